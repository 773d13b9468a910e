//! Unpacks the ELF `vmlinux` from a bzImage so QEMU can start it through its PVH entry,
//! skipping the kernel's own decompressor, which takes seconds under TCG.
//!
//! Layout from the Linux x86 boot protocol (Documentation/arch/x86/boot.rst): `setup_sects`
//! at 0x1f1, "HdrS" at 0x202, version at 0x206, `payload_offset`/`payload_length` (2.08+)
//! at 0x248/0x24c, relative to the protected-mode code at `(setup_sects + 1) * 512`.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;

use anyhow::{bail, ensure, Context, Result};

/// How the payload is compressed, by its magic bytes.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Codec {
    /// `CONFIG_KERNEL_XZ` (Debian's 6.1 kernels).
    Xz,
    /// `CONFIG_KERNEL_ZSTD`.
    Zstd,
    /// `CONFIG_KERNEL_GZIP`.
    Gzip,
}

impl Codec {
    fn tool(self) -> &'static str {
        match self {
            Codec::Xz => "xz",
            Codec::Zstd => "zstd",
            Codec::Gzip => "gzip",
        }
    }
}

fn read_u32(image: &[u8], at: usize) -> Option<usize> {
    let bytes = image.get(at..at + 4)?;
    let value = u32::from_le_bytes(bytes.try_into().ok()?);
    usize::try_from(value).ok()
}

/// The compressed kernel inside `image` and its codec.
pub fn payload(image: &[u8]) -> Result<(&[u8], Codec)> {
    ensure!(image.get(0x202..0x206) == Some(b"HdrS"), "not a bzImage");
    let version = image
        .get(0x206..0x208)
        .map(|v| u16::from_le_bytes([v[0], v[1]]))
        .unwrap_or_default();
    ensure!(
        version >= 0x208,
        "boot protocol {version:#x} has no payload fields"
    );
    // A zero setup_sects means 4, for compatibility with ancient kernels.
    let setup_sects = match image[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let offset = read_u32(image, 0x248).context("truncated header")?;
    let length = read_u32(image, 0x24c).context("truncated header")?;
    let start = (setup_sects + 1) * 512 + offset;
    let data = image
        .get(start..start + length)
        .context("payload lies outside the image")?;
    // The build appends the uncompressed size as 4 bytes (scripts/Makefile.lib size_append);
    // decompressors would read them as a second, truncated stream.
    let data = data
        .get(..data.len().saturating_sub(4))
        .context("payload too short")?;
    let codec = if data.starts_with(b"\xfd7zXZ\0") {
        Codec::Xz
    } else if data.starts_with(b"\x28\xb5\x2f\xfd") {
        Codec::Zstd
    } else if data.starts_with(b"\x1f\x8b") {
        Codec::Gzip
    } else {
        bail!("unknown payload compression");
    };
    Ok((data, codec))
}

/// Writes the `vmlinux` inside the bzImage `vmlinuz` to `out`.
pub fn extract(vmlinuz: &Path, out: &Path) -> Result<()> {
    let image = fs::read(vmlinuz).with_context(|| format!("cannot read {}", vmlinuz.display()))?;
    let (data, codec) = payload(&image)?;
    let data = data.to_vec();
    let file = fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut child = Command::new(codec.tool())
        .arg("-dc")
        .stdin(Stdio::piped())
        .stdout(file)
        .spawn()
        .with_context(|| format!("cannot run {}", codec.tool()))?;
    let mut stdin = child.stdin.take().context("no stdin")?;
    let feeder = thread::spawn(move || stdin.write_all(&data));
    let status = child.wait()?;
    feeder
        .join()
        .map_err(|_| anyhow::anyhow!("decompressor input thread panicked"))?
        .context("cannot feed the decompressor")?;
    ensure!(status.success(), "{} -dc failed ({status})", codec.tool());
    let head = fs::read(out)?;
    ensure!(
        head.starts_with(b"\x7fELF"),
        "the payload is not an ELF vmlinux"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bzImage header with `setup_sects` 1 and `payload` placed 16 bytes into the
    /// protected-mode code, followed by the 4 size bytes the build appends.
    fn image(version: u16, payload: &[u8]) -> Vec<u8> {
        let mut image = vec![0u8; 1024 + 16];
        image[0x1f1] = 1;
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        image[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        let length = u32::try_from(payload.len() + 4).expect("small payload");
        image[0x24c..0x250].copy_from_slice(&length.to_le_bytes());
        image.extend_from_slice(payload);
        image.extend_from_slice(&[1, 2, 3, 4]);
        image
    }

    #[test]
    fn the_payload_is_found_without_its_size_trailer() {
        let xz = b"\xfd7zXZ\0rest-of-stream";
        let img = image(0x20f, xz);
        let (data, codec) = payload(&img).expect("valid header");
        assert_eq!(data, xz);
        assert_eq!(codec, Codec::Xz);
        let img = image(0x20f, b"\x28\xb5\x2f\xfdzstd");
        assert_eq!(payload(&img).expect("valid").1, Codec::Zstd);
    }

    #[test]
    fn old_protocols_and_garbage_are_rejected() {
        assert!(payload(&image(0x207, b"\xfd7zXZ\0")).is_err());
        assert!(payload(&image(0x20f, b"LZ4!")).is_err());
        assert!(payload(b"short").is_err());
        let mut truncated = image(0x20f, b"\x1f\x8bgz");
        truncated.truncate(1030);
        assert!(payload(&truncated).is_err());
    }

    #[test]
    fn a_gzip_payload_decompresses_to_the_elf() {
        let dir = tempfile::tempdir().expect("temp dir");
        let elf = b"\x7fELF pretend kernel".repeat(10);
        let gz = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "printf '{}' | gzip -c",
                "\\177ELF pretend kernel".repeat(10)
            ))
            .output()
            .expect("gzip runs")
            .stdout;
        let vmlinuz = dir.path().join("vmlinuz");
        fs::write(&vmlinuz, image(0x20f, &gz)).expect("write image");
        let out = dir.path().join("vmlinux");
        extract(&vmlinuz, &out).expect("extracts");
        assert_eq!(fs::read(&out).expect("read"), elf);
    }
}
