//! The packed kernel's segments kept unpacked in a cache file and mapped into guest memory
//! copy-on-write. A boot then costs a page fault per kernel page the guest touches instead of
//! decompressing all 8 MB of segments (about 0.4 s of a 2.6 s boot in the lab, where the
//! host itself is emulated), and the page cache holds one copy for every VM on the host.
//!
//! The file holds each segment's file bytes at a page-aligned offset, in table order, zero
//! padded to whole pages; nothing else. Its name carries the source vmlinux's SHA-256 (the
//! caller's choice), so a kernel never meets another's file; its size is checked against the
//! table before anything is mapped. The first boot that finds no file decompresses as
//! [`load`](super::load) does, then writes the file (temporary name, synced, renamed), so a
//! half-written file is never used; VMs starting together may each write one, and the last
//! rename wins with the same bytes. Writing one removes the directory's other `.segments`
//! files (older kernels).

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::{load, Header, Loaded, PackedKernelError, Segment};
use crate::layout::HIMEM_START;
use crate::GuestMemory;

const PAGE: u64 = 4096;
/// [`PAGE`] as a length.
const PAGE_LEN: usize = 4096;

/// Where each segment's bytes start in the cache file, and the file's size; `None` when
/// the segments cannot be mapped (an address not page-aligned, or a segment whose last
/// page would cover the next one).
fn layout(segments: &[Segment]) -> Option<(Vec<u64>, u64)> {
    let mut offsets = Vec::with_capacity(segments.len());
    let mut size = 0u64;
    for (index, segment) in segments.iter().enumerate() {
        if segment.addr % PAGE != 0 {
            return None;
        }
        let mapped = segment.filesz.checked_next_multiple_of(PAGE)?;
        if let Some(next) = segments.get(index + 1) {
            if segment.addr.checked_add(mapped)? > next.addr {
                return None;
            }
        }
        offsets.push(size);
        size = size.checked_add(mapped)?;
    }
    Some((offsets, size))
}

/// Loads the packed kernel `image` into `mem` like [`load`], mapping its segments from the
/// cache file at `cache` when that exists with the right size, else decompressing them and
/// then writing that file for the next boot. Failing to read or write the cache is not an
/// error: the kernel is then decompressed as without one.
pub fn load_mapped(
    mem: &GuestMemory,
    image: &[u8],
    cache: &Path,
) -> Result<Loaded, PackedKernelError> {
    let (header, _) = Header::parse(image)?;
    let Some((offsets, size)) = layout(&header.segments) else {
        return load(mem, image);
    };
    if let Ok(file) = File::open(cache) {
        if file
            .metadata()
            .is_ok_and(|m| m.is_file() && m.len() == size)
            && map_segments(mem, &header, &offsets, &file)?
        {
            return Ok(loaded(&header));
        }
    }
    let loaded = load(mem, image)?;
    // Best effort: the next boot decompresses again if this fails.
    let _ = write_cache(mem, &header, size, cache);
    Ok(loaded)
}

fn loaded(header: &Header) -> Loaded {
    Loaded {
        entry: header.entry,
        kernel_end: header
            .segments
            .last()
            .map_or(HIMEM_START, |last| last.addr + last.memsz),
    }
}

/// Zeroes bytes `from..to` after `start`: the part of segment `index` past its file bytes
/// (`from` is page-aligned). Whole pages are dropped (MADV_DONTNEED) rather than written: guest RAM
/// is private anonymous memory, which reads back as zeros afterwards, so the kernel's BSS
/// costs no page faults and no resident memory until the guest touches it (writing zeros
/// faulted in about 2 MiB per boot). Only a partial last page is written.
fn zero_bss(start: *mut u8, from: usize, to: usize, index: usize) -> Result<(), PackedKernelError> {
    let whole_end = from + (to - from) / PAGE_LEN * PAGE_LEN;
    if whole_end > from {
        // SAFETY: `start + from .. start + whole_end` lies in one segment's slice of guest
        // memory (the caller's `target`), page-aligned, in a private anonymous mapping that
        // lives as long as `mem`; dropping its pages only makes them read as zeros. No
        // other thread touches guest memory yet.
        let dropped = unsafe {
            libc::madvise(
                start.add(from).cast(),
                whole_end - from,
                libc::MADV_DONTNEED,
            )
        };
        if dropped != 0 {
            return Err(PackedKernelError::Map {
                index,
                source: io::Error::last_os_error(),
            });
        }
    }
    if whole_end < to {
        // SAFETY: the bytes from `whole_end` to `to` lie in the same slice, as above.
        let tail = unsafe { std::slice::from_raw_parts_mut(start.add(whole_end), to - whole_end) };
        tail.fill(0);
    }
    Ok(())
}

