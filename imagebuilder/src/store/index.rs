//! The index of images in the cache (`images.json`: reference → manifest, config and layer
//! digests) behind `images` and `rmi`, and the garbage collection of blobs and packed
//! initramfs files that no reference needs any more.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{io_err, Store, StoreError};

const INDEX_VERSION: u32 = 1;

/// One layer of a recorded image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// `sha256:<hex>` of the blob.
    pub digest: String,
    /// Blob size in bytes.
    pub size: u64,
    /// Its media type (synthesized from the content for `docker save` archives).
    pub media_type: String,
}

/// What the cache knows about one reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The normalized reference (`docker.io/library/busybox:latest`, `oci:/dir:tag`...).
    pub reference: String,
    /// `sha256:<hex>` of the image manifest.
    pub manifest_digest: String,
    /// Size of the manifest blob.
    pub manifest_size: u64,
    /// Its media type (needed to parse it again: OCI manifests may omit `mediaType`).
    #[serde(default)]
    pub manifest_media_type: String,
    /// `sha256:<hex>` of the config blob.
    pub config_digest: String,
    /// Size of the config blob.
    pub config_size: u64,
    /// Layers, lowest first.
    pub layers: Vec<LayerRecord>,
    /// When it was pulled, in seconds since the Unix epoch.
    pub pulled_at: u64,
}

impl ImageRecord {
    /// Bytes of all blobs of the image (as stored, i.e. compressed layers).
    pub fn size(&self) -> u64 {
        self.manifest_size + self.config_size + self.layers.iter().map(|l| l.size).sum::<u64>()
    }

    fn digests(&self) -> impl Iterator<Item = &str> {
        [self.manifest_digest.as_str(), self.config_digest.as_str()]
            .into_iter()
            .chain(self.layers.iter().map(|l| l.digest.as_str()))
    }
}

/// What a garbage collection removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Unreferenced blobs deleted.
    pub blobs_removed: usize,
    /// Packed initramfs files of unreferenced manifests deleted.
    pub packed_removed: usize,
    /// Bytes freed in total (including abandoned downloads).
    pub bytes_freed: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct IndexFile {
    version: u32,
    images: BTreeMap<String, ImageRecord>,
}

