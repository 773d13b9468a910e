//! A pulled image as an EROFS disk image plus its block list (the SHA-256 of every 4 KiB
//! block, 32 bytes each, in order), cached under `<cache root>/erofs/` by (manifest
//! digest, format version):
//!
//! ```text
//! sha256-<manifest>.v1.erofs                 the image
//! sha256-<manifest>.v1.blocks.<sha256>       its block list; <sha256> is the list's own
//! ```
//!
//! The list's digest in its name is the cache index: a hit checks the list against it
//! and the image's length against the list, never re-hashing the image (the block
//! device verifies blocks as it reads them). Both files are written to temporary files,
//! fsynced and renamed, the list last, so a present list implies a complete image.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::erofs::{self, ErofsError, ErofsStats, BLOCK_SIZE};
use crate::image::PulledImage;
use crate::limits::Limits;
use crate::pack::{digest_stem, remove_stale_temps};
use crate::progress::Progress;

/// Bumped whenever the image for the same layers would differ (layout, merge rules), so
/// stale images are never reused.
pub const FORMAT_VERSION: u32 = 1;

/// Prefix of files being written; a stale one (a killed builder's) is removed later.
const TEMP_PREFIX: &str = ".tmp-erofs-";

/// Bytes of one block list entry.
const HASH_SIZE: usize = 32;

/// Write buffer of the image file.
const WRITE_BUFFER: usize = 1024 * 1024;

/// Why an image's disk could not be built or its cache entry used.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The manifest digest cannot name a cache file.
    #[error("manifest digest {0:?} is not ALGORITHM:ENCODED")]
    BadDigest(String),
    /// The layers could not be turned into an EROFS image.
    #[error("build disk image of {reference}")]
    Build {
        /// The image.
        reference: String,
        /// Why.
        #[source]
        source: ErofsError,
    },
    /// The cache directory or a file in it could not be written or read.
    #[error("disk image cache {path}")]
    Cache {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A block list does not match its name or its image.
    #[error("block list {path}: {reason}")]
    BlockList {
        /// The block list file.
        path: PathBuf,
        /// What does not match.
        reason: &'static str,
    },
}

/// How to build.
#[derive(Debug, Clone)]
pub struct DiskOptions {
    /// Caps on the layers (untrusted input).
    pub limits: Limits,
    /// Where the build bar goes (hidden by default).
    pub progress: Progress,
}

impl Default for DiskOptions {
    fn default() -> Self {
        DiskOptions {
            limits: Limits::default(),
            progress: Progress::hidden(),
        }
    }
}

/// A cached EROFS image and its block list.
#[derive(Debug, Clone)]
pub struct DiskImage {
    /// The image file.
    pub path: PathBuf,
    /// The block list file.
    pub blocks_path: PathBuf,
    /// Bytes of the image (a multiple of 4096).
    pub size_bytes: u64,
    /// Hex SHA-256 of the block list file (the cache index).
    pub blocks_digest: String,
    /// What was written; `None` when the entry came from the cache.
    pub stats: Option<ErofsStats>,
}

impl DiskImage {
    /// Number of 4 KiB blocks.
    pub fn block_count(&self) -> u64 {
        self.size_bytes / BLOCK_SIZE
    }

    /// The block list file, opened for a reader that streams it (the VMM reads it once at
    /// start, then a group at a time): check what was read with [`Self::check_block_list`].
    pub fn open_block_list(&self) -> Result<fs::File, DiskError> {
        fs::File::open(&self.blocks_path).map_err(|source| DiskError::Cache {
            path: self.blocks_path.clone(),
            source,
        })
    }

    /// Checks a block list read from [`Self::open_block_list`]: its SHA-256 `digest`
    /// against the digest in its name, its `blocks` hashes against the image's current size.
    pub fn check_block_list(&self, digest: &[u8; 32], blocks: u64) -> Result<(), DiskError> {
        let image_len = fs::metadata(&self.path)
            .map_err(|source| DiskError::Cache {
                path: self.path.clone(),
                source,
            })?
            .len();
        let reason = if hex::encode(digest) != self.blocks_digest {
            "sha256 does not match its name"
        } else if blocks.checked_mul(BLOCK_SIZE) != Some(image_len) {
            "length does not match the image size"
        } else {
            return Ok(());
        };
        Err(DiskError::BlockList {
            path: self.blocks_path.clone(),
            reason,
        })
    }

