//! User stories for the host side of isolation: every thread of a running katalite is
//! under a seccomp filter with no_new_privs and holds no descriptor it inherited; a
//! workload whose output nobody reads neither freezes the VM (kill still ends it with
//! 137) nor makes katalite's memory grow.

use std::fs::{self, File, OpenOptions};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::{katalite_in, rootfs, RUN_TIMEOUT};

/// Polls `katalite ps` under `runtime` until a container named `name` is up.
fn wait_until_up(runtime: &Path, name: &str, child: &mut Child) {
    let started = Instant::now();
    loop {
        let ps = katalite_in(runtime, &["ps"], None);
        if ps
            .stdout
            .lines()
            .any(|line| line.contains("Up ") && line.ends_with(name))
        {
            return;
        }
        if let Some(status) = child.try_wait().expect("wait") {
            panic!("katalite ended before {name} was up: {status}");
        }
        assert!(
            started.elapsed() < RUN_TIMEOUT,
            "{name} never came up: {}",
            ps.describe()
        );
        thread::sleep(Duration::from_millis(500));
    }
}

/// Waits for `child` at most `limit`; its exit code.
fn wait_at_most(child: &mut Child, limit: Duration) -> Option<i32> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status.code();
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("katalite did not end within {limit:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// A field of /proc/PID/status (or a task's), trimmed.
fn status_field(status: &str, field: &str) -> Option<String> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .map(|value| value.trim().to_owned())
}

/// The peak resident size of process `pid`, in KiB.
fn vm_hwm_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let value = status_field(&status, "VmHWM").expect("VmHWM");
    value
        .trim_end_matches(" kB")
        .parse()
        .expect("a number of kB")
}

/// The guest RAM of the flooding story.
const GUEST_MIB: u64 = 256;

/// Resident memory of process `pid` outside its guest-RAM mapping (the anonymous
/// mapping of exactly [`GUEST_MIB`]), in KiB.
fn host_side_rss_kib(pid: u32) -> u64 {
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
    let (mut total, mut guest) = (0, 0);
    let mut size = 0;
    for line in smaps.lines() {
        let kib = |line: &str, field: &str| -> Option<u64> {
            line.strip_prefix(field)?
                .trim()
                .trim_end_matches(" kB")
                .parse()
                .ok()
        };
        if let Some(value) = kib(line, "Size:") {
            size = value;
        } else if let Some(rss) = kib(line, "Rss:") {
            total += rss;
            if size == GUEST_MIB * 1024 {
                guest += rss;
            }
        }
    }
    total - guest
}

#[test]
fn every_thread_is_confined_and_no_inherited_descriptor_survives() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let rt = tmp.path();
    let marker = rt.join("inherited-marker");
    File::create(&marker).expect("marker");
    // The shell opens fd 9 without close-on-exec and execs katalite with it.
    let mut child = Command::new("sh")
        .args(["-c", "exec 9>>\"$0\"; exec katalite \"$@\""])
        .arg(&marker)
        .args(["run", "--name", "confined", "--rootfs", &rootfs("busybox")])
        .args(["--", "sleep", "1000"])
        .env("KATALITE_RUNTIME_DIR", rt)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sh");
    wait_until_up(rt, "confined", &mut child);
    let pid = child.id();

    let mut threads = Vec::new();
    for task in fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
        let task = task.expect("task").path();
        let status = fs::read_to_string(task.join("status")).expect("task status");
        let name = status_field(&status, "Name").unwrap_or_default();
        let seccomp = status_field(&status, "Seccomp");
        let nnp = status_field(&status, "NoNewPrivs");
        assert_eq!(seccomp.as_deref(), Some("2"), "thread {name} has no filter");
        assert_eq!(
            nnp.as_deref(),
            Some("1"),
            "thread {name} lacks no_new_privs"
        );
        threads.push(name);
    }
    // Names as the kernel keeps them: 15 bytes.
    for wanted in [
        "katalite-vcpu0",
        "katalite-cons",
        "katalite-out",
        "katalite-contro",
        "katalite-log",
    ] {
        assert!(
            threads.iter().any(|name| name.starts_with(wanted)),
            "no {wanted} among {threads:?}"
        );
    }
    for fd in fs::read_dir(format!("/proc/{pid}/fd")).expect("fds") {
        let fd = fd.expect("fd").path();
        if let Ok(target) = fs::read_link(&fd) {
            assert_ne!(
                target,
                marker,
                "{} is the inherited descriptor",
                fd.display()
            );
        }
    }

    let kill = katalite_in(rt, &["kill", "confined"], None);
    assert_eq!(kill.status, Some(0), "{}", kill.describe());
    assert_eq!(wait_at_most(&mut child, RUN_TIMEOUT), Some(137));
}

