//! From image to initramfs or disk: OCI references and registry pulls, local image
//! sources, the content-addressed cache, and the packing of layers (or a host directory)
//! into the compressed newc cpio the Linux kernel unpacks, or of layers into an EROFS
//! image with a per-block SHA-256 list. Never sees KVM.

pub mod config;
pub mod cpio;
pub mod digest;
pub mod disk;
pub mod erofs;
pub mod image;
pub mod layers;
pub mod limits;
pub mod manifest;
pub mod pack;
pub mod progress;
pub mod reference;
pub mod registry;
pub mod rootfs_dir;
pub mod source;
pub mod store;
pub mod tls_roots;

pub use cpio::{CpioError, CpioWriter, Entry, EntryKind};
pub use disk::{disk_image, DiskError, DiskImage, DiskOptions};
pub use erofs::{write_erofs, ErofsError, ErofsStats};
pub use rootfs_dir::{pack_dir, PackError};
