//! `cargo xtask lab`: real KVM inside QEMU software emulation, for the end-to-end tests.
//!
//! The host's `/dev/kvm` is PVM, which boots only PVM guest kernels; QEMU TCG emulates AMD-V
//! instead, so Debian's kernel booted there ("L1") loads `kvm-amd` and katalite runs on a
//! genuine `/dev/kvm`. See shared/docs/environment.md, "The lab".
//!
//! Inside L1: the repository is `/src` (read-only 9p, the working directory), the host's
//! root is `/host` (read-only 9p), the musl release dir is on `PATH`, eth0 is 10.0.3.15/24
//! and the host's 127.0.0.1 answers at 10.0.3.2 (QEMU's user network moved off 10.0.2.0/24,
//! the plan of katalite's own guests). Host programs run through the host's
//! loader, e.g. Debian's QEMU as a peer:
//! `/host/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 --library-path
//! /host/lib/x86_64-linux-gnu:/host/usr/lib/x86_64-linux-gnu
//! /host/usr/bin/qemu-system-x86_64 -L /host/usr/share/qemu ...` (`/lib64`'s loader link is
//! absolute, so it points out of `/host`; name the loader by its real path). Give such a
//! peer's guest `reboot=t`: without an i8042, the kernel's keyboard-controller reboot
//! polls port 0x64 for about two minutes when every port read is a nested exit.
//!
//! `lab run --runtimes` runs the command instead in a Debian 12 root (the host's root with
//! Debian's containerd, docker.io, podman, crun and runc unpacked over it, see
//! `lab/runtimes.rs`): containerd and dockerd are running (logs in `/var/log/`), Docker
//! knows the runtime `katalite` (`/usr/local/bin/katalite-runc`), and
//! `/usr/local/bin/katalite` and `containerd-shim-katalite-v2` link to the built katalite.
//! `/src`, `/host` and `/scratch` keep their paths there; `/tmp` and the engines' state dirs
//! are on the scratch disk; L1's busybox applets come last on `PATH` (`/lab/busybox`).

mod busybox;
mod bzimage;
mod cache;
mod console;
mod e2e;
mod initramfs;
mod kernel;
pub mod packages;
mod qemu;
mod runtimes;
mod stall;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

/// Exit status for anything that is not the command's own status (like `docker run`).
const LAB_FAILED: i32 = 125;

/// Age after which a temporary file in the cache belongs to an interrupted run, not to a
/// concurrent one (no run lasts this long: `LAB_TIMEOUT` defaults to 40 minutes).
const ABANDONED_AFTER: Duration = Duration::from_secs(24 * 3600);

/// The Rust target of the static katalite that runs inside L1.
const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

/// Size of L1's scratch disk in GiB: room for the e2e images (the largest is over 1 GiB,
/// kept as layers and as a disk image) and the tests' temporary files.
const SCRATCH_GIB: u32 = 16;

/// L1's default memory in MiB with `--runtimes`: containerd, dockerd and their shims take
/// several hundred MiB besides the containers and katalite's VMs.
const RUNTIMES_MEM_MIB: u32 = 4096;

/// Options of `lab`.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: LabCommand,
}

