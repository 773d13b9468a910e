//! Just enough ELF64 reading to check the guest artifacts: the init must be static (no
//! `PT_INTERP`: nothing in the guest could load a dynamic one) and the stripped vmlinux must
//! keep the PVH entry note the VMM boots through.

use anyhow::{bail, ensure, Context, Result};

const PT_INTERP: u32 = 3;
const PT_NOTE: u32 = 4;
/// `XEN_ELFNOTE_PHYS32_ENTRY` (xen/include/public/elfnote.h): the 32-bit PVH entry point.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// One program header, reduced to what the checks need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    kind: u32,
    offset: usize,
    size: usize,
}

/// True when the ELF image has no interpreter, i.e. runs without a dynamic loader.
pub fn is_static(elf: &[u8]) -> Result<bool> {
    Ok(!segments(elf)?.iter().any(|s| s.kind == PT_INTERP))
}

/// True when a `PT_NOTE` segment holds the Xen `PHYS32_ENTRY` note that marks a PVH kernel.
pub fn has_pvh_note(elf: &[u8]) -> Result<bool> {
    for segment in segments(elf)?.iter().filter(|s| s.kind == PT_NOTE) {
        let end = segment.offset.checked_add(segment.size);
        let notes = end
            .and_then(|end| elf.get(segment.offset..end))
            .context("note segment outside the file")?;
        if notes_contain(notes, b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY)? {
            return Ok(true);
        }
    }
    Ok(false)
}

fn segments(elf: &[u8]) -> Result<Vec<Segment>> {
    ensure!(elf.get(..4) == Some(b"\x7fELF"), "not an ELF file");
    // e_ident[EI_CLASS] = ELFCLASS64, e_ident[EI_DATA] = ELFDATA2LSB.
    ensure!(
        elf.get(4) == Some(&2) && elf.get(5) == Some(&1),
        "not a 64-bit little-endian ELF"
    );
    let phoff = usize::try_from(read_u64(elf, 0x20)?)?;
    let phentsize = usize::from(read_u16(elf, 0x36)?);
    let phnum = usize::from(read_u16(elf, 0x38)?);
    ensure!(phentsize >= 56, "program header entries too small");
    (0..phnum)
        .map(|index| {
            let at = phoff + index * phentsize;
            Ok(Segment {
                kind: read_u32(elf, at)?,
                offset: usize::try_from(read_u64(elf, at + 8)?)?,
                size: usize::try_from(read_u64(elf, at + 32)?)?,
            })
        })
        .collect()
}

/// Walks `Elf64_Nhdr` records: namesz, descsz, type, then name and desc, each padded to 4.
fn notes_contain(mut notes: &[u8], name: &[u8], kind: u32) -> Result<bool> {
    while notes.len() >= 12 {
        let namesz = usize::try_from(read_u32(notes, 0)?)?;
        let descsz = usize::try_from(read_u32(notes, 4)?)?;
        let note_kind = read_u32(notes, 8)?;
        let name_end = 12 + namesz;
        let next = name_end.next_multiple_of(4) + descsz.next_multiple_of(4);
        let Some(note_name) = notes.get(12..name_end) else {
            bail!("truncated ELF note");
        };
        if note_name == name && note_kind == kind {
            return Ok(true);
        }
        notes = notes.get(next..).unwrap_or_default();
    }
    Ok(false)
}

fn bytes<const N: usize>(data: &[u8], at: usize) -> Result<[u8; N]> {
    let end = at.checked_add(N).context("ELF offset overflows")?;
    let slice = data.get(at..end).context("truncated ELF file")?;
    Ok(slice.try_into()?)
}

fn read_u16(data: &[u8], at: usize) -> Result<u16> {
    Ok(u16::from_le_bytes(bytes(data, at)?))
}

fn read_u32(data: &[u8], at: usize) -> Result<u32> {
    Ok(u32::from_le_bytes(bytes(data, at)?))
}

fn read_u64(data: &[u8], at: usize) -> Result<u64> {
    Ok(u64::from_le_bytes(bytes(data, at)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 image: header, then one program header per `(type, payload)`, then
    /// the payloads.
    fn image(segments: &[(u32, Vec<u8>)]) -> Vec<u8> {
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        let count = u16::try_from(segments.len()).expect("few segments");
        elf[0x38..0x3a].copy_from_slice(&count.to_le_bytes());
        let mut payload_at = 64 + 56 * segments.len();
        let mut payloads = Vec::new();
        for (kind, payload) in segments {
            let mut header = [0u8; 56];
            header[..4].copy_from_slice(&kind.to_le_bytes());
            header[8..16].copy_from_slice(&(payload_at as u64).to_le_bytes());
            header[32..40].copy_from_slice(&(payload.len() as u64).to_le_bytes());
            elf.extend_from_slice(&header);
            payloads.extend_from_slice(payload);
            payload_at += payload.len();
        }
        elf.extend(payloads);
        elf
    }

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let size = |bytes: &[u8]| u32::try_from(bytes.len()).expect("small note");
        out.extend_from_slice(&size(name).to_le_bytes());
        out.extend_from_slice(&size(desc).to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(name);
        out.resize(out.len().next_multiple_of(4), 0);
        out.extend_from_slice(desc);
        out.resize(out.len().next_multiple_of(4), 0);
        out
    }

    #[test]
    fn interpreter_makes_it_dynamic() {
        let dynamic = image(&[(1, vec![0; 8]), (PT_INTERP, b"/lib/ld.so\0".to_vec())]);
        assert!(!is_static(&dynamic).expect("parse"));
        let fixed = image(&[(1, vec![0; 8])]);
        assert!(is_static(&fixed).expect("parse"));
    }

    #[test]
    fn finds_pvh_note_after_other_notes() {
        let mut notes = note(b"GNU\0", 3, &[1, 2, 3, 4, 5]);
        notes.extend(note(
            b"Xen\0",
            XEN_ELFNOTE_PHYS32_ENTRY,
            &0x100_0000u32.to_le_bytes(),
        ));
        assert!(has_pvh_note(&image(&[(PT_NOTE, notes)])).expect("parse"));
    }

    #[test]
    fn other_xen_notes_are_not_pvh() {
        let notes = note(b"Xen\0", 1, &[0; 8]);
        assert!(!has_pvh_note(&image(&[(PT_NOTE, notes)])).expect("parse"));
        assert!(!has_pvh_note(&image(&[])).expect("parse"));
    }

    #[test]
    fn rejects_non_elf_and_truncation() {
        assert!(is_static(b"#!/bin/sh\n").is_err());
        let mut truncated = image(&[(1, vec![0; 8])]);
        truncated.truncate(80);
        assert!(is_static(&truncated).is_err());
        let bad_note = image(&[(PT_NOTE, vec![200, 0, 0, 0, 0, 0, 0, 0, 18, 0, 0, 0])]);
        assert!(has_pvh_note(&bad_note).is_err());
    }

    #[test]
    fn the_test_binary_itself_is_dynamic() {
        let own = std::fs::read(std::env::current_exe().expect("own path")).expect("read self");
        assert!(!is_static(&own).expect("parse self"));
    }
}
