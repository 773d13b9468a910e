//! `katalite exec` sessions beside the workload: each `Exec` request starts a process with
//! the workload's environment, user and working directory unless the request overrides
//! them (Docker's exec rules), and its stdio joins the relay on the request's stream. A
//! request that cannot start ends its stream with a message and Docker's 126/127; it
//! never fails init.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use guest_init::ExecConfig;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::relay::{ExecRequest, Relay};
use super::session::set_window_size;
use super::{env, users, workload};

/// Most exec sessions relayed at once; more are refused (each holds descriptors and
/// buffers in init).
pub const MAX_SESSIONS: usize = 64;

/// Docker's status for an exec that cannot start for a reason other than a missing program.
const CANNOT_EXECUTE: i32 = 126;

/// What an exec session inherits from the workload (Docker: the container's config).
pub struct Container {
    /// The run config's `NAME=value` entries.
    pub env: Vec<String>,
    /// The guest's hostname.
    pub hostname: String,
    /// The run config's `--user`.
    pub user: String,
    /// The workload's normalised working directory.
    pub workdir: PathBuf,
}

/// The running exec sessions' processes.
pub struct Execs {
    container: Container,
    pids: HashMap<Pid, u32>,
}

impl Execs {
    /// No sessions yet; new ones inherit from `container`.
    pub fn new(container: Container) -> Self {
        Self {
            container,
            pids: HashMap::new(),
        }
    }

    /// Starts every session the host asked for since the last call.
    pub fn start_requested(&mut self, relay: &mut Relay) {
        for request in relay.take_exec_requests() {
            if relay.exec_sessions() >= MAX_SESSIONS {
                let message = format!("too many exec sessions (at most {MAX_SESSIONS})");
                relay.refuse(request.stream, &message, CANNOT_EXECUTE);
                continue;
            }
            if let Err((message, status)) = self.start(relay, &request) {
                relay.refuse(request.stream, &message, status);
            }
        }
    }

    /// Delivers a host signal to the session's process (ignored once it has ended).
    pub fn signal(&self, stream: u32, number: i32) {
        let Ok(signal) = Signal::try_from(number) else {
            return;
        };
        if let Some((&pid, _)) = self.pids.iter().find(|(_, &s)| s == stream) {
            let _ = kill(pid, signal);
        }
    }

    /// A child ended with Docker's `status`: when it is a session's process, the host gets
    /// the status once the session's output is relayed.
    pub fn reaped(&mut self, relay: &mut Relay, pid: Pid, status: u8) {
        if let Some(stream) = self.pids.remove(&pid) {
            relay.exited(stream, i32::from(status));
        }
    }

    fn start(&mut self, relay: &mut Relay, request: &ExecRequest) -> Result<(), (String, i32)> {
        let refuse = |message: String| (message, CANNOT_EXECUTE);
        let config: ExecConfig = serde_json::from_slice(&request.config)
            .map_err(|err| refuse(format!("invalid exec config: {err}")))?;
        if config.args.is_empty() {
            return Err(refuse("no command specified".into()));
        }
        let spec = match config.user.as_str() {
            "" => self.container.user.as_str(),
            given => given,
        };
        // Read at exec time: the workload may have changed them (useradd), as Docker does.
        let passwd = std::fs::read_to_string("/etc/passwd").ok();
        let group = std::fs::read_to_string("/etc/group").ok();
        let user = users::resolve(spec, passwd.as_deref(), group.as_deref())
            .map_err(|err| refuse(err.to_string()))?;
        let workdir = match config.working_dir.as_str() {
            "" => self.container.workdir.clone(),
            given => workload::normalise_workdir(given),
        };
        check_workdir(&workdir).map_err(refuse)?;
        let entries: Vec<String> = self
            .container
            .env
            .iter()
            .chain(&config.env)
            .cloned()
            .collect();
        let env = env::assemble(&entries, &self.container.hostname, &user.home, config.tty);
        let (child_stdio, streams) = workload::stdio(config.tty, config.open_stdin)
            .map_err(|err| refuse(err.to_string()))?;
        if let Some([rows, cols]) = config.console_size.filter(|_| config.tty) {
            // The process must see the host's size from its first ioctl.
            let _ = set_window_size(streams.stdout.as_fd(), rows, cols);
        }
        let spec = workload::Spec {
            args: &config.args,
            env: &env,
            workdir: &workdir,
            user: &user,
        };
        let pid = workload::spawn(&spec, child_stdio)
            .map_err(|err| (err.to_string(), i32::from(err.code)))?;
        relay.add_session(request.stream, streams);
        self.pids.insert(pid, request.stream);
        Ok(())
    }
}

