//! A pulled image as the compressed newc archive the guest kernel unpacks, cached under
//! `<cache root>/packed/` by (manifest digest, packer format version, compression) so a
//! second run of an image does no packing. The file name carries the sha256 of the file,
//! checked on every hit, so a corrupted cache entry is repacked instead of booted.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use indicatif::ProgressBar;
use sha2::{Digest, Sha256};

use crate::image::PulledImage;
use crate::layers::{self, LayerError, UnpackStats};
use crate::limits::Limits;
use crate::progress::Progress;

/// Bumped whenever the archive for the same layers would differ (merge rules, entry
/// order, compression settings), so stale packed files are never reused.
pub const FORMAT_VERSION: u32 = 1;

/// Prefix of files being written; a stale one (a killed packer's) is removed later.
const TEMP_PREFIX: &str = ".tmp-pack-";

/// Age after which a temporary file is considered abandoned.
const STALE_TEMP: Duration = Duration::from_secs(3600);

/// Why an image could not be packed.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// The manifest digest cannot name a cache file.
    #[error("manifest digest {0:?} is not ALGORITHM:ENCODED")]
    BadDigest(String),
    /// The layers could not be merged into an archive.
    #[error("pack {reference}")]
    Layers {
        /// The image.
        reference: String,
        /// Why.
        #[source]
        source: LayerError,
    },
    /// The cache directory or file could not be written or read.
    #[error("packed cache {path}")]
    Cache {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The compressor failed.
    #[error("compress archive")]
    Compress(#[source] io::Error),
}

/// Compression of the archive; the guest kernel has both decompressors (RD_ZSTD,
/// RD_GZIP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// zstd (the default: smaller and faster to pack and unpack than gzip on busybox and
    /// nginx; see the measurements in the issue note).
    Zstd,
    /// gzip.
    Gzip,
}

impl Compression {
    /// The level used when none is given.
    pub fn default_level(self) -> i32 {
        match self {
            Compression::Zstd => 3,
            Compression::Gzip => 6,
        }
    }

    fn extension(self) -> &'static str {
        match self {
            Compression::Zstd => "zst",
            Compression::Gzip => "gz",
        }
    }
}

/// How to pack.
#[derive(Debug, Clone)]
pub struct PackOptions {
    /// Archive compression.
    pub compression: Compression,
    /// Compression level; `None` for [`Compression::default_level`].
    pub level: Option<i32>,
    /// Caps on the layers (untrusted input).
    pub limits: Limits,
    /// Where the packing bar goes (hidden by default).
    pub progress: Progress,
}

impl Default for PackOptions {
    fn default() -> Self {
        PackOptions {
            compression: Compression::Zstd,
            level: None,
            limits: Limits::default(),
            progress: Progress::hidden(),
        }
    }
}

/// Returns the packed archive of `image` from `<cache_root>/packed/`, packing it first
/// when there is no intact one. Written to a temporary file, fsynced and renamed, so the
/// cache never holds a partial archive; concurrent packers of one image each write their
/// own file and the last rename wins (the bytes are identical).
pub fn packed_initramfs(
    image: &PulledImage,
    cache_root: &Path,
    opts: &PackOptions,
) -> Result<PathBuf, PackError> {
    let dir = cache_root.join("packed");
    let key = cache_key(&image.manifest_digest, opts.compression)?;
    let cache_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PackError::Cache { path, source }
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(cache_error(&dir))?;
    if let Some(path) = find_intact(&dir, &key)? {
        return Ok(path);
    }
    remove_stale_temps(&dir, TEMP_PREFIX);
    let temp = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .tempfile_in(&dir)
        .map_err(cache_error(&dir))?;
    let file = temp
        .as_file()
        .try_clone()
        .map_err(cache_error(temp.path()))?;
    let mut sink = HashingWriter::new(BufWriter::new(file));
    pack(image, &mut sink, opts)?;
    let (out, digest) = sink.finish();
    out.into_inner()
        .map_err(|err| err.into_error())
        .map_err(cache_error(temp.path()))?;
    temp.as_file()
        .sync_all()
        .map_err(cache_error(temp.path()))?;
    let path = dir.join(format!("{key}.{digest}"));
    temp.persist(&path).map_err(|err| PackError::Cache {
        path: path.clone(),
        source: err.error,
    })?;
    File::open(&dir)
        .and_then(|dir| dir.sync_all())
        .map_err(cache_error(&dir))?;
    Ok(path)
}

