//! virtio-blk behind the virtio-mmio transport, driven by a hostile driver program (see
//! `katalite_fuzz::driver`). The first byte picks the disk: a verified read-only image (as
//! katalite gives every container), the same with one corrupt block, or a writable disk.

#![no_main]

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, OnceLock};

use katalite_fuzz::driver::Driver;
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use vmm::virtio::{Block, DiskConfig};

/// Sixteen 4 KiB blocks: small enough to rewrite every run, large enough for requests
/// that span blocks and run past the end.
const DISK_BYTES: usize = 16 * 4096;
/// The block whose hash is wrong on the corrupt disk.
const CORRUPT_BLOCK: usize = 5;

/// The image every read-only run shares (never written) and its block hashes.
fn image() -> &'static (File, Arc<[[u8; 32]]>) {
    static IMAGE: OnceLock<(File, Arc<[[u8; 32]]>)> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let content: Vec<u8> = (0..DISK_BYTES)
            .map(|i| u8::try_from(i * 7 % 251).unwrap_or(0))
            .collect();
        let mut file = tempfile::tempfile().expect("image file");
        file.write_all(&content).expect("write image");
        let hashes: Vec<[u8; 32]> = content
            .chunks(4096)
            .map(|block| Sha256::digest(block).into())
            .collect();
        (file, hashes.into())
    })
}

fn disk(mode: u8) -> DiskConfig {
    let (image, hashes) = image();
    let (file, read_only, block_hashes) = match mode % 3 {
        0 => (image.try_clone().expect("dup"), true, Some(hashes.clone())),
        1 => {
            let mut bad = hashes.to_vec();
            bad[CORRUPT_BLOCK][0] ^= 1;
            (image.try_clone().expect("dup"), true, Some(bad.into()))
        }
        _ => {
            let file = tempfile::tempfile().expect("disk file");
            file.set_len(DISK_BYTES as u64).expect("size disk");
            (file, false, None)
        }
    };
    DiskConfig {
        file,
        read_only,
        block_hashes,
        id: "fuzz-disk".into(),
        on_corrupt: Arc::new(|_| {}),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, program)) = data.split_first() else {
        return;
    };
    let device = Block::new(disk(mode)).expect("valid disk");
    let mut driver = Driver::new(Box::new(device));
    driver.run(program, |_, _| {});
});
