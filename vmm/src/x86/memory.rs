//! Guest RAM: which guest-physical ranges are RAM around the device gap below 4 GiB, the
//! anonymous mappings that back them, and the e820-style map the kernel is given (the same
//! entries feed the Linux zero page and the PVH memmap).

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::layout::{EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START};
use crate::GuestMemory;

/// Errors while creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host could not map the requested RAM.
    #[error("cannot map guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    /// The size does not fit this host's address space.
    #[error("guest memory size {0:#x} does not fit the host address space")]
    TooLarge(u64),
}

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

/// Maps `size` bytes of guest RAM. vm-memory maps anonymous memory with MAP_NORESERVE, so
/// pages the guest never touches cost the host nothing.
pub fn create(size: u64) -> Result<GuestMemory, MemoryError> {
    let ranges = ram_ranges(size)
        .into_iter()
        .map(|(start, len)| {
            usize::try_from(len)
                .map(|len| (GuestAddress(start), len))
                .map_err(|_| MemoryError::TooLarge(size))
        })
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemoryMmap::from_ranges(&ranges).map_err(MemoryError::Map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

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
        let mem = create(64 * MIB).expect("map 64 MiB");
        assert_eq!(mem.num_regions(), 1);
        let region = mem.iter().next().expect("one region");
        assert_eq!(region.start_addr(), GuestAddress(0));
        assert_eq!(region.len(), 64 * MIB);
    }
}
