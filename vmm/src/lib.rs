//! katalite's virtual machine monitor: boots a Linux `vmlinux` with an initramfs on KVM,
//! with an 8250 serial console, virtio-mmio devices (rng, console with host input, net on
//! a user-mode network or a TAP device, block devices on host files, optionally verified
//! block by block) and a status port through which the guest reports
//! how it ended; the caller may end it early.
//! It knows nothing about containers or images.

pub mod bus;
pub mod confine;
pub mod devices;
pub mod host;
mod host_writer;
pub mod layout;
pub mod net;
mod vcpu;
pub mod virtio;
mod vm;
mod x86;

pub use bus::{Bus, BusDevice, BusError};
pub use devices::stop::VmStopper;
pub use host::{check_kvm, HostError, KvmKind};
pub use net::{NetBackend, NetConfig};
pub use vcpu::VcpuError;
pub use virtio::{
    BlockHashError, BlockHashes, ConsoleInput, CorruptionHook, DiskConfig, DiskError,
    DiskSetupError, FsShareConfig, InputError, ShareSetupError,
};
pub use vm::{
    run, run_raw, RawGuest, VmConfig, VmError, VmExit, BASE_CMDLINE, MAX_MEMORY_MIB, MAX_VCPUS,
    MIN_MEMORY_MIB,
};
// The causes a VmError can carry, so callers can name and match them.
pub use x86::initramfs::InitramfsPart;
pub use x86::{
    boot::BootError, cpuid::CpuidError, memory::MemoryError, mptable::MptableError, msr::MsrError,
    regs::RegsError,
};

/// Stack of every thread katalite starts (vCPUs, device workers, writers, the front end's
/// helpers): a quarter of Rust's 2 MiB default. None of them recurses or keeps large
/// buffers on its stack; their buffers are on the heap, sized by their queues.
pub const THREAD_STACK_BYTES: usize = 512 << 10;
pub use x86::packed_kernel;

/// Guest memory as every module of this crate sees it.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;
