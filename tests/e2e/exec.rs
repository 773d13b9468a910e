//! User stories for `katalite exec`: commands run inside a detached busybox container
//! through our init, each with its own stdio, exit code, options and terminal.

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use super::tty::Session;
use super::{katalite_in, rootfs, Outcome, RUN_TIMEOUT};

/// A detached busybox `sh -c 'echo up; sleep 1000'` named `name`, killed and removed
/// when dropped.
struct Container {
    runtime: tempfile::TempDir,
    id: String,
}

impl Container {
    fn start(name: &str) -> Self {
        let runtime = tempfile::tempdir().expect("runtime dir");
        let busybox = rootfs("busybox");
        let args = [
            "run",
            "-d",
            "--name",
            name,
            "--rootfs",
            &busybox,
            "--",
            "sh",
            "-c",
            "echo up; sleep 1000",
        ];
        let run = katalite_in(runtime.path(), &args, None);
        assert_eq!(run.status, Some(0), "{}", run.describe());
        let id = run.stdout.trim().to_string();
        assert_eq!(id.len(), 64, "{}", run.describe());
        Self { runtime, id }
    }

    fn katalite(&self, args: &[&str], stdin: Option<&[u8]>) -> Outcome {
        katalite_in(self.runtime.path(), args, stdin)
    }

    /// `katalite exec OPTIONS... <id> COMMAND...`
    fn exec(&self, options: &[&str], command: &[&str]) -> Outcome {
        let mut args = vec!["exec"];
        args.extend_from_slice(options);
        args.push(&self.id);
        args.extend_from_slice(command);
        self.katalite(&args, None)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.katalite(&["rm", "-f", &self.id], None);
    }
}