#[derive(clap::Subcommand)]
enum LabCommand {
    /// Build katalite, boot the lab and run a shell command in it; exits with its status.
    /// With --runtimes the command runs beside containerd, dockerd and podman.
    Run {
        /// Use the artifacts already built.
        #[arg(long)]
        no_build: bool,
        /// Run the command in a Debian root with containerd and dockerd started, podman,
        /// crun and runc installed, and katalite linked as /usr/local/bin/katalite,
        /// katalite-runc (Docker's runtime `katalite`) and containerd-shim-katalite-v2.
        /// L1 gets 4096 MiB unless LAB_MEM says otherwise.
        #[arg(long)]
        runtimes: bool,
        /// The shell command (several words are joined with spaces).
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Build the end-to-end tests and run them all in one lab boot.
    E2e {
        /// Use the katalite binary already built.
        #[arg(long)]
        no_build: bool,
        /// Run the tests in the Debian root with the container engines, as `run --runtimes`.
        #[arg(long)]
        runtimes: bool,
        /// Extra arguments for the test binary (a name filter, `--nocapture`, ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        test_args: Vec<String>,
    },
}

/// Runs a lab command and exits with the command's status, or 125 when the lab itself fails.
pub fn run(args: &Args) -> Result<()> {
    let status = match dispatch(args) {
        Ok(status) => status,
        Err(err) => {
            eprintln!("lab: error: {err:#}");
            LAB_FAILED
        }
    };
    std::process::exit(status)
}

fn dispatch(args: &Args) -> Result<i32> {
    let paths = Paths::new()?;
    match &args.command {
        LabCommand::Run {
            no_build,
            runtimes,
            command,
        } => {
            if !no_build {
                build(&paths)?;
            }
            boot(&paths, &command.join(" "), *runtimes)
        }
        LabCommand::E2e {
            no_build,
            runtimes,
            test_args,
        } => {
            if !no_build {
                build(&paths)?;
            }
            e2e::run(&paths, test_args, *runtimes)
        }
    }
}

/// Where things are on the host, and where L1 sees them.
struct Paths {
    repo: PathBuf,
    target: PathBuf,
    cache: PathBuf,
}

impl Paths {
    fn new() -> Result<Self> {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let repo = manifest
            .parent()
            .context("xtask is not inside the workspace")?
            .canonicalize()
            .context("cannot resolve the repository path")?;
        let target = match std::env::var_os("CARGO_TARGET_DIR") {
            Some(dir) => repo.join(dir),
            None => repo.join("target"),
        };
        let cache = target.join("lab");
        std::fs::create_dir_all(&cache)
            .with_context(|| format!("cannot create {}", cache.display()))?;
        let target = target.canonicalize()?;
        let cache = cache.canonicalize()?;
        Ok(Self {
            repo,
            target,
            cache,
        })
    }

    /// The musl release dir holding the static `katalite`.
    fn musl_release(&self) -> PathBuf {
        self.target.join(MUSL_TARGET).join("release")
    }

    /// The path under which L1 sees the host path `host`: through `/src` when inside the
    /// repository, else through `/host`.
    fn in_l1(&self, host: &Path) -> PathBuf {
        match host.strip_prefix(&self.repo) {
            Ok(inside) => Path::new("/src").join(inside),
            Err(_) => Path::new("/host").join(host.strip_prefix("/").unwrap_or(host)),
        }
    }
}

/// Builds the guest (kernel + init) and the static katalite that embeds it; each step only
/// rebuilds what is stale.
fn build(paths: &Paths) -> Result<()> {
    checked(cargo(paths).args(["xtask", "build-guest"]))?;
    checked(cargo_musl(paths, "build").args(["-p", "katalite"]))
}

/// The cargo that runs us (`CARGO`), in the repository.
fn cargo(paths: &Paths) -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(&paths.repo);
    command
}

/// `cargo SUBCOMMAND --release --target x86_64-unknown-linux-musl`, with musl's C compiler
/// for crates that build C code.
fn cargo_musl(paths: &Paths, subcommand: &str) -> Command {
    let mut command = cargo(paths);
    command
        .env("CC_x86_64_unknown_linux_musl", "musl-gcc")
        .args([subcommand, "--release", "--target", MUSL_TARGET]);
    command
}

/// Runs `command`, its stdout on stderr, failing on a non-zero exit.
fn checked(command: &mut Command) -> Result<()> {
    // stdout belongs to the command run in the lab.
    let status = command
        .stdout(std::io::stderr())
        .status()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed ({status})");
    }
    Ok(())
}

