//! `cargo xtask build-guest`: the guest kernel (vmlinux from Debian's kernel source of the
//! pinned series and `kernel-config/katalite.config`, or from a user's tree) and the static
//! init, into `target/guest/` where the katalite build script embeds them (the kernel as
//! `vmlinux.packed`, made from the vmlinux). Kernels built from Debian's source are kept in
//! the user cache, so a fresh clone does not rebuild one.

mod cache;
mod elf;
mod init;
mod kconfig;
mod kernel;
mod packed;
mod prereq;
mod source;
mod stamp;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{ensure, Context, Result};

use kconfig::Config;
use source::Pin;
use stamp::{KernelSource, Stamp};

/// Options of `build-guest`.
#[derive(clap::Args)]
pub struct Args {
    /// Build the kernel from this Linux tree instead of Debian's source; the output
    /// defaults to target/guest/custom/ (for example a PVM-enabled tree).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["locked", "update_pin"])]
    pub kernel_source: Option<PathBuf>,
    /// A Kconfig fragment merged on top of kernel-config/katalite.config (for example
    /// `CONFIG_PVM_GUEST=y`; setting an option to n also waives it for trees that lack it);
    /// the output defaults to target/guest/custom/.
    #[arg(long, value_name = "FILE")]
    pub config_fragment: Option<PathBuf>,
    /// Output directory for `vmlinux` and `katalite-init` (default: target/guest/).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Build the kernel even when this output or the user cache already has it.
    #[arg(long, alias = "force")]
    pub no_cache: bool,
    /// Refuse a kernel source tarball that is not exactly the one in
    /// kernel-config/source.toml (reproducible builds).
    #[arg(long, conflicts_with = "update_pin")]
    pub locked: bool,
    /// Record the installed kernel source tarball in kernel-config/source.toml, then build.
    #[arg(long)]
    pub update_pin: bool,
}

/// Builds the guest artifacts.
pub fn run(args: &Args) -> Result<()> {
    let started = Instant::now();
    let workspace = workspace_root()?;
    let custom = args.kernel_source.is_some() || args.config_fragment.is_some();
    let guest = workspace.join("target/guest");
    let out = match (&args.out, custom) {
        (Some(out), _) => out.clone(),
        (None, true) => guest.join("custom"),
        (None, false) => guest.clone(),
    };
    fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let out = out
        .canonicalize()
        .context("cannot resolve the output directory")?;
    let build_dir = guest.join("build");
    fs::create_dir_all(&build_dir)
        .with_context(|| format!("cannot create {}", build_dir.display()))?;

    let pin_path = workspace.join("kernel-config/source.toml");
    let pin = Pin::load(&pin_path)?;
    let mut packages = prereq::BUILD_PACKAGES.to_vec();
    if args.kernel_source.is_none() {
        packages.push(&pin.package);
    }
    prereq::ensure_packages(&packages)?;
    prereq::ensure_musl_target(&workspace)?;

    let kernel_cache = cache::dir()?;
    let request = requested_options(&workspace, args.config_fragment.as_deref())?;
    // The Debian tarball in use, or None for a user's tree.
    let (source, installed) = match &args.kernel_source {
        Some(dir) => {
            let path = dir
                .canonicalize()
                .with_context(|| format!("cannot resolve {}", dir.display()))?;
            let upstream_version = source::tree_version(&path)?;
            let tree = KernelSource::Tree {
                path,
                upstream_version,
            };
            (tree, None)
        }
        None => {
            let memo = kernel_cache.join(format!("{}.sha256", pin.package));
            let installed = pin.installed(&memo)?;
            check_pin(args, &pin, &pin_path, &installed)?;
            (KernelSource::debian(&installed), Some(installed))
        }
    };
    println!("build-guest: kernel source {}", source.describe());

    let vmlinux = out.join("vmlinux");
    let stamp_path = out.join("vmlinux.stamp");
    let stamp = Stamp::new(source, &request, stamp::toolchain()?);
    let shared = stamp.source.is_content_addressed();
    if !args.no_cache && stamp.is_fresh(&stamp_path, &vmlinux) {
        println!(
            "build-guest: vmlinux is up to date ({} bytes)",
            fs::metadata(&vmlinux)?.len()
        );
    } else if !args.no_cache && shared && cache::restore(&kernel_cache, &stamp, &out)? {
        println!(
            "build-guest: vmlinux from the cache {} ({} bytes), not compiled",
            kernel_cache.join(&stamp.key).display(),
            fs::metadata(&vmlinux)?.len()
        );
    } else {
        // A failed build must not leave a stamp that vouches for an older vmlinux.
        let _ = fs::remove_file(&stamp_path);
        // Custom kernels keep their objects beside their output so the default ones stay.
        let objects = if custom {
            out.join("build")
        } else {
            build_dir.join("obj")
        };
        let tree = match (&stamp.source, &installed) {
            (KernelSource::Tree { path, .. }, _) => path.clone(),
            (KernelSource::Debian { .. }, installed) => {
                let installed = installed
                    .as_ref()
                    .context("no Debian source is installed")?;
                pin.unpack(installed, &build_dir, &build_dir.join("obj"))?
            }
        };
        let jobs = std::thread::available_parallelism().map_or(1, usize::from);
        let report = kernel::build(&kernel::Job {
            tree: &tree,
            objects: &objects,
            request: &request,
            vmlinux: &vmlinux,
            jobs,
        })?;
        stamp.write(&stamp_path)?;
        println!(
            "build-guest: vmlinux built in {:.0?} with -j{jobs}: {} bytes linked, {} bytes \
             stripped -> {}",
            report.compile,
            report.unstripped,
            report.stripped,
            vmlinux.display()
        );
        if shared {
            let entry = cache::store(&kernel_cache, &stamp, &out)?;
            println!("build-guest: cached as {}", entry.display());
        }
    }

    let packed_path = out.join("vmlinux.packed");
    match packed::ensure(&vmlinux, &packed_path)? {
        Some(packed) => {
            let how = match packed.packed_in {
                Some(took) => format!("packed in {took:.1?}"),
                None => "up to date".to_owned(),
            };
            println!(
                "build-guest: vmlinux.packed {how}: {} loadable bytes in {} bytes (zstd -{}) \
                 -> {}",
                packed.loadable,
                packed.size,
                vmm::packed_kernel::ZSTD_LEVEL,
                packed_path.display()
            );
        }
        None => println!(
            "build-guest: note: the kernel has no PVH entry, so it is not packed; katalite \
             embeds the vmlinux as it is"
        ),
    }

    let init_started = Instant::now();
    let init_path = out.join("katalite-init");
    let init = init::build(&workspace, &init_path)?;
    println!(
        "build-guest: katalite-init static, {} bytes, {} in {:.1?} -> {}",
        init.size,
        if init.copied { "updated" } else { "unchanged" },
        init_started.elapsed(),
        init_path.display()
    );
    println!("build-guest: done in {:.1?}", started.elapsed());
    Ok(())
}

