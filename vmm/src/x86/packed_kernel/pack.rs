//! Makes a packed kernel from a vmlinux ELF: its `PT_LOAD` segments, sorted by physical
//! address, each compressed into one zstd frame, and the PVH entry from its notes.

use std::io;

use sha2::{Digest, Sha256};

use super::{Header, PackedKernelError, HEADER_LEN, MAGIC, SEGMENT_LEN, VERSION};

/// The codec and its level, chosen by decompression time (every boot pays it) and size (the
/// whole binary must stay within 8 MB). Measured on 2026-12-06 on the Debian 6.12.118 guest
/// vmlinux (17,979,808 bytes stripped; 12,309,456 bytes in 4 `PT_LOAD`s): release build,
/// decompressing into a preallocated buffer, the codecs interleaved over 41 rounds on a
/// shared 2-core host (median, fastest):
///
/// | codec | compressed | decompress |
/// | --- | --- | --- |
/// | zstd -19, a frame per segment | 2,686,582 (21.8 %) | 14.7 ms, 12.3 ms |
/// | the same with frame checksums (this format) | 2,686,598 | 17.0 ms, 13.3 ms |
/// | zstd -19, one frame | 2,682,948 | 15.9 ms, 12.6 ms |
/// | zstd -22 --long=27, one frame | 2,679,060 | 13 to 18 ms (separate runs) |
/// | lz4 (lz4_flex 0.11 blocks) | 4,711,254 (38.3 %) | 9.9 ms, 8.8 ms |
/// | xz -9e (liblzma 0.4) | 2,510,732 (20.4 %) | 194 ms, 189 ms (lzma-rs: 308 ms) |
///
/// zstd -19: lz4 saves 4 ms but costs 2 MB the budget does not have; xz saves 176 KB for
/// 15 times the time; level 22 saves a few KB and is no faster. A frame per segment costs
/// 3.6 KB against one frame and lets each go straight into guest memory; the checksums
/// (1 ms) make a corrupt frame an error instead of other kernel bytes.
pub const ZSTD_LEVEL: i32 = 19;

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
/// `EM_X86_64`.
const MACHINE_X86_64: u16 = 62;
/// `XEN_ELFNOTE_PHYS32_ENTRY` (xen/include/public/elfnote.h): the 32-bit PVH entry point.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// Why a vmlinux cannot be packed.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// Not an ELF file this VMM boots.
    #[error("not a 64-bit little-endian x86-64 ELF file")]
    NotElf,
    /// A header or segment lies past the end of the file.
    #[error("the ELF file is truncated: {0} lies past its end")]
    Truncated(&'static str),
    /// The kernel has no PVH entry, the only way a packed kernel is entered.
    #[error(
        "the kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); build it with CONFIG_PVH=y"
    )]
    NoPvhEntry,
    /// libzstd failed.
    #[error("cannot compress segment {index}")]
    Compress {
        /// Position in the (sorted) table.
        index: usize,
        /// What libzstd said.
        #[source]
        source: io::Error,
    },
    /// The result would not pass the loader's checks (overlapping segments, too many...).
    #[error("the kernel cannot be packed")]
    Invalid(#[source] PackedKernelError),
}

/// One `PT_LOAD` program header and its file bytes.
struct Load<'a> {
    addr: u64,
    memsz: u64,
    bytes: &'a [u8],
}

/// Packs the vmlinux `elf`; the loader's checks are applied to the result before it is
/// returned.
pub fn pack(elf: &[u8]) -> Result<Vec<u8>, PackError> {
    let (mut loads, entry) = read_elf(elf)?;
    loads.sort_by_key(|load| load.addr);
    let count = u32::try_from(loads.len()).map_err(|_| PackError::Truncated("program headers"))?;

    let setup = |source| PackError::Compress { index: 0, source };
    let mut compressor = zstd::bulk::Compressor::new(ZSTD_LEVEL).map_err(setup)?;
    compressor.include_checksum(true).map_err(setup)?;
    let mut table = Vec::with_capacity(SEGMENT_LEN * loads.len());
    let mut payload = Vec::new();
    for (index, load) in loads.iter().enumerate() {
        let frame = compressor
            .compress(load.bytes)
            .map_err(|source| PackError::Compress { index, source })?;
        for field in [
            load.addr,
            load.bytes.len() as u64,
            load.memsz,
            frame.len() as u64,
        ] {
            table.extend_from_slice(&field.to_le_bytes());
        }
        payload.extend_from_slice(&frame);
    }

    let mut packed = Vec::with_capacity(HEADER_LEN + table.len() + payload.len());
    packed.extend_from_slice(&MAGIC);
    packed.extend_from_slice(&VERSION.to_le_bytes());
    packed.extend_from_slice(&count.to_le_bytes());
    packed.extend_from_slice(&Sha256::digest(elf));
    packed.extend_from_slice(&entry.to_le_bytes());
    packed.extend_from_slice(&0u64.to_le_bytes());
    packed.extend_from_slice(&table);
    packed.extend_from_slice(&payload);
    Header::parse(&packed).map_err(PackError::Invalid)?;
    Ok(packed)
}

