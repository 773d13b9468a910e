//! The supervisor's control socket (`<container dir>/control.sock`, 0600): how `stop`,
//! `kill` and `exec` reach a VM with no daemon. A client writes one line, the JSON of a
//! [`ControlRequest`]; for Signal and Stop the server answers one [`ControlReply`] line;
//! an Exec connection is handed whole to the exec handler.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::confine::{self, Role};

/// SIGKILL cannot be forwarded usefully: it means "end the VM now".
const SIGKILL: i32 = 9;
const SIGTERM: i32 = 15;
/// Longest request line accepted.
const MAX_REQUEST: usize = 64 << 10;
/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// `sun_path` holds 108 bytes with the terminating NUL (unix(7)).
const MAX_SOCKET_PATH: usize = 107;

/// What a client asks of the supervisor (serde's external tagging: `{"Signal":15}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ControlRequest {
    /// Deliver this signal to the workload through init; 9 (SIGKILL) ends the VM at once
    /// (exit 137), as a VM has no process the host could kill more gently.
    Signal(i32),
    /// SIGTERM to the workload, then after this many seconds end the VM (exit 137).
    Stop(u64),
    /// Start an exec session; the connection belongs to the exec handler from then on.
    Exec(serde_json::Value),
}

/// The answer to Signal and Stop (`{"Ok":null}` or `{"Error":"..."}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlReply {
    /// Done (the signal was queued, the stop started).
    Ok(()),
    /// Why not.
    Error(String),
}

/// Takes an Exec connection and its request.
pub type ExecHandler = Box<dyn Fn(UnixStream, serde_json::Value) + Send + Sync>;

/// What the server acts on: the running VM.
pub struct Target {
    /// Queues a signal for the workload; false when the VM has ended. May block until
    /// init is ready.
    pub signal: Arc<dyn Fn(i32) -> bool + Send + Sync>,
    /// Ends the VM now.
    pub kill: Arc<dyn Fn() + Send + Sync>,
    /// Serves exec sessions; `None` until exec exists.
    pub exec: Option<ExecHandler>,
}

