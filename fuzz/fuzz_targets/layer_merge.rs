//! Layer tars from a hostile registry: the bytes become one to three layer blobs (split at
//! [`LAYER_SEPARATOR`], compression sniffed as for `docker save`), which are merged and
//! written both as the EROFS disk image and as the newc archive. Any outcome but a panic
//! is fine, as long as a written archive names nothing outside the image root and the
//! EROFS block list covers the image.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use imagebuilder::image::{LayerBlob, LayerCompression};
use imagebuilder::layers::write_cpio;
use imagebuilder::limits::Limits;
use imagebuilder::write_erofs;
use indicatif::ProgressBar;
use katalite_fuzz::{cpio_names, LAYER_SEPARATOR};
use libfuzzer_sys::fuzz_target;

/// Caps small enough that one input cannot make one run take seconds (a gzip bomb of a
/// few KiB), large enough for anything the fuzzer writes by hand.
fn limits() -> Limits {
    Limits {
        total_size: 16 << 20,
        file_size: 8 << 20,
        entries: 20_000,
        tree_bytes: 8 << 20,
        ..Limits::default()
    }
}

/// A directory for this process's layer files, removed at exit by nobody: it lives in
/// the system's temp dir and holds at most three small files.
fn layer_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("katalite-fuzz-layers")
            .tempdir()
            .expect("temp dir")
            .keep()
    })
}

fn layers(data: &[u8]) -> Vec<LayerBlob> {
    let mut parts = Vec::new();
    let mut rest = data;
    while parts.len() < 2 {
        let Some(at) = rest
            .windows(LAYER_SEPARATOR.len())
            .position(|w| w == LAYER_SEPARATOR)
        else {
            break;
        };
        parts.push(&rest[..at]);
        rest = &rest[at + LAYER_SEPARATOR.len()..];
    }
    parts.push(rest);
    parts
        .into_iter()
        .enumerate()
        .map(|(i, bytes)| {
            let path = layer_dir().join(format!("layer{i}"));
            std::fs::write(&path, bytes).expect("write layer");
            LayerBlob {
                digest: format!("sha256:{i:064x}"),
                path,
                compression: LayerCompression::sniff(bytes),
                size: bytes.len() as u64,
            }
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let layers = layers(data);
    let progress = ProgressBar::hidden();

    if let Ok((image, hashes, stats)) =
        write_erofs(&layers, limits(), &progress, Vec::new(), Vec::new())
    {
        assert_eq!(image.len() % 4096, 0, "EROFS image is not whole blocks");
        assert_eq!(hashes.len() / 32, image.len() / 4096, "one hash per block");
        assert_eq!(stats.blocks, (image.len() / 4096) as u64);
    }

    if let Ok((archive, _)) = write_cpio(&layers, limits(), &progress, Vec::new()) {
        let names = cpio_names(&archive).expect("the archive we wrote parses");
        for name in names {
            assert!(
                !name.starts_with('/') && !name.split('/').any(|part| part == ".."),
                "unsafe name {name:?} in the archive"
            );
        }
    }
});