/// The loadable segments (those that occupy memory) and the PVH entry of `elf`.
fn read_elf(elf: &[u8]) -> Result<(Vec<Load<'_>>, u64), PackError> {
    // e_ident: magic, ELFCLASS64, ELFDATA2LSB.
    if elf.get(..6) != Some(b"\x7fELF\x02\x01") || u16_at(elf, 0x12)? != MACHINE_X86_64 {
        return Err(PackError::NotElf);
    }
    let phoff = usize_at(elf, 0x20)?;
    let phentsize = usize::from(u16_at(elf, 0x36)?);
    let phnum = usize::from(u16_at(elf, 0x38)?);
    if phentsize < 56 {
        return Err(PackError::NotElf);
    }
    let mut loads = Vec::new();
    let mut entry = None;
    for index in 0..phnum {
        let header = index
            .checked_mul(phentsize)
            .and_then(|offset| offset.checked_add(phoff))
            .and_then(|at| elf.get(at..at.checked_add(phentsize)?))
            .ok_or(PackError::Truncated("a program header"))?;
        let offset = usize_at(header, 8)?;
        let bytes = offset
            .checked_add(usize_at(header, 32)?)
            .and_then(|end| elf.get(offset..end))
            .ok_or(PackError::Truncated("a segment"))?;
        match u32_at(header, 0)? {
            PT_LOAD => {
                let memsz = u64_at(header, 40)?;
                if memsz > 0 {
                    let addr = u64_at(header, 24)?;
                    loads.push(Load { addr, memsz, bytes });
                }
            }
            PT_NOTE => entry = entry.or(pvh_entry(bytes)?),
            _ => {}
        }
    }
    Ok((loads, entry.ok_or(PackError::NoPvhEntry)?))
}

/// The desc of Xen's `PHYS32_ENTRY` note among `notes` (`Elf64_Nhdr` records: namesz,
/// descsz, type, then name and desc, each padded to 4 bytes).
fn pvh_entry(mut notes: &[u8]) -> Result<Option<u64>, PackError> {
    while notes.len() >= 12 {
        let namesz = usize::try_from(u32_at(notes, 0)?).map_err(|_| PackError::NotElf)?;
        let descsz = usize::try_from(u32_at(notes, 4)?).map_err(|_| PackError::NotElf)?;
        let kind = u32_at(notes, 8)?;
        let desc_at = 12 + namesz.next_multiple_of(4);
        let name = notes
            .get(12..12 + namesz)
            .ok_or(PackError::Truncated("a note"))?;
        let desc = notes
            .get(desc_at..desc_at + descsz)
            .ok_or(PackError::Truncated("a note"))?;
        if name == b"Xen\0" && kind == XEN_ELFNOTE_PHYS32_ENTRY {
            return match desc.len() {
                4 => Ok(Some(u64::from(u32_at(desc, 0)?))),
                8 => Ok(Some(u64_at(desc, 0)?)),
                _ => Err(PackError::Truncated("the PVH entry note")),
            };
        }
        notes = notes
            .get(desc_at + descsz.next_multiple_of(4)..)
            .unwrap_or_default();
    }
    Ok(None)
}

fn field<const N: usize>(data: &[u8], at: usize) -> Result<[u8; N], PackError> {
    let mut bytes = [0; N];
    let end = at.checked_add(N).ok_or(PackError::Truncated("a header"))?;
    bytes.copy_from_slice(data.get(at..end).ok_or(PackError::Truncated("a header"))?);
    Ok(bytes)
}

fn u16_at(data: &[u8], at: usize) -> Result<u16, PackError> {
    field(data, at).map(u16::from_le_bytes)
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, PackError> {
    field(data, at).map(u32::from_le_bytes)
}

fn u64_at(data: &[u8], at: usize) -> Result<u64, PackError> {
    field(data, at).map(u64::from_le_bytes)
}

fn usize_at(data: &[u8], at: usize) -> Result<usize, PackError> {
    usize::try_from(u64_at(data, at)?).map_err(|_| PackError::Truncated("an offset"))
}
