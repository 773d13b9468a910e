//! `cargo xtask ci`: the whole test suite, in the order CI runs it. Static gates first
//! (cheap, fail fast), then unit and host tests, then the guest build and the lab's
//! end-to-end tests on real KVM.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

/// The musl target the static katalite and init are built for.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

/// Debian packages the host tests run: `fsck.erofs` and `dump.erofs` check the EROFS images
/// katalite writes.
const HOST_TEST_PACKAGES: &[&str] = &["erofs-utils"];

/// Options of `ci`.
#[derive(clap::Args)]
pub struct Args {
    /// Skip the lab's end-to-end tests (for a quick local check; CI never passes this).
    #[arg(long)]
    pub no_e2e: bool,
}

/// Runs every gate and test; the first failure stops the run. Each step prints how long
/// it took, and the run its total: a clean-clone CI run must stay within its budget.
pub fn run(args: &Args) -> Result<()> {
    let started = Instant::now();
    let result = run_steps(args);
    let verdict = if result.is_ok() { "ok" } else { "FAILED" };
    println!("ci: total: {verdict} ({})", duration(started.elapsed()));
    result
}

fn run_steps(args: &Args) -> Result<()> {
    let root = workspace_root()?;
    ensure_musl_target()?;
    step("format", || cargo(&root, &["fmt", "--all", "--check"]))?;
    let clippy = [
        "clippy",
        "--workspace",
        "--all-targets",
        "--all-features",
        "--",
        "-D",
        "warnings",
    ];
    step("clippy", || cargo(&root, &clippy))?;
    // The real registries (plain, and basic auth over TLS with a self-made CA) serve the
    // integration tests on the host and, through QEMU's user network, the lab.
    let registries = ["registry", "start", "--tls-auth"];
    step("local test registries", || xtask(&root, &registries))?;
    let result = tests_with_registry(&root, args);
    let stopped = xtask(&root, &["registry", "stop", "--tls-auth"]);
    result.and(stopped)
}

fn tests_with_registry(root: &Path, args: &Args) -> Result<()> {
    std::env::set_var("KATALITE_TEST_REGISTRY", "127.0.0.1:5000");
    std::env::set_var("KATALITE_TEST_REGISTRY_TLS", "127.0.0.1:5443");
    // The lab reaches the host's loopback as 10.0.3.2.
    std::env::set_var("KATALITE_E2E_REGISTRY", "10.0.3.2:5000");
    // A one-CPU lab: with two, L1's kernel (under TCG) can livelock in its int3 handler
    // while live-patching static keys as VMs come and go (seen in about one run in 15-60).
    if std::env::var_os("LAB_SMP").is_none() {
        std::env::set_var("LAB_SMP", "1");
    }
    step("unit and host tests", || {
        // imagebuilder's EROFS tests check every image they write with fsck.erofs.
        crate::lab::packages::ensure(HOST_TEST_PACKAGES)?;
        cargo(root, &["test", "--workspace"])
    })?;
    step("fuzzing", || fuzzing(root))?;
    step("guest build", || xtask(root, &["build-guest"]))?;
    step("static release build", || static_release_build(root))?;
    if args.no_e2e {
        println!("ci: end-to-end tests skipped (--no-e2e)");
        return Ok(());
    }
    // In the Debian root with containerd, dockerd and podman: the engine stories need them.
    step("end-to-end tests in the lab", || {
        xtask(root, &["lab", "e2e", "--runtimes"])
    })
}

/// The fuzz crate (outside the workspace) through the same lint gate and its own unit
/// tests, then every fuzz target for a short bounded time from its seeds: a parser change
/// that panics on an input near a seed fails here.
fn fuzzing(root: &Path) -> Result<()> {
    const FUZZ_CRATE: [&str; 4] = [
        "--manifest-path",
        "fuzz/Cargo.toml",
        "--target-dir",
        "target/fuzz",
    ];
    let lints = ["--", "-D", "warnings"];
    cargo(
        root,
        &[&["clippy", "--all-targets"][..], &FUZZ_CRATE, &lints].concat(),
    )?;
    cargo(root, &[&["test", "--lib"][..], &FUZZ_CRATE].concat())?;
    xtask(root, &["fuzz", "--seconds", &FUZZ_SECONDS.to_string()])
}

/// Seconds each fuzz target runs in CI: nine targets, three minutes in all (the whole step,
/// instrumented build included, took 7 min 46 s on 2 cores on 2026-12-06).
const FUZZ_SECONDS: u64 = 20;

/// Runs one named step, printing its start, its end and how long it took.
fn step(name: &str, body: impl FnOnce() -> Result<()>) -> Result<()> {
    println!("ci: ==> {name}");
    let started = Instant::now();
    let result = body();
    let took = duration(started.elapsed());
    match &result {
        Ok(()) => println!("ci: <== {name}: ok ({took})"),
        Err(_) => println!("ci: <== {name}: FAILED ({took})"),
    }
    result.with_context(|| format!("ci step failed: {name}"))
}

/// `3 min 12 s`, or `42 s` under a minute.
fn duration(elapsed: Duration) -> String {
    let seconds = elapsed.as_secs();
    match seconds / 60 {
        0 => format!("{seconds} s"),
        minutes => format!("{minutes} min {} s", seconds % 60),
    }
}

/// The repository root (the parent of `xtask/`).
pub fn workspace_root() -> Result<std::path::PathBuf> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    let status = Command::new(env!("CARGO"))
        .args(args)
        .current_dir(root)
        .env("CC_x86_64_unknown_linux_musl", "musl-gcc")
        .status()
        .with_context(|| format!("cannot start cargo {}", args.join(" ")))?;
    ensure!(
        status.success(),
        "cargo {} failed ({status})",
        args.join(" ")
    );
    Ok(())
}

