//! End-to-end user stories: the `katalite` on `PATH` boots real guests on real KVM.
//!
//! They run inside the lab (`cargo xtask lab e2e`), which puts the static katalite on `PATH`
//! and names the test rootfs trees in `KATALITE_E2E_ROOTFS`; elsewhere they fail loudly.

#[path = "e2e/engines.rs"]
mod engines;
#[path = "e2e/exec.rs"]
mod exec;
#[path = "e2e/images.rs"]
mod images;
#[path = "e2e/isolation.rs"]
mod isolation;
#[path = "e2e/lifecycle.rs"]
mod lifecycle;
#[path = "e2e/network.rs"]
mod network;
#[path = "e2e/options.rs"]
mod options;
#[path = "e2e/runc.rs"]
mod runc;
#[path = "e2e/shim.rs"]
mod shim;
#[path = "e2e/signals.rs"]
mod signals;
#[path = "e2e/stdio.rs"]
mod stdio;
#[path = "e2e/storage.rs"]
mod storage;
#[path = "e2e/tty.rs"]
mod tty;
#[path = "e2e/volumes.rs"]
mod volumes;

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Longest a single run may take: guests boot on KVM nested in QEMU TCG, tens of times
/// slower than on hardware, so this is generous; a hang still fails.
const RUN_TIMEOUT: Duration = Duration::from_secs(240);

