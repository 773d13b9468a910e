//! Writing and reading blobs. Content is written to `tmp/`, hashed while it streams, fsynced
//! and renamed into `blobs/sha256/<hex>` only when its digest and size match, so a killed
//! process never leaves a partial blob where a reader would find it.

use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use super::{io_err, Store, StoreError};
use crate::digest::Digest;

/// Exclusive right to write one blob (an flock on `locks/<hex>.lock`; released on drop or
/// when the process dies).
#[derive(Debug)]
pub struct BlobLock {
    _file: File,
}

impl Store {
    /// Blocks until this process holds the blob's lock.
    pub fn lock_blob(&self, digest: &Digest) -> Result<BlobLock, StoreError> {
        let path = self.lock_path(digest);
        let file = self.lock_file(&path)?;
        file.lock().map_err(io_err(&path))?;
        Ok(BlobLock { _file: file })
    }

    /// Takes the blob's lock if no one else holds it.
    pub fn try_lock_blob(&self, digest: &Digest) -> Result<Option<BlobLock>, StoreError> {
        let path = self.lock_path(digest);
        let file = self.lock_file(&path)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(BlobLock { _file: file })),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(io_err(&path)(e)),
        }
    }

    fn lock_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("locks")
            .join(format!("{}.lock", digest.hex()))
    }

    /// Where a resumable download of `digest` accumulates (only touched under its lock).
    pub(crate) fn partial_path(&self, digest: &Digest) -> PathBuf {
        self.tmp_dir().join(format!("{}.partial", digest.hex()))
    }

    /// Moves a fully written and verified temp file into place: fsync the data, rename, fsync
    /// the directory, so after a crash the blob is either absent or complete.
    pub(crate) fn commit(
        &self,
        file: &File,
        tmp: &Path,
        digest: &Digest,
    ) -> Result<PathBuf, StoreError> {
        file.sync_all().map_err(io_err(tmp))?;
        let dest = self.blob_path(digest);
        fs::rename(tmp, &dest).map_err(io_err(&dest))?;
        let dir = self.root.join("blobs/sha256");
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&dir))?;
        Ok(dest)
    }

    /// Streams `reader` into the cache. With `expected`, the content must hash to it (and an
    /// existing blob is reused without reading); with `expected_size`, it must have that
    /// length. Returns the digest, size and path of the stored blob.
    pub fn put_reader(
        &self,
        expected: Option<&Digest>,
        expected_size: Option<u64>,
        reader: impl Read,
    ) -> Result<(Digest, u64, PathBuf), StoreError> {
        let _lock = match expected {
            Some(digest) => {
                let lock = self.lock_blob(digest)?;
                if self.has_blob(digest) {
                    match self.verify_blob(digest, expected_size) {
                        Ok(path) => return Ok((digest.clone(), size_of(&path)?, path)),
                        // The stored copy was corrupt and is gone: write it anew.
                        Err(
                            StoreError::DigestMismatch { .. } | StoreError::SizeMismatch { .. },
                        ) => {}
                        Err(e) => return Err(e),
                    }
                }
                Some(lock)
            }
            None => None,
        };
        let tmp_dir = self.tmp_dir();
        let mut tmp = tempfile::Builder::new()
            .prefix("import-")
            .tempfile_in(&tmp_dir)
            .map_err(io_err(&tmp_dir))?;
        let limit = expected_size.map_or(u64::MAX, |s| s.saturating_add(1));
        let (actual, size) =
            copy_hashing(reader.take(limit), tmp.as_file_mut()).map_err(io_err(tmp.path()))?;
        check(expected, expected_size, &actual, size)?;
        // Renaming over an existing copy is harmless: the content is identical and verified.
        let (file, temp_path) = tmp.into_parts();
        let path = self.commit(&file, &temp_path, &actual)?;
        // The rename consumed the temp name; disarm its delete-on-drop.
        let _ = temp_path.keep();
        Ok((actual, size, path))
    }

    /// Stores `bytes`, returning their digest.
    pub fn put_bytes(&self, expected: Option<&Digest>, bytes: &[u8]) -> Result<Digest, StoreError> {
        let size = bytes.len() as u64;
        Ok(self.put_reader(expected, Some(size), bytes)?.0)
    }

    /// Re-hashes a stored blob. A blob that no longer matches is deleted (so the next pull
    /// fetches it again) and reported.
    pub fn verify_blob(&self, digest: &Digest, size: Option<u64>) -> Result<PathBuf, StoreError> {
        let path = self.blob_path(digest);
        let file = File::open(&path).map_err(io_err(&path))?;
        let (actual, actual_size) =
            Digest::of_reader(BufReader::with_capacity(256 * 1024, file)).map_err(io_err(&path))?;
        if let Err(e) = check(Some(digest), size, &actual, actual_size) {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        Ok(path)
    }

    /// Reads a small blob (manifest, config) after verifying it.
    pub fn read_blob(&self, digest: &Digest, max: u64) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(digest);
        let file = File::open(&path).map_err(io_err(&path))?;
        let mut bytes = Vec::new();
        file.take(max.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(io_err(&path))?;
        if bytes.len() as u64 > max {
            return Err(StoreError::TooLarge {
                digest: digest.clone(),
                max,
            });
        }
        let actual = Digest::of(&bytes);
        if &actual != digest {
            let _ = fs::remove_file(&path);
            return Err(StoreError::DigestMismatch {
                expected: digest.clone(),
                actual,
            });
        }
        Ok(bytes)
    }
}

fn size_of(path: &Path) -> Result<u64, StoreError> {
    Ok(fs::metadata(path).map_err(io_err(path))?.len())
}

