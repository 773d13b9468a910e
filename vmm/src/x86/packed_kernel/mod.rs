//! The packed kernel: a vmlinux's loadable segments without the ELF around them, compressed,
//! so the kernel katalite embeds is a third of the stripped vmlinux (whose file keeps every
//! `PT_LOAD` at a 2 MiB-aligned offset: 8 of its 18 MB are padding).
//!
//! Layout (all integers little-endian):
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `KTLKERN\0` |
//! | 8 | 4 | version (1) |
//! | 12 | 4 | number of segments (1 to [`MAX_SEGMENTS`]) |
//! | 16 | 32 | SHA-256 of the vmlinux it was made from (so a stale file is noticed) |
//! | 48 | 8 | PVH entry: the guest-physical address the boot vCPU starts at, 32-bit mode |
//! | 56 | 8 | reserved, zero |
//! | 64 | 32 × n | segments: guest-physical address, file size, memory size, compressed size |
//! | 64 + 32n | rest | the segments' file bytes, one zstd frame each, in table order |
//!
//! Segments are sorted by address, never overlap and start at or above [`HIMEM_START`];
//! memory past a segment's file size (its BSS) is zeroed. The frames back to back are one
//! valid zstd stream of the segments' bytes, so `zstd -d` reads the payload too. One frame per
//! segment (not one for all) lets the loader decompress each straight into guest memory in
//! one call, with no window buffer or copy: libzstd's one-shot decoder uses its output as the
//! window, which works only when that output is one contiguous buffer.
//!
//! [`load`] checks every field before it writes a byte of guest memory; [`pack`] (used by
//! `cargo xtask build-guest`) makes the file from a vmlinux.

mod mapped;
mod pack;

use std::io;

use vm_memory::{GuestAddress, GuestMemoryBackend};

pub use mapped::load_mapped;
pub use pack::{pack, PackError, ZSTD_LEVEL};

use crate::layout::HIMEM_START;
use crate::GuestMemory;

/// The first 8 bytes of a packed kernel.
pub const MAGIC: [u8; 8] = *b"KTLKERN\0";
/// The one version this loader reads.
pub const VERSION: u32 = 1;
/// Most segments a packed kernel may have (a vmlinux has about five).
pub const MAX_SEGMENTS: u32 = 16;
/// Bytes before the segment table.
pub const HEADER_LEN: usize = 64;
/// Bytes of one segment table entry.
pub const SEGMENT_LEN: usize = 32;
/// Where the source vmlinux's SHA-256 lies (read by katalite's build script, which cannot
/// depend on this crate, to refuse a packed file older than its vmlinux).
pub const SOURCE_SHA256: std::ops::Range<usize> = 16..48;

/// Why a packed kernel cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PackedKernelError {
    /// The image does not start with [`MAGIC`].
    #[error("not a packed kernel (bad magic)")]
    BadMagic,
    /// A version this loader does not read.
    #[error("packed kernel version {0} is not supported (this katalite reads version {VERSION})")]
    Version(u32),
    /// The image ends inside its header or segment table.
    #[error("the packed kernel is truncated inside its header")]
    Truncated,
    /// No segments, or more than [`MAX_SEGMENTS`].
    #[error("the packed kernel has {0} segments (1 to {MAX_SEGMENTS} are allowed)")]
    SegmentCount(u32),
    /// The reserved header field is not zero.
    #[error("the packed kernel's reserved header field is not zero")]
    Reserved,
    /// A segment table entry is inconsistent in itself or with the previous one.
    #[error("packed kernel segment {index} at {addr:#x} (memory size {memsz:#x}): {reason}")]
    Segment {
        /// Position in the table.
        index: usize,
        /// Its guest-physical address.
        addr: u64,
        /// Its size in memory.
        memsz: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The PVH entry is not inside the file bytes of a segment, or not 32-bit.
    #[error("the packed kernel's entry {0:#x} is not inside a loaded segment")]
    Entry(u64),
    /// The table's compressed sizes do not add up to the payload.
    #[error(
        "the segment table's compressed sizes add up to {table} bytes, the payload has {payload}"
    )]
    PayloadLength {
        /// Sum of the table's compressed sizes.
        table: u64,
        /// Bytes after the table.
        payload: u64,
    },
    /// A segment does not fit in guest RAM.
    #[error("packed kernel segment {index} at {addr:#x} (memory size {memsz:#x}) is outside guest memory")]
    OutsideMemory {
        /// Position in the table.
        index: usize,
        /// Its guest-physical address.
        addr: u64,
        /// Its size in memory.
        memsz: u64,
    },
    /// libzstd could not allocate its decoder.
    #[error("cannot set up the zstd decoder")]
    Decoder(#[source] io::Error),
    /// A segment's frame is corrupt, or decompresses past the segment's file size.
    #[error("packed kernel segment {index} does not decompress")]
    Decompress {
        /// Position in the table.
        index: usize,
        /// What libzstd said.
        #[source]
        source: io::Error,
    },
    /// Mapping a segment from the unpacked cache file failed after others were mapped.
    #[error("cannot map packed kernel segment {index} from its cache file")]
    Map {
        /// Position in the table.
        index: usize,
        /// What mmap said.
        #[source]
        source: io::Error,
    },
    /// A segment's frame decompresses to fewer bytes than its file size.
    #[error(
        "packed kernel segment {index} decompresses to {found} bytes, the table says {expected}"
    )]
    Length {
        /// Position in the table.
        index: usize,
        /// The table's file size.
        expected: u64,
        /// What the frame held.
        found: u64,
    },
}