impl Store {
    /// All recorded images, sorted by reference.
    pub fn images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        Ok(self.read_index()?.images.into_values().collect())
    }

    /// The record of one reference, if present.
    pub fn image(&self, reference: &str) -> Result<Option<ImageRecord>, StoreError> {
        Ok(self.read_index()?.images.remove(reference))
    }

    /// Records (or replaces) an image. Its blobs must already be in the cache.
    pub fn record_image(&self, record: ImageRecord) -> Result<(), StoreError> {
        self.update_index(|index| {
            index.images.insert(record.reference.clone(), record);
            Ok(())
        })
    }

    /// Forgets a reference (its blobs stay until [`Store::gc`]).
    pub fn remove_image(&self, reference: &str) -> Result<ImageRecord, StoreError> {
        let mut removed = None;
        self.update_index(|index| {
            removed = index.images.remove(reference);
            Ok(())
        })?;
        removed.ok_or_else(|| StoreError::NoSuchImage(reference.to_string()))
    }

    /// Deletes blobs, packed files and disk images no recorded image references, abandoned downloads
    /// and lock files. Waits until no other process uses the store (so it never deletes
    /// what a running pull just stored); do not call it while holding a [`super::UsageGuard`].
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        let lock_path = self.root.join("gc.lock");
        let lock = self.lock_file(&lock_path)?;
        lock.lock().map_err(io_err(&lock_path))?;

        let index = self.read_index()?;
        let referenced: HashSet<&str> = index
            .images
            .values()
            .flat_map(|r| r.digests())
            .filter_map(|d| d.strip_prefix("sha256:"))
            .collect();
        let manifests: HashSet<&str> = index
            .images
            .values()
            .filter_map(|r| r.manifest_digest.strip_prefix("sha256:"))
            .collect();

        let mut report = GcReport::default();
        for (path, name) in entries(&self.root.join("blobs/sha256"))? {
            if !referenced.contains(name.as_str()) {
                report.bytes_freed += remove(&path)?;
                report.blobs_removed += 1;
            }
        }
        let packed = entries(&self.packed_dir())?;
        let disks = entries(&self.disk_dir())?;
        for (path, name) in packed.into_iter().chain(disks) {
            // The packer and the disk image writer name their files
            // `sha256-<manifest hex>.<format...>`.
            let owner = name
                .strip_prefix("sha256-")
                .and_then(|rest| rest.get(..64))
                .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()));
            if owner.is_some_and(|hex| !manifests.contains(hex)) {
                report.bytes_freed += remove(&path)?;
                report.packed_removed += 1;
            }
        }
        // Nobody holds the usage lock, so nothing in tmp/ or locks/ is in use.
        for dir in [self.tmp_dir(), self.root.join("locks")] {
            for (path, _) in entries(&dir)? {
                report.bytes_freed += remove(&path)?;
            }
        }
        Ok(report)
    }

    /// Bytes used by the cache (blobs, packed files and downloads in progress).
    pub fn disk_usage(&self) -> Result<u64, StoreError> {
        dir_size(&self.root)
    }

    fn index_path(&self) -> std::path::PathBuf {
        self.root.join("images.json")
    }

    fn read_index(&self) -> Result<IndexFile, StoreError> {
        let path = self.index_path();
        match fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|source| StoreError::Index { path, source })
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(IndexFile {
                version: INDEX_VERSION,
                images: BTreeMap::new(),
            }),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Read-modify-write of the index under its own lock, replaced atomically.
    fn update_index(
        &self,
        change: impl FnOnce(&mut IndexFile) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let lock_path = self.root.join("images.lock");
        let lock = self.lock_file(&lock_path)?;
        lock.lock().map_err(io_err(&lock_path))?;
        let mut index = self.read_index()?;
        change(&mut index)?;
        index.version = INDEX_VERSION;
        let path = self.index_path();
        let bytes = serde_json::to_vec_pretty(&index).map_err(|source| StoreError::Index {
            path: path.clone(),
            source,
        })?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".images-")
            .tempfile_in(&self.root)
            .map_err(io_err(&self.root))?;
        tmp.write_all(&bytes).map_err(io_err(tmp.path()))?;
        tmp.as_file().sync_all().map_err(io_err(tmp.path()))?;
        tmp.persist(&path).map_err(|e| io_err(&path)(e.error))?;
        File::open(&self.root)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.root))
    }
}

fn entries(dir: &Path) -> Result<Vec<(std::path::PathBuf, String)>, StoreError> {
    let mut out = Vec::new();
    let listing = match fs::read_dir(dir) {
        Ok(listing) => listing,
        // A cache that never packed or built a disk image has no such directory.
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err(dir)(e)),
    };
    for entry in listing {
        let entry = entry.map_err(io_err(dir))?;
        out.push((
            entry.path(),
            entry.file_name().to_string_lossy().into_owned(),
        ));
    }
    Ok(out)
}