/// The lowercase hex SHA-256 of `data`, as `sha256sum` prints it.
fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What one `katalite` invocation did.
struct Outcome {
    status: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn describe(&self) -> String {
        format!(
            "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// A test rootfs tree prepared by `cargo xtask lab e2e`.
fn rootfs(name: &str) -> String {
    let dir = std::env::var("KATALITE_E2E_ROOTFS")
        .expect("KATALITE_E2E_ROOTFS must name the test rootfs dir: run `cargo xtask lab e2e`");
    let tree = PathBuf::from(dir).join(name);
    assert!(tree.is_dir(), "missing test rootfs {}", tree.display());
    tree.to_string_lossy().into_owned()
}

/// Runs `katalite run --rootfs <busybox> OPTIONS -- COMMAND` and waits at most
/// [`RUN_TIMEOUT`], capturing both output streams.
fn katalite_busybox(options: &[&str], command: &[&str]) -> Outcome {
    let busybox = rootfs("busybox");
    let mut args = vec!["run", "--rootfs", &busybox];
    args.extend_from_slice(options);
    args.push("--");
    args.extend_from_slice(command);
    katalite(&args)
}

/// Runs `katalite ARGS` and waits at most [`RUN_TIMEOUT`], capturing both output streams.
fn katalite(args: &[&str]) -> Outcome {
    let run = katalite_captured(args, None);
    Outcome {
        status: run.status,
        stdout: String::from_utf8(run.stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8(run.stderr).expect("utf-8 stderr"),
    }
}

/// What one `katalite` invocation did, byte for byte, with timings.
struct Captured {
    status: Option<i32>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// From spawning katalite to its first stdout byte, if any.
    first_output: Option<Duration>,
    /// From the first stdout byte to the last.
    output_span: Duration,
    /// From spawning katalite to its exit.
    elapsed: Duration,
}

/// Reads `from` to the end, noting when the first and the last bytes arrived.
fn read_timed(mut from: impl Read) -> (Vec<u8>, Option<Instant>, Option<Instant>) {
    let (mut data, mut first, mut last) = (Vec::new(), None, None);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return (data, first, last),
            Ok(n) => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = Some(now);
                data.extend_from_slice(&buf[..n]);
            }
        }
    }
}

/// Runs `katalite ARGS` with `stdin` piped in (closed after it; `None`: /dev/null) and
/// waits at most [`RUN_TIMEOUT`], capturing both output streams as bytes.
fn katalite_captured(args: &[&str], stdin: Option<Vec<u8>>) -> Captured {
    katalite_captured_with(args, &[], stdin)
}

/// `katalite ARGS` with its container state under `runtime` (`KATALITE_RUNTIME_DIR`) and
/// `stdin` piped in (`None`: /dev/null); output decoded lossily.
fn katalite_in(runtime: &Path, args: &[&str], stdin: Option<&[u8]>) -> Outcome {
    let env = [("KATALITE_RUNTIME_DIR", runtime.as_os_str())];
    let run = katalite_captured_with(args, &env, stdin.map(<[u8]>::to_vec));
    Outcome {
        status: run.status,
        stdout: String::from_utf8_lossy(&run.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&run.stderr).into_owned(),
    }
}

/// [`katalite_captured`] with extra environment variables.
fn katalite_captured_with(
    args: &[&str],
    env: &[(&str, &OsStr)],
    stdin: Option<Vec<u8>>,
) -> Captured {
    let started = Instant::now();
    let mut child = Command::new("katalite")
        .args(args)
        .envs(env.iter().copied())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("katalite is on PATH");
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A katalite that does not read stdin (no -i) closes it: a write error is fine.
        thread::spawn(move || pipe.write_all(&data));
    }
    let stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let read_stdout = thread::spawn(move || read_timed(stdout));
    let read_stderr = thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stderr.read_to_end(&mut bytes);
        bytes
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for katalite") {
            break status;
        }
        if started.elapsed() > RUN_TIMEOUT {
            child.kill().expect("killing a hung katalite");
            child.wait().expect("reaping a killed katalite");
            let stderr = read_stderr.join().expect("stderr reader");
            panic!(
                "katalite {args:?} did not finish within {RUN_TIMEOUT:?}; stderr:\n{}",
                String::from_utf8_lossy(&stderr)
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    let elapsed = started.elapsed();
    let (stdout, first, last) = read_stdout.join().expect("stdout reader");
    Captured {
        status: status.code(),
        stdout,
        stderr: read_stderr.join().expect("stderr reader"),
        first_output: first.map(|at| at - started),
        output_span: first.zip(last).map_or(Duration::ZERO, |(f, l)| l - f),
        elapsed,
    }
}

#[test]
fn a_shell_prints_and_its_exit_code_becomes_katalites() {
    let run = katalite_busybox(&[], &["sh", "-c", "echo hi; exit 42"]);
    assert!(run.stdout.contains("hi"), "{}", run.describe());
    assert_eq!(run.status, Some(42), "{}", run.describe());
}

#[test]
fn true_exits_zero() {
    let run = katalite_busybox(&[], &["true"]);
    assert_eq!(run.status, Some(0), "{}", run.describe());
}

#[test]
fn exit_three_exits_three() {
    let run = katalite_busybox(&[], &["sh", "-c", "exit 3"]);
    assert_eq!(run.status, Some(3), "{}", run.describe());
}

#[test]
fn a_missing_command_exits_127() {
    let run = katalite_busybox(&[], &["/no/such/command"]);
    assert_eq!(run.status, Some(127), "{}", run.describe());
}

#[test]
fn two_cpus_are_what_the_guest_sees() {
    let run = katalite_busybox(&["--cpus", "2"], &["nproc"]);
    assert_eq!(run.status, Some(0), "{}", run.describe());
    assert_eq!(run.stdout.trim(), "2", "{}", run.describe());
}

#[test]
fn memory_limit_sizes_the_guest_ram() {
    let run = katalite_busybox(&["--memory", "256m"], &["cat", "/proc/meminfo"]);
    assert_eq!(run.status, Some(0), "{}", run.describe());
    let total_kib: u64 = run
        .stdout
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in /proc/meminfo\n{}", run.describe()));
    let total_mib = total_kib / 1024;
    assert!(
        (200..=256).contains(&total_mib),
        "MemTotal {total_mib} MiB is not about 256 MiB\n{}",
        run.describe()
    );
}

#[test]
fn a_guest_kernel_panic_fails_the_run_without_hanging() {
    let started = Instant::now();
    let run = katalite_busybox(&[], &["sh", "-c", "echo c > /proc/sysrq-trigger"]);
    assert_eq!(run.status, Some(125), "{}", run.describe());
    assert!(
        run.stderr.to_lowercase().contains("panic"),
        "stderr does not mention the panic\n{}",
        run.describe()
    );
    assert!(started.elapsed() < RUN_TIMEOUT);
}

#[test]
fn a_file_that_cannot_be_executed_exits_126() {
    let run = katalite_busybox(&[], &["/etc/passwd"]);
    assert_eq!(run.status, Some(126), "{}", run.describe());
}

#[test]
fn death_by_signal_n_exits_128_plus_n() {
    let run = katalite_busybox(&[], &["sh", "-c", "kill -KILL $$"]);
    assert_eq!(run.status, Some(128 + 9), "{}", run.describe());
    let run = katalite_busybox(&[], &["sh", "-c", "kill -SEGV $$"]);
    assert_eq!(run.status, Some(128 + 11), "{}", run.describe());
}

#[test]
fn an_unknown_user_fails_in_init_with_125() {
    let run = katalite_busybox(&["-u", "nosuchuser"], &["true"]);
    assert_eq!(run.status, Some(125), "{}", run.describe());
    assert!(run.stderr.contains("nosuchuser"), "{}", run.describe());
}

#[test]
fn a_bad_flag_is_one_line_and_125() {
    for options in [
        &["--no-such-flag"][..],
        &["--memory", "12x"],
        &["--cpus", "0"],
    ] {
        let run = katalite_busybox(options, &["true"]);
        assert_eq!(run.status, Some(125), "{options:?}: {}", run.describe());
        assert_eq!(run.stderr.lines().count(), 1, "{}", run.describe());
        assert!(run.stderr.starts_with("katalite: "), "{}", run.describe());
        assert!(run.stdout.is_empty(), "{}", run.describe());
    }
}

#[test]
fn a_workload_making_zombies_still_exits_cleanly() {
    // The inner shell's child exits while its parent (exec'd into sleep) never waits for
    // it: a zombie that init, as PID 1, must reap once it is orphaned.
    let script = "sh -c 'sleep 0.1 & exec sleep 0.5' & sleep 1; echo done; exit 5";
    let run = katalite_busybox(&[], &["sh", "-c", script]);
    assert_eq!(run.status, Some(5), "{}", run.describe());
    assert_eq!(run.stdout, "done\n", "{}", run.describe());
}

#[test]
fn background_processes_do_not_keep_the_vm_alive() {
    let started = Instant::now();
    let run = katalite_busybox(&[], &["sh", "-c", "sleep 1000 & echo bye"]);
    assert_eq!(run.status, Some(0), "{}", run.describe());
    assert_eq!(run.stdout, "bye\n", "{}", run.describe());
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "{}",
        run.describe()
    );
}

#[test]
fn boot_to_first_output_and_to_exit_are_timed() {
    let busybox = rootfs("busybox");
    let echo = katalite_captured(&["run", "--rootfs", &busybox, "--", "echo", "hi"], None);
    assert_eq!(echo.status, Some(0));
    assert_eq!(echo.stdout, b"hi\n");
    let first = echo.first_output.expect("output");
    let truth = katalite_captured(&["run", "--rootfs", &busybox, "--", "true"], None);
    assert_eq!(truth.status, Some(0));
    eprintln!(
        "timing: echo: first output {:.3} s, exit {:.3} s; true: exit {:.3} s",
        first.as_secs_f64(),
        echo.elapsed.as_secs_f64(),
        truth.elapsed.as_secs_f64()
    );
    // Generous even in the lab; a guest that hangs around after its workload fails it.
    assert!(
        truth.elapsed < Duration::from_secs(60),
        "{:?}",
        truth.elapsed
    );
}
