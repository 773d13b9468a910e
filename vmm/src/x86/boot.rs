//! Puts a Linux guest into memory: the kernel at its physical addresses (a packed kernel
//! decompressed there, or a vmlinux ELF copied there), the initramfs parts at the top of low
//! RAM, the command line, and the boot information of the protocol the kernel supports (PVH
//! for a packed kernel or an ELF with the PHYS32_ENTRY note, else the 64-bit boot protocol of
//! Documentation/arch/x86/boot.rst).

use std::io::Cursor;
use std::path::Path;

use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress};

use super::initramfs::{self, InitramfsPart};
use super::memory::{self, E820Entry};
use super::packed_kernel::{self, PackedKernelError};
use super::regs::{BootMode, EntryPoint};
use super::{pvh, zeropage};
use crate::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START};
use crate::GuestMemory;

/// Errors while loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel image is not a loadable vmlinux or does not fit.
    #[error("cannot load the kernel image")]
    Kernel(#[source] linux_loader::loader::Error),
    /// The packed kernel is corrupt or does not fit.
    #[error("cannot load the packed kernel")]
    PackedKernel(#[source] PackedKernelError),
    /// The command line (with its NUL) exceeds what the kernel accepts.
    #[error("kernel command line is {len} bytes, the limit is {max}")]
    CmdlineTooLong {
        /// Length including the terminating NUL.
        len: usize,
        /// COMMAND_LINE_SIZE.
        max: usize,
    },
    /// The command line contains a NUL byte.
    #[error("kernel command line contains a nul byte")]
    CmdlineNul,
    /// The initramfs does not fit between the kernel and the top of usable low RAM.
    #[error("initramfs of {size} bytes does not fit in guest memory ({room} bytes free)")]
    InitramfsTooLarge {
        /// Total (padded) initramfs size.
        size: u64,
        /// Room between the kernel's end and the highest usable address.
        room: u64,
    },
    /// An initramfs file could not be read.
    #[error("cannot read the initramfs")]
    InitramfsRead(#[source] std::io::Error),
    /// A boot structure could not be written.
    #[error("cannot write the {what} into guest memory")]
    Write {
        /// Which structure.
        what: &'static str,
        /// What vm-memory said.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Highest address an initramfs byte may occupy when the kernel's setup header (and its
/// `initrd_addr_max`) is unknown, as for a vmlinux: the protocol's historic default.
pub const INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
const PAGE_SIZE: u64 = 0x1000;

/// What to boot.
#[derive(Debug)]
pub struct LinuxImage<'a> {
    /// A packed kernel ([`packed_kernel`]) or an uncompressed vmlinux ELF, told apart by
    /// their magic.
    pub kernel: &'a [u8],
    /// For a packed kernel: the file its segments are kept unpacked in and mapped from
    /// ([`packed_kernel::load_mapped`]); `None`: decompressed at every boot.
    pub kernel_cache: Option<&'a Path>,
    /// Initramfs parts, placed back to back, each padded to 4 bytes; dropped by the load.
    pub initramfs: Vec<InitramfsPart>,
    /// The full command line.
    pub cmdline: &'a str,
}

/// Where the initramfs landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Initrd {
    /// Guest-physical start (page aligned).
    pub addr: u64,
    /// Size in bytes, padding included.
    pub size: u64,
}

/// Everything a boot protocol writer needs to describe the guest to the kernel.
#[derive(Debug, Clone)]
pub struct BootInfo {
    /// Command line length without the NUL.
    pub cmdline_len: usize,
    /// The initramfs, if any.
    pub initrd: Option<Initrd>,
    /// RAM map.
    pub e820: Vec<E820Entry>,
}

/// Checks the command line against COMMAND_LINE_SIZE (which counts the NUL).
pub fn check_cmdline(cmdline: &str) -> Result<(), BootError> {
    if cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    let len = cmdline.len() + 1;
    if len > CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong {
            len,
            max: CMDLINE_MAX_SIZE,
        });
    }
    Ok(())
}

