//! `containerd.task.v2.Task` for one container: its init (the VM, created and started
//! through katalite-runc) and its execs (processes run in the VM by katalite-runc's exec
//! relay). State changes and events are made under one lock, so a process's start event
//! is always queued before its exit event.

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use crate::events::Publisher;
use crate::flags::Flags;
use crate::messages::{
    self, CreateTask, Event, ExecProcess, Exit, ProcessRequest, ProcessState, Status, Stdio,
    Timestamp,
};
use crate::runc::{self, ProcessIo, Runc};
use crate::stdio;
use crate::terminal::{Console, ConsoleSocket};
use crate::ttrpc::{Code, Handler, Reply, Status as RpcStatus};
use crate::{mounts, stats};

const TASK_SERVICE: &str = "containerd.task.v2.Task";
/// How long a process's terminal output may take to drain after it exits.
const DRAIN: Duration = Duration::from_secs(2);

/// One process: the init or an exec.
struct Process {
    pid: u32,
    status: Status,
    exit: Option<Exit>,
    stdio: Stdio,
    stdin_writer: Option<File>,
    console: Option<Arc<Console>>,
    /// An exec's OCI process JSON, until it starts.
    spec: Vec<u8>,
}

impl Process {
    fn new(stdio: Stdio) -> Self {
        Self {
            pid: 0,
            status: Status::Created,
            exit: None,
            stdio,
            stdin_writer: None,
            console: None,
            spec: Vec::new(),
        }
    }
}

/// A process katalite-runc has just started.
struct Started {
    pid: u32,
    console: Option<Arc<Console>>,
    stdin_writer: Option<File>,
}

struct Container {
    id: String,
    bundle: PathBuf,
    init: Process,
    execs: HashMap<String, Process>,
}

impl Container {
    fn process(&mut self, exec_id: &str) -> Result<&mut Process, RpcStatus> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        self.execs
            .get_mut(exec_id)
            .ok_or_else(|| not_found(format!("process {exec_id} not found")))
    }
}

/// The task service.
pub struct Service {
    namespace: String,
    socket: PathBuf,
    runc: Runc,
    events: Publisher,
    container: Mutex<Option<Container>>,
    changed: Condvar,
    shutdown: AtomicBool,
    next_file: AtomicU32,
}

fn not_found(message: impl Into<String>) -> RpcStatus {
    RpcStatus::new(Code::NotFound, message)
}

fn unknown(err: impl std::fmt::Display) -> RpcStatus {
    RpcStatus::new(Code::Unknown, err.to_string())
}

