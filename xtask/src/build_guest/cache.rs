//! Built guest kernels in the user cache (`crate::user_cache`): `guest/<stamp key>/` holds
//! the `vmlinux`, its resolved `.config` and its stamp, so a fresh clone on the same machine
//! copies the kernel instead of compiling it for minutes.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::stamp::Stamp;
use crate::user_cache::{self, Staged};

/// The files of a built kernel, in `out` and in a cache entry. The stamp comes last: it
/// vouches for the others, so it is written after them and removed before them.
const FILES: [&str; 3] = ["vmlinux", "vmlinux.config", "vmlinux.stamp"];

/// The cache directory of all built kernels.
pub fn dir() -> Result<PathBuf> {
    user_cache::section("guest")
}

/// Copies the kernel cached for `stamp` into `out`; false when the cache has none.
pub fn restore(cache: &Path, stamp: &Stamp, out: &Path) -> Result<bool> {
    let entry = cache.join(&stamp.key);
    let complete = FILES.iter().all(|name| entry.join(name).is_file())
        && Stamp::read(&entry.join("vmlinux.stamp")).is_some_and(|found| found.key == stamp.key);
    if !complete {
        return Ok(false);
    }
    let _ = fs::remove_file(out.join("vmlinux.stamp"));
    for name in FILES {
        let (from, to) = (entry.join(name), out.join(name));
        let partial = PathBuf::from(format!("{}.partial", to.display()));
        fs::copy(&from, &partial)
            .with_context(|| format!("cannot copy {} from the cache", from.display()))?;
        fs::rename(&partial, &to).with_context(|| format!("cannot write {}", to.display()))?;
    }
    Ok(true)
}

/// Stores the kernel just built in `out` under its stamp's key, replacing an older entry.
pub fn store(cache: &Path, stamp: &Stamp, out: &Path) -> Result<PathBuf> {
    let staged = Staged::new(&cache.join(&stamp.key))?;
    for name in FILES {
        let from = out.join(name);
        fs::copy(&from, staged.path().join(name))
            .with_context(|| format!("cannot copy {} into the cache", from.display()))?;
    }
    staged.commit()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build_guest::kconfig::Config;
    use crate::build_guest::stamp::KernelSource;

    fn stamp(sha: &str) -> Stamp {
        let source = KernelSource::Debian {
            package: "linux-source-6.12".into(),
            debian_version: "6.12.118-1".into(),
            upstream_version: "6.12.118".into(),
            tarball_sha256: sha.repeat(64),
        };
        Stamp::new(
            source,
            &Config::parse("CONFIG_SMP=y\n").expect("config"),
            vec![],
        )
    }

    fn built(out: &Path, stamp: &Stamp, vmlinux: &[u8]) {
        fs::create_dir_all(out).expect("mkdir");
        fs::write(out.join("vmlinux"), vmlinux).expect("vmlinux");
        fs::write(out.join("vmlinux.config"), b"CONFIG_SMP=y\n").expect("config");
        stamp.write(&out.join("vmlinux.stamp")).expect("stamp");
    }

    #[test]
    fn a_stored_kernel_is_restored_into_a_fresh_clone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = dir.path().join("cache");
        fs::create_dir_all(&cache).expect("mkdir");
        let (first, second) = (dir.path().join("clone1"), dir.path().join("clone2"));
        let wanted = stamp("a");
        built(&first, &wanted, b"\x7fELF kernel");
        fs::create_dir_all(&second).expect("mkdir");
        assert!(!restore(&cache, &wanted, &second).expect("empty cache"));

        store(&cache, &wanted, &first).expect("store");
        assert!(restore(&cache, &wanted, &second).expect("restore"));
        assert_eq!(
            fs::read(second.join("vmlinux")).expect("read"),
            b"\x7fELF kernel"
        );
        assert!(wanted.is_fresh(&second.join("vmlinux.stamp"), &second.join("vmlinux")));
        // Another key finds nothing.
        assert!(!restore(&cache, &stamp("b"), &second).expect("other key"));
    }

    #[test]
    fn an_incomplete_entry_is_not_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cache, out) = (dir.path().join("cache"), dir.path().join("out"));
        let wanted = stamp("c");
        let entry = cache.join(&wanted.key);
        built(&entry, &wanted, b"kernel");
        fs::remove_file(entry.join("vmlinux.config")).expect("rm");
        fs::create_dir_all(&out).expect("mkdir");
        assert!(!restore(&cache, &wanted, &out).expect("incomplete"));
        assert!(!out.join("vmlinux").exists());
    }
}
