//! Guest RAM: which guest-physical ranges are RAM around the device gap below 4 GiB, the
//! anonymous mappings that back them, and the e820-style map the kernel is given (the same
//! entries feed the Linux zero page and the PVH memmap).
//!
//! The mappings start on a 2 MiB boundary and ask for transparent huge pages: KVM maps guest
//! memory with 2 MiB entries only where the host address and the guest-physical address agree
//! modulo 2 MiB and a huge page backs it. Otherwise each 4 KiB page the guest touches is a
//! nested page fault of its own: about 9000 exits in a busybox boot, where QEMU (which
//! aligns its RAM the same way) takes under 300 for its RAM.

use std::io;
use std::ptr::NonNull;

use vm_memory::mmap::{FromRangesError, MmapRegionBuilder};
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::layout::{EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START};
use crate::GuestMemory;

/// Errors while creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host could not map the requested RAM.
    #[error("cannot map guest memory")]
    Map(#[source] FromRangesError),
    /// The size does not fit this host's address space.
    #[error("guest memory size {0:#x} does not fit the host address space")]
    TooLarge(u64),
    /// The host refused the anonymous mapping.
    #[error("cannot map {size:#x} bytes of guest memory")]
    Mmap {
        /// Bytes asked for.
        size: usize,
        /// What mmap said.
        #[source]
        source: io::Error,
    },
}

/// The alignment guest RAM is mapped at: an x86 huge page.
const HUGE_PAGE: usize = 2 << 20;

/// e820 type of usable RAM (the only type the guest is told about).
pub const E820_RAM: u32 = 1;

/// One entry of the memory map handed to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Guest-physical start.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// e820 type ([`E820_RAM`]).
    pub kind: u32,
}

/// End (exclusive) of the RAM below the device gap.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_GAP_START)
}

/// The guest-physical RAM ranges for `size` bytes: everything below the gap, the rest from
/// 4 GiB up.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    let low = low_ram_end(size);
    let mut ranges = vec![(0, low)];
    if size > low {
        ranges.push((MMIO_GAP_END, size - low));
    }
    ranges
}

/// The memory map the guest sees. The hole between the EBDA and 1 MiB stays out of it, as
/// on a PC (it holds the MP table; Linux treats it as reserved).
pub fn e820_map(size: u64) -> Vec<E820Entry> {
    let ram = |addr, end: u64| E820Entry {
        addr,
        size: end - addr,
        kind: E820_RAM,
    };
    let mut map = vec![ram(0, EBDA_START), ram(HIMEM_START, low_ram_end(size))];
    if size > MMIO_GAP_START {
        map.push(ram(MMIO_GAP_END, MMIO_GAP_END + size - MMIO_GAP_START));
    }
    map
}

/// The host mappings behind guest RAM; dropping it unmaps them. [`GuestMemory`] only borrows
/// them (vm-memory cannot map at an alignment of our choosing), so whoever holds this must
/// drop it after every user of the memory: the VM's threads, its devices, its KVM slots.
#[derive(Debug)]
pub struct RamMappings {
    maps: Vec<(NonNull<u8>, usize)>,
}

// SAFETY: the struct only records mappings to unmap; the pointers are never dereferenced
// through it, so moving or sharing it between threads is sound.
unsafe impl Send for RamMappings {}
// SAFETY: as above: `&RamMappings` gives no access to the memory.
unsafe impl Sync for RamMappings {}

impl Drop for RamMappings {
    fn drop(&mut self) {
        for &(addr, len) in &self.maps {
            // SAFETY: `addr..addr + len` is a mapping `map_aligned` made and nothing else
            // unmapped; its owner guarantees no user of it is left (see the type's doc).
            unsafe { libc::munmap(addr.as_ptr().cast(), len) };
        }
    }
}

