//! `katalite-runc`, driven as containerd's runc shim, dockerd and conmon drive runc: an
//! OCI bundle, `create` with the caller as the subreaper of the process in `--pid-file`,
//! `start`, `state`, `kill`, `exec`, `delete`, hooks and the console socket.

use std::fs;
use std::io::{IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::Once;
use std::thread;
use std::time::{Duration, Instant};

use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
use rustix::process::{Pid, WaitOptions};

use super::{rootfs, Outcome, RUN_TIMEOUT};

/// One runtime root, bundle and katalite state dir per test.
struct Runc {
    dir: tempfile::TempDir,
    link: PathBuf,
}

impl Runc {
    fn new() -> Self {
        static SUBREAPER: Once = Once::new();
        // The engines' shims are subreapers: the container process outlives `create`
        // and is reaped by them. So is this test process.
        SUBREAPER.call_once(|| {
            rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
                .expect("become a subreaper");
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let katalite = std::env::split_paths(&std::env::var_os("PATH").expect("PATH"))
            .map(|dir| dir.join("katalite"))
            .find(|path| path.is_file())
            .expect("katalite on PATH");
        let link = dir.path().join("katalite-runc");
        std::os::unix::fs::symlink(&katalite, &link).expect("link");
        fs::create_dir(dir.path().join("state")).expect("state dir");
        Self { dir, link }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `bundle/config.json` with the busybox tree as a read-only root.
    fn bundle(&self, process: serde_json::Value, hooks: serde_json::Value) -> PathBuf {
        let bundle = self.path("bundle");
        fs::create_dir_all(&bundle).expect("bundle");
        let config = serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": rootfs("busybox"), "readonly": true},
            "process": process,
            "hostname": "runc-test",
            "hooks": hooks,
            "linux": {"namespaces": [{"type": "network"}, {"type": "pid"}]},
        });
        fs::write(bundle.join("config.json"), config.to_string()).expect("config.json");
        bundle
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.link);
        command
            .env("KATALITE_RUNTIME_DIR", self.path("state"))
            .arg("--root")
            .arg(self.path("root"))
            .arg("--log")
            .arg(self.path("runc-log.json"))
            .args(["--log-format", "json"])
            .args(args);
        command
    }

    /// Runs a short command (not `create`) and captures its output.
    fn run(&self, args: &[&str]) -> Outcome {
        let out = self.command(args).output().expect("katalite-runc runs");
        Outcome {
            status: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `create` with stdin a pipe the test keeps and stdout/stderr files, as go-runc hands
    /// a container its FIFOs; returns the pid from the pid file and the stdin pipe.
    fn create(&self, id: &str, extra: &[&str]) -> (i32, ChildStdin) {
        let pid_file = self.path(&format!("{id}.pid"));
        let bundle = self.path("bundle");
        let mut args = vec!["create", "--bundle", bundle.to_str().expect("utf-8")];
        args.extend(["--pid-file", pid_file.to_str().expect("utf-8")]);
        args.extend(extra);
        args.push(id);
        let mut child = self
            .command(&args)
            .stdin(Stdio::piped())
            .stdout(fs::File::create(self.path(&format!("{id}.out"))).expect("out"))
            .stderr(fs::File::create(self.path(&format!("{id}.err"))).expect("err"))
            .spawn()
            .expect("create runs");
        let stdin = child.stdin.take().expect("stdin");
        let status = child.wait().expect("create ends");
        assert!(status.success(), "create failed: {}", self.output(id).1);
        let pid = fs::read_to_string(&pid_file).expect("pid file");
        (pid.parse().expect("a bare pid"), stdin)
    }

    /// What the container wrote to its stdout and stderr.
    fn output(&self, id: &str) -> (String, String) {
        let read =
            |ext: &str| fs::read_to_string(self.path(&format!("{id}.{ext}"))).unwrap_or_default();
        (read("out"), read("err"))
    }

    fn state(&self, id: &str) -> serde_json::Value {
        let out = self.run(&["state", id]);
        assert_eq!(out.status, Some(0), "state: {}", out.describe());
        serde_json::from_str(&out.stdout).expect("state is JSON")
    }
}

/// Waits for the reparented container process and returns its exit status.
fn wait_exit(pid: i32) -> i32 {
    let pid = Pid::from_raw(pid).expect("pid");
    let started = Instant::now();
    loop {
        if let Some((_, status)) =
            rustix::process::waitpid(Some(pid), WaitOptions::NOHANG).expect("waitpid")
        {
            return status
                .exit_status()
                .unwrap_or_else(|| 128 + status.terminating_signal().unwrap_or(0));
        }
        assert!(
            started.elapsed() < RUN_TIMEOUT,
            "container process {pid:?} did not end"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn process(args: &[&str], terminal: bool) -> serde_json::Value {
    serde_json::json!({
        "terminal": terminal,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/bin:/usr/bin", "GREETING=from-config"],
        "cwd": "/tmp",
    })
}

#[test]
fn runc_create_start_runs_the_bundle_in_a_vm_with_the_callers_stdio() {
    let runc = Runc::new();
    let script = "echo \"$GREETING $(hostname) $(pwd)\"; echo err >&2; read line; \
                  echo \"got $line\"; exit 3";
    let hook = serde_json::json!({"path": "/bin/sh",
        "args": ["sh", "-c", format!("cat > {}", runc.path("prestart.json").display())]});
    runc.bundle(
        process(&["sh", "-c", script], false),
        serde_json::json!({"prestart": [hook]}),
    );
    let (pid, mut stdin) = runc.create("c1", &[]);
    let state = runc.state("c1");
    assert_eq!(state["status"], "created");
    assert_eq!(state["pid"], pid);
    let hooked: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(runc.path("prestart.json")).expect("hook ran"))
            .expect("hook state");
    assert_eq!(hooked["pid"], pid);
    assert_eq!(hooked["status"], "created");
    // The container process is in a network namespace of its own, not the host's.
    let own = fs::read_link("/proc/self/ns/net").expect("own netns");
    let its = fs::read_link(format!("/proc/{pid}/ns/net")).expect("its netns");
    assert_ne!(own, its);

    let start = runc.run(&["start", "c1"]);
    assert_eq!(start.status, Some(0), "{}", start.describe());
    assert_eq!(runc.state("c1")["status"], "running");
    stdin.write_all(b"hello\n").expect("stdin");
    drop(stdin);
    assert_eq!(wait_exit(pid), 3, "{:?}", runc.output("c1"));
    let (out, err) = runc.output("c1");
    assert_eq!(
        out, "from-config runc-test /tmp\ngot hello\n",
        "stderr: {err}"
    );
    assert!(err.contains("err"), "{err}");
    assert_eq!(runc.state("c1")["status"], "stopped");
    let delete = runc.run(&["delete", "c1"]);
    assert_eq!(delete.status, Some(0), "{}", delete.describe());
    let gone = runc.run(&["state", "c1"]);
    assert_eq!(gone.status, Some(1), "{}", gone.describe());
    let log = fs::read_to_string(runc.path("runc-log.json")).expect("log");
    let last: serde_json::Value =
        serde_json::from_str(log.lines().last().expect("a line")).expect("JSON line");
    assert_eq!(last["level"], "error");
    assert_eq!(last["msg"], "container does not exist: c1");
}

#[test]
fn runc_kill_exec_and_delete_force_reach_the_running_vm() {
    let runc = Runc::new();
    runc.bundle(process(&["sleep", "300"], false), serde_json::json!({}));
    let (pid, _stdin) = runc.create("c2", &[]);
    assert_eq!(runc.run(&["start", "c2"]).status, Some(0));
    // exec: a process in the same VM, its status and output the relay's.
    let exec_process = runc.path("exec.json");
    let script = "echo \"exec $GREETING\"; pidof sleep >/dev/null && exit 5";
    fs::write(
        &exec_process,
        process(&["sh", "-c", script], false).to_string(),
    )
    .expect("write");
    let exec = runc.run(&[
        "exec",
        "--process",
        exec_process.to_str().expect("utf-8"),
        "c2",
    ]);
    assert_eq!(exec.status, Some(5), "{}", exec.describe());
    assert_eq!(exec.stdout, "exec from-config\n", "{}", exec.describe());
    let ps = runc.run(&["ps", "--format", "json", "c2"]);
    assert_eq!(ps.stdout.trim(), format!("[{pid}]"), "{}", ps.describe());
    let refused = runc.run(&["delete", "c2"]);
    assert_eq!(refused.status, Some(1), "{}", refused.describe());
    assert!(
        refused.stderr.contains("not stopped"),
        "{}",
        refused.describe()
    );
    let kill = runc.run(&["kill", "c2", "TERM"]);
    assert_eq!(kill.status, Some(0), "{}", kill.describe());
    assert_eq!(wait_exit(pid), 143, "{:?}", runc.output("c2"));
    let again = runc.run(&["kill", "c2", "KILL"]);
    assert_eq!(again.status, Some(1), "{}", again.describe());

    // A created container is deleted with its waiting process; a running one with --force.
    runc.run(&["delete", "c2"]);
    let (pid, _stdin) = runc.create("c3", &[]);
    let delete = runc.run(&["delete", "c3"]);
    assert_eq!(delete.status, Some(0), "{}", delete.describe());
    assert_eq!(wait_exit(pid), 128 + 9);
    let (pid, _stdin) = runc.create("c4", &[]);
    assert_eq!(runc.run(&["start", "c4"]).status, Some(0));
    let forced = runc.run(&["delete", "--force", "c4"]);
    assert_eq!(forced.status, Some(0), "{}", forced.describe());
    assert_eq!(wait_exit(pid), 128 + 9);
}

#[test]
fn runc_sends_the_terminal_over_the_console_socket() {
    let runc = Runc::new();
    let script = "test -t 0 && test -t 1 && echo tty-ok; exit 4";
    runc.bundle(process(&["sh", "-c", script], true), serde_json::json!({}));
    let socket = runc.path("console.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    let receiver = thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut name = [0u8; 256];
        rustix::net::recvmsg(
            &stream,
            &mut [IoSliceMut::new(&mut name)],
            &mut control,
            RecvFlags::empty(),
        )
        .expect("recvmsg");
        let master = control.drain().find_map(|message| match message {
            RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
            _ => None,
        });
        fs::File::from(master.expect("the terminal's master"))
    });
    let no_socket = runc.run(&[
        "create",
        "--bundle",
        runc.path("bundle").to_str().expect("utf-8"),
        "c5",
    ]);
    assert_eq!(no_socket.status, Some(1), "{}", no_socket.describe());
    let (pid, _stdin) = runc.create("c5", &["--console-socket", socket.to_str().expect("utf-8")]);
    let mut master = receiver.join().expect("receiver");
    assert_eq!(runc.run(&["start", "c5"]).status, Some(0));
    let reader = thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO once the last slave descriptor closes.
        while let Ok(n @ 1..) = master.read(&mut buf) {
            seen.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&seen).into_owned()
    });
    assert_eq!(wait_exit(pid), 4);
    let seen = reader.join().expect("reader");
    assert!(seen.contains("tty-ok"), "terminal output: {seen:?}");
    assert_eq!(runc.run(&["delete", "c5"]).status, Some(0));
}

#[test]
fn runc_features_and_version_answer_without_a_container() {
    let runc = Runc::new();
    let features = runc.run(&["features"]);
    assert_eq!(features.status, Some(0), "{}", features.describe());
    let value: serde_json::Value = serde_json::from_str(&features.stdout).expect("JSON");
    assert_eq!(value["ociVersionMax"], "1.1.0");
    let version = runc.run(&["--version"]);
    assert!(
        version.stdout.starts_with("katalite-runc "),
        "{}",
        version.describe()
    );
    assert!(
        version.stdout.contains("spec: 1.1.0"),
        "{}",
        version.describe()
    );
}
