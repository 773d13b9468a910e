//! katalite's build cache outside the work tree: `$KATALITE_BUILD_CACHE`, else
//! `$XDG_CACHE_HOME/katalite`, else `~/.cache/katalite` (beside, never inside, the image
//! cache a non-root katalite keeps there: sections `guest/` and `lab/` are ours). It holds
//! what is slow to make and the same for every clone on a machine (the built guest kernel,
//! the lab's downloaded L1 kernel), so a fresh clone does not rebuild or download it again.
//!
//! Directories are created 0700 (the cache holds executables that end up in katalite), and
//! entries appear whole or not at all: each is written into a temporary directory beside
//! its final place and renamed there.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The cache root (not created).
pub fn root() -> Result<PathBuf> {
    root_from(|name| std::env::var_os(name))
}

fn root_from(env: impl Fn(&str) -> Option<std::ffi::OsString>) -> Result<PathBuf> {
    let var = |name: &str| env(name).filter(|value| !value.is_empty());
    if let Some(dir) = var("KATALITE_BUILD_CACHE") {
        return absolute(PathBuf::from(dir), "KATALITE_BUILD_CACHE");
    }
    if let Some(dir) = var("XDG_CACHE_HOME") {
        return Ok(absolute(PathBuf::from(dir), "XDG_CACHE_HOME")?.join("katalite"));
    }
    let home =
        var("HOME").context("neither KATALITE_BUILD_CACHE, XDG_CACHE_HOME nor HOME is set")?;
    Ok(absolute(PathBuf::from(home), "HOME")?.join(".cache/katalite"))
}

fn absolute(path: PathBuf, name: &str) -> Result<PathBuf> {
    if !path.is_absolute() {
        bail!("{name} must be an absolute path, not {}", path.display());
    }
    Ok(path)
}

/// `root/section`, created 0700 along with the root.
pub fn section(section: &str) -> Result<PathBuf> {
    let dir = root()?.join(section);
    private_dir(&dir)?;
    Ok(dir)
}

/// Creates `dir` (and missing parents) with mode 0700, and makes an existing `dir` 0700.
pub fn private_dir(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot make {} private", dir.display()))
}

/// A directory being filled, published at `dest` by `commit`; dropped before that, it
/// vanishes with its contents.
pub struct Staged {
    temp: tempfile::TempDir,
    dest: PathBuf,
}

impl Staged {
    /// Starts an entry that will be `dest` (its parent must exist).
    pub fn new(dest: &Path) -> Result<Self> {
        let parent = dest.parent().context("a cache entry needs a parent")?;
        let temp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempdir_in(parent)
            .with_context(|| format!("cannot create a temporary dir in {}", parent.display()))?;
        fs::set_permissions(temp.path(), fs::Permissions::from_mode(0o700))?;
        Ok(Self {
            temp,
            dest: dest.to_path_buf(),
        })
    }

    /// Where to write the entry's files.
    pub fn path(&self) -> &Path {
        self.temp.path()
    }

    /// Moves the entry into place, replacing an older one. Files are synced first, so a
    /// crash leaves either the old entry or the whole new one.
    pub fn commit(self) -> Result<PathBuf> {
        for entry in fs::read_dir(self.temp.path())? {
            let path = entry?.path();
            if path.is_file() {
                fs::File::open(&path)
                    .and_then(|file| file.sync_all())
                    .with_context(|| format!("cannot sync {}", path.display()))?;
            }
        }
        let staged = self.temp.keep();
        if self.dest.exists() {
            // rename(2) cannot replace a non-empty directory: move the old one aside first.
            let old = staged.with_extension("old");
            fs::rename(&self.dest, &old)
                .with_context(|| format!("cannot move aside {}", self.dest.display()))?;
            let _ = fs::remove_dir_all(&old);
        }
        if let Err(err) = fs::rename(&staged, &self.dest) {
            let _ = fs::remove_dir_all(&staged);
            return Err(err).with_context(|| format!("cannot publish {}", self.dest.display()));
        }
        Ok(self.dest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn the_root_follows_the_environment() {
        fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<std::ffi::OsString> {
            let pairs: Vec<(String, String)> = pairs
                .iter()
                .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
                .collect();
            move |name| {
                pairs
                    .iter()
                    .find(|(key, _)| key == name)
                    .map(|(_, value)| value.into())
            }
        }
        assert_eq!(
            root_from(env(&[("HOME", "/home/u")])).expect("home"),
            Path::new("/home/u/.cache/katalite")
        );
        let xdg = [("HOME", "/home/u"), ("XDG_CACHE_HOME", "/xdg")];
        assert_eq!(
            root_from(env(&xdg)).expect("xdg"),
            Path::new("/xdg/katalite")
        );
        let own = [("XDG_CACHE_HOME", "/xdg"), ("KATALITE_BUILD_CACHE", "/c")];
        assert_eq!(root_from(env(&own)).expect("own"), Path::new("/c"));
        assert!(root_from(env(&[("KATALITE_BUILD_CACHE", "rel")])).is_err());
        assert!(root_from(env(&[("HOME", "")])).is_err());
    }

    #[test]
    fn private_dirs_are_0700() {
        let dir = tempfile::tempdir().expect("tempdir");
        let nested = dir.path().join("a/b");
        private_dir(&nested).expect("create");
        assert_eq!(fs::metadata(&nested).expect("stat").mode() & 0o777, 0o700);
        fs::set_permissions(&nested, fs::Permissions::from_mode(0o755)).expect("chmod");
        private_dir(&nested).expect("again");
        assert_eq!(fs::metadata(&nested).expect("stat").mode() & 0o777, 0o700);
    }

    #[test]
    fn an_entry_appears_whole_or_not_at_all() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("entry");
        {
            let staged = Staged::new(&dest).expect("stage");
            fs::write(staged.path().join("f"), b"half").expect("write");
            // Dropped without commit: nothing is published and nothing is left.
        }
        assert!(!dest.exists());
        assert_eq!(fs::read_dir(dir.path()).expect("list").count(), 0);

        let staged = Staged::new(&dest).expect("stage");
        fs::write(staged.path().join("f"), b"v1").expect("write");
        staged.commit().expect("commit");
        assert_eq!(fs::read(dest.join("f")).expect("read"), b"v1");

        let staged = Staged::new(&dest).expect("stage");
        fs::write(staged.path().join("f"), b"v2").expect("write");
        staged.commit().expect("replace");
        assert_eq!(fs::read(dest.join("f")).expect("read"), b"v2");
        assert_eq!(fs::read_dir(dir.path()).expect("list").count(), 1);
    }
}