    /// The SHA-256 of every block, in order, after checking the list against the digest
    /// in its name and its length against the image's current size.
    pub fn block_hashes(&self) -> Result<Vec<[u8; 32]>, DiskError> {
        let bytes = fs::read(&self.blocks_path).map_err(|source| DiskError::Cache {
            path: self.blocks_path.clone(),
            source,
        })?;
        let whole = bytes.len().is_multiple_of(HASH_SIZE);
        let blocks = if whole {
            (bytes.len() / HASH_SIZE) as u64
        } else {
            u64::MAX
        };
        self.check_block_list(&Sha256::digest(&bytes).into(), blocks)?;
        Ok(bytes
            .chunks_exact(HASH_SIZE)
            .map(|hash| hash.try_into().unwrap_or([0; 32]))
            .collect())
    }
}

/// The intact cached EROFS image of `image`, if there is one; never builds. A start that
/// finds one needs nothing else from the layers, so it can skip re-hashing them.
pub fn cached_disk_image(
    image: &PulledImage,
    cache_root: &Path,
) -> Result<Option<DiskImage>, DiskError> {
    let dir = cache_root.join("erofs");
    let stem = digest_stem(&image.manifest_digest)
        .ok_or_else(|| DiskError::BadDigest(image.manifest_digest.clone()))?;
    let key = format!("{stem}.v{FORMAT_VERSION}");
    if !dir.is_dir() {
        return Ok(None);
    }
    let image_path = dir.join(format!("{key}.erofs"));
    find_intact(&dir, &key, &image_path)
}

/// Returns the EROFS image of `image` from `<cache_root>/erofs/`, building it first when
/// there is no intact entry (a block list whose digest matches its name and whose
/// length matches the image's). Concurrent builders of one image write identical bytes
/// to their own temporary files; the last renames win.
pub fn disk_image(
    image: &PulledImage,
    cache_root: &Path,
    opts: &DiskOptions,
) -> Result<DiskImage, DiskError> {
    let dir = cache_root.join("erofs");
    let stem = digest_stem(&image.manifest_digest)
        .ok_or_else(|| DiskError::BadDigest(image.manifest_digest.clone()))?;
    let key = format!("{stem}.v{FORMAT_VERSION}");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(cache_error(&dir))?;
    let image_path = dir.join(format!("{key}.erofs"));
    if let Some(hit) = find_intact(&dir, &key, &image_path)? {
        return Ok(hit);
    }
    remove_stale_temps(&dir, TEMP_PREFIX);
    let temp = |dir: &Path| {
        tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempfile_in(dir)
            .map_err(cache_error(dir))
    };
    let (image_temp, list_temp) = (temp(&dir)?, temp(&dir)?);
    let clone = |temp: &tempfile::NamedTempFile| {
        temp.as_file().try_clone().map_err(cache_error(temp.path()))
    };
    let out = BufWriter::with_capacity(WRITE_BUFFER, clone(&image_temp)?);
    let list = HashingWriter::new(BufWriter::new(clone(&list_temp)?));
    let total = image.layers.iter().map(|layer| layer.size).sum::<u64>() * 2;
    let bar = opts.progress.bytes("building disk", Some(total));
    let result = erofs::write_erofs(&image.layers, opts.limits, &bar, out, list);
    bar.finish_and_clear();
    let (out, list, stats) = result.map_err(|source| DiskError::Build {
        reference: image.reference.clone(),
        source,
    })?;
    out.into_inner()
        .map_err(|err| err.into_error())
        .map_err(cache_error(image_temp.path()))?;
    let (list, digest) = list.finish();
    list.into_inner()
        .map_err(|err| err.into_error())
        .map_err(cache_error(list_temp.path()))?;
    for temp in [&image_temp, &list_temp] {
        temp.as_file()
            .sync_all()
            .map_err(cache_error(temp.path()))?;
    }
    // Lists of an older image go first: from here until the new list is renamed in, no
    // list vouches for a half-replaced image.
    remove_lists(&dir, &key);
    let persist = |temp: tempfile::NamedTempFile, path: &Path| {
        temp.persist(path).map_err(|err| DiskError::Cache {
            path: path.to_path_buf(),
            source: err.error,
        })?;
        File::open(&dir)
            .and_then(|dir| dir.sync_all())
            .map_err(cache_error(&dir))
    };
    persist(image_temp, &image_path)?;
    let blocks_path = dir.join(format!("{key}.blocks.{digest}"));
    persist(list_temp, &blocks_path)?;
    Ok(DiskImage {
        path: image_path,
        blocks_path,
        size_bytes: stats.blocks * BLOCK_SIZE,
        blocks_digest: digest,
        stats: Some(stats),
    })
}

fn cache_error(path: &Path) -> impl FnOnce(io::Error) -> DiskError {
    let path = path.to_path_buf();
    move |source| DiskError::Cache { path, source }
}