/// One loadable segment, as the table describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address of its first byte.
    pub addr: u64,
    /// Bytes that come from the payload.
    pub filesz: u64,
    /// Bytes it occupies in memory; those past `filesz` are zero.
    pub memsz: u64,
    /// Bytes of its zstd frame in the payload.
    pub compressed: u64,
}

/// A parsed and checked header: everything but the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// SHA-256 of the vmlinux this was packed from.
    pub source_sha256: [u8; 32],
    /// The PVH entry point.
    pub entry: u64,
    /// The segments, sorted by address.
    pub segments: Vec<Segment>,
}

/// Where a loaded kernel starts and ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loaded {
    /// The PVH entry point (32-bit protected mode, paging off).
    pub entry: u64,
    /// First guest-physical byte past the kernel's memory image, BSS included.
    pub kernel_end: u64,
}

/// True when `image` starts like a packed kernel (the loader still checks the rest).
pub fn is_packed(image: &[u8]) -> bool {
    image.starts_with(&MAGIC)
}

impl Header {
    /// Reads and checks the header and segment table of `image`; returns them and the
    /// payload. Everything but the frames' contents is checked here.
    pub fn parse(image: &[u8]) -> Result<(Self, &[u8]), PackedKernelError> {
        if !is_packed(image) {
            return Err(PackedKernelError::BadMagic);
        }
        let header = image
            .get(..HEADER_LEN)
            .ok_or(PackedKernelError::Truncated)?;
        let version = u32_at(header, 8);
        if version != VERSION {
            return Err(PackedKernelError::Version(version));
        }
        let count = u32_at(header, 12);
        if count == 0 || count > MAX_SEGMENTS {
            return Err(PackedKernelError::SegmentCount(count));
        }
        let count = usize::try_from(count).map_err(|_| PackedKernelError::SegmentCount(count))?;
        let mut source_sha256 = [0; 32];
        source_sha256.copy_from_slice(&header[SOURCE_SHA256]);
        let entry = u64_at(header, 48);
        if u64_at(header, 56) != 0 {
            return Err(PackedKernelError::Reserved);
        }
        // At most 16 entries of 32 bytes: no overflow.
        let table_end = HEADER_LEN + SEGMENT_LEN * count;
        let table = image
            .get(HEADER_LEN..table_end)
            .ok_or(PackedKernelError::Truncated)?;
        let segments: Vec<Segment> = table
            .chunks_exact(SEGMENT_LEN)
            .map(|entry| Segment {
                addr: u64_at(entry, 0),
                filesz: u64_at(entry, 8),
                memsz: u64_at(entry, 16),
                compressed: u64_at(entry, 24),
            })
            .collect();
        check_segments(&segments)?;
        let inside = |s: &Segment| entry >= s.addr && entry - s.addr < s.filesz;
        if u32::try_from(entry).is_err() || !segments.iter().any(inside) {
            return Err(PackedKernelError::Entry(entry));
        }
        let payload = &image[table_end..];
        // Each size is below 2^64 and there are at most 16: a u128 sum cannot overflow.
        let table_sum: u128 = segments.iter().map(|s| u128::from(s.compressed)).sum();
        if table_sum != payload.len() as u128 {
            return Err(PackedKernelError::PayloadLength {
                table: u64::try_from(table_sum).unwrap_or(u64::MAX),
                payload: payload.len() as u64,
            });
        }
        let header = Header {
            source_sha256,
            entry,
            segments,
        };
        Ok((header, payload))
    }
}