/// Boots the lab once, runs `command` in it (in the Debian root with the container engines
/// when `runtimes`) and returns the status to exit with.
fn boot(paths: &Paths, command: &str, runtimes: bool) -> Result<i32> {
    let began = Instant::now();
    cache::remove_abandoned(&paths.cache, ABANDONED_AFTER);
    packages::ensure(packages::LAB_PACKAGES)?;
    // The downloaded L1 kernel is the same for every clone: it lives in the user cache.
    let downloads = crate::user_cache::section("lab")?;
    let kernel = kernel::prepare(&downloads).context("cannot prepare the L1 kernel")?;
    let base = initramfs::base(&paths.cache, &kernel).context("cannot build the L1 initramfs")?;
    let runtimes = if runtimes {
        let kernel_in_l1 = paths.in_l1(&kernel.modules);
        Some(
            runtimes::prepare(&downloads, &kernel, &kernel_in_l1)
                .context("cannot prepare the container engines")?,
        )
    } else {
        None
    };
    let token = run_token();
    let mut env = format!(
        "LAB_TOKEN={token}\nLAB_PATH={}\n",
        paths.in_l1(&paths.musl_release()).display()
    );
    if runtimes.is_some() {
        env.push_str(&runtimes_env());
    }
    let initrd = initramfs::with_files(
        &paths.cache,
        &base,
        &[("lab/env", &env), ("lab/cmd.sh", &format!("{command}\n"))],
    )?;
    let default_mem = if runtimes.is_some() {
        RUNTIMES_MEM_MIB
    } else {
        qemu::DEFAULT_MEM_MIB
    };
    let machine = qemu::Machine::from_env(default_mem)?;
    // Unix socket paths are short (108 bytes): keep the monitor out of a deep target dir.
    let scratch = tempfile::tempdir().context("cannot create a scratch dir")?;
    let monitor = scratch.path().join("monitor");
    let disk = scratch.path().join("scratch.img");
    scratch_disk(&disk)?;
    let prepared = began.elapsed();
    let outcome = qemu::run(
        &machine,
        &qemu::Boot {
            kernel: &kernel.image,
            initrd: initrd.path(),
            repo: &paths.repo,
            token: &token,
            monitor: &monitor,
            scratch: &disk,
            runtimes: runtimes.as_ref().map(|runtimes| runtimes.root.as_path()),
        },
    )?;
    match outcome {
        qemu::Outcome::Exited {
            status,
            ready,
            finished,
        } => {
            eprintln!(
                "lab: prepared in {:.1} s, L1 ready in {:.1} s, command ran {:.1} s, \
                 round trip {:.1} s, status {status}",
                prepared.as_secs_f64(),
                ready.as_secs_f64(),
                (finished - ready).as_secs_f64(),
                began.elapsed().as_secs_f64(),
            );
            Ok(status)
        }
        qemu::Outcome::Failed {
            reason,
            diagnostics,
        } => {
            eprintln!("{diagnostics}");
            eprintln!("lab: error: {reason}");
            Ok(LAB_FAILED)
        }
    }
}

/// The lines of L1's `/lab/env` that make its init set up the container engines.
fn runtimes_env() -> String {
    format!(
        "LAB_RUNTIMES=1\nLAB_RUNTIMES_MODULES={}\n",
        shell_quote(&runtimes::MODULES.join(" "))
    )
}

/// Creates L1's scratch disk: a sparse file of `LAB_SCRATCH_GIB` GiB (default
/// [`SCRATCH_GIB`]) with an empty ext4, which L1 mounts at /scratch for katalite's cache and
/// temporary files. Sparse, so only what the tests write takes host disk space, and it
/// goes with the run's scratch directory.
fn scratch_disk(path: &Path) -> Result<()> {
    let gib = qemu::env_number("LAB_SCRATCH_GIB", SCRATCH_GIB)?;
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    file.set_len(u64::from(gib) << 30)
        .with_context(|| format!("cannot size {}", path.display()))?;
    drop(file);
    checked(
        Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-m",
                "0",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1",
            ])
            .arg(path),
    )
}

/// A value unique to this run, so stale or quoted markers never match.
fn run_token() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos());
    format!("{:x}{nanos:x}", std::process::id())
}

/// Quotes `word` for `sh`.
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_paths_map_into_l1_shares() {
        let paths = Paths {
            repo: "/work/main".into(),
            target: "/work/main/target".into(),
            cache: "/work/main/target/lab".into(),
        };
        assert_eq!(
            paths.in_l1(&paths.musl_release()),
            Path::new("/src/target/x86_64-unknown-linux-musl/release")
        );
        assert_eq!(
            paths.in_l1(Path::new("/var/cache/t")),
            Path::new("/host/var/cache/t")
        );
        assert_eq!(
            paths.in_l1(Path::new("/work/mainx")),
            Path::new("/host/work/mainx")
        );
    }

    #[test]
    fn quoted_words_survive_the_shell() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        let output = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "printf %s {}",
                shell_quote("x'; echo injected '$HOME")
            ))
            .output()
            .expect("sh runs");
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            "x'; echo injected '$HOME"
        );
    }
}
