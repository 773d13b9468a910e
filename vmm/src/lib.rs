//! katalite's virtual machine monitor: boots a Linux `vmlinux` with an initramfs on KVM,
//! with an 8250 serial console, virtio-mmio devices (rng, console) and a status port through
//! which the guest reports how it ended. It knows nothing about containers or images.

pub mod bus;
pub mod devices;
pub mod layout;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};

/// Guest memory as every module of this crate sees it.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;