pub fn xtask(root: &Path, args: &[&str]) -> Result<()> {
    let mut full = vec!["run", "--quiet", "--package", "xtask", "--"];
    full.extend_from_slice(args);
    cargo(root, &full)
}

fn ensure_musl_target() -> Result<()> {
    let output = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("cannot run rustup")?;
    if String::from_utf8_lossy(&output.stdout)
        .lines()
        .any(|t| t.trim() == MUSL_TARGET)
    {
        return Ok(());
    }
    let status = Command::new("rustup")
        .args(["target", "add", MUSL_TARGET])
        .status()?;
    ensure!(status.success(), "rustup target add {MUSL_TARGET} failed");
    Ok(())
}

/// The most the release katalite may weigh with the guest kernel and init embedded (issue
/// 16): one small download that holds everything. CI fails above it (README "Binary size"
/// says where the bytes go).
pub const MAX_RELEASE_BYTES: u64 = 8_000_000;

/// Builds the release katalite for musl and checks it is static (no ELF interpreter) and,
/// with the guest embedded, within [`MAX_RELEASE_BYTES`].
pub fn static_release_build(root: &Path) -> Result<()> {
    cargo(
        root,
        &[
            "build",
            "--release",
            "--target",
            MUSL_TARGET,
            "--package",
            "katalite",
        ],
    )?;
    let binary = root
        .join("target")
        .join(MUSL_TARGET)
        .join("release/katalite");
    let bytes =
        std::fs::read(&binary).with_context(|| format!("cannot read {}", binary.display()))?;
    if has_interpreter(&bytes)? {
        bail!(
            "{} is dynamically linked (it has a PT_INTERP header)",
            binary.display()
        );
    }
    let embedded = guest_embedded(&binary)?;
    println!(
        "ci: {} is static, {} bytes ({})",
        binary.display(),
        bytes.len(),
        if embedded {
            "guest embedded"
        } else {
            "no guest embedded"
        }
    );
    check_release_size(bytes.len() as u64, embedded)
}

/// Whether `katalite --version` names an embedded guest kernel.
fn guest_embedded(binary: &Path) -> Result<bool> {
    let output = Command::new(binary)
        .arg("--version")
        .output()
        .with_context(|| format!("cannot run {} --version", binary.display()))?;
    ensure!(
        output.status.success(),
        "{} --version failed ({})",
        binary.display(),
        output.status
    );
    Ok(String::from_utf8_lossy(&output.stdout).contains("\nguest kernel "))
}

/// Fails when a release binary with the guest embedded is over [`MAX_RELEASE_BYTES`];
/// one without the guest is not what users get, so its size is only printed.
fn check_release_size(size: u64, embedded: bool) -> Result<()> {
    if embedded && size > MAX_RELEASE_BYTES {
        bail!(
            "the release katalite is {size} bytes with the guest embedded, {} over its \
             {MAX_RELEASE_BYTES}-byte budget: see README's \"Binary size\" for where the bytes \
             go (kernel config, dependencies, release profile)",
            size - MAX_RELEASE_BYTES
        );
    }
    Ok(())
}

/// True when a 64-bit little-endian ELF has a PT_INTERP program header.
fn has_interpreter(elf: &[u8]) -> Result<bool> {
    const PT_INTERP: u32 = 3;
    ensure!(
        elf.len() >= 64 && &elf[..4] == b"\x7fELF" && elf[4] == 2,
        "not a 64-bit ELF"
    );
    let u16_at = |at: usize| u16::from_le_bytes([elf[at], elf[at + 1]]);
    let phoff = u64::from_le_bytes(elf[32..40].try_into()?);
    let (phentsize, phnum) = (usize::from(u16_at(54)), usize::from(u16_at(56)));
    let phoff = usize::try_from(phoff)?;
    for index in 0..phnum {
        let at = phoff + index * phentsize;
        let header = elf.get(at..at + 4).context("truncated program headers")?;
        if u32::from_le_bytes(header.try_into()?) == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_build_tool_itself_is_dynamic_and_detected() {
        let own = std::fs::read(std::env::current_exe().expect("exe")).expect("read");
        // Test binaries on the gnu target are dynamically linked.
        assert!(has_interpreter(&own).expect("parse"));
    }

    #[test]
    fn durations_read_like_the_issue_asks() {
        assert_eq!(duration(Duration::from_millis(42_900)), "42 s");
        assert_eq!(duration(Duration::from_secs(192)), "3 min 12 s");
        assert_eq!(duration(Duration::from_secs(3600)), "60 min 0 s");
    }

    #[test]
    fn a_failed_step_is_reported_and_named() {
        assert!(step("passing", || Ok(())).is_ok());
        let error = step("broken", || bail!("boom")).expect_err("fails");
        assert!(
            format!("{error:#}").contains("ci step failed: broken"),
            "{error:#}"
        );
    }

    #[test]
    fn the_size_gate_applies_to_binaries_with_the_guest() {
        assert!(check_release_size(MAX_RELEASE_BYTES, true).is_ok());
        let error = check_release_size(MAX_RELEASE_BYTES + 1, true).expect_err("over");
        let message = format!("{error:#}");
        assert!(message.contains("8000001 bytes"), "{message}");
        assert!(
            message.contains(", 1 over its 8000000-byte budget"),
            "{message}"
        );
        // Without the guest the binary is not the artifact: no budget to enforce.
        assert!(check_release_size(30_000_000, false).is_ok());
    }

    #[test]
    fn non_elf_is_rejected() {
        assert!(has_interpreter(b"#!/bin/sh\n").is_err());
    }
}
