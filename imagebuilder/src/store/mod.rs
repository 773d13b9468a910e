//! The content-addressed image cache: verified blobs by sha256, an index of pulled
//! references, and the packer's outputs. Every writer holds a shared "usage" lock on the
//! store and garbage collection an exclusive one, so `rmi` never deletes what a pull is using;
//! per-blob locks make parallel pulls of one blob download it once.

mod blobs;
mod index;

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

pub use blobs::BlobLock;
pub use index::{GcReport, ImageRecord, LayerRecord};

use crate::digest::Digest;

/// Errors of the cache.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file or directory of the cache could not be used.
    #[error("cache file {path}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Content does not hash to the digest it is supposed to have.
    #[error("content has digest {actual}, expected {expected}")]
    DigestMismatch {
        /// The digest that was asked for.
        expected: Digest,
        /// What the bytes hash to.
        actual: Digest,
    },
    /// Content has another length than its descriptor says.
    #[error("{digest} is {actual} bytes, expected {expected}")]
    SizeMismatch {
        /// The blob.
        digest: Digest,
        /// Size from the descriptor.
        expected: u64,
        /// Bytes seen.
        actual: u64,
    },
    /// A blob is larger than the caller accepts (manifests and configs are read into memory).
    #[error("{digest} is larger than {max} bytes")]
    TooLarge {
        /// The blob.
        digest: Digest,
        /// The limit.
        max: u64,
    },
    /// The cache index is not valid JSON of our format.
    #[error("malformed image index {path}")]
    Index {
        /// The index file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// No image of that name is in the cache.
    #[error("no such image: {0}")]
    NoSuchImage(String),
    /// Neither `XDG_CACHE_HOME` nor `HOME` is set for a non-root user.
    #[error("cannot find a cache directory: set HOME, XDG_CACHE_HOME or KATALITE_CACHE_DIR")]
    NoCacheDir,
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The cache rooted at one directory.
///
/// Layout: `blobs/sha256/<hex>` (verified content), `tmp/` (downloads in progress, never
/// read as blobs), `locks/` (flock files), `images.json` (reference → manifest),
/// `packed/` (the packer's initramfs files, named `sha256-<manifest hex>...`).
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// Held while using blobs (pulling, importing, packing); `gc` waits until no one holds it.
#[derive(Debug)]
pub struct UsageGuard {
    _file: File,
}

impl Store {
    /// Opens (creating as needed, mode 0700) the cache at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let store = Self { root: root.into() };
        for dir in [
            store.root.clone(),
            store.root.join("blobs/sha256"),
            store.tmp_dir(),
            store.root.join("locks"),
            store.packed_dir(),
            store.disk_dir(),
        ] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(io_err(&dir))?;
        }
        Ok(store)
    }

    /// The default cache root: `$KATALITE_CACHE_DIR`, else `/var/lib/katalite` for root,
    /// else `$XDG_CACHE_HOME/katalite`, else `~/.cache/katalite`.
    pub fn default_root() -> Result<PathBuf, StoreError> {
        let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
        if let Some(dir) = var("KATALITE_CACHE_DIR") {
            return Ok(PathBuf::from(dir));
        }
        if effective_uid() == 0 {
            return Ok(PathBuf::from("/var/lib/katalite"));
        }
        if let Some(dir) = var("XDG_CACHE_HOME") {
            return Ok(PathBuf::from(dir).join("katalite"));
        }
        var("HOME")
            .map(|home| PathBuf::from(home).join(".cache/katalite"))
            .ok_or(StoreError::NoCacheDir)
    }

    /// The cache root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the packer keeps its outputs (`sha256-<manifest hex><anything>`); `gc` removes
    /// those whose manifest is no longer referenced.
    pub fn packed_dir(&self) -> PathBuf {
        self.root.join("packed")
    }

    /// Where the EROFS disk images and their block lists live (`sha256-<manifest
    /// hex><anything>`); `gc` removes those whose manifest is no longer referenced.
    pub fn disk_dir(&self) -> PathBuf {
        self.root.join("erofs")
    }

    /// Where a verified blob lives (it may not exist yet).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    /// Whether the blob is present (not re-verified).
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Takes the shared usage lock (blocks while a `gc` runs).
    pub fn hold(&self) -> Result<UsageGuard, StoreError> {
        let file = self.lock_file(&self.root.join("gc.lock"))?;
        file.lock_shared().map_err(io_err(&self.root))?;
        Ok(UsageGuard { _file: file })
    }

    pub(crate) fn lock_file(&self, path: &Path) -> Result<File, StoreError> {
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io_err(path))
    }
}

/// The effective user id, read from `/proc/self/status` so this crate needs no FFI.
pub(crate) fn effective_uid() -> u32 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1))
                .and_then(|euid| euid.parse().ok())
        })
        .unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn open_creates_private_layout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("cache");
        let store = Store::open(&root).expect("open");
        for sub in ["", "blobs/sha256", "tmp", "locks", "packed"] {
            let meta = fs::metadata(root.join(sub)).expect("created");
            assert_eq!(meta.permissions().mode() & 0o777, 0o700, "{sub}");
        }
        let d = Digest::of(b"x");
        assert_eq!(store.blob_path(&d), root.join("blobs/sha256").join(d.hex()));
        assert!(!store.has_blob(&d));
    }

    #[test]
    fn euid_is_read() {
        // The test suite runs as some real user; u32::MAX would mean /proc was unreadable.
        assert_ne!(effective_uid(), u32::MAX);
    }
}
