//! The messages of `containerd.task.v2.Task` (containerd's runtime/v2/task/shim.proto) and
//! of its events (api/events/task.proto), with the field numbers of containerd 1.6; see
//! docs/containerd-shim-v2.md. Requests are decoded, responses and events encoded.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::proto::{fields, DecodeError, Encoder, Value};

/// A point in time as `google.protobuf.Timestamp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp {
    /// Seconds since the Unix epoch.
    pub seconds: i64,
    /// 0..999,999,999.
    pub nanos: u32,
}

impl Timestamp {
    /// Now.
    pub fn now() -> Self {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
            nanos: since.subsec_nanos(),
        }
    }

    /// The encoded message.
    pub fn encode(self) -> Vec<u8> {
        let mut encoder = Encoder::new();
        encoder.int(1, self.seconds).uint(2, u64::from(self.nanos));
        encoder.finish()
    }
}

/// A process's exit: its status (128+signal when killed) and time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The wait status as containerd reports it.
    pub status: u32,
    /// When the shim saw it.
    pub at: Timestamp,
}

/// One `containerd.types.Mount` of the task's rootfs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mount {
    /// `overlay`, `bind`...
    pub kind: String,
    /// The source (a path, or `overlay`).
    pub source: String,
    /// mount(8) options.
    pub options: Vec<String>,
}

/// A process's stdio as the client names it: FIFO paths, `file://` or `binary://` URIs,
/// or empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stdio {
    /// Where stdin comes from.
    pub stdin: String,
    /// Where stdout goes.
    pub stdout: String,
    /// Where stderr goes.
    pub stderr: String,
    /// A pseudo-terminal instead (stdout carries both streams).
    pub terminal: bool,
}

/// `CreateTaskRequest`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateTask {
    /// The container id.
    pub id: String,
    /// The bundle directory.
    pub bundle: String,
    /// Mounted in order on the bundle's `rootfs`.
    pub rootfs: Vec<Mount>,
    /// The init's stdio.
    pub stdio: Stdio,
}

impl CreateTask {
    /// Decodes the request.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut out = Self::default();
        fields(buf, |field, value| {
            match field {
                1 => out.id = value.string()?,
                2 => out.bundle = value.string()?,
                3 => out.rootfs.push(decode_mount(value.bytes())?),
                4 => out.stdio.terminal = value.uint() != 0,
                5 => out.stdio.stdin = value.string()?,
                6 => out.stdio.stdout = value.string()?,
                7 => out.stdio.stderr = value.string()?,
                _ => {}
            }
            Ok(())
        })?;
        Ok(out)
    }
}

fn decode_mount(buf: &[u8]) -> Result<Mount, DecodeError> {
    let mut mount = Mount::default();
    fields(buf, |field, value| {
        match field {
            1 => mount.kind = value.string()?,
            2 => mount.source = value.string()?,
            4 => mount.options.push(value.string()?),
            _ => {}
        }
        Ok(())
    })?;
    Ok(mount)
}

/// The requests that name a process and carry at most a few scalars: Start, Delete,
/// State, Wait, Kill, ResizePty, CloseIO, Pids, Connect, Shutdown, Stats. Each fills what
/// its message has; the rest stays zero.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessRequest {
    /// The container id (field 1 of every request).
    pub id: String,
    /// The exec id; empty for the container's init.
    pub exec_id: String,
    /// Kill: the signal; ResizePty: the width (columns).
    pub field3: u32,
    /// Kill: `all`; ResizePty: the height (rows); CloseIO: field 3 is `stdin`.
    pub field4: u32,
}

impl ProcessRequest {
    /// Decodes any of the messages above.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut out = Self::default();
        fields(buf, |field, value| {
            match (field, value) {
                (1, _) => out.id = value.string()?,
                // ShutdownRequest's field 2 is the bool `now`: not a string.
                (2, Value::Bytes(_)) => out.exec_id = value.string()?,
                (3, _) => out.field3 = value.u32(),
                (4, _) => out.field4 = value.u32(),
                _ => {}
            }
            Ok(())
        })?;
        Ok(out)
    }
}

/// `ExecProcessRequest`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecProcess {
    /// The container id.
    pub id: String,
    /// The new process's id.
    pub exec_id: String,
    /// Its stdio.
    pub stdio: Stdio,
    /// The OCI `process` as JSON (the `Any`'s value; its type URL is the runtime spec's).
    pub spec: Vec<u8>,
}

impl ExecProcess {
    /// Decodes the request.
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut out = Self::default();
        fields(buf, |field, value| {
            match field {
                1 => out.id = value.string()?,
                2 => out.exec_id = value.string()?,
                3 => out.stdio.terminal = value.uint() != 0,
                4 => out.stdio.stdin = value.string()?,
                5 => out.stdio.stdout = value.string()?,
                6 => out.stdio.stderr = value.string()?,
                7 => fields(value.bytes(), |field, value| {
                    if field == 2 {
                        out.spec = value.bytes().to_vec();
                    }
                    Ok(())
                })?,
                _ => {}
            }
            Ok(())
        })?;
        Ok(out)
    }
}

/// A response that is one or two uint32s: Create and Start (`pid`), Connect
/// (`shim_pid`, `task_pid`).
pub fn pids(first: u32, second: u32) -> Vec<u8> {
    let mut encoder = Encoder::new();
    encoder.uint(1, u64::from(first)).uint(2, u64::from(second));
    encoder.finish()
}

/// `DeleteResponse`.
pub fn delete_response(pid: u32, exit: Exit) -> Vec<u8> {
    let mut encoder = Encoder::new();
    encoder
        .uint(1, u64::from(pid))
        .uint(2, u64::from(exit.status))
        .message(3, &exit.at.encode());
    encoder.finish()
}

