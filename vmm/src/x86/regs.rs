//! Boot CPU state for each entry protocol: the flat GDT, segment registers, control
//! registers, identity page tables (64-bit boot) and general registers, as
//! Documentation/arch/x86/boot.rst ("64-bit boot protocol") and the PVH ABI
//! (xen/include/public/arch-x86/hvm/start_info.h) require.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    PVH_INFO_START, ZERO_PAGE_START,
};
use crate::GuestMemory;

/// Errors while writing boot CPU structures into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Guest memory does not cover a boot structure (GDT, IDT or page tables).
    #[error("cannot write the boot {what} at {addr:#x}")]
    Write {
        /// Which structure.
        what: &'static str,
        /// Where it goes.
        addr: u64,
        /// What vm-memory said.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// How the boot vCPU enters the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootMode {
    /// Linux 64-bit boot protocol: long mode, paging on, `rsi` = zero page.
    Linux64,
    /// PVH: 32-bit protected mode, paging off, `rbx` = `hvm_start_info`.
    Pvh,
    /// Real mode with CS = 0 (hand-written test guests).
    RealMode,
}

/// Where and how the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryPoint {
    /// Entry protocol.
    pub mode: BootMode,
    /// Guest-physical address of the first instruction.
    pub addr: u64,
}

const X86_CR0_PE: u64 = 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Bit 1 of RFLAGS is reserved and always set.
const RFLAGS_RESERVED: u64 = 1 << 1;

/// Packs a GDT descriptor; `flags` holds the access byte (bits 0-7) and the G/D/L/AVL
/// nibble (bits 12-15), as in the Intel SDM vol. 3 §3.4.5 layout.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    let flags = u64::from(flags);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The KVM view of GDT descriptor `entry` loaded through selector `index * 8`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let g = bit(55);
    let raw_limit = ((entry >> 32) & 0x000f_0000) | (entry & 0xffff);
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = bit(47);
    kvm_segment {
        base: ((entry >> 32) & 0xff00_0000) | ((entry >> 16) & 0x00ff_ffff),
        limit: u32::try_from(limit).unwrap_or(u32::MAX),
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// The GDT for `mode`: null, code, data, TSS.
fn gdt_for(mode: BootMode) -> [u64; 4] {
    match mode {
        // PVH ABI: 32-bit flat code and data, a 32-bit busy TSS of 0x67 bytes.
        BootMode::Pvh | BootMode::RealMode => [
            0,
            gdt_entry(0xc09b, 0, 0xffff_ffff),
            gdt_entry(0xc093, 0, 0xffff_ffff),
            gdt_entry(0x008b, 0, 0x67),
        ],
        // 64-bit protocol: a long-mode (L=1) code segment, flat data.
        BootMode::Linux64 => [
            0,
            gdt_entry(0xa09b, 0, 0xfffff),
            gdt_entry(0xc093, 0, 0xfffff),
            gdt_entry(0x808b, 0, 0xfffff),
        ],
    }
}

fn write_u64(
    mem: &GuestMemory,
    what: &'static str,
    addr: u64,
    value: u64,
) -> Result<(), RegsError> {
    mem.write_obj(value, GuestAddress(addr))
        .map_err(|source| RegsError::Write { what, addr, source })
}

/// Identity-maps the first 1 GiB with 2 MiB pages: enough for the kernel, the zero page and
/// the command line until Linux builds its own tables in startup_64.
fn write_page_tables(mem: &GuestMemory) -> Result<(), RegsError> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    write_u64(mem, "PML4", PML4_START, PDPTE_START | PRESENT_RW)?;
    write_u64(mem, "PDPTE", PDPTE_START, PDE_START | PRESENT_RW)?;
    for i in 0..512u64 {
        let entry = (i << 21) | PAGE_SIZE_2M | PRESENT_RW;
        write_u64(mem, "PDE", PDE_START + i * 8, entry)?;
    }
    Ok(())
}

/// Special registers for the boot vCPU, starting from KVM's reset state `sregs`. Writes the
/// GDT, an empty IDT and (64-bit boot) the page tables into guest memory.
pub fn boot_sregs(
    mem: &GuestMemory,
    mut sregs: kvm_sregs,
    mode: BootMode,
) -> Result<kvm_sregs, RegsError> {
    if mode == BootMode::RealMode {
        // Reset state runs at CS:IP = f000:fff0 with base 0xffff0000; test guests run at
        // a low address with every segment based at 0.
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        return Ok(sregs);
    }
    let gdt = gdt_for(mode);
    for (i, entry) in (0u64..).zip(gdt) {
        write_u64(mem, "GDT", BOOT_GDT_START + i * 8, entry)?;
    }
    // An empty IDT: an exception before Linux installs its own must not jump anywhere.
    write_u64(mem, "IDT", BOOT_IDT_START, 0)?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = 4 * 8 - 1;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;

    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[3], 3);

    match mode {
        BootMode::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
        }
        BootMode::Linux64 => {
            write_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        BootMode::RealMode => {}
    }
    Ok(sregs)
}