/// The `katalite-control` thread serving the socket; [`stop`](Self::stop) removes it.
pub struct ControlServer {
    path: PathBuf,
    done: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl ControlServer {
    /// Binds `path` (0600) and serves requests for `target` on a thread.
    pub fn start(path: &Path, target: Target) -> io::Result<Self> {
        // A socket left by a supervisor that was killed would make bind fail.
        let _ = std::fs::remove_file(path);
        let listener = short_path(path, |p| UnixListener::bind(p))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let done = Arc::new(AtomicBool::new(false));
        let thread = {
            let done = done.clone();
            std::thread::Builder::new()
                .name("katalite-control".into())
                .stack_size(vmm::THREAD_STACK_BYTES)
                .spawn(move || {
                    confine::enter(Role::Control);
                    serve(&listener, &target, &done);
                })?
        };
        Ok(Self {
            path: path.to_path_buf(),
            done,
            thread,
        })
    }

    /// Stops serving, joins the thread and removes the socket.
    pub fn stop(self) {
        self.done.store(true, Ordering::SeqCst);
        // Wakes the blocked accept; if the connect fails, accept is not blocked anyway.
        let _ = short_path(&self.path, |p| UnixStream::connect(p));
        let _ = self.thread.join();
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(listener: &UnixListener, target: &Target, done: &AtomicBool) {
    for stream in listener.incoming() {
        if done.load(Ordering::SeqCst) {
            return;
        }
        // A failed accept or a misbehaving client affects only that client.
        if let Ok(stream) = stream {
            let _ = serve_one(stream, target);
        }
    }
}

fn serve_one(mut stream: UnixStream, target: &Target) -> io::Result<()> {
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    let line = read_line(&mut stream)?;
    let reply = match serde_json::from_slice::<ControlRequest>(&line) {
        Err(err) => ControlReply::Error(format!("invalid request: {err}")),
        Ok(ControlRequest::Exec(request)) => match &target.exec {
            Some(exec) => {
                stream.set_read_timeout(None)?;
                exec(stream, request);
                return Ok(());
            }
            None => ControlReply::Error("exec is not supported yet".into()),
        },
        Ok(ControlRequest::Signal(SIGKILL)) => {
            (target.kill)();
            ControlReply::Ok(())
        }
        Ok(ControlRequest::Signal(signal)) if !(1..=64).contains(&signal) => {
            ControlReply::Error(format!("invalid signal {signal}"))
        }
        Ok(ControlRequest::Signal(signal)) => {
            forward(target, signal);
            ControlReply::Ok(())
        }
        Ok(ControlRequest::Stop(seconds)) => {
            forward(target, SIGTERM);
            let kill = target.kill.clone();
            std::thread::Builder::new()
                .name("katalite-stop-timer".into())
                .stack_size(vmm::THREAD_STACK_BYTES)
                .spawn(move || {
                    std::thread::sleep(Duration::from_secs(seconds));
                    kill();
                })?;
            ControlReply::Ok(())
        }
    };
    let mut text = serde_json::to_vec(&reply)?;
    text.push(b'\n');
    stream.write_all(&text)
}

/// Sends `signal` on a thread of its own: before init is ready the send waits, and the
/// control thread must keep serving (a kill may follow).
fn forward(target: &Target, signal: i32) {
    let send = target.signal.clone();
    let spawned = std::thread::Builder::new()
        .name("katalite-control-signal".into())
        .stack_size(vmm::THREAD_STACK_BYTES)
        .spawn(move || {
            send(signal);
        });
    if spawned.is_err() {
        (target.signal)(signal);
    }
}

/// Reads up to and without the first newline, byte by byte: nothing after it may be
/// consumed, since an exec session's data follows on the same connection.
fn read_line(stream: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let mut byte = [0u8];
    while line.len() < MAX_REQUEST {
        if stream.read(&mut byte)? == 0 || byte[0] == b'\n' {
            return Ok(line);
        }
        line.push(byte[0]);
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "request too long",
    ))
}

/// Calls `op` with `path`, or, when it is too long for `sun_path`, with the same file
/// reached through `/proc/self/fd/<its dir>` (the kernel resolves the magic link).
fn short_path<T>(path: &Path, op: impl FnOnce(&Path) -> io::Result<T>) -> io::Result<T> {
    if path.as_os_str().len() <= MAX_SOCKET_PATH {
        return op(path);
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return op(path);
    };
    let dir = std::fs::File::open(dir)?;
    let mut short = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    short.push(name);
    op(&short)
}

/// Connects to the supervisor's socket, also when its path is too long for `sun_path`
/// (the exec client keeps the connection for its session).
pub fn connect(socket: &Path) -> io::Result<UnixStream> {
    short_path(socket, |path| UnixStream::connect(path))
}

/// Sends `request` to the supervisor at `socket` and returns its reply (Signal and Stop).
pub fn request(socket: &Path, request: &ControlRequest) -> Result<()> {
    let mut stream = short_path(socket, |p| UnixStream::connect(p))
        .with_context(|| format!("cannot reach the supervisor at {}", socket.display()))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line).context("cannot send the request")?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .context("no reply from the supervisor")?;
    match serde_json::from_str::<ControlReply>(&reply) {
        Ok(ControlReply::Ok(())) => Ok(()),
        Ok(ControlReply::Error(message)) => bail!("{message}"),
        Err(err) => Err(anyhow!("invalid reply from the supervisor: {err}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Instant;

    #[derive(Default)]
    struct Seen {
        signals: Mutex<Vec<i32>>,
        kills: Mutex<u32>,
    }

    fn server(path: &Path, exec: Option<ExecHandler>) -> (ControlServer, Arc<Seen>) {
        let seen = Arc::new(Seen::default());
        let target = Target {
            signal: {
                let seen = seen.clone();
                Arc::new(move |s| {
                    seen.signals.lock().expect("lock").push(s);
                    true
                })
            },
            kill: {
                let seen = seen.clone();
                Arc::new(move || *seen.kills.lock().expect("lock") += 1)
            },
            exec,
        };
        (ControlServer::start(path, target).expect("start"), seen)
    }

    fn eventually(what: &str, check: impl Fn() -> bool) {
        let started = Instant::now();
        while !check() {
            assert!(started.elapsed() < Duration::from_secs(10), "never: {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn requests_are_externally_tagged_json() {
        let text = serde_json::to_string(&ControlRequest::Signal(15)).expect("json");
        assert_eq!(text, r#"{"Signal":15}"#);
        assert_eq!(
            serde_json::to_string(&ControlRequest::Stop(10)).expect("json"),
            r#"{"Stop":10}"#
        );
        assert_eq!(
            serde_json::to_string(&ControlReply::Ok(())).expect("json"),
            r#"{"Ok":null}"#
        );
    }

    #[test]
    fn signals_are_forwarded_and_sigkill_ends_the_vm() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("control.sock");
        let (server, seen) = server(&path, None);
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        request(&path, &ControlRequest::Signal(10)).expect("signal");
        eventually("SIGUSR1 forwarded", || {
            *seen.signals.lock().expect("lock") == [10]
        });
        request(&path, &ControlRequest::Signal(9)).expect("kill");
        assert_eq!(*seen.kills.lock().expect("lock"), 1);
        let err = request(&path, &ControlRequest::Signal(99)).expect_err("bad signal");
        assert_eq!(err.to_string(), "invalid signal 99");
        let err =
            request(&path, &ControlRequest::Exec(serde_json::json!({}))).expect_err("no exec yet");
        assert_eq!(err.to_string(), "exec is not supported yet");
        server.stop();
        assert!(!path.exists(), "the socket is removed");
    }

    #[test]
    fn stop_terms_then_kills_after_the_timeout() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("control.sock");
        let (server, seen) = server(&path, None);
        request(&path, &ControlRequest::Stop(0)).expect("stop");
        // The TERM is forwarded on its own thread, so it may land after the kill.
        eventually("TERM forwarded and killed", || {
            *seen.kills.lock().expect("lock") == 1
                && *seen.signals.lock().expect("lock") == [SIGTERM]
        });
        server.stop();
    }

    #[test]
    fn exec_connections_are_handed_over_with_the_bytes_after_the_line() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("control.sock");
        let handler: ExecHandler = Box::new(|mut stream, request| {
            let mut rest = String::new();
            let _ = stream.read_to_string(&mut rest);
            let _ = writeln!(stream, "{}|{rest}", request["cmd"]);
        });
        let (server, _) = server(&path, Some(handler));
        let mut client = UnixStream::connect(&path).expect("connect");
        client
            .write_all(b"{\"Exec\":{\"cmd\":\"echo\"}}\nstdin bytes")
            .expect("write");
        client
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
        let mut reply = String::new();
        client.read_to_string(&mut reply).expect("read");
        assert_eq!(reply, "\"echo\"|stdin bytes\n");
        server.stop();
    }

    #[test]
    fn long_socket_paths_go_through_proc() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("d".repeat(60)).join("e".repeat(60));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("control.sock");
        assert!(path.as_os_str().len() > MAX_SOCKET_PATH);
        let (server, seen) = server(&path, None);
        request(&path, &ControlRequest::Signal(1)).expect("signal");
        eventually("SIGHUP forwarded", || {
            *seen.signals.lock().expect("lock") == [1]
        });
        server.stop();
        assert!(!path.exists());
    }

    #[test]
    fn nobody_listening_is_an_error() {
        let tmp = tempfile::tempdir().expect("tempdir");
        assert!(request(&tmp.path().join("none.sock"), &ControlRequest::Stop(1)).is_err());
    }
}
