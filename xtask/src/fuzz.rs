//! `cargo xtask fuzz`: builds the cargo-fuzz crate in `fuzz/` with libFuzzer's coverage
//! instrumentation on stable Rust (no cargo-fuzz, no nightly: sanitizer "none" needs only
//! stable codegen flags), then runs each target for a bounded time on a scratch copy of
//! its committed seed corpus and reports executions per second and any crash.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};

/// The targets of `fuzz/Cargo.toml` and the largest input each is given: the layer target
/// needs room for tar blocks and several entries, the others parse small messages.
const TARGETS: &[(&str, usize)] = &[
    ("channel_decoder", 16 * 1024),
    ("layer_merge", 64 * 1024),
    ("oci_manifest", 16 * 1024),
    ("usernet_frame", 16 * 1024),
    ("packet_frames", 70 * 1024),
    ("virtio_rng", 8 * 1024),
    ("virtio_blk", 16 * 1024),
    ("virtio_fs", 16 * 1024),
    ("virtio_net", 16 * 1024),
    ("virtio_console", 16 * 1024),
];

/// The host triple: passing `--target` keeps RUSTFLAGS off build scripts and proc macros,
/// which must not be instrumented (cargo-fuzz does the same).
const TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// cargo-fuzz's flags for `--sanitizer none` (its `project.rs`), all stable: SanitizerCoverage
/// with inline 8-bit counters, the PC table and comparison tracing that libFuzzer feeds on,
/// `cfg(fuzzing)`, and assertions plus overflow checks so that arithmetic bugs panic.
const RUSTFLAGS: &[&str] = &[
    "-Cpasses=sancov-module",
    "-Cllvm-args=-sanitizer-coverage-level=4",
    "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
    "-Cllvm-args=-sanitizer-coverage-pc-table",
    "-Cllvm-args=-sanitizer-coverage-trace-compares",
    "-Cllvm-args=-sanitizer-coverage-stack-depth",
    "-Cllvm-args=-simplifycfg-branch-fold-threshold=0",
    "--cfg=fuzzing",
    "-Cdebug-assertions",
    "-Coverflow-checks",
];

/// libFuzzer needs a C++ compiler to build (libfuzzer-sys compiles it from source).
const PACKAGES: &[&str] = &["g++"];

/// A single input running longer than this is reported as a hang.
const INPUT_TIMEOUT_SECS: u64 = 10;
/// Memory cap of a target process (also its largest single allocation): a parser that
/// allocates what its input claims hits it.
const RSS_LIMIT_MB: u64 = 2048;

/// Options of `fuzz`.
#[derive(clap::Args)]
pub struct Args {
    /// How long each target runs.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Largest input, instead of each target's own default.
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Targets to run (default: all).
    #[arg(value_name = "TARGET")]
    pub targets: Vec<String>,
}

/// What one target's run gave.
struct Outcome {
    target: String,
    execs: u64,
    execs_per_sec: u64,
    corpus: usize,
    /// Crash, leak, timeout or out-of-memory inputs it wrote.
    findings: Vec<PathBuf>,
    failed: bool,
}

pub fn run(args: &Args) -> Result<()> {
    let root = crate::ci::workspace_root()?;
    let targets = selected(&args.targets)?;
    crate::lab::packages::ensure(PACKAGES)?;
    let started = Instant::now();
    build(&root)?;
    println!("fuzz: built in {} s", started.elapsed().as_secs());
    let mut outcomes = Vec::new();
    for &(target, default_len) in &targets {
        let max_len = args.max_len.unwrap_or(default_len);
        outcomes.push(run_target(&root, target, args.seconds, max_len)?);
    }
    report(&outcomes);
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.failed)
        .map(|o| o.target.as_str())
        .collect();
    if !failed.is_empty() {
        bail!(
            "fuzz targets failed: {} (inputs under target/fuzz/artifacts/)",
            failed.join(", ")
        );
    }
    Ok(())
}

fn selected(names: &[String]) -> Result<Vec<(&'static str, usize)>> {
    if names.is_empty() {
        return Ok(TARGETS.to_vec());
    }
    names
        .iter()
        .map(|name| {
            TARGETS
                .iter()
                .find(|(target, _)| target == name)
                .copied()
                .with_context(|| {
                    let known: Vec<&str> = TARGETS.iter().map(|(t, _)| *t).collect();
                    format!("unknown fuzz target {name:?} (known: {})", known.join(", "))
                })
        })
        .collect()
}

/// The fuzz crate's own target dir, apart from the workspace's (different flags).
fn target_dir(root: &Path) -> PathBuf {
    root.join("target/fuzz")
}

fn build(root: &Path) -> Result<()> {
    let manifest = root.join("fuzz/Cargo.toml");
    // Not --locked: fuzz/Cargo.lock keeps the versions it pins, and cargo adds whatever
    // the workspace's crates depend on since (commit the lock file with such a change).
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "--bins", "--target", TRIPLE])
        .arg("--manifest-path")
        .arg(&manifest)
        .current_dir(root)
        .env("CARGO_TARGET_DIR", target_dir(root))
        .env("RUSTFLAGS", RUSTFLAGS.join(" "))
        // Would override RUSTFLAGS (cargo sets it for build scripts of our own build).
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .context("cannot start cargo build for fuzz/")?;
    ensure!(
        status.success(),
        "building the fuzz targets failed ({status})"
    );
    Ok(())
}