/// The intact packed archive of `image` in `<cache_root>/packed/`, if there is one (a
/// damaged one is removed): all a start from the cache needs, without reading the layers.
pub fn cached_packed_initramfs(
    image: &PulledImage,
    cache_root: &Path,
    compression: Compression,
) -> Result<Option<PathBuf>, PackError> {
    let dir = cache_root.join("packed");
    if !dir.is_dir() {
        return Ok(None);
    }
    find_intact(&dir, &cache_key(&image.manifest_digest, compression)?)
}

/// Packs `image` into `out` (compressed), without any cache.
pub fn pack<W: Write>(
    image: &PulledImage,
    out: W,
    opts: &PackOptions,
) -> Result<(W, UnpackStats), PackError> {
    // Both passes read every layer (the second may stop early; the bar is cleared then).
    let total = image.layers.iter().map(|layer| layer.size).sum::<u64>() * 2;
    let bar = opts.progress.bytes("packing", Some(total));
    let result = compress(image, out, opts, &bar);
    bar.finish_and_clear();
    result
}

fn compress<W: Write>(
    image: &PulledImage,
    out: W,
    opts: &PackOptions,
    bar: &ProgressBar,
) -> Result<(W, UnpackStats), PackError> {
    let layers_error = |source| PackError::Layers {
        reference: image.reference.clone(),
        source,
    };
    let level = opts.level.unwrap_or(opts.compression.default_level());
    match opts.compression {
        Compression::Zstd => {
            let mut encoder =
                zstd::stream::write::Encoder::new(out, level).map_err(PackError::Compress)?;
            // The frame checksum lets the kernel's decompressor detect a damaged archive.
            encoder
                .include_checksum(true)
                .map_err(PackError::Compress)?;
            let (encoder, stats) = layers::write_cpio(&image.layers, opts.limits, bar, encoder)
                .map_err(layers_error)?;
            Ok((encoder.finish().map_err(PackError::Compress)?, stats))
        }
        Compression::Gzip => {
            let level = u32::try_from(level.clamp(0, 9)).unwrap_or(6);
            let encoder = flate2::write::GzEncoder::new(out, flate2::Compression::new(level));
            let (encoder, stats) = layers::write_cpio(&image.layers, opts.limits, bar, encoder)
                .map_err(layers_error)?;
            Ok((encoder.finish().map_err(PackError::Compress)?, stats))
        }
    }
}

/// `sha256-<hex>.v<version>.cpio.<ext>` from the manifest digest; anything that could
/// form a path (`/`, `..` alone) is rejected by the digest grammar (image-spec
/// `descriptor.md`: algorithm `[a-z0-9+._-]+`, encoded `[a-zA-Z0-9=_-]+`).
fn cache_key(digest: &str, compression: Compression) -> Result<String, PackError> {
    let stem = digest_stem(digest).ok_or_else(|| PackError::BadDigest(digest.to_string()))?;
    Ok(format!(
        "{stem}.v{FORMAT_VERSION}.cpio.{}",
        compression.extension()
    ))
}

/// `ALGORITHM-ENCODED` from a digest that follows the descriptor grammar, for cache file
/// names; `None` otherwise.
pub(crate) fn digest_stem(digest: &str) -> Option<String> {
    let (algorithm, encoded) = digest.split_once(':')?;
    let algorithm_ok = !algorithm.is_empty()
        && algorithm
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b));
    let encoded_ok = !encoded.is_empty()
        && encoded
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"=_-".contains(&b));
    if !algorithm_ok || !encoded_ok || digest.len() > 200 {
        return None;
    }
    Some(format!("{algorithm}-{encoded}"))
}