/// Applies `--locked` and `--update-pin` to the installed source, or says how it differs
/// from the pin when neither is given.
fn check_pin(args: &Args, pin: &Pin, pin_path: &Path, installed: &source::Installed) -> Result<()> {
    if args.locked {
        return pin.check_locked(installed);
    }
    if pin.matches(installed) {
        return Ok(());
    }
    if args.update_pin {
        pin.updated(installed).save(pin_path)?;
        println!(
            "build-guest: {} now pins {} {} (was {})",
            pin_path.display(),
            installed.package,
            installed.debian_version,
            pin.debian_version
        );
    } else {
        println!(
            "build-guest: note: the installed {} {} is not the pinned {} (accepted: same \
             series {}, authenticated by apt; `--update-pin` records it, `--locked` refuses it)",
            installed.package, installed.debian_version, pin.debian_version, pin.series
        );
    }
    Ok(())
}

/// `kernel-config/katalite.config`, with `extra` laid on top when given.
fn requested_options(workspace: &Path, extra: Option<&Path>) -> Result<Config> {
    let mut request = read_fragment(&workspace.join("kernel-config/katalite.config"))?;
    if let Some(extra) = extra {
        request.overlay(&read_fragment(extra)?);
    }
    Ok(request)
}

fn read_fragment(path: &Path) -> Result<Config> {
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Config::parse(&text).with_context(|| format!("bad Kconfig fragment {}", path.display()))
}

fn workspace_root() -> Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

/// Runs a command with inherited stdio and fails on a non-zero exit.
fn run_command(command: &mut Command) -> Result<()> {
    let program = command.get_program().to_string_lossy().into_owned();
    let status = command
        .status()
        .with_context(|| format!("cannot start {program}"))?;
    ensure!(status.success(), "{program} failed ({status})");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_fragment_overrides_and_extends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let extra = dir.path().join("pvm.config");
        fs::write(
            &extra,
            "CONFIG_PVM_GUEST=y\n# CONFIG_KVM_GUEST is not set\n",
        )
        .expect("write");
        let workspace = workspace_root().expect("workspace");
        let request = requested_options(&workspace, Some(&extra)).expect("fragments");
        assert_eq!(request.get("CONFIG_PVM_GUEST"), Some("y"));
        assert_eq!(request.get("CONFIG_KVM_GUEST"), Some("n"));
        assert_eq!(request.get("CONFIG_PVH"), Some("y"));
    }

    #[test]
    fn run_reports_failure() {
        assert!(run_command(&mut Command::new("true")).is_ok());
        assert!(run_command(&mut Command::new("false")).is_err());
    }
}