/// Checks a hashed stream against what was expected of it.
pub(crate) fn check(
    expected: Option<&Digest>,
    expected_size: Option<u64>,
    actual: &Digest,
    size: u64,
) -> Result<(), StoreError> {
    if let Some(want) = expected_size {
        if want != size {
            return Err(StoreError::SizeMismatch {
                digest: expected.unwrap_or(actual).clone(),
                expected: want,
                actual: size,
            });
        }
    }
    match expected {
        Some(want) if want != actual => Err(StoreError::DigestMismatch {
            expected: want.clone(),
            actual: actual.clone(),
        }),
        _ => Ok(()),
    }
}

/// Copies `reader` into `out` while hashing it; returns the digest and the byte count.
fn copy_hashing(reader: impl Read, out: &mut File) -> io::Result<(Digest, u64)> {
    Digest::of_reader(Tee { inner: reader, out })
}

/// A reader that writes everything read through it to `out` too.
struct Tee<'a, R> {
    inner: R,
    out: &'a mut File,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.out.write_all(&buf[..n])?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier};
    use std::time::Duration;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path().join("c")).expect("open");
        (dir, store)
    }

    fn tmp_entries(store: &Store) -> usize {
        fs::read_dir(store.tmp_dir()).expect("tmp dir").count()
    }

    #[test]
    fn put_verifies_digest_and_size() {
        let (_d, store) = store();
        let good = Digest::of(b"hello");
        assert_eq!(
            store.put_bytes(Some(&good), b"hello").expect("stored"),
            good
        );
        assert_eq!(store.read_blob(&good, 100).expect("read"), b"hello");

        let other = Digest::of(b"other");
        let err = store
            .put_bytes(Some(&other), b"hello")
            .expect_err("mismatch");
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
        assert!(!store.has_blob(&other));

        let err = store
            .put_reader(Some(&other), Some(3), &b"other"[..])
            .expect_err("longer than declared");
        assert!(
            matches!(err, StoreError::SizeMismatch { actual: 4, .. }),
            "{err}"
        );
        assert!(!store.has_blob(&other));
        assert_eq!(tmp_entries(&store), 0, "failed writes leave no temp files");
    }

    #[test]
    fn unknown_digest_is_computed_and_deduplicated() {
        let (_d, store) = store();
        let (d1, n, p1) = store.put_reader(None, None, &b"layer"[..]).expect("stored");
        assert_eq!((d1.clone(), n), (Digest::of(b"layer"), 5));
        let (d2, _, p2) = store.put_reader(None, None, &b"layer"[..]).expect("stored");
        assert_eq!((d1, p1), (d2, p2));
        assert_eq!(tmp_entries(&store), 0);
    }

    #[test]
    fn partial_files_are_never_blobs() {
        let (_d, store) = store();
        let digest = Digest::of(b"complete content");
        fs::write(store.partial_path(&digest), b"complete").expect("write partial");
        assert!(
            !store.has_blob(&digest),
            "a partial download does not count"
        );
        assert!(store.read_blob(&digest, 100).is_err());
        // Importing the real content still works and ignores the stale partial.
        store
            .put_bytes(Some(&digest), b"complete content")
            .expect("stored");
        assert!(store.has_blob(&digest));
    }

    #[test]
    fn corrupted_blob_is_detected_and_dropped() {
        let (_d, store) = store();
        let digest = store.put_bytes(None, b"original").expect("stored");
        fs::write(store.blob_path(&digest), b"originaL").expect("flip a byte");
        let err = store.verify_blob(&digest, Some(8)).expect_err("corrupt");
        assert!(matches!(err, StoreError::DigestMismatch { .. }));
        assert!(!store.has_blob(&digest), "corrupt blob removed");

        let digest = store.put_bytes(None, b"original").expect("stored");
        fs::write(store.blob_path(&digest), b"originaL").expect("flip a byte");
        assert!(store.read_blob(&digest, 100).is_err());
        let digest = store.put_bytes(None, b"big").expect("stored");
        assert!(matches!(
            store.read_blob(&digest, 2),
            Err(StoreError::TooLarge { max: 2, .. })
        ));
    }

    #[test]
    fn blob_lock_is_exclusive_across_handles() {
        let (_d, store) = store();
        let digest = Digest::of(b"x");
        let held = store.lock_blob(&digest).expect("lock");
        assert!(store.try_lock_blob(&digest).expect("try").is_none());
        drop(held);
        assert!(store.try_lock_blob(&digest).expect("try").is_some());
    }

    #[test]
    fn parallel_writers_store_once() {
        let (_d, store) = store();
        let content = vec![7u8; 1 << 20];
        let digest = Digest::of(&content);
        let reads = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (store, content, digest) = (store.clone(), content.clone(), digest.clone());
                let (reads, barrier) = (reads.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    // A reader that counts how often the content is actually consumed.
                    let reader = CountingReader {
                        inner: &content[..],
                        first: true,
                        reads: &reads,
                    };
                    store.put_reader(Some(&digest), Some(content.len() as u64), reader)
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread").expect("stored");
        }
        assert_eq!(
            reads.load(Ordering::SeqCst),
            1,
            "content consumed exactly once"
        );
        assert!(store.verify_blob(&digest, None).is_ok());
    }

    struct CountingReader<'a> {
        inner: &'a [u8],
        first: bool,
        reads: &'a AtomicUsize,
    }

    impl Read for CountingReader<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.first {
                self.first = false;
                self.reads.fetch_add(1, Ordering::SeqCst);
                // Widen the race window so a missing lock would show.
                std::thread::sleep(Duration::from_millis(20));
            }
            self.inner.read(buf)
        }
    }
}
