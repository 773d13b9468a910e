//! Host-side measurements (no VM needed): pull+pack time and packed size per image with a
//! cold and a warm cache, initramfs size and pack time per compression, and the busybox
//! initramfs files, one per compression, that QEMU boots in the lab.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use imagebuilder::config::RegistryConfig;
use imagebuilder::pack::{self, Compression, PackOptions};
use imagebuilder::progress::Progress;
use imagebuilder::source::{self, ImageSource, PullOptions};
use imagebuilder::store::Store;
use serde::Serialize;

use super::stats::{round, Stats};

/// Pull+pack figures of one image.
#[derive(Debug, Serialize)]
pub struct PackResult {
    /// `katalite run --write-initramfs` with an empty cache: pull, verify, pack, write.
    pub cold_ms: Stats,
    /// The same with the image and its packed archive cached.
    pub cached_ms: Stats,
    /// Size of the packed (zstd) archive in the cache.
    pub packed_bytes: u64,
}

/// One compression of an image's root filesystem archive.
#[derive(Debug, Serialize)]
pub struct Variant {
    /// Archive size.
    pub bytes: u64,
    /// Time to build it from the cached layers (imagebuilder, in this process).
    pub pack_ms: f64,
}

/// What measuring one image leaves behind besides its figures.
pub struct Measured {
    /// The figures.
    pub pack: PackResult,
    /// Size and pack time per compression (`zstd`, `gzip`, `none`).
    pub variants: BTreeMap<String, Variant>,
    /// `(compression, file)`: the archive plus the boot-probe init archive, as katalite
    /// boots it (zstd first).
    pub initrds: Vec<(String, PathBuf)>,
}

/// The compressions compared: katalite's default first.
const COMPRESSIONS: [&str; 3] = ["zstd", "gzip", "none"];

/// Measures `name` from `registry` with the static `katalite`, keeping scratch caches in
/// `work`. With `write_initrds`, also writes the per-compression initramfs files to `out`.
pub fn measure_image(
    katalite: &Path,
    registry: &str,
    name: &str,
    samples: u32,
    work: &Path,
    out: Option<&Path>,
) -> Result<Measured> {
    let reference = format!("{registry}/library/{name}");
    let written = work.join(format!("{name}.initramfs"));
    let mut cold = Vec::new();
    let mut cache = None;
    for _ in 0..samples {
        let dir = tempfile::tempdir_in(work).context("cannot create a scratch cache")?;
        cold.push(write_initramfs(
            katalite,
            registry,
            &reference,
            dir.path(),
            &written,
        )?);
        cache = Some(dir);
    }
    let cache = cache.context("no samples")?;
    let mut cached = Vec::new();
    for _ in 0..samples {
        cached.push(write_initramfs(
            katalite,
            registry,
            &reference,
            cache.path(),
            &written,
        )?);
    }
    let packed = packed_file(cache.path())?;
    let packed_bytes = fs::metadata(&packed)?.len();
    let pack = PackResult {
        cold_ms: Stats::of(&cold).context("no cold samples")?,
        cached_ms: Stats::of(&cached).context("no cached samples")?,
        packed_bytes,
    };

    let archives = work.join(name);
    fs::create_dir_all(&archives)?;
    let mut variants = BTreeMap::new();
    let mut files = Vec::new();
    for compression in COMPRESSIONS {
        let file = archives.join(compression);
        let pack_ms = pack_variant(cache.path(), registry, &reference, compression, &file)?;
        let bytes = fs::metadata(&file)?.len();
        variants.insert(compression.to_string(), Variant { bytes, pack_ms });
        files.push((compression, file));
    }
    let initrds = match out {
        Some(out) => initrds_for(&written, &packed, &files, out, name)?,
        None => Vec::new(),
    };
    fs::remove_dir_all(&archives)?;
    Ok(Measured {
        pack,
        variants,
        initrds,
    })
}

