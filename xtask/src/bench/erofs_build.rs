//! Host figures of building an image's EROFS disk image from cached layers: rootfs MiB/s
//! and peak RSS. Each sample is a fresh release-built process (`cargo xtask
//! bench-erofs-build`, hidden) so its peak RSS is the build's alone; it loads the image into
//! a store (a copy from the OCI layout the first time, untimed), then times
//! `imagebuilder::disk::disk_image` into an empty directory and prints one JSON line.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use imagebuilder::disk::{disk_image, DiskOptions};
use imagebuilder::source::{self, ImageSource, PullOptions};
use imagebuilder::store::Store;
use serde::{Deserialize, Serialize};

use super::stats::Stats;

/// Images whose build is measured (busybox is too small to time).
pub const IMAGES: [&str; 2] = ["nginx", "large"];

/// Options of the hidden `bench-erofs-build` subcommand.
#[derive(clap::Args)]
pub struct Args {
    /// The image, e.g. `oci:/var/tmp/katalite-images/nginx:latest`.
    image: String,
    /// The image cache to load it into (kept between calls); the disk image is built in
    /// a temporary directory inside it and removed.
    cache: PathBuf,
}

/// One build, as the subcommand prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    /// Bytes of file content in the root filesystem.
    pub rootfs_bytes: u64,
    /// Bytes of the EROFS image.
    pub image_bytes: u64,
    /// Bytes of the (compressed) layers read.
    pub layer_bytes: u64,
    /// Regular files written.
    pub files: u64,
    /// Wall time of `disk_image`: both passes over the layers, block hashes, fsync.
    pub seconds: f64,
    /// VmRSS right before the build.
    pub rss_before_kib: u64,
    /// VmHWM right before the build (the load's peak), before it was reset.
    pub hwm_before_kib: u64,
    /// VmHWM after the build: the process's peak RSS during it when `peak_reset`.
    pub peak_rss_kib: u64,
    /// Whether `/proc/self/clear_refs` reset VmHWM before the build.
    pub peak_reset: bool,
}

/// Runs one measurement and prints it as JSON on stdout.
pub fn run(args: &Args) -> Result<()> {
    fs::create_dir_all(&args.cache)
        .with_context(|| format!("cannot create {}", args.cache.display()))?;
    let store = Store::open(&args.cache)?;
    let options = PullOptions {
        // Hashed when copied in; re-hashing here would only slow the untimed part.
        verify_cached_layers: false,
        ..PullOptions::default()
    };
    let source = ImageSource::parse(&args.image)?;
    let image = source::pull(&source, &store, &options)
        .with_context(|| format!("cannot load {}", args.image))?;
    let out = tempfile::tempdir_in(&args.cache).context("cannot create a build dir")?;
    let before = proc_status()?;
    // "5" resets the peak RSS to the current RSS (Linux 4.0+).
    let peak_reset = fs::write("/proc/self/clear_refs", "5").is_ok();
    let started = Instant::now();
    let disk = disk_image(&image, out.path(), &DiskOptions::default())?;
    let seconds = started.elapsed().as_secs_f64();
    let after = proc_status()?;
    let stats = disk
        .stats
        .context("the disk image came from a cache, not built")?;
    let field = |status: &str, name: &str| {
        status_kib(status, name).with_context(|| format!("no {name} in /proc/self/status"))
    };
    let measurement = Measurement {
        rootfs_bytes: stats.content_bytes,
        image_bytes: disk.size_bytes,
        layer_bytes: image.layers.iter().map(|layer| layer.size).sum(),
        files: stats.files,
        seconds,
        rss_before_kib: field(&before, "VmRSS")?,
        hwm_before_kib: field(&before, "VmHWM")?,
        peak_rss_kib: field(&after, "VmHWM")?,
        peak_reset,
    };
    println!("{}", serde_json::to_string(&measurement)?);
    Ok(())
}

fn proc_status() -> Result<String> {
    fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status")
}

