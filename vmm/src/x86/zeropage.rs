//! The Linux 64-bit boot protocol's `boot_params` ("zero page",
//! Documentation/arch/x86/zero-page.rst and boot.rst): the setup header fields a boot
//! loader fills in, the e820 table, and where the command line and initramfs are.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, E820_MAX_ENTRIES_ZEROPAGE};
use vm_memory::{Bytes, GuestAddress};

use super::boot::{BootError, BootInfo};
use crate::layout::{CMDLINE_START, ZERO_PAGE_START};
use crate::GuestMemory;

/// `boot_flag`: the 0xAA55 signature of the setup header.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `header`: "HdrS".
const HDR_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader`: 0xFF, "undefined" boot loader (boot.rst, "type_of_loader").
const LOADER_UNDEFINED: u8 = 0xff;
/// `kernel_alignment` the x86-64 kernel is built for (CONFIG_PHYSICAL_ALIGN default).
const KERNEL_ALIGNMENT: u32 = 0x100_0000;

/// The zero page for `info`.
pub fn build(info: &BootInfo) -> boot_params {
    let mut params = boot_params::default();
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = HDR_MAGIC;
    params.hdr.type_of_loader = LOADER_UNDEFINED;
    params.hdr.kernel_alignment = KERNEL_ALIGNMENT;
    // CMDLINE_START and the initramfs (below INITRD_ADDR_MAX) are both below 4 GiB.
    params.hdr.cmd_line_ptr = u32::try_from(CMDLINE_START).unwrap_or(0);
    params.hdr.cmdline_size = u32::try_from(info.cmdline_len).unwrap_or(0);
    if let Some(initrd) = info.initrd {
        params.hdr.ramdisk_image = u32::try_from(initrd.addr).unwrap_or(0);
        params.hdr.ramdisk_size = u32::try_from(initrd.size).unwrap_or(0);
    }
    let mut count = 0u8;
    for (slot, entry) in params
        .e820_table
        .iter_mut()
        .zip(info.e820.iter().take(E820_MAX_ENTRIES_ZEROPAGE))
    {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind,
        };
        count += 1;
    }
    params.e820_entries = count;
    params
}

/// Writes the zero page at ZERO_PAGE_START; `rsi` of the boot vCPU must point there.
pub fn write(mem: &GuestMemory, info: &BootInfo) -> Result<(), BootError> {
    mem.write_obj(build(info), GuestAddress(ZERO_PAGE_START))
        .map_err(|source| BootError::Write {
            what: "zero page",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86::boot::Initrd;
    use crate::x86::memory::{e820_map, E820_RAM};

    #[test]
    fn zero_page_carries_header_e820_and_initrd() {
        let info = BootInfo {
            cmdline_len: 42,
            initrd: Some(Initrd {
                addr: 0x3000_0000,
                size: 0x1000,
            }),
            e820: e820_map(4 << 30),
        };
        let params = build(&info);
        let hdr = params.hdr;
        assert_eq!(
            (hdr.boot_flag, hdr.header, hdr.type_of_loader),
            (0xaa55, 0x5372_6448, 0xff)
        );
        assert_eq!((hdr.cmd_line_ptr, hdr.cmdline_size), (0x20000, 42));
        assert_eq!((hdr.ramdisk_image, hdr.ramdisk_size), (0x3000_0000, 0x1000));
        assert_eq!(params.e820_entries, 3);
        let table = params.e820_table;
        let high = table[2];
        assert_eq!(
            (high.addr, high.size, high.r#type),
            (1 << 32, 1 << 30, E820_RAM)
        );
        let empty_size = table[3].size;
        assert_eq!(empty_size, 0);
    }

    #[test]
    fn no_initramfs_leaves_the_ramdisk_fields_zero() {
        let info = BootInfo {
            cmdline_len: 0,
            initrd: None,
            e820: e820_map(64 << 20),
        };
        let hdr = build(&info).hdr;
        assert_eq!((hdr.ramdisk_image, hdr.ramdisk_size), (0, 0));
    }
}
