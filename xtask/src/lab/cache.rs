//! Freshness keys for what the lab caches under `target/lab/`.
//!
//! A cached artifact sits next to a `.key` file holding a hash of everything it was built
//! from; a different key means rebuild.

use std::fs;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

/// A key over `parts` (stable for one toolchain, which is all a local cache needs).
pub fn key(parts: &[&[u8]]) -> String {
    let mut hasher = DefaultHasher::new();
    parts.hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

/// Identifies a file's version by size and modification time, without reading it.
pub fn file_version(path: &Path) -> Result<String> {
    let meta = fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
    let modified = meta
        .modified()
        .ok()
        .and_then(|time| time.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |since| since.as_nanos());
    Ok(format!("{}:{modified}", meta.len()))
}

/// Whether `artifact` exists and was built with `key`.
pub fn is_fresh(artifact: &Path, key: &str) -> bool {
    artifact.exists() && fs::read_to_string(key_path(artifact)).is_ok_and(|stored| stored == key)
}

/// Records that `artifact` was built with `key`.
pub fn mark(artifact: &Path, key: &str) -> Result<()> {
    let path = key_path(artifact);
    fs::write(&path, key).with_context(|| format!("cannot write {}", path.display()))
}

/// Deletes temporary files and dirs (`tempfile`'s `.tmp*`) older than `age` from `dir`: runs
/// stopped by a signal leave their per-run initramfs behind. Best effort: a cache that
/// cannot be tidied still works.
pub fn remove_abandoned(dir: &Path, age: Duration) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let is_temporary = entry.file_name().to_string_lossy().starts_with(".tmp");
        let is_old = entry
            .metadata()
            .and_then(|meta| meta.modified())
            .ok()
            .and_then(|modified| SystemTime::now().duration_since(modified).ok())
            .is_some_and(|elapsed| elapsed > age);
        if is_temporary && is_old {
            let path = entry.path();
            // Failing to delete leaves garbage, nothing worse.
            let _ = fs::remove_dir_all(&path).or_else(|_| fs::remove_file(&path));
        }
    }
}

fn key_path(artifact: &Path) -> std::path::PathBuf {
    let mut name = artifact.as_os_str().to_owned();
    name.push(".key");
    name.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_change_with_any_part() {
        let base = key(&[b"init", b"6.1"]);
        assert_eq!(base, key(&[b"init", b"6.1"]));
        assert_ne!(base, key(&[b"init", b"6.2"]));
        assert_ne!(base, key(&[b"ini", b"t6.1"]));
    }

    #[test]
    fn only_old_temporaries_are_removed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let old = dir.path().join(".tmpOLD");
        let fresh = dir.path().join(".tmpNEW");
        let artifact = dir.path().join("l1.cpio");
        for path in [&old, &fresh, &artifact] {
            fs::write(path, b"x").expect("write");
        }
        let two_days_ago = SystemTime::now() - Duration::from_secs(48 * 3600);
        for path in [&old, &artifact] {
            let file = fs::File::options().write(true).open(path).expect("open");
            file.set_modified(two_days_ago).expect("set mtime");
        }
        remove_abandoned(dir.path(), Duration::from_secs(24 * 3600));
        assert!(!old.exists());
        assert!(fresh.exists());
        assert!(artifact.exists());
    }

    #[test]
    fn an_artifact_is_fresh_only_with_its_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        let artifact = dir.path().join("l1.cpio");
        assert!(!is_fresh(&artifact, "k1"));
        fs::write(&artifact, b"x").expect("write artifact");
        assert!(!is_fresh(&artifact, "k1"));
        mark(&artifact, "k1").expect("write key");
        assert!(is_fresh(&artifact, "k1"));
        assert!(!is_fresh(&artifact, "k2"));
    }
}