impl Service {
    /// The service of the shim started with `flags`, listening on `socket`.
    pub fn new(flags: &Flags, socket: PathBuf) -> Self {
        let address = std::env::var("TTRPC_ADDRESS")
            .ok()
            .filter(|a| !a.is_empty());
        Self {
            namespace: flags.namespace.clone(),
            socket,
            runc: Runc::new(&flags.namespace),
            events: Publisher::start(address, flags.namespace.clone()),
            container: Mutex::new(None),
            changed: Condvar::new(),
            shutdown: AtomicBool::new(false),
            next_file: AtomicU32::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Container>> {
        self.container
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn with_container<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Container) -> Result<T, RpcStatus>,
    ) -> Result<T, RpcStatus> {
        match self.lock().as_mut() {
            Some(container) if container.id == id => f(container),
            _ => Err(not_found(format!("container {id} not created"))),
        }
    }

    fn create(self: &Arc<Self>, request: CreateTask) -> Reply {
        let mut guard = self.lock();
        if guard.is_some() {
            return Err(RpcStatus::new(
                Code::AlreadyExists,
                format!("a container already runs in this shim ({})", request.id),
            ));
        }
        let bundle = PathBuf::from(&request.bundle);
        if !request.rootfs.is_empty() {
            let rootfs = bundle.join("rootfs");
            fs::create_dir_all(&rootfs).map_err(unknown)?;
            mounts::mount_all(&request.rootfs, &rootfs).map_err(unknown)?;
        }
        let created = self.create_init(&request, &bundle);
        let Started {
            pid,
            console,
            stdin_writer,
        } = match created {
            Ok(created) => created,
            Err(err) => {
                let _ = mounts::unmount_all(&bundle.join("rootfs"));
                return Err(err);
            }
        };
        let mut init = Process::new(request.stdio.clone());
        init.pid = pid;
        init.console = console.clone();
        init.stdin_writer = stdin_writer;
        *guard = Some(Container {
            id: request.id.clone(),
            bundle,
            init,
            execs: HashMap::new(),
        });
        self.events.publish(Event::Create {
            id: request.id.clone(),
            bundle: request.bundle,
            stdio: request.stdio,
            pid,
        });
        self.watch(pid, String::new(), console);
        Ok(messages::pids(pid, 0))
    }

    /// Runs `katalite-runc create`; returns the init's pid, its console and stdin writer.
    fn create_init(&self, request: &CreateTask, bundle: &Path) -> Result<Started, RpcStatus> {
        let opened = stdio::open(&request.stdio, &request.id, &self.namespace).map_err(unknown)?;
        let socket = request
            .stdio
            .terminal
            .then(ConsoleSocket::new)
            .transpose()
            .map_err(unknown)?;
        let (io, copy) = split_io(opened.io, socket.is_some());
        let mut child = self
            .runc
            .create(
                &request.id,
                bundle,
                socket.as_ref().map(ConsoleSocket::path),
                io,
            )
            .map_err(unknown)?;
        // A failure after katalite-runc's own may leave a created container: deleted here,
        // before the caller unmounts its rootfs.
        let undo = |err: RpcStatus| {
            let _ = self.runc.delete(&request.id);
            err
        };
        let console = match take_console(socket.as_ref(), &mut child, copy) {
            Ok(console) => console,
            Err(err) => {
                let _ = child.wait();
                return Err(undo(err));
            }
        };
        runc::finished("create", child, Some(&bundle.join("log.json"))).map_err(unknown)?;
        let pid = read_pid(&bundle.join("init.pid")).map_err(undo)?;
        Ok(Started {
            pid,
            console,
            stdin_writer: opened.stdin_writer,
        })
    }

    /// Waits for `pid` on a thread of its own; records and announces its exit.
    fn watch(self: &Arc<Self>, pid: u32, exec_id: String, console: Option<Arc<Console>>) {
        let service = Arc::clone(self);
        let spawned = thread::Builder::new().stack_size(128 << 10).spawn(move || {
            let status = wait_pid(pid);
            if let Some(console) = console {
                console.drain(DRAIN);
            }
            service.exited(pid, &exec_id, status);
        });
        if let Err(err) = spawned {
            crate::log(&format!("cannot watch process {pid}: {err}"));
        }
    }

    fn exited(&self, pid: u32, exec_id: &str, status: u32) {
        let mut guard = self.lock();
        reap(pid);
        let Some(container) = guard.as_mut() else {
            return;
        };
        let id = container.id.clone();
        let Ok(process) = container.process(exec_id) else {
            return;
        };
        if process.pid != pid {
            return;
        }
        let exit = Exit {
            status,
            at: Timestamp::now(),
        };
        process.status = Status::Stopped;
        process.exit = Some(exit);
        process.stdin_writer = None;
        let name = if exec_id.is_empty() {
            id.clone()
        } else {
            exec_id.to_owned()
        };
        self.events.publish(Event::Exit {
            id,
            process: name,
            pid,
            exit,
        });
        self.changed.notify_all();
    }

    fn start(self: &Arc<Self>, request: &ProcessRequest) -> Reply {
        let mut guard = self.lock();
        let container = match guard.as_mut() {
            Some(container) if container.id == request.id => container,
            _ => return Err(not_found(format!("container {} not created", request.id))),
        };
        let process = container.process(&request.exec_id)?;
        if process.status != Status::Created || process.pid != 0 && !request.exec_id.is_empty() {
            return Err(RpcStatus::new(
                Code::FailedPrecondition,
                "process already started",
            ));
        }
        if request.exec_id.is_empty() {
            self.runc.start(&request.id).map_err(unknown)?;
            container.init.status = Status::Running;
            let pid = container.init.pid;
            self.events.publish(Event::Start {
                id: request.id.clone(),
                pid,
            });
            return Ok(messages::pids(pid, 0));
        }
        let spec = std::mem::take(&mut process.spec);
        let stdio = process.stdio.clone();
        let bundle = container.bundle.clone();
        let started = self.start_exec(&request.id, &bundle, &spec, &stdio);
        let process = container.process(&request.exec_id)?;
        let Started {
            pid,
            console,
            stdin_writer,
        } = match started {
            Ok(started) => started,
            Err(err) => {
                // It will never run: a pending Wait gets an exit (runc's shim does the same).
                process.status = Status::Stopped;
                process.exit = Some(Exit {
                    status: 255,
                    at: Timestamp::now(),
                });
                self.changed.notify_all();
                return Err(err);
            }
        };
        process.pid = pid;
        process.status = Status::Running;
        process.console = console.clone();
        process.stdin_writer = stdin_writer;
        self.events.publish(Event::ExecStarted {
            id: request.id.clone(),
            exec_id: request.exec_id.clone(),
            pid,
        });
        self.watch(pid, request.exec_id.clone(), console);
        Ok(messages::pids(pid, 0))
    }

    /// Runs `katalite-runc exec --detach`; returns the relay's pid, console, stdin writer.
    fn start_exec(
        &self,
        id: &str,
        bundle: &Path,
        spec: &[u8],
        stdio: &Stdio,
    ) -> Result<Started, RpcStatus> {
        let n = self.next_file.fetch_add(1, Ordering::Relaxed);
        let process_file = bundle.join(format!(".katalite-exec-{n}.json"));
        let pid_file = bundle.join(format!(".katalite-exec-{n}.pid"));
        let result = (|| {
            fs::write(&process_file, with_terminal(spec, stdio.terminal)?).map_err(unknown)?;
            let opened = stdio::open(stdio, id, &self.namespace).map_err(unknown)?;
            let socket = stdio
                .terminal
                .then(ConsoleSocket::new)
                .transpose()
                .map_err(unknown)?;
            let (io, copy) = split_io(opened.io, socket.is_some());
            let log = bundle.join("log.json");
            let mut child = self
                .runc
                .exec(
                    id,
                    &log,
                    &process_file,
                    &pid_file,
                    socket.as_ref().map(ConsoleSocket::path),
                    io,
                )
                .map_err(unknown)?;
            let console = match take_console(socket.as_ref(), &mut child, copy) {
                Ok(console) => console,
                Err(err) => {
                    let _ = child.wait();
                    return Err(err);
                }
            };
            runc::finished("exec", child, Some(&log)).map_err(unknown)?;
            Ok(Started {
                pid: read_pid(&pid_file)?,
                console,
                stdin_writer: opened.stdin_writer,
            })
        })();
        let _ = fs::remove_file(&process_file);
        let _ = fs::remove_file(&pid_file);
        result
    }

    fn exec(&self, request: ExecProcess) -> Reply {
        self.with_container(&request.id, |container| {
            if container.init.status == Status::Stopped {
                return Err(unknown("container is stopped"));
            }
            if container.execs.contains_key(&request.exec_id) {
                return Err(RpcStatus::new(
                    Code::AlreadyExists,
                    format!("id {} already in use", request.exec_id),
                ));
            }
            let mut process = Process::new(request.stdio);
            process.spec = request.spec;
            container.execs.insert(request.exec_id.clone(), process);
            self.events.publish(Event::ExecAdded {
                id: request.id.clone(),
                exec_id: request.exec_id,
            });
            Ok(Vec::new())
        })
    }

    fn state(&self, request: &ProcessRequest) -> Reply {
        self.with_container(&request.id, |container| {
            let bundle = container.bundle.display().to_string();
            let id = container.id.clone();
            let process = container.process(&request.exec_id)?;
            let name = if request.exec_id.is_empty() {
                &id
            } else {
                &request.exec_id
            };
            Ok(messages::state_response(&ProcessState {
                id: name,
                bundle: &bundle,
                pid: process.pid,
                status: process.status,
                stdio: &process.stdio,
                exit: process.exit,
                exec_id: &request.exec_id,
            }))
        })
    }

    fn wait(&self, request: &ProcessRequest) -> Reply {
        let mut guard = self.lock();
        loop {
            let container = match guard.as_mut() {
                Some(container) if container.id == request.id => container,
                _ => return Err(not_found(format!("container {} not created", request.id))),
            };
            if let Some(exit) = container.process(&request.exec_id)?.exit {
                return Ok(messages::wait_response(exit));
            }
            guard = self
                .changed
                .wait(guard)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    fn kill(&self, request: &ProcessRequest) -> Reply {
        let (signal, all) = (request.field3, request.field4 != 0);
        self.with_container(&request.id, |container| {
            let process = container.process(&request.exec_id)?;
            match process.status {
                Status::Stopped => return Err(not_found("process already finished")),
                Status::Created if !request.exec_id.is_empty() => {
                    return Err(RpcStatus::new(
                        Code::FailedPrecondition,
                        "process not started",
                    ))
                }
                _ => {}
            }
            let finished = || not_found("process already finished");
            if request.exec_id.is_empty() {
                return match self.runc.kill(&request.id, signal, all) {
                    Ok(()) => Ok(Vec::new()),
                    // Ended but not yet reaped (its output still draining): finished.
                    Err(_) if has_exited(process.pid) => Err(finished()),
                    Err(err) => Err(unknown(err)),
                };
            }
            let pid = rustix::process::Pid::from_raw(i32::try_from(process.pid).unwrap_or(0))
                .ok_or_else(|| unknown("no pid"))?;
            let signal = i32::try_from(signal)
                .ok()
                .and_then(rustix::process::Signal::from_named_raw)
                .ok_or_else(|| {
                    RpcStatus::new(Code::InvalidArgument, format!("invalid signal {signal}"))
                })?;
            match rustix::process::kill_process(pid, signal) {
                Ok(()) => Ok(Vec::new()),
                Err(rustix::io::Errno::SRCH) => Err(finished()),
                Err(err) => Err(unknown(err)),
            }
        })
    }

    fn delete(&self, request: &ProcessRequest) -> Reply {
        let mut guard = self.lock();
        let container = match guard.as_mut() {
            Some(container) if container.id == request.id => container,
            _ => return Err(not_found(format!("container {} not created", request.id))),
        };
        if !request.exec_id.is_empty() {
            let process = container.process(&request.exec_id)?;
            if process.status == Status::Running {
                return Err(unknown("cannot delete a running process"));
            }
            let (pid, exit) = (
                process.pid,
                process.exit.unwrap_or(Exit {
                    status: 0,
                    at: Timestamp::now(),
                }),
            );
            container.execs.remove(&request.exec_id);
            // A Wait on it now answers NotFound instead of waiting for ever.
            self.changed.notify_all();
            return Ok(messages::delete_response(pid, exit));
        }
        if container.init.status == Status::Running {
            return Err(unknown("cannot delete a running container"));
        }
        // A created container's init still waits for start: katalite-runc kills it.
        self.runc.delete(&request.id).map_err(unknown)?;
        let pid = container.init.pid;
        let exit = container.init.exit.unwrap_or(Exit {
            status: 137,
            at: Timestamp::now(),
        });
        let _ = mounts::unmount_all(&container.bundle.join("rootfs"));
        *guard = None;
        self.changed.notify_all();
        self.events.publish(Event::Delete {
            id: request.id.clone(),
            pid,
            exit,
        });
        Ok(messages::delete_response(pid, exit))
    }

    fn pids(&self, request: &ProcessRequest) -> Reply {
        self.with_container(&request.id, |container| {
            let mut pids: Vec<u32> = vec![container.init.pid];
            pids.extend(
                container
                    .execs
                    .values()
                    .filter(|p| p.status == Status::Running)
                    .map(|p| p.pid),
            );
            Ok(messages::pids_response(&pids))
        })
    }

    fn close_io(&self, request: &ProcessRequest) -> Reply {
        self.with_container(&request.id, |container| {
            let process = container.process(&request.exec_id)?;
            if request.field3 != 0 {
                process.stdin_writer = None;
            }
            Ok(Vec::new())
        })
    }

    fn resize(&self, request: &ProcessRequest) -> Reply {
        self.with_container(&request.id, |container| {
            let process = container.process(&request.exec_id)?;
            if let Some(console) = &process.console {
                let (width, height) = (clamp(request.field3), clamp(request.field4));
                console.resize(width, height).map_err(unknown)?;
            }
            Ok(Vec::new())
        })
    }

    fn connect(&self) -> Reply {
        let task_pid = self
            .lock()
            .as_ref()
            .map_or(0, |container| container.init.pid);
        Ok(messages::pids(std::process::id(), task_pid))
    }

    fn stats(&self, request: &ProcessRequest) -> Reply {
        let pid = self.with_container(&request.id, |container| Ok(container.init.pid))?;
        Ok(stats::metrics(pid))
    }

    fn shutdown(&self) -> Reply {
        if self.lock().is_none() {
            self.shutdown.store(true, Ordering::SeqCst);
        }
        Ok(Vec::new())
    }
}

fn clamp(value: u32) -> u16 {
    u16::try_from(value).unwrap_or(u16::MAX)
}

/// With a terminal the process gets no stdio of ours (the pty is its stdio): the opened
/// stdin and stdout go to the copier instead.
fn split_io(io: ProcessIo, terminal: bool) -> (ProcessIo, Option<ProcessIo>) {
    if terminal {
        (ProcessIo::default(), Some(io))
    } else {
        (io, None)
    }
}

fn take_console(
    socket: Option<&ConsoleSocket>,
    child: &mut Child,
    copy: Option<ProcessIo>,
) -> Result<Option<Arc<Console>>, RpcStatus> {
    let (Some(socket), Some(copy)) = (socket, copy) else {
        return Ok(None);
    };
    match socket.receive(child).map_err(unknown)? {
        Some(master) => Console::start(master, copy.stdin, copy.stdout)
            .map(Arc::new)
            .map(Some)
            .map_err(unknown),
        // It exited without a terminal: its own error says why.
        None => Ok(None),
    }
}

/// The OCI process JSON with `terminal` as the request says (containerd's rule).
fn with_terminal(spec: &[u8], terminal: bool) -> Result<Vec<u8>, RpcStatus> {
    let mut value: serde_json::Value = serde_json::from_slice(spec)
        .map_err(|err| RpcStatus::new(Code::InvalidArgument, format!("exec spec: {err}")))?;
    let object = value
        .as_object_mut()
        .ok_or_else(|| RpcStatus::new(Code::InvalidArgument, "exec spec is not an object"))?;
    object.insert("terminal".into(), terminal.into());
    serde_json::to_vec(&value).map_err(unknown)
}

fn read_pid(path: &Path) -> Result<u32, RpcStatus> {
    fs::read_to_string(path)
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .filter(|pid| *pid > 0)
        .ok_or_else(|| unknown(format!("no pid in {}", path.display())))
}

/// Waits for `pid` (a child, or an orphan adopted as subreaper); its status as containerd
/// reports it: the exit code, or 128 + the signal.
fn wait_pid(pid: u32) -> u32 {
    let Some(pid) = rustix::process::Pid::from_raw(i32::try_from(pid).unwrap_or(0)) else {
        return 255;
    };
    loop {
        // WNOWAIT: the process stays a zombie, its pid unreusable, until `exited` reaps it
        // under the lock that `Kill` signals under.
        let options =
            rustix::process::WaitIdOptions::EXITED | rustix::process::WaitIdOptions::NOWAIT;
        match rustix::process::waitid(rustix::process::WaitId::Pid(pid), options) {
            Ok(Some(status)) => {
                if let Some(code) = status.exit_status() {
                    return u32::try_from(code).unwrap_or(255);
                }
                if let Some(signal) = status.terminating_signal() {
                    return 128 + u32::try_from(signal).unwrap_or(127);
                }
            }
            Err(rustix::io::Errno::INTR) | Ok(None) => {}
            Err(_) => return 255,
        }
    }
}

/// Whether `pid` has ended (a zombie not yet reaped by its watcher).
fn has_exited(pid: u32) -> bool {
    let Some(pid) = rustix::process::Pid::from_raw(i32::try_from(pid).unwrap_or(0)) else {
        return true;
    };
    let options = rustix::process::WaitIdOptions::EXITED
        | rustix::process::WaitIdOptions::NOWAIT
        | rustix::process::WaitIdOptions::NOHANG;
    !matches!(
        rustix::process::waitid(rustix::process::WaitId::Pid(pid), options),
        Ok(None)
    )
}

/// Reaps `pid`, which [`wait_pid`] saw end.
fn reap(pid: u32) {
    if let Some(pid) = rustix::process::Pid::from_raw(i32::try_from(pid).unwrap_or(0)) {
        let _ = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::NOHANG);
    }
}

impl Handler for Service {
    fn call(self: Arc<Self>, service: &str, method: &str, payload: &[u8]) -> Reply {
        if service != TASK_SERVICE {
            return Err(RpcStatus::new(
                Code::Unimplemented,
                format!("service {service} not implemented"),
            ));
        }
        match method {
            "Create" => self.create(CreateTask::decode(payload)?),
            "Exec" => self.exec(ExecProcess::decode(payload)?),
            "Connect" => self.connect(),
            "Shutdown" => self.shutdown(),
            "Pause" | "Resume" | "Checkpoint" | "Update" => Err(RpcStatus::new(
                Code::Unimplemented,
                format!("{method} is not implemented by katalite (a VM is not paused or checkpointed through its shim)"),
            )),
            _ => {
                let request = ProcessRequest::decode(payload)?;
                match method {
                    "Start" => self.start(&request),
                    "State" => self.state(&request),
                    "Wait" => self.wait(&request),
                    "Kill" => self.kill(&request),
                    "Delete" => self.delete(&request),
                    "Pids" => self.pids(&request),
                    "CloseIO" => self.close_io(&request),
                    "ResizePty" => self.resize(&request),
                    "Stats" => self.stats(&request),
                    _ => Err(RpcStatus::new(Code::Unimplemented, format!("method {method} not implemented"))),
                }
            }
        }
    }

    fn replied(&self) {
        if self.shutdown.load(Ordering::SeqCst) {
            // containerd's own shims wait as long for their event queue.
            self.events.flush(Duration::from_secs(5));
            let _ = fs::remove_file(&self.socket);
            std::process::exit(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exec_spec_takes_the_requests_terminal() {
        let spec = br#"{"args":["sh"],"terminal":false,"cwd":"/"}"#;
        let out: serde_json::Value =
            serde_json::from_slice(&with_terminal(spec, true).expect("spec")).expect("json");
        assert_eq!(out["terminal"], true);
        assert_eq!(out["args"][0], "sh");
        assert_eq!(
            with_terminal(b"[1]", false)
                .expect_err("not an object")
                .code,
            Code::InvalidArgument
        );
    }

    #[test]
    #[allow(clippy::zombie_processes, reason = "wait_pid and reap wait for them")]
    fn exit_statuses_are_codes_or_128_plus_the_signal() {
        let child = std::process::Command::new("sh")
            .args(["-c", "exit 7"])
            .spawn()
            .expect("sh");
        assert!(wait_pid(child.id()) == 7 && has_exited(child.id()));
        reap(child.id());
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let pid =
            rustix::process::Pid::from_raw(i32::try_from(child.id()).expect("pid")).expect("pid");
        rustix::process::kill_process(pid, rustix::process::Signal::KILL).expect("kill");
        assert_eq!(wait_pid(child.id()), 137);
        reap(child.id());
    }
}