/// Sizes consistent, addresses at or above the load floor, sorted, no overlaps.
fn check_segments(segments: &[Segment]) -> Result<(), PackedKernelError> {
    let mut previous_end = HIMEM_START;
    for (index, segment) in segments.iter().enumerate() {
        let fail = |reason| PackedKernelError::Segment {
            index,
            addr: segment.addr,
            memsz: segment.memsz,
            reason,
        };
        if segment.filesz > segment.memsz {
            return Err(fail("file size larger than memory size"));
        }
        if segment.memsz == 0 {
            return Err(fail("empty"));
        }
        if segment.addr < HIMEM_START {
            return Err(fail("below the kernel's load floor (1 MiB)"));
        }
        if segment.addr < previous_end {
            return Err(fail("overlaps or precedes the previous segment"));
        }
        previous_end = segment
            .addr
            .checked_add(segment.memsz)
            .ok_or_else(|| fail("ends past the address space"))?;
    }
    Ok(())
}

/// Decompresses `image`'s segments straight into `mem` at their addresses, zeroes their BSS,
/// and returns the entry point. Nothing is written unless the whole header and table check
/// out and every segment lies in guest RAM; a corrupt frame is found while writing, and the
/// VM is then not started.
pub fn load(mem: &GuestMemory, image: &[u8]) -> Result<Loaded, PackedKernelError> {
    let (header, payload) = Header::parse(image)?;
    let mut targets = Vec::with_capacity(header.segments.len());
    for (index, segment) in header.segments.iter().enumerate() {
        let outside = || PackedKernelError::OutsideMemory {
            index,
            addr: segment.addr,
            memsz: segment.memsz,
        };
        let len = usize::try_from(segment.memsz).map_err(|_| outside())?;
        // One region only: the slice must be contiguous host memory.
        let slice = mem
            .get_slice(GuestAddress(segment.addr), len)
            .map_err(|_| outside())?;
        targets.push(slice);
    }
    let mut decoder = zstd::bulk::Decompressor::new().map_err(PackedKernelError::Decoder)?;
    let mut frames = payload;
    for (index, (segment, target)) in header.segments.iter().zip(&targets).enumerate() {
        // `Header::parse` checked that the compressed sizes add up to the payload's length
        // and the file sizes are at most the memory sizes, which are the targets' lengths.
        let (frame, rest) = frames.split_at(
            usize::try_from(segment.compressed)
                .unwrap_or(usize::MAX)
                .min(frames.len()),
        );
        frames = rest;
        let guard = target.ptr_guard_mut();
        // SAFETY: `get_slice` returned this range as `target.len()` bytes of one mapped
        // region that lives as long as `mem`, which outlives this function. The VM has not
        // started: no vCPU or device thread touches guest memory yet, and the segments do
        // not overlap (checked by `Header::parse`), so this is the only reference to these
        // bytes while it lives. Anonymous guest memory is always initialised.
        let memory = unsafe { std::slice::from_raw_parts_mut(guard.as_ptr(), target.len()) };
        let filesz = usize::try_from(segment.filesz)
            .unwrap_or(usize::MAX)
            .min(memory.len());
        let (file, bss) = memory.split_at_mut(filesz);
        let found = decoder
            .decompress_to_buffer(frame, file)
            .map_err(|source| PackedKernelError::Decompress { index, source })?;
        if found != file.len() {
            return Err(PackedKernelError::Length {
                index,
                expected: segment.filesz,
                found: found as u64,
            });
        }
        bss.fill(0);
    }
    let kernel_end = header
        .segments
        .last()
        .map_or(HIMEM_START, |last| last.addr + last.memsz);
    Ok(Loaded {
        entry: header.entry,
        kernel_end,
    })
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

#[cfg(test)]
mod tests;
