//! The kernel cache: a key over everything the vmlinux depends on (source identity, the
//! requested options, the build recipe), stored beside the artifact, so a rerun with
//! nothing changed skips the kernel entirely instead of waiting for a no-op `make`.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

use super::kconfig::Config;
use super::source::sha256_hex;

/// Names the steps of `kernel::build`; change it when they change so old stamps go stale.
const RECIPE: &str = "v1: make ARCH=x86_64 tinyconfig, overlay, olddefconfig, vmlinux, strip";

/// The cache key of a kernel built from `source` (e.g. "debian linux-source-6.12 6.12.117
/// SHA256" or "tree /path 6.12.0") with the options `request`. Options are hashed in their
/// rendered form, so editing a comment in a fragment does not force a rebuild.
pub fn kernel_key(source: &str, request: &Config) -> String {
    let text = format!("{RECIPE}\nsource {source}\n{}", request.render());
    sha256_hex(text.as_bytes())
}

/// True when `stamp` records `key` and `artifact` exists.
pub fn is_fresh(stamp: &Path, key: &str, artifact: &Path) -> bool {
    artifact.is_file() && fs::read_to_string(stamp).is_ok_and(|text| text.trim() == key)
}

/// Records that `key` has been built.
pub fn record(stamp: &Path, key: &str) -> Result<()> {
    fs::write(stamp, format!("{key}\n"))
        .with_context(|| format!("cannot write {}", stamp.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(text).expect("valid fragment")
    }

    #[test]
    fn key_follows_the_fragment_values_only() {
        let base = kernel_key("debian x 6.12.117 aa", &config("CONFIG_SMP=y\n"));
        let commented = kernel_key(
            "debian x 6.12.117 aa",
            &config("# Platform: why\nCONFIG_SMP=y\n\n"),
        );
        assert_eq!(base, commented);
        let changed = kernel_key("debian x 6.12.117 aa", &config("# CONFIG_SMP is not set\n"));
        assert_ne!(base, changed);
        let added = kernel_key(
            "debian x 6.12.117 aa",
            &config("CONFIG_SMP=y\nCONFIG_PVH=y\n"),
        );
        assert_ne!(base, added);
    }

    #[test]
    fn key_follows_the_source() {
        let request = config("CONFIG_SMP=y\n");
        assert_ne!(
            kernel_key("debian x 6.12.117 aa", &request),
            kernel_key("debian x 6.12.117 bb", &request)
        );
        assert_ne!(
            kernel_key("tree /a 6.12.0", &request),
            kernel_key("tree /b 6.12.0", &request)
        );
    }

    #[test]
    fn fresh_needs_matching_stamp_and_artifact() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (stamp, artifact) = (dir.path().join("stamp"), dir.path().join("vmlinux"));
        assert!(!is_fresh(&stamp, "k1", &artifact));
        record(&stamp, "k1").expect("record");
        assert!(!is_fresh(&stamp, "k1", &artifact), "artifact missing");
        fs::write(&artifact, b"elf").expect("write");
        assert!(is_fresh(&stamp, "k1", &artifact));
        assert!(!is_fresh(&stamp, "k2", &artifact));
    }
}