/// Maps each segment's pages of `file` over guest memory, copy-on-write, and zeroes the
/// rest of its memory size. Returns false, leaving guest memory as it was, when a mapping
/// fails before any was made; a failure after that is an error (the kernel is half there).
fn map_segments(
    mem: &GuestMemory,
    header: &Header,
    offsets: &[u64],
    file: &File,
) -> Result<bool, PackedKernelError> {
    for (index, (segment, &offset)) in header.segments.iter().zip(offsets).enumerate() {
        let outside = || PackedKernelError::OutsideMemory {
            index,
            addr: segment.addr,
            memsz: segment.memsz,
        };
        let len = usize::try_from(segment.memsz).map_err(|_| outside())?;
        // One region only: the range must be contiguous host memory.
        let target = mem
            .get_slice(GuestAddress(segment.addr), len)
            .map_err(|_| outside())?;
        let mapped = usize::try_from(segment.filesz.next_multiple_of(PAGE)).unwrap_or(usize::MAX);
        let guard = target.ptr_guard_mut();
        let start = guard.as_ptr();
        if mapped > 0 {
            let mapped_len = mapped.min(target.len()).next_multiple_of(PAGE_LEN);
            // `layout` checked that the segment's last mapped page ends before the next
            // segment; it may still run past the end of guest memory when the memory size
            // is below the mapped length.
            if mem
                .get_slice(GuestAddress(segment.addr), mapped_len)
                .is_err()
            {
                return Err(outside());
            }
            let offset = libc::off_t::try_from(offset).map_err(|_| outside())?;
            // SAFETY: `start` is page-aligned (the segment's address is, and guest memory
            // regions start page-aligned) and `mapped_len` bytes from it lie in one mapped
            // region of guest memory (checked just above), which this replaces with a
            // private, copy-on-write mapping of the file: the same address range, still
            // readable and writable, still owned by `mem`, which unmaps it with the rest.
            // The VM has not started: no vCPU or device thread touches this memory yet.
            let result = unsafe {
                libc::mmap(
                    start.cast(),
                    mapped_len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED,
                    file.as_raw_fd(),
                    offset,
                )
            };
            if result == libc::MAP_FAILED {
                if index == 0 {
                    return Ok(false);
                }
                return Err(PackedKernelError::Map {
                    index,
                    source: io::Error::last_os_error(),
                });
            }
        }
        if mapped < target.len() {
            zero_bss(start, mapped, target.len(), index)?;
        }
    }
    Ok(true)
}

/// Writes the segments' file bytes, as [`load`] put them in `mem`, to `cache`: a temporary
/// file beside it, synced, then renamed over it.
fn write_cache(mem: &GuestMemory, header: &Header, size: u64, cache: &Path) -> io::Result<()> {
    let dir = cache.parent().unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let temp = cache.with_extension(format!("tmp{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        let mut bytes = vec![0u8; PAGE_LEN];
        let mut written = 0u64;
        for segment in &header.segments {
            let mut at = segment.addr;
            let end = segment.addr + segment.filesz.next_multiple_of(PAGE);
            while at < end {
                let filled = (segment.addr + segment.filesz).saturating_sub(at).min(PAGE);
                bytes.fill(0);
                let part = &mut bytes[..usize::try_from(filled).unwrap_or(0)];
                mem.read_slice(part, GuestAddress(at))
                    .map_err(io::Error::other)?;
                file.write_all(&bytes)?;
                at += PAGE;
                written += PAGE;
            }
        }
        if written != size {
            return Err(io::Error::other("cache layout mismatch"));
        }
        file.sync_all()?;
        std::fs::rename(&temp, cache)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
        return result;
    }
    remove_others(dir, cache);
    Ok(())
}

/// Removes the other kernels' files from the cache directory (older katalite builds'): a
/// new one is written only when the kernel changed. A VM still running from one keeps its
/// mapping.
fn remove_others(dir: &Path, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path != keep && path.extension().is_some_and(|e| e == "segments") {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(addr: u64, filesz: u64, memsz: u64) -> Segment {
        Segment {
            addr,
            filesz,
            memsz,
            compressed: 1,
        }
    }

    #[test]
    fn segments_go_to_page_aligned_offsets_and_must_not_share_a_page() {
        let segments = [
            segment(0x100_0000, 0x1001, 0x3000),
            segment(0x100_3000, 0x2000, 0x2000),
        ];
        assert_eq!(layout(&segments), Some((vec![0, 0x2000], 0x4000)));
        // Not page-aligned: the second cannot be mapped.
        let close = [
            segment(0x100_0000, 0x1001, 0x1001),
            segment(0x100_1800, 0x10, 0x10),
        ];
        assert_eq!(layout(&close), None);
        assert_eq!(layout(&[segment(0x100_0010, 0x10, 0x10)]), None);
    }
}
