//! User stories for detached containers: `run -d` returns with an id while the VM keeps
//! running under its supervisor; `ps`, `logs`, `stop`, `kill`, `rm`, `inspect` and `wait`
//! find it by name or id; a supervisor killed with -9 shows as exited, never as running.
//! Each test has its own runtime dir (`KATALITE_RUNTIME_DIR`).

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};

use super::{rootfs, Outcome, RUN_TIMEOUT};

/// `katalite ARGS` with `runtime` as its runtime dir; waits at most [`RUN_TIMEOUT`].
pub(super) fn katalite_in(runtime: &Path, args: &[&str]) -> Outcome {
    super::katalite_in(runtime, args, None)
}

/// `katalite run -d --rootfs <busybox> OPTIONS -- COMMAND`; returns the id it printed.
fn detached(runtime: &Path, options: &[&str], command: &[&str]) -> String {
    let busybox = rootfs("busybox");
    let mut args = vec!["run", "-d", "--rootfs", &busybox];
    args.extend_from_slice(options);
    args.push("--");
    args.extend_from_slice(command);
    let run = katalite_in(runtime, &args);
    assert_eq!(run.status, Some(0), "{}", run.describe());
    let id = run.stdout.trim().to_string();
    assert!(
        id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "not an id: {}",
        run.describe()
    );
    id
}

/// Polls `katalite ARGS` until its stdout satisfies `done`; returns that outcome.
fn until(runtime: &Path, args: &[&str], done: impl Fn(&str) -> bool) -> Outcome {
    let started = Instant::now();
    loop {
        let run = katalite_in(runtime, args);
        if done(&run.stdout) {
            return run;
        }
        assert!(
            started.elapsed() < RUN_TIMEOUT,
            "katalite {args:?} never got there: {}",
            run.describe()
        );
        thread::sleep(Duration::from_millis(500));
    }
}

fn runtime_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

#[test]
fn a_detached_shell_is_listed_logged_stopped_and_removed() {
    let tmp = runtime_dir();
    let rt = tmp.path();
    let id = detached(rt, &["--name", "web"], &["sh", "-c", "echo up; sleep 1000"]);

    let ps = katalite_in(rt, &["ps"]);
    assert_eq!(ps.status, Some(0), "{}", ps.describe());
    let line = ps
        .stdout
        .lines()
        .find(|l| l.starts_with(&id[..12]))
        .unwrap_or_else(|| panic!("ps does not list {id}: {}", ps.describe()));
    assert!(line.contains("Up ") && line.ends_with("web"), "{line}");

    let logs = until(rt, &["logs", "web"], |out| out == "up\n");
    assert_eq!(logs.status, Some(0), "{}", logs.describe());

    let started = Instant::now();
    let stop = katalite_in(rt, &["stop", "-t", "5", &id[..8]]);
    assert_eq!(stop.status, Some(0), "{}", stop.describe());
    assert_eq!(
        stop.stdout,
        format!("{}\n", &id[..8]),
        "{}",
        stop.describe()
    );
    eprintln!("timing: stop took {:.3} s", started.elapsed().as_secs_f64());
    assert!(started.elapsed() < Duration::from_secs(5 + 60));

    let ps = katalite_in(rt, &["ps", "-a"]);
    assert!(
        ps.stdout.contains("Exited (143)") || ps.stdout.contains("Exited (137)"),
        "{}",
        ps.describe()
    );
    assert!(!katalite_in(rt, &["ps"]).stdout.contains(&id[..12]));
    let wait = katalite_in(rt, &["wait", "web"]);
    assert!(
        matches!(wait.stdout.trim(), "143" | "137"),
        "{}",
        wait.describe()
    );

    let rm = katalite_in(rt, &["rm", "web"]);
    assert_eq!(rm.status, Some(0), "{}", rm.describe());
    assert!(!katalite_in(rt, &["ps", "-a"]).stdout.contains(&id[..12]));
    let gone = katalite_in(rt, &["inspect", "web"]);
    assert_eq!(gone.status, Some(1), "{}", gone.describe());
}

#[test]
fn a_supervisor_killed_with_sigkill_shows_as_exited() {
    let tmp = runtime_dir();
    let rt = tmp.path();
    let id = detached(rt, &[], &["sleep", "1000"]);
    let inspect = katalite_in(rt, &["inspect", &id]);
    let value: serde_json::Value = serde_json::from_str(&inspect.stdout).expect("inspect JSON");
    assert_eq!(value[0]["State"]["Running"], true, "{}", inspect.describe());
    let pid = value[0]["State"]["Pid"].as_i64().expect("pid");
    let pid = Pid::from_raw(i32::try_from(pid).expect("pid")).expect("nonzero pid");
    kill_process(pid, Signal::KILL).expect("kill the supervisor");

    let ps = until(rt, &["ps", "-a"], |out| out.contains("Exited (137)"));
    assert!(ps.stdout.contains("unknown"), "{}", ps.describe());
    assert!(!katalite_in(rt, &["ps"]).stdout.contains(&id[..12]));
    let kill = katalite_in(rt, &["kill", &id]);
    assert_eq!(kill.status, Some(1), "{}", kill.describe());
    assert!(
        kill.stderr.contains("is not running"),
        "{}",
        kill.describe()
    );
    let rm = katalite_in(rt, &["rm", &id]);
    assert_eq!(rm.status, Some(0), "{}", rm.describe());
}