/// Removes a file or tree, returning the bytes it held.
fn remove(path: &Path) -> Result<u64, StoreError> {
    let size = dir_size(path)?;
    let meta = fs::symlink_metadata(path).map_err(io_err(path))?;
    let result = if meta.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    match result {
        Ok(()) => Ok(size),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn dir_size(path: &Path) -> Result<u64, StoreError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_err(path)(e)),
    };
    if !meta.is_dir() {
        return Ok(meta.len());
    }
    let mut total = 0;
    for (child, _) in entries(path)? {
        total += dir_size(&child)?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;

    fn record(store: &Store, reference: &str, layers: &[&[u8]]) -> ImageRecord {
        let manifest = store
            .put_bytes(None, reference.as_bytes())
            .expect("manifest");
        let config = store.put_bytes(None, b"{}").expect("config");
        let layers = layers
            .iter()
            .map(|bytes| LayerRecord {
                digest: store.put_bytes(None, bytes).expect("layer").to_string(),
                size: bytes.len() as u64,
                media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            })
            .collect();
        let record = ImageRecord {
            reference: reference.into(),
            manifest_digest: manifest.to_string(),
            manifest_size: reference.len() as u64,
            manifest_media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            config_digest: config.to_string(),
            config_size: 2,
            layers,
            pulled_at: 1,
        };
        store.record_image(record.clone()).expect("record");
        record
    }

    #[test]
    fn records_list_and_remove() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        assert!(store.images().expect("empty index").is_empty());
        let a = record(&store, "docker.io/library/a:latest", &[b"one", b"two"]);
        record(&store, "docker.io/library/b:latest", &[b"two", b"three"]);
        assert_eq!(a.size(), a.manifest_size + 2 + 6);
        let names: Vec<_> = store
            .images()
            .expect("list")
            .into_iter()
            .map(|r| r.reference)
            .collect();
        assert_eq!(
            names,
            ["docker.io/library/a:latest", "docker.io/library/b:latest"]
        );
        assert_eq!(
            store.image("docker.io/library/a:latest").expect("get"),
            Some(a.clone())
        );
        assert_eq!(store.remove_image(&a.reference).expect("removed"), a);
        assert!(matches!(
            store.remove_image(&a.reference),
            Err(StoreError::NoSuchImage(_))
        ));
    }

    #[test]
    fn gc_keeps_shared_blobs_and_drops_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let a = record(&store, "a", &[b"only-a", b"shared"]);
        let b = record(&store, "b", &[b"shared", b"only-b"]);
        let packed_a = store
            .packed_dir()
            .join(format!("sha256-{}.v1.cpio.zst.x", &a.manifest_digest[7..]));
        let packed_b = store
            .packed_dir()
            .join(format!("sha256-{}.v1.cpio.zst.x", &b.manifest_digest[7..]));
        let foreign = store.packed_dir().join("README");
        for p in [&packed_a, &packed_b, &foreign] {
            fs::write(p, b"packed").expect("write packed");
        }
        fs::write(store.tmp_dir().join("abandoned.partial"), b"xx").expect("partial");
        store.remove_image("a").expect("rmi a");
        let before = store.disk_usage().expect("du");
        let report = store.gc().expect("gc");
        assert_eq!(report.blobs_removed, 2, "a's manifest and only-a");
        assert_eq!(report.packed_removed, 1);
        assert_eq!(store.disk_usage().expect("du"), before - report.bytes_freed);
        assert!(!packed_a.exists() && packed_b.exists() && foreign.exists());
        assert!(!store.has_blob(&Digest::of(b"only-a")));
        for kept in [&b"shared"[..], b"only-b", b"{}"] {
            assert!(store.has_blob(&Digest::of(kept)));
        }
        assert_eq!(fs::read_dir(store.tmp_dir()).expect("tmp").count(), 0);
    }

    #[test]
    fn gc_waits_for_users() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let guard = store.hold().expect("hold");
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let t = {
            let (store, done) = (store.clone(), done.clone());
            std::thread::spawn(move || {
                store.gc().expect("gc");
                done.store(true, std::sync::atomic::Ordering::SeqCst);
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(
            !done.load(std::sync::atomic::Ordering::SeqCst),
            "gc ran while in use"
        );
        drop(guard);
        t.join().expect("gc thread");
        assert!(done.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[test]
    fn malformed_index_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        fs::write(dir.path().join("images.json"), b"{not json").expect("write");
        assert!(matches!(store.images(), Err(StoreError::Index { .. })));
    }
}
