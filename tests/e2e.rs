//! End-to-end user stories: the `katalite` on `PATH` boots real guests on real KVM.
//!
//! They run inside the lab (`cargo xtask lab e2e`), which puts the static katalite on `PATH`
//! and names the test rootfs trees in `KATALITE_E2E_ROOTFS`; elsewhere they fail loudly.

#[path = "e2e/images.rs"]
mod images;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Longest a single run may take: guests boot on KVM nested in QEMU TCG, tens of times
/// slower than on hardware, so this is generous; a hang still fails.
const RUN_TIMEOUT: Duration = Duration::from_secs(240);

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
    let command = args;
    let mut child = Command::new("katalite")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("katalite is on PATH");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let read_stdout = thread::spawn(move || {
        let mut text = String::new();
        stdout.read_to_string(&mut text).map(|_| text)
    });
    let read_stderr = thread::spawn(move || {
        let mut text = String::new();
        stderr.read_to_string(&mut text).map(|_| text)
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for katalite") {
            break status;
        }
        if started.elapsed() > RUN_TIMEOUT {
            child.kill().expect("killing a hung katalite");
            child.wait().expect("reaping a killed katalite");
            let stderr = read_stderr
                .join()
                .expect("stderr reader")
                .unwrap_or_default();
            panic!("katalite {command:?} did not finish within {RUN_TIMEOUT:?}; stderr:\n{stderr}");
        }
        thread::sleep(Duration::from_millis(50));
    };
    Outcome {
        status: status.code(),
        stdout: read_stdout
            .join()
            .expect("stdout reader")
            .expect("utf-8 stdout"),
        stderr: read_stderr
            .join()
            .expect("stderr reader")
            .expect("utf-8 stderr"),
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
