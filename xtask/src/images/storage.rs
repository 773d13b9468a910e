//! Test images of the storage path: `caps` (busybox plus a copy of busybox carrying a
//! `security.capability` xattr, as `setcap` leaves it in a layer) and `large` (the nginx
//! image plus a layer of incompressible data, over 1 GiB in all, with its SHA-256 beside
//! it so a guest can check every byte).

use std::io::{self, Read};
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use super::{exec, umoci_add_layer, LayerTar, MTIME};

/// Where `caps` puts its capable busybox copy.
/// Its name starts with "busybox" so busybox runs the applet named by its first argument.
const CAPS_BINARY: &str = "usr/local/bin/busybox-netbind";

/// `cap_net_bind_service=ep` as `setcap` stores it: `vfs_cap_data` revision 2 (magic
/// 0x02000000 with the effective flag), permitted bit 10, nothing inheritable.
const NET_BIND_SERVICE_EP: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, // magic_etc: VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE
    0x00, 0x04, 0x00, 0x00, // permitted[0]: 1 << CAP_NET_BIND_SERVICE (10)
    0x00, 0x00, 0x00, 0x00, // inheritable[0]
    0x00, 0x00, 0x00, 0x00, // permitted[1]
    0x00, 0x00, 0x00, 0x00, // inheritable[1]
];

/// Size of `large`'s data file: with the nginx layers the image is over 1 GiB.
const LARGE_DATA_BYTES: u64 = 1000 << 20;

/// Where `large` keeps its data and the data's `sha256sum -c` line.
const LARGE_DATA: &str = "data/random.bin";

/// caps: the busybox layout plus one layer with [`CAPS_BINARY`].
pub fn build_caps(busybox: &Path, layout: &Path, scratch: &Path) -> Result<()> {
    copy_layout(busybox, layout)?;
    let binary = busybox_binary()?;
    let layer = scratch.join("caps.tar");
    let mut tar = LayerTar::create(&layer)?;
    tar.dir("usr/local", 0o755)?;
    tar.dir("usr/local/bin", 0o755)?;
    let mut header = LayerTar::header(tar::EntryType::Regular, 0o755, (0, 0));
    header.set_size(binary.len() as u64);
    tar.pax(
        CAPS_BINARY,
        &[("SCHILY.xattr.security.capability", &NET_BIND_SERVICE_EP)],
    )?;
    tar.append(&mut header, CAPS_BINARY, binary.as_slice())?;
    tar.finish()?;
    umoci_add_layer(
        layout,
        &layer,
        "a busybox with cap_net_bind_service=ep (security.capability)",
    )
}

/// large: the nginx layout plus a layer with [`LARGE_DATA`] (pseudo-random, so no
/// compression shrinks it) and `LARGE_DATA.sha256`.
pub fn build_large(nginx: &Path, layout: &Path, scratch: &Path) -> Result<()> {
    copy_layout(nginx, layout)?;
    let layer = scratch.join("large.tar");
    let mut tar = LayerTar::create(&layer)?;
    tar.dir("data", 0o755)?;
    let mut header = LayerTar::header(tar::EntryType::Regular, 0o644, (0, 0));
    header.set_size(LARGE_DATA_BYTES);
    let mut data = RandomBytes::new(LARGE_DATA_BYTES);
    tar.append(&mut header, LARGE_DATA, &mut data)?;
    let line = format!("{}  /{LARGE_DATA}\n", hex(&data.hash.finalize()));
    tar.file(
        &format!("{LARGE_DATA}.sha256"),
        0o644,
        (0, 0),
        line.as_bytes(),
    )?;
    tar.finish()?;
    umoci_add_layer(layout, &layer, "1000 MiB of incompressible data")
}

fn copy_layout(from: &Path, to: &Path) -> Result<()> {
    exec(Command::new("cp").arg("-a").arg(from).arg(to))
}

fn busybox_binary() -> Result<Vec<u8>> {
    let path = super::package_file("busybox-static", "/bin/busybox")?;
    std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `len` bytes of xorshift64* output (fast, and incompressible for gzip), hashed as they
/// are read.
struct RandomBytes {
    left: u64,
    state: u64,
    hash: Sha256,
}

impl RandomBytes {
    fn new(len: u64) -> Self {
        RandomBytes {
            left: len,
            state: MTIME | 1,
            hash: Sha256::new(),
        }
    }
}

impl Read for RandomBytes {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        for chunk in buf[..n].chunks_mut(8) {
            self.state ^= self.state >> 12;
            self.state ^= self.state << 25;
            self.state ^= self.state >> 27;
            let word = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
        self.hash.update(&buf[..n]);
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_bytes_have_the_length_asked_and_do_not_compress() {
        let mut data = RandomBytes::new(1 << 20 | 3);
        let mut all = Vec::new();
        data.read_to_end(&mut all).expect("read");
        assert_eq!(all.len(), (1 << 20) + 3);
        assert_eq!(hex(&data.hash.finalize()), hex(&Sha256::digest(&all)));
        let distinct: std::collections::BTreeSet<&[u8]> = all.chunks(8).collect();
        assert!(distinct.len() > all.len() / 8 - 2, "the stream repeats");
    }
}