/// Picks the initramfs address: as high as possible in low RAM, page aligned, entirely
/// below [`INITRD_ADDR_MAX`] and above the kernel.
pub fn initrd_addr(size: u64, kernel_end: u64, low_ram_end: u64) -> Result<u64, BootError> {
    let top = low_ram_end.min(INITRD_ADDR_MAX + 1);
    let bottom = kernel_end.next_multiple_of(PAGE_SIZE);
    let room = top.saturating_sub(bottom);
    top.checked_sub(size)
        .map(|addr| addr & !(PAGE_SIZE - 1))
        .filter(|addr| *addr >= bottom)
        .ok_or(BootError::InitramfsTooLarge { size, room })
}

/// Where a kernel was put and how it is entered.
struct LoadedKernel {
    /// First byte past its memory image.
    end: u64,
    /// Its entry point.
    entry: EntryPoint,
}

/// Puts the kernel of `image` into `mem`: a packed kernel is decompressed into place and
/// always entered through PVH; an ELF is copied by linux-loader and entered through its PVH
/// note when it has one.
fn load_kernel(
    mem: &GuestMemory,
    kernel: &[u8],
    cache: Option<&Path>,
) -> Result<LoadedKernel, BootError> {
    if packed_kernel::is_packed(kernel) {
        let loaded = match cache {
            Some(cache) => packed_kernel::load_mapped(mem, kernel, cache),
            None => packed_kernel::load(mem, kernel),
        }
        .map_err(BootError::PackedKernel)?;
        return Ok(LoadedKernel {
            end: loaded.kernel_end,
            entry: EntryPoint {
                mode: BootMode::Pvh,
                addr: loaded.entry,
            },
        });
    }
    let loaded = Elf::load(
        mem,
        None,
        &mut Cursor::new(kernel),
        Some(GuestAddress(HIMEM_START)),
    )
    .map_err(BootError::Kernel)?;
    let entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => EntryPoint {
            mode: BootMode::Pvh,
            addr: entry.0,
        },
        PvhBootCapability::PvhEntryNotPresent | PvhBootCapability::PvhEntryIgnored => EntryPoint {
            mode: BootMode::Linux64,
            addr: loaded.kernel_load.0,
        },
    };
    Ok(LoadedKernel {
        end: loaded.kernel_end,
        entry,
    })
}