/// A `Name:   123 kB` field of `/proc/PID/status`, in KiB.
fn status_kib(status: &str, name: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The report's `images.host_build.<image>`: medians over fresh processes.
#[derive(Debug, Serialize)]
pub struct HostBuild {
    /// Bytes of file content in the root filesystem.
    pub rootfs_bytes: u64,
    /// Bytes of the EROFS image.
    pub image_bytes: u64,
    /// Bytes of the layers read.
    pub layer_bytes: u64,
    /// Regular files.
    pub files: u64,
    /// Build time.
    pub seconds: Stats,
    /// Rootfs content per second of build.
    pub rootfs_mib_per_s: Stats,
    /// RSS of the process before the build (image loaded, nothing built).
    pub rss_before_mib: Stats,
    /// Peak RSS during the build (VmHWM, reset before it; `getrusage`'s `ru_maxrss`).
    pub peak_rss_mib: Stats,
    /// Peak RSS minus the RSS before: what building added.
    pub build_rss_mib: Stats,
    /// Whether every sample's peak was reset before the build (else it may include the
    /// load's peak).
    pub peak_reset: bool,
}

/// Summarises the measurements of one image (`None` without any).
pub fn summarise(samples: &[Measurement]) -> Option<HostBuild> {
    let first = samples.first()?;
    let stats = |pick: &dyn Fn(&Measurement) -> f64| {
        Stats::of(&samples.iter().map(pick).collect::<Vec<_>>())
    };
    let mib = |kib: u64| kib as f64 / 1024.0;
    Some(HostBuild {
        rootfs_bytes: first.rootfs_bytes,
        image_bytes: first.image_bytes,
        layer_bytes: first.layer_bytes,
        files: first.files,
        seconds: stats(&|m| m.seconds)?,
        rootfs_mib_per_s: stats(&|m| m.rootfs_bytes as f64 / f64::from(1u32 << 20) / m.seconds)?,
        rss_before_mib: stats(&|m| mib(m.rss_before_kib))?,
        peak_rss_mib: stats(&|m| mib(m.peak_rss_kib))?,
        build_rss_mib: stats(&|m| mib(m.peak_rss_kib.saturating_sub(m.rss_before_kib)))?,
        peak_reset: samples.iter().all(|m| m.peak_reset),
    })
}

/// The measurement line in the subcommand's stdout (the last JSON line).
fn parse_output(stdout: &str) -> Result<Measurement> {
    let line = stdout
        .lines()
        .rev()
        .find(|line| line.trim_start().starts_with('{'))
        .context("bench-erofs-build printed no measurement")?;
    serde_json::from_str(line).context("malformed bench-erofs-build output")
}

/// `samples` builds of each of [`IMAGES`] from the OCI layouts in `images_dir`, each in a
/// fresh release-built xtask; a store under `work` per image. Returns the figures and, per
/// image that failed, why.
pub fn measure(
    root: &Path,
    work: &Path,
    images_dir: &Path,
    samples: u32,
) -> (BTreeMap<String, HostBuild>, Vec<String>) {
    let mut figures = BTreeMap::new();
    let mut errors = Vec::new();
    for image in IMAGES {
        eprintln!(
            "bench: EROFS build of {image} on the host ({samples} fresh processes of the \
             release xtask, built first if needed)"
        );
        match measure_image(root, work, images_dir, image, samples) {
            Ok(build) => {
                figures.insert(image.to_string(), build);
            }
            Err(err) => errors.push(format!("images.host_build {image}: {err:#}")),
        }
    }
    (figures, errors)
}

fn measure_image(
    root: &Path,
    work: &Path,
    images_dir: &Path,
    image: &str,
    samples: u32,
) -> Result<HostBuild> {
    let store = tempfile::tempdir_in(work).context("cannot create a scratch store")?;
    let reference = format!("oci:{}:latest", images_dir.join(image).display());
    let mut measured = Vec::new();
    for _ in 0..samples {
        // Release: the debug build's SHA-256 and copies would measure the compiler.
        let output = Command::new(env!("CARGO"))
            .current_dir(root)
            .args(["run", "--quiet", "--release", "--package", "xtask", "--"])
            .arg("bench-erofs-build")
            .arg(&reference)
            .arg(store.path())
            .stderr(Stdio::inherit())
            .output()
            .context("cannot run cargo xtask bench-erofs-build")?;
        if !output.status.success() {
            bail!("bench-erofs-build {reference} failed ({})", output.status);
        }
        measured.push(parse_output(&String::from_utf8_lossy(&output.stdout))?);
    }
    summarise(&measured).context("no samples")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measurement(seconds: f64, peak_kib: u64) -> Measurement {
        Measurement {
            rootfs_bytes: 100 << 20,
            image_bytes: 101 << 20,
            layer_bytes: 40 << 20,
            files: 1200,
            seconds,
            rss_before_kib: 10 * 1024,
            hwm_before_kib: 30 * 1024,
            peak_rss_kib: peak_kib,
            peak_reset: true,
        }
    }

    #[test]
    fn status_fields_are_read_in_kib() {
        let status = "Name:\txtask\nVmHWM:\t   61440 kB\nVmRSS:\t   51200 kB\n";
        assert_eq!(status_kib(status, "VmRSS"), Some(51200));
        assert_eq!(status_kib(status, "VmHWM"), Some(61440));
        assert_eq!(status_kib(status, "VmSwap"), None);
        assert_eq!(status_kib("VmRSSx:\t1 kB", "VmRSS"), None);
    }

    #[test]
    fn the_measurement_is_the_last_json_line() {
        let line = serde_json::to_string(&measurement(2.0, 50 * 1024)).expect("json");
        let stdout = format!("images: nginx is cached\n{line}\n");
        assert_eq!(
            parse_output(&stdout).expect("parsed"),
            measurement(2.0, 50 * 1024)
        );
        assert!(parse_output("no json here\n").is_err());
        assert!(parse_output("{broken\n").is_err());
    }

    #[test]
    fn builds_summarise_to_rates_and_rss() {
        let samples = [
            measurement(2.0, 50 * 1024),
            measurement(1.0, 40 * 1024),
            measurement(4.0, 60 * 1024),
        ];
        let build = summarise(&samples).expect("summary");
        assert_eq!(build.seconds.median, 2.0);
        assert_eq!(
            (build.rootfs_mib_per_s.min, build.rootfs_mib_per_s.median),
            (25.0, 50.0)
        );
        assert_eq!(build.peak_rss_mib.median, 50.0);
        assert_eq!(build.build_rss_mib.max, 50.0);
        assert_eq!(build.rss_before_mib.median, 10.0);
        assert!(build.peak_reset);
        let mut unreset = measurement(1.0, 1);
        unreset.peak_reset = false;
        let build = summarise(&[unreset]).expect("summary");
        assert!(!build.peak_reset);
        assert_eq!(build.build_rss_mib.median, 0.0, "never negative");
        assert!(summarise(&[]).is_none());
    }
}