/// `WaitResponse`.
pub fn wait_response(exit: Exit) -> Vec<u8> {
    let mut encoder = Encoder::new();
    encoder
        .uint(1, u64::from(exit.status))
        .message(2, &exit.at.encode());
    encoder.finish()
}

/// `containerd.v1.types.Status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Created, not started.
    Created = 1,
    /// Started, not exited.
    Running = 2,
    /// Exited.
    Stopped = 3,
}

/// What `StateResponse` says of one process.
#[derive(Debug, Clone)]
pub struct ProcessState<'a> {
    /// The container id, or the exec id.
    pub id: &'a str,
    /// The bundle directory.
    pub bundle: &'a str,
    /// The host pid (0 before an exec starts).
    pub pid: u32,
    /// Its status.
    pub status: Status,
    /// Its stdio.
    pub stdio: &'a Stdio,
    /// Its exit, once it has one.
    pub exit: Option<Exit>,
    /// The exec id, empty for the init.
    pub exec_id: &'a str,
}

/// `StateResponse`.
pub fn state_response(state: &ProcessState<'_>) -> Vec<u8> {
    let mut encoder = Encoder::new();
    encoder
        .string(1, state.id)
        .string(2, state.bundle)
        .uint(3, u64::from(state.pid))
        .uint(4, state.status as u64)
        .string(5, &state.stdio.stdin)
        .string(6, &state.stdio.stdout)
        .string(7, &state.stdio.stderr)
        .bool(8, state.stdio.terminal);
    if let Some(exit) = state.exit {
        // Left out until the exit: containerd reads an absent time as "not exited".
        encoder
            .uint(9, u64::from(exit.status))
            .message(10, &exit.at.encode());
    }
    encoder.string(11, state.exec_id);
    encoder.finish()
}

/// `PidsResponse` of host pids.
pub fn pids_response(pids: &[u32]) -> Vec<u8> {
    let mut encoder = Encoder::new();
    for pid in pids {
        let mut info = Encoder::new();
        info.uint(1, u64::from(*pid));
        encoder.message(1, &info.finish());
    }
    encoder.finish()
}

/// A `google.protobuf.Any`.
pub fn any(type_url: &str, value: &[u8]) -> Vec<u8> {
    let mut encoder = Encoder::new();
    encoder.string(1, type_url).bytes(2, value);
    encoder.finish()
}

/// The events the shim sends, with their topics (containerd's runtime/events.go).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `/tasks/create`.
    Create {
        /// The container.
        id: String,
        /// Its bundle.
        bundle: String,
        /// Its init's stdio.
        stdio: Stdio,
        /// Its init's pid.
        pid: u32,
    },
    /// `/tasks/start`.
    Start {
        /// The container.
        id: String,
        /// Its init's pid.
        pid: u32,
    },
    /// `/tasks/exec-added`.
    ExecAdded {
        /// The container.
        id: String,
        /// The exec.
        exec_id: String,
    },
    /// `/tasks/exec-started`.
    ExecStarted {
        /// The container.
        id: String,
        /// The exec.
        exec_id: String,
        /// Its pid.
        pid: u32,
    },
    /// `/tasks/exit`: `process` is the container id for the init, else the exec id.
    Exit {
        /// The container.
        id: String,
        /// The process.
        process: String,
        /// Its pid.
        pid: u32,
        /// How it ended.
        exit: Exit,
    },
    /// `/tasks/delete` (the init only).
    Delete {
        /// The container.
        id: String,
        /// Its init's pid.
        pid: u32,
        /// How it ended.
        exit: Exit,
    },
}

impl Event {
    /// The topic, the `Any` type URL (a bare message name, as containerd's typeurl makes
    /// for its event types) and the encoded message.
    pub fn encode(&self) -> (&'static str, &'static str, Vec<u8>) {
        let mut encoder = Encoder::new();
        let (topic, type_url) = match self {
            Event::Create {
                id,
                bundle,
                stdio,
                pid,
            } => {
                let mut io = Encoder::new();
                io.string(1, &stdio.stdin)
                    .string(2, &stdio.stdout)
                    .string(3, &stdio.stderr)
                    .bool(4, stdio.terminal);
                encoder
                    .string(1, id)
                    .string(2, bundle)
                    .message(4, &io.finish())
                    .uint(6, u64::from(*pid));
                ("/tasks/create", "containerd.events.TaskCreate")
            }
            Event::Start { id, pid } => {
                encoder.string(1, id).uint(2, u64::from(*pid));
                ("/tasks/start", "containerd.events.TaskStart")
            }
            Event::ExecAdded { id, exec_id } => {
                encoder.string(1, id).string(2, exec_id);
                ("/tasks/exec-added", "containerd.events.TaskExecAdded")
            }
            Event::ExecStarted { id, exec_id, pid } => {
                encoder
                    .string(1, id)
                    .string(2, exec_id)
                    .uint(3, u64::from(*pid));
                ("/tasks/exec-started", "containerd.events.TaskExecStarted")
            }
            Event::Exit {
                id,
                process,
                pid,
                exit,
            } => {
                encoder
                    .string(1, id)
                    .string(2, process)
                    .uint(3, u64::from(*pid))
                    .uint(4, u64::from(exit.status))
                    .message(5, &exit.at.encode());
                ("/tasks/exit", "containerd.events.TaskExit")
            }
            Event::Delete { id, pid, exit } => {
                encoder
                    .string(1, id)
                    .uint(2, u64::from(*pid))
                    .uint(3, u64::from(exit.status))
                    .message(4, &exit.at.encode());
                ("/tasks/delete", "containerd.events.TaskDelete")
            }
        };
        (topic, type_url, encoder.finish())
    }
}
