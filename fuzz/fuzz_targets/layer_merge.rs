//! Layer tars from a hostile registry: the bytes become one to three layer blobs (split at
//! [`LAYER_SEPARATOR`], compression sniffed as for `docker save`), which are merged and
//! written both as the EROFS disk image and as the newc archive. Any outcome but a panic
//! is fine, as long as a written archive names nothing outside the image root, each name
//! once and after its parent, the EROFS block list covers the image, and both writers
//! agree on what the merged tree holds.

#![no_main]

use std::collections::HashSet;
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

    let erofs = write_erofs(&layers, limits(), &progress, Vec::new(), Vec::new());
    if let Ok((image, hashes, stats)) = &erofs {
        assert_eq!(image.len() % 4096, 0, "EROFS image is not whole blocks");
        assert_eq!(hashes.len() / 32, image.len() / 4096, "one hash per block");
        assert_eq!(stats.blocks, (image.len() / 4096) as u64);
    }

    let Ok((archive, cpio)) = write_cpio(&layers, limits(), &progress, Vec::new()) else {
        return;
    };
    let names = cpio_names(&archive).expect("the archive we wrote parses");
    let mut seen = HashSet::new();
    for name in &names {
        assert!(
            !name.starts_with('/') && !name.split('/').any(|part| part == ".." || part.is_empty()),
            "unsafe name {name:?} in the archive"
        );
        // The kernel unpacks in order: a parent must come before what it holds.
        if let Some((parent, _)) = name.rsplit_once('/') {
            assert!(seen.contains(parent), "{name:?} comes before its parent");
        }
        assert!(
            seen.insert(name.as_str()),
            "{name:?} is in the archive twice"
        );
    }
    // Both writers merge the same tree: they must agree on what it holds.
    if let Ok((_, _, erofs)) = erofs {
        let ours = (erofs.files, erofs.hard_links, erofs.symlinks, erofs.fifos);
        let theirs = (cpio.files, cpio.hard_links, cpio.symlinks, cpio.fifos);
        assert_eq!(ours, theirs, "EROFS and newc hold different trees");
        assert_eq!(erofs.content_bytes, cpio.content_bytes);
        // EROFS counts the root directory, newc has no entry for it.
        assert_eq!(erofs.directories, cpio.directories + 1);
    }
});