/// Maps `len` bytes of private anonymous memory (MAP_NORESERVE: untouched pages cost the host
/// nothing) starting on a [`HUGE_PAGE`] boundary, with transparent huge pages asked for. The
/// advice is best effort: a host with THP off still gets working memory.
fn map_aligned(len: usize) -> Result<NonNull<u8>, MemoryError> {
    let fail = |source| MemoryError::Mmap { size: len, source };
    let padded = len
        .checked_add(HUGE_PAGE)
        .ok_or_else(|| fail(io::Error::from_raw_os_error(libc::ENOMEM)))?;
    // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing: nothing
    // existing is touched.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            padded,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(fail(io::Error::last_os_error()));
    }
    let base = base.cast::<u8>();
    let head = (HUGE_PAGE - base as usize % HUGE_PAGE) % HUGE_PAGE;
    // SAFETY: `head < HUGE_PAGE`, so `base + head .. base + head + len` lies in the padded
    // mapping; the trimmed head and tail are parts of that same fresh mapping, unused.
    let start = unsafe {
        let start = base.add(head);
        if head > 0 {
            libc::munmap(base.cast(), head);
        }
        let tail = padded - head - len;
        if tail > 0 {
            libc::munmap(start.add(len).cast(), tail);
        }
        libc::madvise(start.cast(), len, libc::MADV_HUGEPAGE);
        start
    };
    NonNull::new(start).ok_or_else(|| fail(io::Error::from_raw_os_error(libc::EFAULT)))
}

/// Maps `size` bytes of guest RAM, each range 2 MiB-aligned (see the module's doc).
pub fn create(size: u64) -> Result<(GuestMemory, RamMappings), MemoryError> {
    let mut ram = RamMappings { maps: Vec::new() };
    let mut regions = Vec::new();
    for (start, len) in ram_ranges(size) {
        let len = usize::try_from(len).map_err(|_| MemoryError::TooLarge(size))?;
        let addr = map_aligned(len)?;
        ram.maps.push((addr, len));
        // SAFETY: `addr..addr + len` is the mapping just made, which `ram` keeps until its
        // owner drops it after the memory's last user.
        let region = unsafe {
            MmapRegionBuilder::new(len)
                .with_raw_mmap_pointer(addr.as_ptr())
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
                .build()
        }
        .map_err(|err| MemoryError::Map(err.into()))?;
        let region = GuestRegionMmap::new(region, GuestAddress(start))
            .ok_or(MemoryError::Map(FromRangesError::InvalidGuestRegion))?;
        regions.push(region);
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(|err| MemoryError::Map(err.into()))?;
    Ok((mem, ram))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn small_memory_is_one_low_range() {
        assert_eq!(ram_ranges(512 * MIB), vec![(0, 512 * MIB)]);
        let map = e820_map(512 * MIB);
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: EBDA_START,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: HIMEM_START,
                    size: 512 * MIB - HIMEM_START,
                    kind: E820_RAM
                },
            ]
        );
    }

    #[test]
    fn memory_above_the_gap_moves_past_4g() {
        let size = 4 * GIB;
        assert_eq!(
            ram_ranges(size),
            vec![(0, MMIO_GAP_START), (MMIO_GAP_END, size - MMIO_GAP_START)]
        );
        let map = e820_map(size);
        assert_eq!(map.len(), 3);
        assert_eq!(map[1].addr + map[1].size, MMIO_GAP_START);
        assert_eq!(map[2].addr, 4 * GIB);
        assert_eq!(map[2].size, GIB);
        // RAM told to the guest never overlaps the device gap.
        for entry in &map {
            let end = entry.addr + entry.size;
            assert!(end <= MMIO_GAP_START || entry.addr >= MMIO_GAP_END);
        }
    }

    #[test]
    fn exactly_the_gap_start_needs_no_high_range() {
        assert_eq!(ram_ranges(MMIO_GAP_START).len(), 1);
        assert_eq!(e820_map(MMIO_GAP_START).len(), 2);
    }

    #[test]
    fn created_memory_matches_the_ranges() {
        let (mem, _ram) = create(64 * MIB).expect("map 64 MiB");
        assert_eq!(mem.num_regions(), 1);
        let region = mem.iter().next().expect("one region");
        assert_eq!(region.start_addr(), GuestAddress(0));
        assert_eq!(region.len(), 64 * MIB);
    }

    #[test]
    fn created_memory_is_huge_page_aligned_zeroed_and_writable() {
        let (mem, ram) = create(4 * GIB + 6 * MIB).expect("map above the gap");
        assert_eq!(mem.num_regions(), 2);
        for region in mem.iter() {
            let host = region.as_ptr() as usize;
            assert_eq!(host % HUGE_PAGE, 0, "region at {:?}", region.start_addr());
        }
        let last = GuestAddress(4 * GIB + 6 * MIB - 8);
        assert_eq!(mem.read_obj::<u64>(last).expect("read"), 0);
        mem.write_obj(0x1234_5678_u64, last).expect("write");
        assert_eq!(mem.read_obj::<u64>(last).expect("read"), 0x1234_5678);
        assert_eq!(ram.maps.len(), 2);
    }
}