#[test]
fn a_second_container_with_a_taken_name_fails_with_125_and_leaves_nothing() {
    let tmp = runtime_dir();
    let rt = tmp.path();
    let id = detached(rt, &["--name", "same"], &["sleep", "1000"]);
    let busybox = rootfs("busybox");
    let second = katalite_in(
        rt,
        &[
            "run", "-d", "--rootfs", &busybox, "--name", "same", "--", "true",
        ],
    );
    assert_eq!(second.status, Some(125), "{}", second.describe());
    assert_eq!(
        second.stderr,
        format!(
            "katalite: the container name \"same\" is already in use by {}\n",
            &id[..12]
        )
    );
    assert!(second.stdout.is_empty(), "{}", second.describe());
    let ps = katalite_in(rt, &["ps", "-a", "-q"]);
    assert_eq!(ps.stdout, format!("{}\n", &id[..12]), "{}", ps.describe());

    let rm = katalite_in(rt, &["rm", "-f", "same"]);
    assert_eq!(rm.status, Some(0), "{}", rm.describe());
    assert!(katalite_in(rt, &["ps", "-a", "-q"]).stdout.is_empty());
}

#[test]
fn rm_leaves_nothing_and_wait_prints_the_exit_code() {
    let tmp = runtime_dir();
    let rt = tmp.path();
    let busybox = rootfs("busybox");
    let run = katalite_in(
        rt,
        &[
            "run", "--rm", "--rootfs", &busybox, "--", "sh", "-c", "exit 3",
        ],
    );
    assert_eq!(run.status, Some(3), "{}", run.describe());
    let containers = rt.join("containers");
    let left: Vec<_> = std::fs::read_dir(&containers).expect("dir").collect();
    assert!(left.is_empty(), "{left:?}");

    let id = detached(
        rt,
        &[],
        &["sh", "-c", "echo out; echo err >&2; sleep 2; exit 42"],
    );
    let wait = katalite_in(rt, &["wait", &id[..12]]);
    assert_eq!(wait.status, Some(0), "{}", wait.describe());
    assert_eq!(wait.stdout, "42\n", "{}", wait.describe());
    let logs = katalite_in(rt, &["logs", "-t", &id]);
    assert_eq!(logs.stdout.split_once(' ').map(|(_, l)| l), Some("out\n"));
    assert_eq!(logs.stderr.split_once(' ').map(|(_, l)| l), Some("err\n"));

    let id = detached(rt, &["--rm"], &["true"]);
    let started = Instant::now();
    while containers.join(&id).exists() {
        assert!(started.elapsed() < RUN_TIMEOUT, "--rm left {id}");
        thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn with_log_driver_none_the_output_is_shown_but_not_kept() {
    let tmp = runtime_dir();
    let rt = tmp.path();
    let busybox = rootfs("busybox");
    let run = katalite_in(
        rt,
        &[
            "run",
            "--name",
            "quiet",
            "--log-driver",
            "none",
            "--rootfs",
            &busybox,
            "--",
            "echo",
            "shown",
        ],
    );
    assert_eq!(run.status, Some(0), "{}", run.describe());
    assert_eq!(run.stdout, "shown\n", "{}", run.describe());
    let logs = katalite_in(rt, &["logs", "quiet"]);
    assert_ne!(logs.status, Some(0), "{}", logs.describe());
    assert!(
        logs.stderr.contains("does not support reading"),
        "{}",
        logs.describe()
    );
    // The default keeps it, complete as soon as the foreground run has returned.
    let run = katalite_in(
        rt,
        &[
            "run",
            "--name",
            "kept",
            "--rootfs",
            &busybox,
            "--",
            "sh",
            "-c",
            "echo one; head -c 300000 /dev/zero; echo; echo two",
        ],
    );
    assert_eq!(run.status, Some(0), "{}", run.describe());
    let logs = katalite_in(rt, &["logs", "kept"]);
    assert_eq!(logs.status, Some(0), "{}", logs.describe());
    assert!(
        logs.stdout.starts_with("one\n") && logs.stdout.ends_with("\ntwo\n"),
        "{}",
        logs.describe()
    );
    assert_eq!(logs.stdout.len(), run.stdout.len(), "{}", logs.describe());
}