/// General registers for the boot vCPU.
pub fn boot_regs(entry: EntryPoint) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        rip: entry.addr,
        ..Default::default()
    };
    match entry.mode {
        BootMode::Linux64 => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        BootMode::Pvh => regs.rbx = PVH_INFO_START,
        BootMode::RealMode => regs.rsp = BOOT_STACK_POINTER,
    }
    regs
}

/// FPU state every vCPU starts with: the x87 control word and MXCSR values FNINIT and
/// reset define (all exceptions masked).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn memory() -> GuestMemory {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("memory")
    }

    fn read(mem: &GuestMemory, addr: u64) -> u64 {
        mem.read_obj(GuestAddress(addr)).expect("read")
    }

    #[test]
    fn gdt_entries_encode_like_the_sdm() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0x008b, 0, 0x67), 0x0000_8b00_0000_0067);
        assert_eq!(gdt_entry(0x0093, 0x1234_5678, 0), 0x1200_9334_5678_0000);
    }

    #[test]
    fn segments_decode_granularity_and_long_mode() {
        let code = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!((code.selector, code.l, code.db, code.g), (8, 1, 0, 1));
        assert_eq!(code.limit, 0xffff_ffff);
        assert_eq!(
            (code.type_, code.present, code.s, code.unusable),
            (0xb, 1, 1, 0)
        );
        let tss = segment_from_gdt(gdt_entry(0x008b, 0, 0x67), 3);
        assert_eq!((tss.limit, tss.g, tss.s, tss.type_), (0x67, 0, 0, 0xb));
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn linux64_enters_long_mode_with_identity_tables() {
        let mem = memory();
        let sregs = boot_sregs(&mem, kvm_sregs::default(), BootMode::Linux64).expect("sregs");
        assert_eq!(
            sregs.cr0 & (X86_CR0_PE | X86_CR0_PG),
            X86_CR0_PE | X86_CR0_PG
        );
        assert_ne!(sregs.cr4 & X86_CR4_PAE, 0);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cr3, PML4_START);
        assert_eq!(
            (sregs.cs.l, sregs.ds.selector, sregs.tr.selector),
            (1, 0x10, 0x18)
        );
        assert_eq!(read(&mem, BOOT_GDT_START + 8), 0x00af_9b00_0000_ffff);
        assert_eq!(read(&mem, PML4_START), PDPTE_START | 3);
        assert_eq!(read(&mem, PDPTE_START), PDE_START | 3);
        assert_eq!(read(&mem, PDE_START), 0x83);
        assert_eq!(read(&mem, PDE_START + 511 * 8), (511 << 21) | 0x83);
    }

    #[test]
    fn pvh_enters_flat_protected_mode_without_paging() {
        let mem = memory();
        let reset = kvm_sregs {
            cr0: 0x6000_0010,
            cr4: 0x20,
            ..Default::default()
        };
        let sregs = boot_sregs(&mem, reset, BootMode::Pvh).expect("sregs");
        assert_eq!(sregs.cr0, X86_CR0_PE | X86_CR0_ET);
        assert_eq!(sregs.cr4, 0);
        assert_eq!(sregs.efer & EFER_LME, 0);
        assert_eq!(
            (sregs.cs.db, sregs.cs.l, sregs.cs.limit),
            (1, 0, 0xffff_ffff)
        );
        assert_eq!(sregs.tr.limit, 0x67);
        // No page tables written for PVH.
        assert_eq!(read(&mem, PML4_START), 0);
        let regs = boot_regs(EntryPoint {
            mode: BootMode::Pvh,
            addr: 0x100_0000,
        });
        assert_eq!(
            (regs.rbx, regs.rip, regs.rflags),
            (PVH_INFO_START, 0x100_0000, 2)
        );
    }

    #[test]
    fn linux64_regs_point_at_the_zero_page() {
        let regs = boot_regs(EntryPoint {
            mode: BootMode::Linux64,
            addr: 0x100_0000,
        });
        assert_eq!(
            (regs.rsi, regs.rsp, regs.rip),
            (ZERO_PAGE_START, BOOT_STACK_POINTER, 0x100_0000)
        );
    }

    #[test]
    fn real_mode_clears_the_reset_code_base() {
        let reset = kvm_sregs {
            cs: kvm_segment {
                base: 0xffff_0000,
                selector: 0xf000,
                ..Default::default()
            },
            ..Default::default()
        };
        let sregs = boot_sregs(&memory(), reset, BootMode::RealMode).expect("sregs");
        assert_eq!((sregs.cs.base, sregs.cs.selector), (0, 0));
    }

    #[test]
    fn too_little_memory_is_an_error() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).expect("memory");
        assert!(boot_sregs(&mem, kvm_sregs::default(), BootMode::Linux64).is_err());
    }
}