#[test]
fn seccomp_unconfined_leaves_the_threads_unfiltered() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let rt = tmp.path();
    let mut child = Command::new("katalite")
        .args([
            "run",
            "--name",
            "free",
            "--security-opt",
            "seccomp=unconfined",
        ])
        .args(["--rootfs", &rootfs("busybox"), "--", "sleep", "1000"])
        .env("KATALITE_RUNTIME_DIR", rt)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("katalite is on PATH");
    wait_until_up(rt, "free", &mut child);
    let status = fs::read_to_string(format!("/proc/{}/status", child.id())).expect("status");
    assert_eq!(status_field(&status, "Seccomp").as_deref(), Some("0"));

    let kill = katalite_in(rt, &["kill", "free"], None);
    assert_eq!(kill.status, Some(0), "{}", kill.describe());
    assert_eq!(wait_at_most(&mut child, RUN_TIMEOUT), Some(137));
}

#[test]
fn output_nobody_reads_neither_freezes_the_vm_nor_grows_katalite() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let rt = tmp.path();
    let fifo = rt.join("stdout.fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .expect("mkfifo");
    // Held open for reading (so katalite's writes do not fail) and never read.
    let _reader = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .expect("fifo");
    let stdout = OpenOptions::new().write(true).open(&fifo).expect("fifo");
    let mut child = Command::new("katalite")
        .args(["run", "--name", "stalled", "-m", &format!("{GUEST_MIB}m")])
        .args(["--rootfs", &rootfs("busybox")])
        .args(["--", "yes"])
        .env("KATALITE_RUNTIME_DIR", rt)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::null())
        .spawn()
        .expect("katalite is on PATH");
    wait_until_up(rt, "stalled", &mut child);

    // The guest floods its console for a minute. Guest RAM the kernel touches counts in
    // katalite's RSS too, so the host side is measured without the guest-memory mapping:
    // it must stop growing once the bounded queue is full, and the peak stays under the
    // guest's RAM plus a fixed allowance.
    thread::sleep(Duration::from_secs(10));
    let early = host_side_rss_kib(child.id());
    thread::sleep(Duration::from_secs(50));
    let late = host_side_rss_kib(child.id());
    assert!(
        late.saturating_sub(early) <= 4 * 1024,
        "katalite's own memory grew from {early} KiB to {late} KiB while nobody read"
    );
    let peak = vm_hwm_kib(child.id());
    assert!(
        peak <= GUEST_MIB * 1024 + 64 * 1024,
        "VmHWM {peak} KiB is past the guest's {GUEST_MIB} MiB plus 64 MiB"
    );

    let started = Instant::now();
    let kill = katalite_in(rt, &["kill", "stalled"], None);
    assert_eq!(kill.status, Some(0), "{}", kill.describe());
    // A few seconds on hardware; the lab's nested TCG is tens of times slower.
    assert_eq!(wait_at_most(&mut child, Duration::from_secs(60)), Some(137));
    eprintln!("kill ended the stalled run in {:?}", started.elapsed());
}
