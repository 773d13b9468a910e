//! katalite as containerd's own shim (`containerd-shim-katalite-v2`, the runtime
//! `io.containerd.katalite.v2`), driven by `ctr` as docs/containerd-shim-v2.md §5 describes:
//! run beside runc in one containerd, exec with stdin and a terminal, the task events in
//! order, a plain rootfs dir, and a task that outlives a containerd restart.
//! Like engines.rs they need `cargo xtask lab e2e --runtimes`; elsewhere they fail loudly.

use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};

use super::engines::{containerd_shared, docker_image, kernels, run, CONTAINERD, IMAGE};
use super::{rootfs, Outcome, RUN_TIMEOUT};

/// The runtime name containerd maps to `containerd-shim-katalite-v2`.
const RUNTIME: &str = "io.containerd.katalite.v2";

/// How long a killed task may take to show as STOPPED.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

fn ctr(args: &[&str]) -> Outcome {
    run("ctr", args, None)
}

/// Asserts that `out` exited with `code` (`what` names the step) and returns it.
fn exited(out: Outcome, code: i32, what: &str) -> Outcome {
    assert_eq!(out.status, Some(code), "{what}: {}", out.describe());
    out
}

/// `ctr run --runtime RUNTIME OPTIONS ID COMMAND` (OPTIONS end with the image or rootfs).
fn ctr_run(runtime: &str, options: &[&str], id: &str, command: &[&str]) -> Outcome {
    ctr(&[&["run", "--runtime", runtime], options, &[id], command].concat())
}

/// `ctr task exec --exec-id EXEC_ID ID sh -c SCRIPT` with `stdin` (`None`: /dev/null).
fn exec(id: &str, exec_id: &str, script: &str, stdin: Option<&[u8]>) -> Outcome {
    let args = ["task", "exec", "--exec-id", exec_id, id, "sh", "-c", script];
    run("ctr", &args, stdin)
}

/// Retries `attempt` every half second until it succeeds; after `limit`, panics with its
/// last error.
fn poll<T>(limit: Duration, mut attempt: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match attempt() {
            Ok(done) => return done,
            Err(why) if Instant::now() > deadline => panic!("after {limit:?}: {why}"),
            Err(_) => thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// The busybox image in containerd (the Docker archive, imported once).
fn image() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| {
        let import = ctr(&["images", "import", docker_image()]);
        exited(import, 0, "ctr images import");
        format!("docker.io/library/{IMAGE}:latest")
    })
}

/// A container id whose task and container are removed before the test (a previous run's
/// leftovers) and when the test ends, whether or not its assertions held.
struct Cleanup<'a>(&'a str);

impl<'a> Cleanup<'a> {
    fn new(id: &'a str) -> Self {
        remove(id);
        Self(id)
    }
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        // A second panic while a failed test unwinds would abort every test.
        let _ = std::panic::catch_unwind(|| remove(self.0));
    }
}

/// `ctr task rm -f` and `ctr c rm`: best effort, whatever state `id` is in.
fn remove(id: &str) {
    let _ = ctr(&["task", "rm", "-f", id]);
    let _ = ctr(&["containers", "rm", id]);
}

/// Whether `ctr task ls` shows `id` as `status`; the listing otherwise.
fn task_is(id: &str, status: &str) -> Result<(), String> {
    let ls = ctr(&["task", "ls"]);
    let listed = ls.stdout.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.first() == Some(&id) && fields.get(2) == Some(&status)
    });
    let why = || format!("ctr task ls does not show {id} {status}: {}", ls.describe());
    listed.then_some(()).ok_or_else(why)
}

/// `ctr run -d` of a task that sleeps until it is killed.
fn run_detached(id: &str) {
    let started = ctr_run(RUNTIME, &["-d", image()], id, &["sleep", "600"]);
    exited(started, 0, "ctr run -d");
    task_is(id, "RUNNING").unwrap_or_else(|why| panic!("{why}"));
}

/// `ctr task kill -s SIGKILL`, then waits until `ctr task ls` shows the task STOPPED and
/// removes task and container; `ctr task rm` warns of the exit status 137 (128 + 9).
fn kill_and_remove(id: &str) {
    let kill = ctr(&["task", "kill", "-s", "SIGKILL", id]);
    exited(kill, 0, "ctr task kill");
    poll(STOP_TIMEOUT, || task_is(id, "STOPPED"));
    let rm = exited(ctr(&["task", "rm", id]), 0, "ctr task rm");
    assert!(rm.stderr.contains("137"), "exit status: {}", rm.describe());
    exited(ctr(&["containers", "rm", id]), 0, "ctr c rm");
}

