//! The PVH boot information (xen/include/public/arch-x86/hvm/start_info.h, version 1):
//! `hvm_start_info` with the command line, the initramfs as the single module, and the
//! memory map, at the fixed addresses of the layout.

use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use vm_memory::{Bytes, GuestAddress};

use super::boot::{BootError, BootInfo};
use crate::layout::{CMDLINE_START, PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START};
use crate::GuestMemory;

/// Room for memmap entries between PVH_MEMMAP_START and the zero page area.
const MAX_MEMMAP_ENTRIES: usize = 32;

fn write_obj<T: vm_memory::ByteValued>(
    mem: &GuestMemory,
    what: &'static str,
    value: T,
    addr: u64,
) -> Result<(), BootError> {
    mem.write_obj(value, GuestAddress(addr))
        .map_err(|source| BootError::Write { what, source })
}

/// Writes `hvm_start_info`, the module list and the memory map; `rbx` of the boot vCPU
/// must point at PVH_INFO_START.
pub fn write(mem: &GuestMemory, info: &BootInfo) -> Result<(), BootError> {
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        // No ACPI: Linux finds the CPUs through the MP table.
        rsdp_paddr: 0,
        memmap_paddr: PVH_MEMMAP_START,
        ..Default::default()
    };
    if let Some(initrd) = info.initrd {
        let module = hvm_modlist_entry {
            paddr: initrd.addr,
            size: initrd.size,
            ..Default::default()
        };
        write_obj(mem, "pvh module list", module, PVH_MODLIST_START)?;
        start_info.nr_modules = 1;
        start_info.modlist_paddr = PVH_MODLIST_START;
    }
    for (entry, at) in info
        .e820
        .iter()
        .take(MAX_MEMMAP_ENTRIES)
        .zip((PVH_MEMMAP_START..).step_by(std::mem::size_of::<hvm_memmap_table_entry>()))
    {
        let table_entry = hvm_memmap_table_entry {
            addr: entry.addr,
            size: entry.size,
            type_: entry.kind,
            reserved: 0,
        };
        write_obj(mem, "pvh memory map", table_entry, at)?;
    }
    start_info.memmap_entries = u32::try_from(info.e820.len().min(MAX_MEMMAP_ENTRIES)).unwrap_or(0);
    write_obj(mem, "pvh start info", start_info, PVH_INFO_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86::boot::Initrd;
    use crate::x86::memory::{e820_map, E820_RAM};
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn start_info_describes_cmdline_module_and_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("memory");
        let size = 5 << 30;
        let info = BootInfo {
            cmdline_len: 10,
            initrd: Some(Initrd {
                addr: 0x1f00_0000,
                size: 0x4_0000,
            }),
            e820: e820_map(size),
        };
        write(&mem, &info).expect("write");

        let start: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).expect("read");
        assert_eq!(start.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(start.version, 1);
        assert_eq!(start.cmdline_paddr, CMDLINE_START);
        assert_eq!(start.rsdp_paddr, 0);
        assert_eq!(
            (start.nr_modules, start.modlist_paddr),
            (1, PVH_MODLIST_START)
        );
        let module: hvm_modlist_entry =
            mem.read_obj(GuestAddress(PVH_MODLIST_START)).expect("read");
        assert_eq!((module.paddr, module.size), (0x1f00_0000, 0x4_0000));

        assert_eq!(start.memmap_entries, 3);
        assert_eq!(start.memmap_paddr, PVH_MEMMAP_START);
        let entries: Vec<hvm_memmap_table_entry> = (0..3)
            .map(|i| {
                mem.read_obj(GuestAddress(PVH_MEMMAP_START + i * 24))
                    .expect("read")
            })
            .collect();
        let expected = e820_map(size);
        for (got, want) in entries.iter().zip(&expected) {
            assert_eq!(
                (got.addr, got.size, got.type_),
                (want.addr, want.size, E820_RAM)
            );
        }
        assert_eq!(entries[2].addr, 1 << 32);
    }
}
