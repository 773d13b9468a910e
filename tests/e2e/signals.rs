//! User stories for signals sent to `katalite run`: forwarded to the workload, which exits
//! its own way; a workload that ignores them is stopped after `--stop-timeout` or on a
//! second signal, with Docker's 137.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};

use super::{rootfs, RUN_TIMEOUT};

/// `katalite run` in the background, its stdout read line by line.
struct Background {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: JoinHandle<String>,
}

impl Background {
    /// Starts `katalite run --rootfs <busybox> OPTIONS -- COMMAND`.
    fn busybox(options: &[&str], command: &[&str]) -> Self {
        let mut child = Command::new("katalite")
            .args(["run", "--rootfs", &rootfs("busybox")])
            .args(options)
            .arg("--")
            .args(command)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("katalite is on PATH");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stderr = child.stderr.take().expect("piped stderr");
        let (send, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
            stderr,
        }
    }

    /// Waits until the workload prints `line` (it is then ready for signals).
    fn wait_for_line(&mut self, line: &str) {
        let deadline = Instant::now() + RUN_TIMEOUT;
        while !self.seen.iter().any(|l| l == line) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(got) => self.seen.push(got),
                Err(_) => {
                    let _ = self.child.kill();
                    panic!("no {line:?} line; stdout so far: {:?}", self.seen);
                }
            }
        }
    }

    fn signal(&self, signal: Signal) {
        kill_process(Pid::from_child(&self.child), signal).expect("signal katalite");
    }

    /// Waits for katalite to exit: its status, stderr, and how long that took.
    fn finish(mut self) -> (Option<i32>, String, Duration) {
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("waiting for katalite") {
                break status;
            }
            if started.elapsed() > RUN_TIMEOUT {
                let _ = self.child.kill();
                panic!("katalite did not exit within {RUN_TIMEOUT:?} of the signal");
            }
            thread::sleep(Duration::from_millis(20));
        };
        let took = started.elapsed();
        let stderr = self.stderr.join().expect("stderr reader");
        (status.code(), stderr, took)
    }
}

#[test]
fn sigterm_reaches_a_trapping_workload_which_exits_its_own_way() {
    let script = "trap 'echo got TERM; exit 7' TERM; echo ready; while :; do sleep 1; done";
    let mut run = Background::busybox(&[], &["sh", "-c", script]);
    run.wait_for_line("ready");
    run.signal(Signal::TERM);
    run.wait_for_line("got TERM");
    let (status, stderr, _) = run.finish();
    assert_eq!(status, Some(7), "{stderr}");
}

#[test]
fn sigterm_ends_a_plain_workload_with_143() {
    let mut run = Background::busybox(&[], &["sh", "-c", "echo ready; exec sleep 1000"]);
    run.wait_for_line("ready");
    run.signal(Signal::TERM);
    let (status, stderr, _) = run.finish();
    assert_eq!(status, Some(128 + 15), "{stderr}");
}

#[test]
fn other_signals_are_forwarded_too() {
    let script = "trap 'echo got USR1' USR1; trap 'echo got HUP; exit 3' HUP; echo ready; \
                  while :; do sleep 1; done";
    let mut run = Background::busybox(&[], &["sh", "-c", script]);
    run.wait_for_line("ready");
    run.signal(Signal::USR1);
    run.wait_for_line("got USR1");
    run.signal(Signal::HUP);
    let (status, stderr, _) = run.finish();
    assert_eq!(status, Some(3), "{stderr}");
}

#[test]
fn a_workload_ignoring_sigterm_is_stopped_after_the_timeout_with_137() {
    let script = "trap '' TERM; echo ready; while :; do sleep 1; done";
    let mut run = Background::busybox(&["--stop-timeout", "3"], &["sh", "-c", script]);
    run.wait_for_line("ready");
    run.signal(Signal::TERM);
    let (status, stderr, took) = run.finish();
    assert_eq!(status, Some(137), "{stderr}");
    assert!(
        took >= Duration::from_secs(3),
        "stopped after {took:?}, before the timeout"
    );
}

#[test]
fn a_second_sigint_stops_at_once_with_137() {
    let script = "trap '' INT; echo ready; while :; do sleep 1; done";
    let mut run = Background::busybox(&["--stop-timeout", "600"], &["sh", "-c", script]);
    run.wait_for_line("ready");
    run.signal(Signal::INT);
    thread::sleep(Duration::from_millis(500));
    run.signal(Signal::INT);
    let (status, stderr, took) = run.finish();
    assert_eq!(status, Some(137), "{stderr}");
    assert!(took < Duration::from_secs(60), "took {took:?}");
}