/// Runs `katalite run --write-initramfs` with the cache at `cache`; returns its wall time.
fn write_initramfs(
    katalite: &Path,
    registry: &str,
    reference: &str,
    cache: &Path,
    out: &Path,
) -> Result<f64> {
    let started = Instant::now();
    let output = Command::new(katalite)
        .env("KATALITE_CACHE_DIR", cache)
        .args(["run", "-q", "--insecure-registry", registry, "--boot-probe"])
        .arg("--write-initramfs")
        .arg(out)
        .args([reference, "true"])
        .output()
        .with_context(|| format!("cannot run {}", katalite.display()))?;
    let elapsed = started.elapsed().as_secs_f64() * 1000.0;
    if !output.status.success() {
        bail!(
            "katalite --write-initramfs {reference} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(round(elapsed))
}

/// The one packed archive in a scratch cache.
fn packed_file(cache: &Path) -> Result<PathBuf> {
    let dir = cache.join("packed");
    let mut files = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry?;
        if !entry.file_name().to_string_lossy().starts_with('.') {
            files.push(entry.path());
        }
    }
    ensure!(
        files.len() == 1,
        "expected one packed archive in {}, found {}",
        dir.display(),
        files.len()
    );
    Ok(files.remove(0))
}

/// Packs the cached image with `compression` into `file`; returns the time taken in ms.
fn pack_variant(
    cache: &Path,
    registry: &str,
    reference: &str,
    compression: &str,
    file: &Path,
) -> Result<f64> {
    let store = Store::open(cache)?;
    let mut registries = RegistryConfig::default();
    registries.add_insecure(registry)?;
    let options = PullOptions {
        registries,
        ..PullOptions::default()
    };
    let image = source::pull(&ImageSource::parse(reference)?, &store, &options)?;
    let sink = BufWriter::new(File::create(file)?);
    let started = Instant::now();
    let sink = match compression {
        "zstd" | "gzip" => {
            let options = PackOptions {
                compression: if compression == "zstd" {
                    Compression::Zstd
                } else {
                    Compression::Gzip
                },
                ..PackOptions::default()
            };
            pack::pack(&image, sink, &options)?.0
        }
        "none" => {
            let bar = Progress::hidden().bytes("packing", None);
            let limits = PackOptions::default().limits;
            imagebuilder::layers::write_cpio(&image.layers, limits, &bar, sink)?.0
        }
        other => bail!("unknown compression {other}"),
    };
    sink.into_inner()
        .map_err(|err| err.into_error())?
        .sync_all()?;
    Ok(round(started.elapsed().as_secs_f64() * 1000.0))
}

/// Writes one initramfs per compression to `out`: that archive followed by the init
/// archive katalite appended to `packed` in `written`. Zstd is `written` itself.
fn initrds_for(
    written: &Path,
    packed: &Path,
    archives: &[(&str, PathBuf)],
    out: &Path,
    name: &str,
) -> Result<Vec<(String, PathBuf)>> {
    let written = fs::read(written)?;
    let tail = init_archive(&written, &fs::read(packed)?)?;
    let mut files = Vec::new();
    for (compression, archive) in archives {
        let path = out.join(format!("initrd-{name}-{compression}.img"));
        let bytes = if *compression == "zstd" {
            written.clone()
        } else {
            let mut bytes = fs::read(archive)?;
            bytes.resize(bytes.len().next_multiple_of(4), 0);
            bytes.extend_from_slice(tail);
            bytes
        };
        File::create(&path)
            .and_then(|mut file| file.write_all(&bytes))
            .with_context(|| format!("cannot write {}", path.display()))?;
        files.push((compression.to_string(), path));
    }
    Ok(files)
}

/// The init archive at the end of a `--write-initramfs` file whose first archive is
/// `packed`, zero-padded to 4 bytes as katalite lays the archives out.
fn init_archive<'a>(written: &'a [u8], packed: &[u8]) -> Result<&'a [u8]> {
    ensure!(
        written.starts_with(packed),
        "the written initramfs does not start with the cached packed archive"
    );
    written
        .get(packed.len().next_multiple_of(4)..)
        .filter(|tail| !tail.is_empty())
        .context("the written initramfs has no init archive")
}

/// Size of `path` in bytes.
pub fn file_bytes(path: &Path) -> Result<u64> {
    Ok(fs::metadata(path)
        .with_context(|| format!("cannot stat {}", path.display()))?
        .len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_init_archive_follows_the_padded_rootfs() {
        let packed = b"zstdzst";
        let written = b"zstdzst\x00070701init";
        assert_eq!(init_archive(written, packed).ok(), Some(&b"070701init"[..]));
        assert!(init_archive(b"other\x00\x00\x00070701", packed).is_err());
        assert!(
            init_archive(b"zstdzst\0", packed).is_err(),
            "no init archive"
        );
    }

    #[test]
    fn variants_get_the_same_init_archive() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = |name: &str| dir.path().join(name);
        fs::write(path("written"), b"ZSTD\0\0\0\0INIT").expect("write");
        fs::write(path("packed"), b"ZSTD\0\0\0\0").expect("write");
        fs::write(path("gz"), b"GZIP!").expect("write");
        let archives = [("zstd", path("packed")), ("gzip", path("gz"))];
        let files = initrds_for(
            &path("written"),
            &path("packed"),
            &archives,
            dir.path(),
            "bb",
        )
        .expect("initrds");
        assert_eq!(files[0].0, "zstd");
        assert_eq!(fs::read(&files[0].1).expect("zstd"), b"ZSTD\0\0\0\0INIT");
        assert_eq!(fs::read(&files[1].1).expect("gzip"), b"GZIP!\0\0\0INIT");
        assert_eq!(files[1].1, dir.path().join("initrd-bb-gzip.img"));
    }

    #[test]
    fn a_scratch_cache_has_one_packed_archive() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir(dir.path().join("packed")).expect("mkdir");
        assert!(packed_file(dir.path()).is_err());
        fs::write(dir.path().join("packed/.tmp-pack-x"), b"").expect("write");
        fs::write(dir.path().join("packed/sha256-a.v1.cpio.zst.b"), b"").expect("write");
        assert_eq!(
            packed_file(dir.path()).expect("one").file_name(),
            Some("sha256-a.v1.cpio.zst.b".as_ref())
        );
    }
}
