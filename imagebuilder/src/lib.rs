//! Packs root filesystems into newc cpio archives the Linux kernel unpacks as its initramfs.
