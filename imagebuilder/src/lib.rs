//! Packs root filesystems into newc cpio archives the Linux kernel unpacks as its
//! initramfs. Never sees KVM: its output is bytes the VMM places in guest memory.

pub mod cpio;
pub mod image;
pub mod layers;
pub mod limits;
pub mod pack;
pub mod rootfs_dir;
pub mod config;
pub mod digest;
pub mod reference;
pub mod manifest;
pub mod progress;
pub mod registry;
pub mod source;
pub mod store;
pub mod tls_roots;

pub use cpio::{CpioError, CpioWriter, Entry, EntryKind};
pub use rootfs_dir::{pack_dir, PackError};