/// Unlike the workload's, an exec's working directory is not created (runc's
/// `chdir to cwd` failure, Docker's 126).
fn check_workdir(dir: &Path) -> Result<(), String> {
    if dir.is_dir() {
        Ok(())
    } else {
        Err(format!(
            "chdir to cwd ({:?}) set in config.json failed: no such file or directory",
            dir.display().to_string()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pid1::relay::WORKLOAD;
    use crate::pid1::session::Streams;
    use guest_init::channel::{encode, Decoder, Frame, Message};
    use nix::fcntl::OFlag;
    use nix::poll::PollTimeout;
    use nix::unistd::pipe2;
    use std::io::{Read, Write};
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    fn pipe() -> (OwnedFd, OwnedFd) {
        pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).expect("pipe")
    }

    /// A relay whose workload is idle, the host's end of its channel, the exec sessions
    /// (inheriting `PATH`, `FROM_RUN` and the temp dir), and a stand-in signalfd.
    struct Rig {
        relay: Relay,
        execs: Execs,
        host: UnixStream,
        _workload: (OwnedFd, OwnedFd),
        idle: (OwnedFd, OwnedFd),
        frames: Vec<Frame>,
        decoder: Decoder,
    }

    fn rig() -> Rig {
        let (host, guest) = UnixStream::pair().expect("socketpair");
        guest.set_nonblocking(true).expect("nonblocking");
        host.set_read_timeout(Some(Duration::from_millis(5)))
            .expect("timeout");
        let (out_r, out_w) = pipe();
        let streams = Streams {
            stdout: out_r,
            stderr: None,
            stdin: None,
            tty: false,
        };
        let container = Container {
            env: vec![
                "PATH=/usr/bin:/bin".into(),
                "FROM_RUN=run".into(),
                "OVERRIDDEN=run".into(),
            ],
            hostname: "box".into(),
            user: String::new(),
            workdir: std::env::temp_dir(),
        };
        Rig {
            relay: Relay::new(OwnedFd::from(guest), streams),
            execs: Execs::new(container),
            host,
            _workload: (out_w, pipe().0),
            idle: pipe(),
            frames: Vec::new(),
            decoder: Decoder::new(),
        }
    }

    impl Rig {
        fn send(&mut self, stream: u32, message: Message) {
            let mut bytes = Vec::new();
            encode(stream, &message, &mut bytes);
            self.host.write_all(&bytes).expect("host write");
        }

        fn exec(&mut self, stream: u32, config: &ExecConfig) {
            let json = serde_json::to_vec(config).expect("json");
            self.send(stream, Message::Exec(json));
        }

        /// One turn of init's loop: relay, start sessions, deliver signals, reap.
        fn turn(&mut self) {
            self.relay
                .turn(self.idle.0.as_fd(), PollTimeout::from(5u8))
                .expect("turn");
            self.execs.start_requested(&mut self.relay);
            for (stream, number) in self.relay.take_signals() {
                assert_ne!(stream, WORKLOAD);
                self.execs.signal(stream, number);
            }
            loop {
                match nix::sys::wait::waitpid(None, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
                    Ok(nix::sys::wait::WaitStatus::StillAlive) | Err(_) => break,
                    Ok(ended) => {
                        let pid = ended.pid().expect("a pid");
                        let status = crate::pid1::signals::exit_code(ended).expect("ended");
                        self.execs.reaped(&mut self.relay, pid, status);
                    }
                }
            }
            let mut buf = [0u8; 4096];
            while let Ok(n) = self.host.read(&mut buf) {
                if n == 0 {
                    break;
                }
                self.decoder.feed(&buf[..n]);
            }
            while let Some(frame) = self.decoder.next_frame().expect("valid frames") {
                self.frames.push(frame);
            }
        }

        /// Turns until `stream` got its Exited frame; returns (stdout, stderr, status).
        fn wait(&mut self, stream: u32) -> (String, String, i32) {
            let started = Instant::now();
            loop {
                let exited = self.frames.iter().find_map(|f| match f.message {
                    Message::Exited(status) if f.stream == stream => Some(status),
                    _ => None,
                });
                if let Some(status) = exited {
                    let text = |stderr: bool| {
                        let bytes: Vec<u8> = self
                            .frames
                            .iter()
                            .filter(|f| f.stream == stream)
                            .filter_map(|f| match (&f.message, stderr) {
                                (Message::Stdout(d), false) | (Message::Stderr(d), true) => {
                                    Some(d.clone())
                                }
                                _ => None,
                            })
                            .flatten()
                            .collect();
                        String::from_utf8(bytes).expect("utf-8")
                    };
                    let last = self.frames.iter().rposition(|f| f.stream == stream);
                    let exited_at = self.frames.iter().rposition(|f| {
                        f.stream == stream && matches!(f.message, Message::Exited(_))
                    });
                    assert_eq!(last, exited_at, "Exited is the stream's last frame");
                    return (text(false), text(true), status);
                }
                assert!(started.elapsed() < Duration::from_secs(20), "no Exited");
                self.turn();
            }
        }
    }

    fn command(args: &[&str]) -> ExecConfig {
        ExecConfig {
            args: args.iter().map(|a| a.to_string()).collect(),
            ..ExecConfig::default()
        }
    }

    #[test]
    fn sessions_run_with_the_workloads_env_and_their_own_overrides() {
        let _children = crate::pid1::CHILDREN.lock();
        let mut rig = rig();
        let mut config = command(&[
            "sh",
            "-c",
            "echo \"$FROM_RUN $OVERRIDDEN $EXTRA $HOSTNAME\" \"$(pwd)\"; echo oops >&2; exit 3",
        ]);
        config.env = vec!["OVERRIDDEN=exec".into(), "EXTRA=x".into()];
        config.working_dir = "/".into();
        rig.exec(3, &config);
        let (out, err, status) = rig.wait(3);
        assert_eq!(out, "run exec x box /\n");
        assert_eq!(err, "oops\n");
        assert_eq!(status, 3);
        assert_eq!(rig.relay.exec_sessions(), 0);
    }

    #[test]
    fn two_sessions_interleave_and_stdin_and_signals_go_to_their_own_stream() {
        let _children = crate::pid1::CHILDREN.lock();
        let mut rig = rig();
        let mut cat = command(&["cat"]);
        cat.open_stdin = true;
        rig.exec(5, &cat);
        rig.exec(6, &command(&["sleep", "30"]));
        rig.turn();
        assert_eq!(rig.relay.exec_sessions(), 2);
        rig.send(5, Message::Stdin(b"to five".to_vec()));
        rig.send(5, Message::StdinClosed);
        rig.send(6, Message::Signal(libc::SIGTERM));
        let (out, _, status) = rig.wait(5);
        assert_eq!((out.as_str(), status), ("to five", 0));
        let (out, _, status) = rig.wait(6);
        assert_eq!((out.as_str(), status), ("", 128 + libc::SIGTERM));
    }

    #[test]
    fn failures_end_the_stream_with_dockers_codes_and_a_message() {
        let _children = crate::pid1::CHILDREN.lock();
        let mut rig = rig();
        rig.exec(1, &command(&["no-such-program"]));
        let (_, err, status) = rig.wait(1);
        assert_eq!(status, 127);
        assert!(err.contains("executable file not found"), "{err}");
        let mut config = command(&["true"]);
        config.user = "nosuchuser".into();
        rig.exec(2, &config);
        let (_, err, status) = rig.wait(2);
        assert_eq!(status, 126);
        assert!(err.contains("unable to find user nosuchuser"), "{err}");
        let mut config = command(&["true"]);
        config.working_dir = "/no/such/dir".into();
        rig.exec(3, &config);
        let (_, err, status) = rig.wait(3);
        assert_eq!(status, 126);
        assert!(err.contains("chdir to cwd"), "{err}");
        rig.send(4, Message::Exec(b"{not json".to_vec()));
        let (_, err, status) = rig.wait(4);
        assert_eq!(status, 126);
        assert!(err.contains("invalid exec config"), "{err}");
        // Stream 0 is the workload's; reusing a live stream is refused too.
        rig.exec(WORKLOAD, &command(&["true"]));
        rig.turn();
        assert_eq!(rig.relay.take_problems().len(), 1);
    }

    #[test]
    fn sessions_beyond_the_cap_are_refused() {
        let _children = crate::pid1::CHILDREN.lock();
        let mut rig = rig();
        for stream in 1..=u32::try_from(MAX_SESSIONS).expect("small") + 1 {
            let mut config = command(&["cat"]);
            config.open_stdin = true;
            rig.exec(stream, &config);
        }
        let extra = u32::try_from(MAX_SESSIONS).expect("small") + 1;
        let (_, err, status) = rig.wait(extra);
        assert_eq!(status, 126);
        assert!(err.contains("too many exec sessions"), "{err}");
        assert_eq!(rig.relay.exec_sessions(), MAX_SESSIONS);
        for stream in 1..extra {
            rig.send(stream, Message::StdinClosed);
        }
        for stream in 1..extra {
            assert_eq!(rig.wait(stream).2, 0);
        }
    }

    #[test]
    fn a_terminal_session_starts_with_the_requested_size() {
        let _children = crate::pid1::CHILDREN.lock();
        let mut rig = rig();
        let mut config = command(&["sh", "-c", "stty size; [ -t 0 ] && echo tty"]);
        config.tty = true;
        config.console_size = Some([33, 101]);
        rig.exec(9, &config);
        let (out, _, status) = rig.wait(9);
        assert_eq!(status, 0);
        assert_eq!(out, "33 101\r\ntty\r\n");
    }
}
