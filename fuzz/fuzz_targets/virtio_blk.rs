//! virtio-blk behind the virtio-mmio transport, driven by a hostile driver program (see
//! `katalite_fuzz::driver`). The first byte picks the disk: a verified read-only image (as
//! katalite gives every container), the same with one corrupt block, whose bytes must
//! never reach guest memory, or a writable disk.

#![no_main]

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use katalite_fuzz::driver::{Driver, MEM_SIZE};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use vm_memory::{Bytes, GuestAddress};
use vmm::virtio::{Block, BlockHashes, DiskConfig};

/// Sixteen 4 KiB blocks: small enough to rewrite every run, large enough for requests
/// that span blocks and run past the end.
const DISK_BYTES: usize = 16 * 4096;
/// The block whose hash is wrong on the corrupt disk.
const CORRUPT_BLOCK: usize = 5;

/// Set when the device reports a read of the corrupt block: only then can its bytes be
/// in guest memory, so only then is memory searched for them.
static CORRUPT_READ: AtomicBool = AtomicBool::new(false);

/// The image every read-only run shares (never written) and its block hashes.
fn image() -> &'static (File, Arc<[[u8; 32]]>) {
    static IMAGE: OnceLock<(File, Arc<[[u8; 32]]>)> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let content = content();
        let mut file = tempfile::tempfile().expect("image file");
        file.write_all(content).expect("write image");
        let hashes: Vec<[u8; 32]> = content
            .chunks(4096)
            .map(|block| Sha256::digest(block).into())
            .collect();
        (file, hashes.into())
    })
}

/// The image's bytes: pseudo-random (xorshift), so that 16 bytes name the place they
/// came from.
fn content() -> &'static [u8] {
    static CONTENT: OnceLock<Vec<u8>> = OnceLock::new();
    CONTENT.get_or_init(|| {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        (0..DISK_BYTES)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state.to_le_bytes()[0]
            })
            .collect()
    })
}

/// A 64-bit digest of 16 bytes (splitmix64's finalizer over both halves): the leak check
/// compares these, never the bytes themselves, so that comparison tracing cannot hand
/// the fuzzer the corrupt block's contents to write into guest memory on its own.
fn digest(bytes: &[u8]) -> u64 {
    let half = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let mut x = half(0) ^ half(8).rotate_left(29) ^ 0x9e37_79b9_7f4a_7c15;
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Whether any sector of the corrupt block reached guest memory (its first 16 bytes at
/// any address): verification must stop it before it leaves the device.
fn corrupt_data_leaked(driver: &Driver) -> bool {
    let block = &content()[CORRUPT_BLOCK * 4096..][..4096];
    let sectors: Vec<u64> = block
        .chunks(512)
        .map(|sector| digest(&sector[..16]))
        .collect();
    // Only windows starting with a sector's first byte are digested (speed).
    let mut first = [false; 256];
    for sector in block.chunks(512) {
        first[usize::from(sector[0])] = true;
    }
    let mut memory = vec![0u8; usize::try_from(MEM_SIZE).expect("small")];
    driver
        .mem
        .read_slice(&mut memory, GuestAddress(0))
        .expect("guest memory");
    memory
        .windows(16)
        .any(|window| first[usize::from(window[0])] && sectors.contains(&digest(window)))
}

fn disk(mode: u8) -> DiskConfig {
    let (image, hashes) = image();
    let (file, read_only, block_hashes) = match mode % 3 {
        0 => (image.try_clone().expect("dup"), true, Some(list(hashes))),
        1 => {
            let mut bad = hashes.to_vec();
            bad[CORRUPT_BLOCK][0] ^= 1;
            (image.try_clone().expect("dup"), true, Some(list(&bad)))
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
        on_corrupt: Arc::new(|_| CORRUPT_READ.store(true, Ordering::Relaxed)),
    }
}

/// The hash list as the VMM takes it: a list file, read once.
fn list(hashes: &[[u8; 32]]) -> BlockHashes {
    let mut file = tempfile::tempfile().expect("list file");
    file.write_all(hashes.as_flattened()).expect("write list");
    BlockHashes::read(file).expect("read list").0
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, program)) = data.split_first() else {
        return;
    };
    CORRUPT_READ.store(false, Ordering::Relaxed);
    let device = Block::new(disk(mode)).expect("valid disk");
    let mut driver = Driver::new(Box::new(device));
    driver.run(program, |_, _| {});
    if CORRUPT_READ.load(Ordering::Relaxed) {
        assert!(
            !corrupt_data_leaked(&driver),
            "bytes of a corrupt block reached the guest"
        );
    }
});