/// The entry for `key` whose block list matches its name and the image; anything
/// damaged is deleted so it gets rebuilt.
fn find_intact(dir: &Path, key: &str, image: &Path) -> Result<Option<DiskImage>, DiskError> {
    let prefix = format!("{key}.blocks.");
    let entries = fs::read_dir(dir).map_err(cache_error(dir))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(digest) = name.to_str().and_then(|name| name.strip_prefix(&prefix)) else {
            continue;
        };
        let path = entry.path();
        let image_len = fs::metadata(image).map(|meta| meta.len());
        let intact = match (fs::read(&path), image_len) {
            (Ok(list), Ok(len)) => check_list(&list, digest, len).is_ok().then_some(len),
            _ => None,
        };
        match intact {
            Some(size_bytes) => {
                return Ok(Some(DiskImage {
                    path: image.to_path_buf(),
                    blocks_path: path,
                    size_bytes,
                    blocks_digest: digest.to_string(),
                    stats: None,
                }))
            }
            // Damaged (or vanished meanwhile): rebuild rather than serve it.
            None => {
                let _ = fs::remove_file(&path);
            }
        }
    }
    Ok(None)
}

/// Checks a block list against the digest it is filed under and its image's length.
fn check_list(list: &[u8], digest: &str, image_len: u64) -> Result<(), &'static str> {
    if hex::encode(Sha256::digest(list)) != digest {
        return Err("sha256 does not match its name");
    }
    if !list.len().is_multiple_of(HASH_SIZE)
        || (list.len() / HASH_SIZE) as u64 * BLOCK_SIZE != image_len
    {
        return Err("length does not match the image size");
    }
    Ok(())
}