#[test]
fn exec_runs_commands_beside_the_workload_with_their_own_codes_and_stdio() {
    let container = Container::start("exec-story");

    let started = Instant::now();
    let echo = container.exec(&[], &["echo", "hi"]);
    let took = started.elapsed();
    assert_eq!(echo.status, Some(0), "{}", echo.describe());
    assert_eq!(echo.stdout, "hi\n", "{}", echo.describe());
    eprintln!("timing: exec echo hi: {:.3} s", took.as_secs_f64());

    let three = container.exec(&[], &["sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!(three.status, Some(3), "{}", three.describe());
    assert_eq!(
        (three.stdout.as_str(), three.stderr.as_str()),
        ("out\n", "err\n")
    );

    let missing = container.exec(&[], &["nosuch"]);
    assert_eq!(missing.status, Some(127), "{}", missing.describe());
    assert!(
        missing.stderr.contains("not found"),
        "{}",
        missing.describe()
    );

    // By name, and the workload is the one started by run: its sleep is still there.
    let args = [
        "exec",
        "exec-story",
        "sh",
        "-c",
        "ps | grep -c '[s]leep 1000'",
    ];
    let named = container.katalite(&args, None);
    assert_eq!(named.stdout.trim(), "1", "{}", named.describe());

    let data = b"round trip\nthrough cat\n";
    let args = ["exec", "-i", container.id.as_str(), "cat"];
    let cat = container.katalite(&args, Some(data));
    assert_eq!(cat.status, Some(0), "{}", cat.describe());
    assert_eq!(cat.stdout.as_bytes(), data, "{}", cat.describe());

    let options = ["-e", "FOO=bar", "-w", "/tmp", "-u", "1000:1000"];
    let script = "echo \"$FOO $(pwd) $(id -u):$(id -g)\"";
    let applied = container.exec(&options, &["sh", "-c", script]);
    assert_eq!(applied.status, Some(0), "{}", applied.describe());
    assert_eq!(
        applied.stdout,
        "bar /tmp 1000:1000\n",
        "{}",
        applied.describe()
    );

    let tty = container.exec(&["-t"], &["sh", "-c", "[ -t 0 ] && [ -t 1 ] && tty"]);
    assert_eq!(tty.status, Some(0), "{}", tty.describe());
    assert!(tty.stdout.starts_with("/dev/pts/"), "{}", tty.describe());
    assert!(
        tty.stdout.ends_with("\r\n"),
        "the terminal's ONLCR: {}",
        tty.describe()
    );

    // Sessions run at once, each on its own stream.
    let both: Vec<_> = (0..2)
        .map(|i| {
            let args = ["exec", container.id.as_str(), "sh", "-c"];
            let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            args.push(format!("sleep 1; echo session {i}"));
            let runtime = container.runtime.path().to_path_buf();
            thread::spawn(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                katalite_in(&runtime, &args, None)
            })
        })
        .collect();
    for (i, session) in both.into_iter().enumerate() {
        let session = session.join().expect("session thread");
        assert_eq!(
            session.stdout,
            format!("session {i}\n"),
            "{}",
            session.describe()
        );
    }

    let logs = container.katalite(&["logs", &container.id], None);
    assert_eq!(
        logs.stdout,
        "up\n",
        "exec output stays out of the logs: {}",
        logs.describe()
    );
}

#[test]
fn exec_into_a_missing_or_stopped_container_fails_with_1() {
    let container = Container::start("exec-stopped");
    let unknown = container.katalite(&["exec", "no-such-container", "true"], None);
    assert_eq!(unknown.status, Some(1), "{}", unknown.describe());

    // A session still running when the VM ends dies with it, as in Docker: 137.
    let session = {
        let runtime = container.runtime.path().to_path_buf();
        let id = container.id.clone();
        thread::spawn(move || {
            katalite_in(
                &runtime,
                &["exec", &id, "sh", "-c", "echo started; sleep 1000"],
                None,
            )
        })
    };
    let probe = [
        "exec",
        container.id.as_str(),
        "sh",
        "-c",
        "ps | grep -c '[s]leep 1000'",
    ];
    let started = Instant::now();
    while container.katalite(&probe, None).stdout.trim() != "2" {
        assert!(
            started.elapsed() < RUN_TIMEOUT,
            "the session's sleep never started"
        );
        thread::sleep(Duration::from_millis(200));
    }
    let kill = container.katalite(&["kill", &container.id], None);
    assert_eq!(kill.status, Some(0), "{}", kill.describe());
    let ended = session.join().expect("session thread");
    assert_eq!(ended.status, Some(137), "{}", ended.describe());
    assert_eq!(ended.stdout, "started\n", "{}", ended.describe());
    let wait = container.katalite(&["wait", &container.id], None);
    assert_eq!(wait.status, Some(0), "{}", wait.describe());
    let stopped = container.exec(&[], &["true"]);
    assert_eq!(stopped.status, Some(1), "{}", stopped.describe());
    assert!(
        stopped.stderr.contains("is not running"),
        "{}",
        stopped.describe()
    );
}

/// `katalite exec -it` driven through a pseudo-terminal the test holds, as a person at a
/// terminal would: the host terminal goes raw, keys reach the process and are echoed by
/// the guest's terminal, its size is the host terminal's, and its exit code is katalite's.
#[test]
fn exec_it_is_an_interactive_terminal_session() {
    let container = Container::start("exec-tty");
    let mut katalite = Command::new("katalite");
    katalite
        .args(["exec", "-it", &container.id, "sh", "-c"])
        .arg("echo ready; read x; stty size; echo \"got $x\"; exit 5")
        .env("KATALITE_RUNTIME_DIR", container.runtime.path());
    let mut session = Session::spawn(30, 100, katalite);
    // Typed before the process reads, input would sit in the host terminal's line buffer.
    session.wait_for("ready");
    session.type_bytes(b"hello\r");
    session.wait_for("got hello");
    let (status, screen, _) = session.finish();
    assert_eq!(status, Some(5), "{screen}");
    // The echo comes from the guest's terminal (the host one is raw), CR LF from its ONLCR.
    assert!(screen.contains("hello\r\n"), "{screen}");
    assert!(screen.contains("30 100\r\ngot hello\r\n"), "{screen}");
}