/// The cached file for `key` whose content still matches the sha256 in its name; a
/// damaged one is deleted.
fn find_intact(dir: &Path, key: &str) -> Result<Option<PathBuf>, PackError> {
    let prefix = format!("{key}.");
    let entries = fs::read_dir(dir).map_err(|source| PackError::Cache {
        path: dir.to_path_buf(),
        source,
    })?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(recorded) = name.to_str().and_then(|name| name.strip_prefix(&prefix)) else {
            continue;
        };
        let path = entry.path();
        match file_sha256(&path) {
            Ok(actual) if actual == recorded => return Ok(Some(path)),
            // Damaged (or vanished meanwhile): repack rather than boot it.
            _ => {
                let _ = fs::remove_file(&path);
            }
        }
    }
    Ok(None)
}

fn file_sha256(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(hex(&hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Best effort: temporary files (named `prefix*`) of writers killed long ago.
pub(crate) fn remove_stale_temps(dir: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        let is_temp = entry
            .file_name()
            .to_str()
            .is_some_and(|name| name.starts_with(prefix));
        let age = entry
            .metadata()
            .and_then(|meta| meta.modified())
            .ok()
            .and_then(|modified| now.duration_since(modified).ok());
        if is_temp && age.is_some_and(|age| age > STALE_TEMP) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Hashes what passes through, so the archive's digest costs no second read.
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
        (self.inner, hex(&self.hasher.finalize()))
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
mod tests {
    use super::*;
    use crate::image::{ImageConfig, LayerBlob, LayerCompression};
    use std::os::unix::fs::MetadataExt;

    fn image(dir: &Path) -> PulledImage {
        let mut tar = ::tar::Builder::new(Vec::new());
        for (name, data) in [("etc/motd", &b"hello\n"[..]), ("bin/tool", b"\x7fELF...")] {
            let mut header = ::tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o755);
            tar.append_data(&mut header, name, data).expect("append");
        }
        let tar = tar.into_inner().expect("tar");
        let path = dir.join("layer.tar");
        fs::write(&path, &tar).expect("write layer");
        PulledImage {
            reference: "test/image:latest".into(),
            manifest_digest: format!("sha256:{}", "ab".repeat(32)),
            config: ImageConfig::default(),
            layers: vec![LayerBlob {
                digest: "sha256:layer".into(),
                path,
                compression: LayerCompression::None,
                size: tar.len() as u64,
            }],
        }
    }

    fn uncompressed(image: &PulledImage) -> Vec<u8> {
        crate::layers::write_cpio(
            &image.layers,
            Limits::default(),
            &ProgressBar::hidden(),
            Vec::new(),
        )
        .expect("plain archive")
        .0
    }

    fn packed_files(cache: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(cache.join("packed"))
            .expect("packed dir")
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
    fn packs_once_and_reuses_the_cached_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = image(dir.path());
        let cache = dir.path().join("cache");
        let opts = PackOptions::default();
        let first = packed_initramfs(&image, &cache, &opts).expect("pack");
        let name = first
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        assert!(name.starts_with(&format!(
            "sha256-{}.v{FORMAT_VERSION}.cpio.zst.",
            "ab".repeat(32)
        )));
        let stamp = fs::metadata(&first).expect("stat");
        let second = packed_initramfs(&image, &cache, &opts).expect("cached");
        assert_eq!(first, second);
        let again = fs::metadata(&second).expect("stat");
        assert_eq!(
            (stamp.ino(), stamp.mtime_nsec()),
            (again.ino(), again.mtime_nsec()),
            "not rewritten"
        );
        let bytes = zstd::decode_all(&fs::read(&first).expect("read")[..]).expect("zstd");
        assert_eq!(bytes, uncompressed(&image));
        let mode = fs::metadata(cache.join("packed")).expect("stat").mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn gzip_holds_the_same_archive() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = image(dir.path());
        let opts = PackOptions {
            compression: Compression::Gzip,
            ..PackOptions::default()
        };
        let path = packed_initramfs(&image, &dir.path().join("cache"), &opts).expect("pack");
        assert!(path.to_string_lossy().contains(".cpio.gz."));
        let mut bytes = Vec::new();
        flate2::read::GzDecoder::new(File::open(&path).expect("open"))
            .read_to_end(&mut bytes)
            .expect("gunzip");
        assert_eq!(bytes, uncompressed(&image));
    }

    #[test]
    fn the_cached_archive_is_found_without_packing_and_a_damaged_one_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = image(dir.path());
        let cache = dir.path().join("cache");
        let zstd = Compression::Zstd;
        assert_eq!(
            cached_packed_initramfs(&image, &cache, zstd).expect("none"),
            None
        );
        let path = packed_initramfs(&image, &cache, &PackOptions::default()).expect("pack");
        assert_eq!(
            cached_packed_initramfs(&image, &cache, zstd).expect("found"),
            Some(path.clone())
        );
        assert_eq!(
            cached_packed_initramfs(&image, &cache, Compression::Gzip).expect("other"),
            None
        );
        let mut bytes = fs::read(&path).expect("read");
        bytes[0] ^= 1;
        fs::write(&path, &bytes).expect("damage");
        assert_eq!(
            cached_packed_initramfs(&image, &cache, zstd).expect("damaged"),
            None
        );
        assert!(
            packed_files(&cache).is_empty(),
            "the damaged archive is removed"
        );
    }

    #[test]
    fn a_damaged_cache_file_is_repacked_not_returned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = image(dir.path());
        let cache = dir.path().join("cache");
        let opts = PackOptions::default();
        let path = packed_initramfs(&image, &cache, &opts).expect("pack");
        let mut bytes = fs::read(&path).expect("read");
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x20;
        fs::write(&path, &bytes).expect("damage");
        let repacked = packed_initramfs(&image, &cache, &opts).expect("repack");
        let name = repacked
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let recorded = name.rsplit('.').next().expect("digest");
        assert_eq!(file_sha256(&repacked).expect("hash"), recorded);
        assert_ne!(fs::read(&repacked).expect("read"), bytes);
        assert_eq!(packed_files(&cache).len(), 1);
    }

    #[test]
    fn failures_leave_nothing_in_the_cache() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut image = image(dir.path());
        let layer = &image.layers[0].path;
        let bytes = fs::read(layer).expect("read");
        fs::write(layer, &bytes[..bytes.len() - 1100]).expect("truncate");
        let cache = dir.path().join("cache");
        let err = packed_initramfs(&image, &cache, &PackOptions::default()).expect_err("truncated");
        assert!(matches!(err, PackError::Layers { .. }), "{err:?}");
        assert!(packed_files(&cache).is_empty());
        image.manifest_digest = "sha256:../../escape".into();
        let err =
            packed_initramfs(&image, &cache, &PackOptions::default()).expect_err("bad digest");
        assert!(matches!(err, PackError::BadDigest(_)));
    }

    #[test]
    fn cache_keys_accept_only_digest_grammar() {
        assert!(cache_key("sha256:0123abc", Compression::Zstd).is_ok());
        assert!(cache_key("sha512+b64:AbC=_-", Compression::Gzip).is_ok());
        for bad in [
            "",
            "sha256",
            "sha256:",
            ":abc",
            "sha256:a/b",
            "SHA256:ab",
            "sha256:a.b",
            "a/b:c",
        ] {
            assert!(cache_key(bad, Compression::Zstd).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn stale_temporary_files_are_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stale = dir.path().join(format!("{TEMP_PREFIX}old"));
        let fresh = dir.path().join(format!("{TEMP_PREFIX}new"));
        for path in [&stale, &fresh] {
            fs::write(path, b"partial").expect("write");
        }
        File::options()
            .write(true)
            .open(&stale)
            .and_then(|file| file.set_modified(SystemTime::now() - 2 * STALE_TEMP))
            .expect("age the file");
        remove_stale_temps(dir.path(), TEMP_PREFIX);
        assert!(!stale.exists());
        assert!(fresh.exists(), "a packer may still be writing it");
    }
}
