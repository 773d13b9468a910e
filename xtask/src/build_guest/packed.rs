//! `vmlinux.packed`: the kernel katalite embeds, made from the `vmlinux` beside it with
//! `vmm::packed_kernel` (the loader's own format code, so the two cannot drift apart). It is
//! derived on every `build-guest` rather than cached with the kernel: its header names the
//! vmlinux's SHA-256, so an up-to-date file is kept and any other is made again. A kernel
//! without a PVH entry (a custom one) cannot be packed; katalite then embeds the vmlinux.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use vmm::packed_kernel::{self, Header};

use super::elf;

/// What [`ensure`] did.
pub struct Report {
    /// Size of the packed kernel.
    pub size: u64,
    /// Size of the loadable bytes it holds, uncompressed.
    pub loadable: u64,
    /// Time spent compressing; `None` when the file was already up to date.
    pub packed_in: Option<Duration>,
}

/// Makes `out` from `vmlinux` unless it already was made from these exact bytes; `None`
/// (and no `out`) when the kernel has no PVH entry.
pub fn ensure(vmlinux: &Path, out: &Path) -> Result<Option<Report>> {
    let elf = fs::read(vmlinux).with_context(|| format!("cannot read {}", vmlinux.display()))?;
    if !elf::has_pvh_note(&elf)? {
        match fs::remove_file(out) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                return Err(error).with_context(|| format!("cannot remove {}", out.display()))
            }
            _ => return Ok(None),
        }
    }
    let digest: [u8; 32] = Sha256::digest(&elf).into();
    if let Ok(existing) = fs::read(out) {
        if let Ok((header, _)) = Header::parse(&existing) {
            if header.source_sha256 == digest {
                return Ok(Some(report(&header, existing.len(), None)));
            }
        }
    }
    let started = Instant::now();
    let packed =
        packed_kernel::pack(&elf).with_context(|| format!("cannot pack {}", vmlinux.display()))?;
    let took = started.elapsed();
    let partial = PathBuf::from(format!("{}.partial", out.display()));
    fs::write(&partial, &packed).with_context(|| format!("cannot write {}", partial.display()))?;
    fs::rename(&partial, out).with_context(|| format!("cannot move to {}", out.display()))?;
    let (header, _) = Header::parse(&packed).context("the packed kernel does not parse")?;
    Ok(Some(report(&header, packed.len(), Some(took))))
}

fn report(header: &Header, size: usize, packed_in: Option<Duration>) -> Report {
    Report {
        size: size as u64,
        loadable: header.segments.iter().map(|s| s.filesz).sum(),
        packed_in,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vmlinux of one segment at 16 MiB with the PVH entry note.
    fn vmlinux(code: &[u8]) -> Vec<u8> {
        let mut note = Vec::new();
        for word in [4u32, 4, 18] {
            note.extend_from_slice(&word.to_le_bytes());
        }
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&0x100_0000u32.to_le_bytes());
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[0x12] = 62; // EM_X86_64
        elf[0x20] = 64; // e_phoff
        elf[0x36] = 56; // e_phentsize
        elf[0x38] = 2; // e_phnum
        let data = 64 + 2 * 56;
        let code_len = code.len() as u64;
        for (kind, offset, addr, size) in [
            (1u32, data, 0x100_0000u64, code_len),
            (4, data + code_len, 0, note.len() as u64),
        ] {
            let mut header = [0u8; 56];
            header[..4].copy_from_slice(&kind.to_le_bytes());
            for (at, value) in [(8, offset), (24, addr), (32, size), (40, size)] {
                header[at..at + 8].copy_from_slice(&value.to_le_bytes());
            }
            elf.extend_from_slice(&header);
        }
        elf.extend_from_slice(code);
        elf.extend_from_slice(&note);
        elf
    }

    #[test]
    fn packs_once_per_vmlinux() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (elf, out) = (
            dir.path().join("vmlinux"),
            dir.path().join("vmlinux.packed"),
        );
        fs::write(&elf, vmlinux(&[0x90; 4096])).expect("write");
        let first = ensure(&elf, &out).expect("pack").expect("pvh");
        assert!(first.packed_in.is_some());
        assert_eq!(first.loadable, 4096);
        assert_eq!(first.size, fs::metadata(&out).expect("stat").len());
        let mtime = fs::metadata(&out)
            .and_then(|m| m.modified())
            .expect("mtime");

        let again = ensure(&elf, &out).expect("up to date").expect("pvh");
        assert!(again.packed_in.is_none(), "same vmlinux, same file");
        let after = fs::metadata(&out)
            .and_then(|m| m.modified())
            .expect("mtime");
        assert_eq!(mtime, after);

        fs::write(&elf, vmlinux(&[0xf4; 4096])).expect("write");
        let repacked = ensure(&elf, &out).expect("repack").expect("pvh");
        assert!(repacked.packed_in.is_some());
        let (header, _) = Header::parse(&fs::read(&out).expect("read")).expect("parse");
        let digest: [u8; 32] = Sha256::digest(fs::read(&elf).expect("read")).into();
        assert_eq!(header.source_sha256, digest);
    }

    #[test]
    fn a_corrupt_packed_file_is_made_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (elf, out) = (
            dir.path().join("vmlinux"),
            dir.path().join("vmlinux.packed"),
        );
        fs::write(&elf, vmlinux(&[0x90; 512])).expect("write");
        fs::write(&out, b"KTLKERN\0 garbage").expect("write");
        let report = ensure(&elf, &out).expect("pack").expect("pvh");
        assert!(report.packed_in.is_some());
        assert!(Header::parse(&fs::read(&out).expect("read")).is_ok());
    }

    #[test]
    fn a_kernel_without_pvh_is_not_packed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (elf, out) = (
            dir.path().join("vmlinux"),
            dir.path().join("vmlinux.packed"),
        );
        let mut image = vmlinux(&[0x90; 512]);
        image[0x38] = 1; // drop the note's program header
        fs::write(&elf, image).expect("write");
        fs::write(&out, b"an older packed kernel").expect("write");
        assert!(ensure(&elf, &out).expect("no pvh").is_none());
        assert!(!out.exists(), "a stale file is not left to be embedded");
        fs::write(&elf, b"\x7fELF not really").expect("write");
        assert!(ensure(&elf, &out).is_err());
    }
}