/// The guest kernel's release as `katalite --version` names it (`guest kernel RELEASE
/// (config ...`), and the lab's own.
fn guest_and_host_kernels() -> (String, String) {
    let (version, host) = kernels();
    let guest = version
        .lines()
        .find_map(|line| line.strip_prefix("guest kernel "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("katalite --version names no guest kernel:\n{version}"));
    (guest.to_string(), host)
}

#[test]
fn ctr_runs_katalite_vms_beside_runc_containers_in_one_containerd() {
    let _containerd = containerd_shared();
    let (guest_kernel, host_kernel) = guest_and_host_kernels();
    let (vm_id, plain_id) = ("shim-run-vm", "shim-run-runc");
    let (_vm, _plain) = (Cleanup::new(vm_id), Cleanup::new(plain_id));
    let rm_image = ["--rm", image()];
    let vm = ctr_run(RUNTIME, &rm_image, vm_id, &["sh", "-c", "uname -r; exit 3"]);
    let vm = exited(vm, 3, "the katalite task's exit code");
    let release = vm.stdout.trim();
    assert!(
        release.starts_with(&guest_kernel) && release != host_kernel,
        "not the guest kernel {guest_kernel} (L1 runs {host_kernel}): {}",
        vm.describe()
    );
    let plain = ["sh", "-c", "uname -r; exit 4"];
    let plain = ctr_run("io.containerd.runc.v2", &rm_image, plain_id, &plain);
    let plain = exited(plain, 4, "the runc task's exit code");
    assert_eq!(
        plain.stdout.trim(),
        host_kernel,
        "runc's kernel: {}",
        plain.describe()
    );
}

#[test]
fn ctr_run_t_gives_the_init_a_terminal_that_follows_resizes() {
    let _containerd = containerd_shared();
    let id = "shim-run-tty";
    let _cleanup = Cleanup::new(id);
    // `script` gives ctr a terminal; its size (set first) reaches the shim as ResizePty and
    // the VM's terminal through it.
    let command = format!(
        "stty cols 101 rows 41; ctr run -t --rm --runtime {RUNTIME} {} {id} \
         sh -c 'sleep 2; tty; stty size; exit 5'",
        image()
    );
    let out = run("script", &["-qec", &command, "/dev/null"], None);
    let out = exited(out, 5, "ctr run -t");
    assert!(
        out.stdout.contains("/dev/pts/") || out.stdout.contains("/dev/console"),
        "no terminal: {}",
        out.describe()
    );
    assert!(
        out.stdout.contains("41 101"),
        "the window size did not follow: {}",
        out.describe()
    );
}

#[test]
fn ctr_task_exec_ps_kill_and_rm_drive_a_detached_katalite_task() {
    let _containerd = containerd_shared();
    let id = "shim-exec-task";
    let _cleanup = Cleanup::new(id);
    run_detached(id);
    exited(exec(id, "e1", "exit 7", None), 7, "the exec's exit code");
    let cat = exec(id, "e2", "cat; echo done", Some(b"hello\n"));
    let cat = exited(cat, 0, "exec with stdin");
    assert_eq!(
        cat.stdout,
        "hello\ndone\n",
        "stdin to EOF: {}",
        cat.describe()
    );
    // With -t ctr wants a terminal of its own: `script` gives it one.
    let tty = format!("ctr task exec -t --exec-id e3 {id} sh -c 'tty; stty size'");
    let tty = run("script", &["-qec", &tty, "/dev/null"], None);
    let tty = exited(tty, 0, "exec -t");
    assert!(
        tty.stdout.contains("/dev/pts/"),
        "no pty: {}",
        tty.describe()
    );
    task_is(id, "RUNNING").unwrap_or_else(|why| panic!("{why}"));
    exited(ctr(&["task", "ps", id]), 0, "ctr task ps");
    exec_killed_by_pid_ends_in_the_vm(id);
    kill_and_remove(id);
}

/// containerd SIGKILLs an exec by the pid the shim gave it (katalite-runc's relay): the
/// process in the VM must end with it.
fn exec_killed_by_pid_ends_in_the_vm(id: &str) {
    let sleepers = |exec_id: &str| {
        let script = "ps | grep -v grep | grep -c 'sleep 1000' || true";
        exited(exec(id, exec_id, script, None), 0, "ps in the VM")
            .stdout
            .trim()
            .to_string()
    };
    let mut sleeper = Command::new("ctr")
        .args(["task", "exec", "--exec-id", "e4", id, "sleep", "1000"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ctr task exec");
    poll(RUN_TIMEOUT, || match sleepers("p1").as_str() {
        "1" => Ok(()),
        other => Err(format!("{other} sleep processes in the VM, waiting for 1")),
    });
    let kill = ctr(&["task", "kill", "--exec-id", "e4", "-s", "SIGKILL", id]);
    exited(kill, 0, "ctr task kill --exec-id");
    poll(RUN_TIMEOUT, || match sleeper.try_wait() {
        Ok(Some(_)) => Ok(()),
        _ => Err("ctr task exec still waits for the killed exec".to_string()),
    });
    poll(RUN_TIMEOUT, || match sleepers("p2").as_str() {
        "0" => Ok(()),
        other => Err(format!(
            "{other} sleep processes left in the VM after SIGKILL"
        )),
    });
}

/// `ctr events` in the background, its lines collected as they come.
struct Events {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Events {
    /// Starts `ctr events` and returns once it is subscribed: it has seen a namespace of
    /// ours come and go.
    fn subscribe() -> Self {
        let mut child = Command::new("ctr")
            .arg("events")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| panic!("ctr must be on PATH (lab e2e --runtimes): {err}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(line);
            }
        });
        let events = Self { child, lines };
        let probe = "shim-events-probe";
        poll(RUN_TIMEOUT, || {
            if events.lines().iter().any(|line| line.contains(probe)) {
                return Ok(());
            }
            let _ = ctr(&["namespaces", "create", probe]);
            let _ = ctr(&["namespaces", "rm", probe]);
            Err("ctr events shows no /namespaces/create".to_string())
        });
        events
    }

    fn lines(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The /tasks/ topics of container `id` in the order they came, each exit followed by
    /// its process's id (the container's for the init, else the exec id), once the last
    /// is /tasks/delete: the shim forwards its events asynchronously.
    fn tasks_of(&self, id: &str) -> Vec<String> {
        let topic_of = |line: &String| {
            let topic = line
                .split_whitespace()
                .find(|word| word.starts_with("/tasks/"))?;
            let event: serde_json::Value = serde_json::from_str(&line[line.find('{')?..]).ok()?;
            (event["container_id"] == id).then(|| match event["id"].as_str() {
                Some(process) if topic == "/tasks/exit" => format!("{topic} {process}"),
                _ => topic.to_string(),
            })
        };
        poll(STOP_TIMEOUT, || {
            let lines = self.lines();
            let topics: Vec<String> = lines.iter().filter_map(topic_of).collect();
            match topics.last() {
                Some(last) if last == "/tasks/delete" => Ok(topics),
                _ => Err(format!("no /tasks/delete for {id}:\n{}", lines.join("\n"))),
            }
        })
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn ctr_events_show_a_katalite_tasks_lifecycle_in_order() {
    let _containerd = containerd_shared();
    let (run_id, exec_id) = ("shim-events-run", "shim-events-exec");
    let (_run, _exec) = (Cleanup::new(run_id), Cleanup::new(exec_id));
    let events = Events::subscribe();

    let ran = ctr_run(RUNTIME, &["--rm", image()], run_id, &["sh", "-c", "exit 0"]);
    exited(ran, 0, "ctr run --rm");
    let init_exit = format!("/tasks/exit {run_id}");
    let expected = ["/tasks/create", "/tasks/start", &init_exit, "/tasks/delete"];
    let all = || events.lines().join("\n");
    assert_eq!(
        events.tasks_of(run_id),
        expected,
        "ctr run --rm:\n{}",
        all()
    );

    run_detached(exec_id);
    exited(exec(exec_id, "x1", "exit 0", None), 0, "ctr task exec");
    kill_and_remove(exec_id);
    let init_exit = format!("/tasks/exit {exec_id}");
    let expected = [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/exit x1",
        &init_exit,
        "/tasks/delete",
    ];
    assert_eq!(
        events.tasks_of(exec_id),
        expected,
        "exec, kill, rm:\n{}",
        all()
    );
}

#[test]
fn ctr_log_uris_take_a_katalite_tasks_output_to_a_file_or_a_program() {
    let _containerd = containerd_shared();
    let id = "shim-log-uri";
    let _cleanup = Cleanup::new(id);
    let dir = std::env::temp_dir().join("katalite-shim-log-uri");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("log dir");
    let script = ["sh", "-c", "echo out-line; echo err-line >&2"];
    // file://: stdout and stderr appended to the file.
    let file = dir.join("task.log");
    let uri = format!("file://{}", file.display());
    let logged = ctr_run(RUNTIME, &["--rm", "--log-uri", &uri, image()], id, &script);
    exited(logged, 0, "ctr run --log-uri file://");
    let text = fs::read_to_string(&file).unwrap_or_default();
    assert!(
        text.contains("out-line") && text.contains("err-line"),
        "the log file holds {text:?}"
    );
    // binary://: containerd's protocol, stdout on fd 3, stderr on fd 4, fd 5 closed when
    // ready; the query's pairs are its arguments.
    let logger = dir.join("logger");
    let sink = dir.join("sink");
    fs::write(
        &logger,
        format!(
            "#!/bin/sh\nexec 5>&-\necho \"$CONTAINER_ID $1=$2\" > {sink}\ncat <&3 >> {sink} &\ncat <&4 >> {sink}\nwait\n",
            sink = sink.display()
        ),
    )
    .expect("logger");
    let chmod = run("chmod", &["755", &logger.display().to_string()], None);
    exited(chmod, 0, "chmod");
    let uri = format!("binary://{}?tag=x", logger.display());
    let logged = ctr_run(RUNTIME, &["--rm", "--log-uri", &uri, image()], id, &script);
    exited(logged, 0, "ctr run --log-uri binary://");
    poll(RUN_TIMEOUT, || {
        let text = fs::read_to_string(&sink).unwrap_or_default();
        let complete = text.starts_with(&format!("{id} tag=x\n"))
            && text.contains("out-line")
            && text.contains("err-line");
        complete
            .then_some(())
            .ok_or_else(|| format!("the logging program wrote {text:?}"))
    });
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn ctr_run_rootfs_boots_a_plain_directory() {
    let _containerd = containerd_shared();
    let id = "shim-rootfs";
    let _cleanup = Cleanup::new(id);
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = dir.path().join("rootfs");
    let tree = tree.to_str().expect("utf-8 temp dir");
    let copy = run("cp", &["-a", &rootfs("busybox"), tree], None);
    exited(copy, 0, "copying the busybox tree");
    let marker = format!("katalite-shim-marker-{}", std::process::id());
    fs::write(dir.path().join("rootfs/marker"), &marker).expect("write the marker");
    let options = ["--rm", "--rootfs", tree];
    let out = ctr_run(RUNTIME, &options, id, &["sh", "-c", "cat /marker"]);
    let out = exited(out, 0, "ctr run --rootfs");
    assert_eq!(out.stdout, marker, "the marker: {}", out.describe());
}

/// The pids of the running containerd daemons (not zombies, not shims).
fn containerd_pids() -> Vec<i32> {
    let entries = fs::read_dir("/proc").expect("read /proc");
    let pids = entries.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok());
    pids.filter(|pid: &i32| {
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = stat
            .rsplit_once(") ")
            .map(|(_, rest)| rest.starts_with('Z'));
        comm.trim() == "containerd" && zombie == Some(false)
    })
    .collect()
}

/// Stops containerd with SIGTERM and starts it again as the lab's runtimes.sh does
/// (`in_debian sh -c 'exec containerd >/var/log/containerd.log 2>&1'`: no flags, the
/// clean environment of `in_debian`; the log is appended to here), then waits until
/// `ctr version` answers.
fn restart_containerd() {
    let pids = containerd_pids();
    assert!(!pids.is_empty(), "no containerd is running");
    for &pid in &pids {
        let pid = Pid::from_raw(pid).expect("a pid");
        kill_process(pid, Signal::TERM).expect("SIGTERM containerd");
    }
    poll(STOP_TIMEOUT, || match containerd_pids() {
        running if running.is_empty() => Ok(()),
        running => Err(format!("containerd {running:?} ignored SIGTERM")),
    });
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open("/var/log/containerd.log")
        .expect("open /var/log/containerd.log");
    // Its own process group, so nothing aimed at the tests' group reaches it.
    let mut containerd = Command::new("containerd")
        .env_clear()
        .env("HOME", "/root")
        .env("TERM", "linux")
        .env("TMPDIR", "/tmp")
        .env("PATH", std::env::var_os("PATH").expect("PATH"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup the log"))
        .stderr(log)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|err| panic!("containerd must be on PATH: {err}"));
    // It outlives the test; reaped here should it stop while the tests run.
    thread::spawn(move || containerd.wait());
    poll(RUN_TIMEOUT, || {
        let version = ctr(&["version"]);
        let log = "log: /var/log/containerd.log";
        (version.status == Some(0)).then_some(()).ok_or_else(|| {
            format!(
                "containerd does not answer after its restart ({log}): {}",
                version.describe()
            )
        })
    });
}

#[test]
fn a_katalite_task_stays_reachable_across_a_containerd_restart() {
    // Alone: the other tests' containerd goes away for a while.
    let _containerd = CONTAINERD.write().unwrap_or_else(PoisonError::into_inner);
    let id = "shim-restart";
    let _cleanup = Cleanup::new(id);
    run_detached(id);
    restart_containerd();
    task_is(id, "RUNNING").unwrap_or_else(|why| panic!("after the restart: {why}"));
    let alive = exec(id, "r1", "echo alive", None);
    let alive = exited(alive, 0, "exec after the restart");
    assert_eq!(
        alive.stdout,
        "alive\n",
        "exec after the restart: {}",
        alive.describe()
    );
    kill_and_remove(id);
}