fn run_target(root: &Path, target: &str, seconds: u64, max_len: usize) -> Result<Outcome> {
    let dir = target_dir(root);
    let binary = dir.join(TRIPLE).join("release").join(target);
    // The committed seeds stay as they are; libFuzzer adds what it finds to a copy.
    let corpus = dir.join("corpus").join(target);
    let artifacts = dir.join("artifacts").join(target);
    let _ = fs::remove_dir_all(&corpus);
    copy_dir(&root.join("fuzz/corpus").join(target), &corpus)?;
    fs::create_dir_all(&artifacts)?;
    let before = findings(&artifacts)?;
    let log_path = dir.join("logs").join(format!("{target}.log"));
    fs::create_dir_all(log_path.parent().context("log dir")?)?;
    let log = fs::File::create(&log_path)?;

    println!("fuzz: ==> {target} ({seconds} s, inputs up to {max_len} bytes)");
    let status = Command::new(&binary)
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-max_len={max_len}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg("-print_final_stats=1")
        // libFuzzer wants the prefix's trailing slash to treat it as a directory.
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(&corpus)
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(log)
        .status()
        .with_context(|| format!("cannot run {}", binary.display()))?;
    let text = fs::read_to_string(&log_path).unwrap_or_default();
    let (execs, execs_per_sec) = stats(&text);
    let new: Vec<PathBuf> = findings(&artifacts)?
        .into_iter()
        .filter(|path| !before.contains(path))
        .collect();
    let failed = !status.success() || !new.is_empty();
    if failed {
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        eprintln!(
            "fuzz: {target} failed ({status}); end of {}:",
            log_path.display()
        );
        for line in tail.iter().rev() {
            eprintln!("    {line}");
        }
    }
    Ok(Outcome {
        target: target.to_string(),
        execs,
        execs_per_sec,
        corpus: fs::read_dir(&corpus)?.count(),
        findings: new,
        failed,
    })
}

/// Total executions and executions per second from libFuzzer's final statistics, or from
/// its last status line (`#1234 ... exec/s: 56 ...`) when it stopped on a crash.
fn stats(log: &str) -> (u64, u64) {
    let stat = |name: &str| {
        log.lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse::<u64>().ok())
    };
    let last_status = log
        .lines()
        .rev()
        .find(|line| line.starts_with('#') && line.contains("exec/s:"));
    let from_status = |key: &str| {
        last_status.and_then(|line| {
            let mut words = line.split_whitespace();
            match key {
                "#" => words.next()?.trim_start_matches('#').parse().ok(),
                _ => words.skip_while(|w| *w != key).nth(1)?.parse::<u64>().ok(),
            }
        })
    };
    let execs = stat("stat::number_of_executed_units:").or_else(|| from_status("#"));
    let rate = stat("stat::average_exec_per_sec:").or_else(|| from_status("exec/s:"));
    (execs.unwrap_or(0), rate.unwrap_or(0))
}

/// Inputs libFuzzer saved because they crashed, leaked, hung or ran out of memory (slow
/// units are only reported in the log).
fn findings(artifacts: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(artifacts)? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if ["crash-", "leak-", "timeout-", "oom-"]
            .iter()
            .any(|prefix| name.starts_with(prefix))
        {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    if !from.exists() {
        return Ok(());
    }
    for entry in fs::read_dir(from).with_context(|| format!("read {}", from.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

fn report(outcomes: &[Outcome]) {
    println!(
        "fuzz: {:<16} {:>10} {:>12} {:>8}  result",
        "target", "execs/s", "execs", "corpus"
    );
    for o in outcomes {
        let result = match (o.failed, o.findings.is_empty()) {
            (false, _) => "ok".to_string(),
            (true, true) => "FAILED (see its log)".to_string(),
            (true, false) => {
                let names: Vec<String> =
                    o.findings.iter().map(|p| p.display().to_string()).collect();
                format!("CRASHED: {}", names.join(", "))
            }
        };
        println!(
            "fuzz: {:<16} {:>10} {:>12} {:>8}  {result}",
            o.target, o.execs_per_sec, o.execs, o.corpus
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_stats_are_read() {
        let log = "#2\tINITED cov: 10 ft: 10 corp: 1/1b exec/s: 0 rss: 30Mb\n\
                   #4096\tpulse  cov: 50 ft: 60 corp: 5/99b lim: 43 exec/s: 2048 rss: 31Mb\n\
                   Done 123456 runs in 10 second(s)\n\
                   stat::number_of_executed_units: 123456\n\
                   stat::average_exec_per_sec:     12345\n\
                   stat::new_units_added:          7\n";
        assert_eq!(stats(log), (123456, 12345));
    }

    #[test]
    fn a_crashed_run_reports_its_last_status_line() {
        let log = "#4096\tpulse  cov: 50 ft: 60 corp: 5/99b lim: 43 exec/s: 2048 rss: 31Mb\n\
                   #5000\tNEW    cov: 51 ft: 61 corp: 6/120b lim: 43 exec/s: 1666 rss: 31Mb\n\
                   thread '<unnamed>' panicked at fuzz_targets/x.rs:1:1:\n\
                   ==1== ERROR: libFuzzer: deadly signal\n";
        assert_eq!(stats(log), (5000, 1666));
        assert_eq!(stats(""), (0, 0));
    }

    #[test]
    fn every_target_is_a_bin_of_the_fuzz_crate() {
        let root = crate::ci::workspace_root().expect("root");
        let manifest = fs::read_to_string(root.join("fuzz/Cargo.toml")).expect("manifest");
        for (target, _) in TARGETS {
            assert!(
                manifest.contains(&format!("name = \"{target}\"")),
                "{target} is not in fuzz/Cargo.toml"
            );
            assert!(
                root.join("fuzz/corpus").join(target).is_dir(),
                "{target} has no seed corpus"
            );
        }
        assert!(selected(&["nope".into()]).is_err());
    }
}