/// Loads `image` into `mem` (of `mem_size` bytes of RAM) and returns where the boot vCPU
/// starts.
pub fn load(
    mem: &GuestMemory,
    mem_size: u64,
    image: LinuxImage<'_>,
) -> Result<EntryPoint, BootError> {
    check_cmdline(image.cmdline)?;
    let kernel = load_kernel(mem, image.kernel, image.kernel_cache)?;
    let initrd = initramfs::write(
        mem,
        image.initramfs,
        kernel.end,
        memory::low_ram_end(mem_size),
    )?;
    let mut cmdline = image.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    mem.write_slice(&cmdline, GuestAddress(CMDLINE_START))
        .map_err(|source| BootError::Write {
            what: "command line",
            source,
        })?;

    let info = BootInfo {
        cmdline_len: image.cmdline.len(),
        initrd,
        e820: memory::e820_map(mem_size),
    };
    if kernel.entry.mode == BootMode::Pvh {
        pvh::write(mem, &info)?;
    } else {
        zeropage::write(mem, &info)?;
    }
    Ok(kernel.entry)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use linux_loader::loader::bootparam::boot_params;
    use linux_loader::loader::elf::start_info::hvm_start_info;
    use vm_memory::GuestMemoryMmap;

    use crate::layout::{PVH_INFO_START, ZERO_PAGE_START};

    const MIB: u64 = 1 << 20;

    /// A minimal x86-64 vmlinux: one PT_LOAD of `code` at 16 MiB (entry there), plus a
    /// PT_NOTE carrying Xen's PHYS32_ENTRY note when `pvh_entry` is set.
    pub(crate) fn tiny_vmlinux(code: &[u8], pvh_entry: Option<u32>) -> Vec<u8> {
        const LOAD: u64 = 0x100_0000;
        let phnum: u16 = if pvh_entry.is_some() { 2 } else { 1 };
        let data_off = 64 + 56 * u64::from(phnum);
        let mut note = Vec::new();
        if let Some(entry) = pvh_entry {
            note.extend_from_slice(&4u32.to_le_bytes()); // namesz "Xen\0"
            note.extend_from_slice(&4u32.to_le_bytes()); // descsz
            note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
            note.extend_from_slice(b"Xen\0");
            note.extend_from_slice(&entry.to_le_bytes());
        }
        let mut elf = Vec::new();
        elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        elf.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        elf.extend_from_slice(&1u32.to_le_bytes());
        elf.extend_from_slice(&LOAD.to_le_bytes()); // e_entry
        elf.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
        elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
        elf.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
        elf.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
        elf.extend_from_slice(&phnum.to_le_bytes());
        elf.extend_from_slice(&[0; 6]); // shentsize, shnum, shstrndx
        let mut phdr = |kind: u32, offset: u64, addr: u64, size: u64, memsz: u64| {
            elf.extend_from_slice(&kind.to_le_bytes());
            elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
            for value in [offset, addr, addr, size, memsz, 0x1000] {
                elf.extend_from_slice(&value.to_le_bytes());
            }
        };
        let code_len = code.len() as u64;
        // The kernel's memory image is larger than its file image (BSS).
        phdr(1, data_off, LOAD, code_len, code_len + 0x20_0000);
        if pvh_entry.is_some() {
            phdr(
                4,
                data_off + code_len,
                0,
                note.len() as u64,
                note.len() as u64,
            );
        }
        elf.extend_from_slice(code);
        elf.extend_from_slice(&note);
        elf
    }

    fn memory(size: u64) -> GuestMemory {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), usize::try_from(size).expect("size"))])
            .expect("memory")
    }

    #[test]
    fn cmdline_limit_counts_the_nul() {
        let max = "x".repeat(CMDLINE_MAX_SIZE - 1);
        assert!(check_cmdline(&max).is_ok());
        let over = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            check_cmdline(&over),
            Err(BootError::CmdlineTooLong {
                len: 2049,
                max: 2048
            })
        ));
        assert!(matches!(check_cmdline("a\0b"), Err(BootError::CmdlineNul)));
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram_page_aligned() {
        let addr = initrd_addr(0x1234, 32 * MIB, 64 * MIB).expect("fits");
        assert_eq!(addr, 64 * MIB - 0x2000);
        assert_eq!(addr % PAGE_SIZE, 0);
    }

    #[test]
    fn initrd_stays_below_the_default_initrd_addr_max() {
        let addr = initrd_addr(MIB, 32 * MIB, 2048 * MIB).expect("fits");
        assert!(addr + MIB <= INITRD_ADDR_MAX + 1);
        assert_eq!(addr, INITRD_ADDR_MAX + 1 - MIB);
    }

    #[test]
    fn initrd_never_overlaps_the_kernel() {
        // 30 MiB free between a kernel ending at 34 MiB and 64 MiB of RAM.
        assert!(initrd_addr(30 * MIB, 34 * MIB, 64 * MIB).is_ok());
        assert!(matches!(
            initrd_addr(30 * MIB + 1, 34 * MIB, 64 * MIB),
            Err(BootError::InitramfsTooLarge { room, .. }) if room == 30 * MIB
        ));
        assert!(initrd_addr(u64::MAX, 0, 64 * MIB).is_err());
    }

    #[test]
    fn linux64_boot_writes_zero_page_cmdline_and_initramfs() {
        let mem = memory(64 * MIB);
        let kernel = tiny_vmlinux(&[0xf4], None);
        let parts = vec![b"abcde".to_vec().into(), b"xyz".to_vec().into()];
        let image = LinuxImage {
            kernel: &kernel,
            kernel_cache: None,
            initramfs: parts,
            cmdline: "console=ttyS0",
        };
        let entry = load(&mem, 64 * MIB, image).expect("load");
        assert_eq!(
            entry,
            EntryPoint {
                mode: BootMode::Linux64,
                addr: 0x100_0000
            }
        );
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x100_0000)).expect("read"),
            0xf4
        );

        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).expect("read");
        let (image_addr, size) = (params.hdr.ramdisk_image, params.hdr.ramdisk_size);
        assert_eq!(size, 12, "two parts, each padded to 4 bytes");
        let mut initrd = [0u8; 12];
        mem.read_slice(&mut initrd, GuestAddress(u64::from(image_addr)))
            .expect("read");
        assert_eq!(&initrd, b"abcde\0\0\0xyz\0");
        let mut cmdline = [0u8; 14];
        mem.read_slice(&mut cmdline, GuestAddress(CMDLINE_START))
            .expect("read");
        assert_eq!(&cmdline, b"console=ttyS0\0");
    }

    #[test]
    fn a_pvh_note_selects_the_pvh_entry() {
        let mem = memory(64 * MIB);
        let kernel = tiny_vmlinux(&[0xf4; 16], Some(0x100_0008));
        let image = LinuxImage {
            kernel: &kernel,
            kernel_cache: None,
            initramfs: Vec::new(),
            cmdline: "quiet",
        };
        let entry = load(&mem, 64 * MIB, image).expect("load");
        assert_eq!(
            entry,
            EntryPoint {
                mode: BootMode::Pvh,
                addr: 0x100_0008
            }
        );
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).expect("read");
        assert_eq!(info.nr_modules, 0, "no initramfs, no module");
        assert_eq!(info.cmdline_paddr, CMDLINE_START);
    }

    #[test]
    fn a_packed_kernel_is_decompressed_and_entered_through_pvh() {
        let mem = memory(64 * MIB);
        let elf = tiny_vmlinux(&[0xf4; 16], Some(0x100_0008));
        let kernel = packed_kernel::pack(&elf).expect("pack");
        let image = LinuxImage {
            kernel: &kernel,
            kernel_cache: None,
            initramfs: vec![b"initramfs".to_vec().into()],
            cmdline: "quiet",
        };
        let entry = load(&mem, 64 * MIB, image).expect("load");
        assert_eq!(
            entry,
            EntryPoint {
                mode: BootMode::Pvh,
                addr: 0x100_0008
            }
        );
        let mut code = [0u8; 16];
        mem.read_slice(&mut code, GuestAddress(0x100_0000))
            .expect("read");
        assert_eq!(code, [0xf4; 16]);
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).expect("read");
        assert_eq!(info.nr_modules, 1, "the initramfs");
    }

    #[test]
    fn a_corrupt_packed_kernel_is_rejected() {
        let mem = memory(64 * MIB);
        let elf = tiny_vmlinux(&[0xf4; 16], Some(0x100_0008));
        let mut kernel = packed_kernel::pack(&elf).expect("pack");
        kernel.truncate(kernel.len() - 1);
        let image = LinuxImage {
            kernel: &kernel,
            kernel_cache: None,
            initramfs: Vec::new(),
            cmdline: "",
        };
        assert!(matches!(
            load(&mem, 64 * MIB, image),
            Err(BootError::PackedKernel(_))
        ));
    }

    #[test]
    fn a_non_elf_kernel_is_rejected() {
        let mem = memory(64 * MIB);
        let image = LinuxImage {
            kernel: b"MZ not an elf at all, sorry.................................................",
            kernel_cache: None,
            initramfs: Vec::new(),
            cmdline: "",
        };
        assert!(matches!(
            load(&mem, 64 * MIB, image),
            Err(BootError::Kernel(_))
        ));
    }

    #[test]
    fn an_initramfs_too_big_for_memory_is_rejected() {
        let mem = memory(64 * MIB);
        let kernel = tiny_vmlinux(&[0xf4], None);
        let big = vec![0u8; usize::try_from(60 * MIB).expect("size")];
        let image = LinuxImage {
            kernel: &kernel,
            kernel_cache: None,
            initramfs: vec![big.into()],
            cmdline: "",
        };
        assert!(matches!(
            load(&mem, 64 * MIB, image),
            Err(BootError::InitramfsTooLarge { .. })
        ));
    }
}