/// Best effort: every block list of `key`.
fn remove_lists(dir: &Path, key: &str) {
    let prefix = format!("{key}.blocks.");
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_str()
            .is_some_and(|name| name.starts_with(&prefix))
        {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Hashes what passes through, so the list's digest costs no second read.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
        }
    }

    fn finish(self) -> (W, String) {
        (self.inner, hex::encode(self.hasher.finalize()))
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
// Test data generators on 64-bit hosts.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::erofs::tests::{fsck_extract, Layer};
    use crate::image::ImageConfig;
    use std::os::unix::fs::MetadataExt;

    fn image(dir: &Path) -> PulledImage {
        let layer = Layer::new()
            .dir("etc", 0o755)
            .file("etc/motd", b"hello\n")
            .file("bin/tool", &vec![0x7f; 10_000])
            .write(dir, "layer");
        PulledImage {
            reference: "test/image:latest".into(),
            manifest_digest: format!("sha256:{}", "ab".repeat(32)),
            config: ImageConfig::default(),
            layers: vec![layer],
        }
    }

    fn files(cache: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(cache.join("erofs"))
            .expect("erofs dir")
            .map(|entry| {
                entry
                    .expect("entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        names.sort();
        names
    }

    #[test]
    fn builds_once_and_reuses_the_entry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = image(dir.path());
        let cache = dir.path().join("cache");
        let first = disk_image(&image, &cache, &DiskOptions::default()).expect("build");
        let stem = format!("sha256-{}.v{FORMAT_VERSION}", "ab".repeat(32));
        assert_eq!(
            files(&cache),
            [
                format!("{stem}.blocks.{}", first.blocks_digest),
                format!("{stem}.erofs")
            ]
        );
        let stats = first.stats.expect("built");
        assert_eq!((stats.files, stats.content_bytes), (2, 10_006));
        assert_eq!(
            first.size_bytes,
            fs::metadata(&first.path).expect("stat").len()
        );
        let hashes = first.block_hashes().expect("intact");
        let bytes = fs::read(&first.path).expect("read");
        let want: Vec<[u8; 32]> = bytes
            .chunks(BLOCK_SIZE as usize)
            .map(|block| Sha256::digest(block).into())
            .collect();
        assert_eq!(hashes, want);
        fsck_extract(&first.path);
        let stamp = fs::metadata(&first.path).expect("stat");
        let second = disk_image(&image, &cache, &DiskOptions::default()).expect("hit");
        assert!(second.stats.is_none(), "from the cache");
        assert_eq!(
            (&second.path, &second.blocks_path, second.size_bytes),
            (&first.path, &first.blocks_path, first.size_bytes)
        );
        let again = fs::metadata(&second.path).expect("stat");
        assert_eq!(
            (stamp.ino(), stamp.mtime_nsec()),
            (again.ino(), again.mtime_nsec())
        );
        assert_eq!(
            fs::metadata(cache.join("erofs")).expect("stat").mode() & 0o777,
            0o700
        );
    }

    #[test]
    fn a_tampered_block_list_is_rejected_and_rebuilt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = image(dir.path());
        let cache = dir.path().join("cache");
        let built = disk_image(&image, &cache, &DiskOptions::default()).expect("build");
        let mut list = fs::read(&built.blocks_path).expect("read");
        list[5] ^= 1;
        fs::write(&built.blocks_path, &list).expect("tamper");
        let err = built.block_hashes().expect_err("tampered");
        assert!(
            matches!(err, DiskError::BlockList { reason, .. } if reason.contains("sha256")),
            "{err}"
        );
        let rebuilt = disk_image(&image, &cache, &DiskOptions::default()).expect("rebuild");
        assert!(rebuilt.stats.is_some(), "rebuilt, not served");
        assert_eq!(
            rebuilt.blocks_path, built.blocks_path,
            "deterministic image"
        );
        rebuilt.block_hashes().expect("intact again");
        // An image whose length no longer matches its list is rebuilt too.
        let file = File::options()
            .append(true)
            .open(&rebuilt.path)
            .expect("open");
        file.set_len(rebuilt.size_bytes + BLOCK_SIZE).expect("grow");
        let err = rebuilt.block_hashes().expect_err("length");
        assert!(matches!(err, DiskError::BlockList { reason, .. } if reason.contains("length")));
        let again = disk_image(&image, &cache, &DiskOptions::default()).expect("rebuild");
        assert!(again.stats.is_some());
        assert_eq!(
            fs::metadata(&again.path).expect("stat").len(),
            again.size_bytes
        );
        assert_eq!(files(&cache).len(), 2, "{:?}", files(&cache));
    }

    /// Throughput from a cached uncompressed layer: `KATALITE_BENCH_MB` MiB (default 1024)
    /// of files from 1 KiB to 4 MiB. Run with
    /// `cargo test --release -p imagebuilder --lib disk::tests::bench -- --ignored --nocapture`.
    #[test]
    #[ignore = "benchmark: writes ~2 GB"]
    fn bench_disk_image_throughput() {
        use std::io::BufWriter;
        let megabytes: u64 = std::env::var("KATALITE_BENCH_MB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1024);
        let dir =
            tempfile::tempdir_in(std::env::var("KATALITE_BENCH_DIR").unwrap_or("/tmp".into()))
                .expect("tempdir");
        let path = dir.path().join("layer.tar");
        let mut tar = ::tar::Builder::new(BufWriter::new(File::create(&path).expect("create")));
        let chunk: Vec<u8> = (0..4 << 20)
            .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let (mut written, mut i) = (0u64, 0u64);
        while written < megabytes << 20 {
            // Sizes cycle through 1 KiB .. 4 MiB, like a real rootfs (many small files).
            let size = [1 << 10, 7 << 10, 60 << 10, 300 << 10, 4 << 20][(i % 5) as usize];
            let mut header = ::tar::Header::new_gnu();
            header.set_size(size as u64);
            header.set_mode(0o644);
            tar.append_data(&mut header, format!("d{}/f{i}", i % 64), &chunk[..size])
                .expect("append");
            written += size as u64;
            i += 1;
        }
        tar.into_inner().expect("finish").flush().expect("flush");
        let size = fs::metadata(&path).expect("stat").len();
        let image = PulledImage {
            reference: "bench".into(),
            manifest_digest: format!("sha256:{}", "cd".repeat(32)),
            config: ImageConfig::default(),
            layers: vec![crate::image::LayerBlob {
                digest: "sha256:bench".into(),
                path,
                compression: crate::image::LayerCompression::None,
                size,
            }],
        };
        let start = std::time::Instant::now();
        let disk =
            disk_image(&image, &dir.path().join("cache"), &DiskOptions::default()).expect("build");
        let seconds = start.elapsed().as_secs_f64();
        let stats = disk.stats.expect("built");
        println!(
            "bench: {i} files, {} MB content, image {} MB in {seconds:.2} s: {:.0} MB/s of rootfs",
            stats.content_bytes / 1_000_000,
            disk.size_bytes / 1_000_000,
            stats.content_bytes as f64 / 1e6 / seconds
        );
    }

    #[test]
    fn failures_leave_nothing_in_the_cache() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut image = image(dir.path());
        let layer = &image.layers[0].path;
        let bytes = fs::read(layer).expect("read");
        fs::write(layer, &bytes[..bytes.len() - 3000]).expect("truncate");
        let cache = dir.path().join("cache");
        let err = disk_image(&image, &cache, &DiskOptions::default()).expect_err("truncated");
        assert!(matches!(err, DiskError::Build { .. }), "{err:?}");
        assert!(files(&cache).is_empty(), "{:?}", files(&cache));
        image.manifest_digest = "sha256:../../escape".into();
        let err = disk_image(&image, &cache, &DiskOptions::default()).expect_err("bad digest");
        assert!(matches!(err, DiskError::BadDigest(_)));
    }
}
