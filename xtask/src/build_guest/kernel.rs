//! Building vmlinux out of tree (`make O=`): tinyconfig, the requested options laid over it,
//! olddefconfig, a check that nothing requested was dropped, `make vmlinux`, and a copy
//! without symbols that still carries the PVH entry note the VMM boots through.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use super::elf;
use super::kconfig::Config;

/// What to build and where.
pub struct Job<'a> {
    /// The Linux source tree (never written to: objects go to `objects`).
    pub tree: &'a Path,
    /// The `make O=` directory.
    pub objects: &'a Path,
    /// The options every fragment asks for, merged in order.
    pub request: &'a Config,
    /// Where the stripped vmlinux goes; the resolved `.config` lands beside it.
    pub vmlinux: &'a Path,
    /// `make -j`.
    pub jobs: usize,
}

/// Sizes and time of a kernel build.
pub struct Report {
    /// Wall time of `make vmlinux`.
    pub compile: Duration,
    /// Size of the linked vmlinux.
    pub unstripped: u64,
    /// Size of the copy without symbols.
    pub stripped: u64,
}

/// Configures, builds and strips the kernel.
pub fn build(job: &Job) -> Result<Report> {
    // Kbuild refuses `O=` builds from a tree that was configured in place.
    ensure!(
        !job.tree.join(".config").exists(),
        "{} was configured in place; run `make mrproper` there first (objects go to {})",
        job.tree.display(),
        job.objects.display()
    );
    fs::create_dir_all(job.objects)
        .with_context(|| format!("cannot create {}", job.objects.display()))?;
    let objects = job
        .objects
        .canonicalize()
        .context("cannot resolve the object directory")?;
    let dot_config = objects.join(".config");

    make(job.tree, &objects, &["-s", "tinyconfig"])?;
    let mut config = read_config(&dot_config)?;
    config.overlay(job.request);
    fs::write(&dot_config, config.render()).context("cannot write the merged .config")?;
    make(job.tree, &objects, &["-s", "olddefconfig"])?;
    let resolved = read_config(&dot_config)?;
    let dropped = job.request.dropped_in(&resolved);
    if !dropped.is_empty() {
        let list: Vec<String> = dropped.iter().map(|d| format!("  {d}")).collect();
        bail!(
            "olddefconfig did not keep {} requested option(s) (unmet dependencies or forced \
             values); fix the fragment:\n{}\n(resolved config: {})",
            dropped.len(),
            list.join("\n"),
            dot_config.display()
        );
    }
    println!(
        "build-guest: .config has all {} requested options",
        job.request.len()
    );

    let started = Instant::now();
    make(job.tree, &objects, &[&format!("-j{}", job.jobs), "vmlinux"])?;
    let compile = started.elapsed();

    let linked = objects.join("vmlinux");
    let unstripped = size_of(&linked)?;
    let stripped = strip_into(
        &linked,
        job.vmlinux,
        resolved.get("CONFIG_PVH") == Some("y"),
    )?;
    let config_copy = job.vmlinux.with_extension("config");
    fs::copy(&dot_config, &config_copy)
        .with_context(|| format!("cannot copy .config to {}", config_copy.display()))?;
    Ok(Report {
        compile,
        unstripped,
        stripped,
    })
}

/// Copies `linked` to `out` without symbols (`strip --strip-all` keeps every loadable
/// segment and the `PT_NOTE` segment) and checks the PVH note survived when expected.
fn strip_into(linked: &Path, out: &Path, expect_pvh: bool) -> Result<u64> {
    let partial = PathBuf::from(format!("{}.partial", out.display()));
    super::run_command(
        Command::new("strip")
            .arg("--strip-all")
            .arg("-o")
            .arg(&partial)
            .arg(linked),
    )?;
    let image = fs::read(&partial).with_context(|| format!("cannot read {}", partial.display()))?;
    if expect_pvh {
        ensure!(
            elf::has_pvh_note(&image)?,
            "{} lost its PVH entry note",
            partial.display()
        );
    }
    fs::rename(&partial, out).with_context(|| format!("cannot move to {}", out.display()))?;
    Ok(u64::try_from(image.len())?)
}

fn make(tree: &Path, objects: &Path, args: &[&str]) -> Result<()> {
    // ARCH=x86_64 (not the default ARCH=x86) makes tinyconfig start from a 64-bit kernel
    // instead of flipping 64BIT later, which would default-enable every 64-bit-only option.
    super::run_command(
        Command::new("make")
            .arg("-C")
            .arg(tree)
            .arg(format!("O={}", objects.display()))
            .arg("ARCH=x86_64")
            .args(args),
    )
    .with_context(|| format!("kernel build step `make {}` failed", args.join(" ")))
}

fn read_config(path: &Path) -> Result<Config> {
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Config::parse(&text).with_context(|| format!("cannot parse {}", path.display()))
}

fn size_of(path: &Path) -> Result<u64> {
    Ok(fs::metadata(path)
        .with_context(|| format!("cannot stat {}", path.display()))?
        .len())
}
