//! One process's stdio on the channel (the run workload on stream 0, or an exec session):
//! its output pipes or terminal master, its stdin with a bounded buffer, the terminal size,
//! and, for an exec session, its exit status waiting for the output to drain.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use guest_init::channel::Message;
use nix::errno::Errno;
use nix::unistd::{read, write};

/// Most stdin bytes waiting for one process; the channel is not read beyond it.
pub const INPUT_LIMIT: usize = 256 * 1024;

/// After an exec process ended, how long its output may stay silent before the session
/// ends anyway (a background child of it can keep the pipes open forever).
const LINGER: Duration = Duration::from_secs(2);

/// init's ends of a process's stdio, all non-blocking.
pub struct Streams {
    /// The stdout pipe's read end, or the terminal master.
    pub stdout: OwnedFd,
    /// The stderr pipe's read end; none with a terminal (it shares the terminal).
    pub stderr: Option<OwnedFd>,
    /// The stdin pipe's write end, or a duplicate of the terminal master.
    pub stdin: Option<OwnedFd>,
    /// Whether `stdin` is a terminal master (resizes apply to it; it is never closed).
    pub tty: bool,
}

/// What reading one output stream gave.
pub enum Output {
    /// This many bytes, at the start of the scratch buffer.
    Data(usize),
    /// Nothing now (or the stream just reached end of file).
    Nothing,
}

/// The relay state of one process.
pub struct Session {
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    stdin: Option<OwnedFd>,
    stdin_buf: Vec<u8>,
    stdin_closed: bool,
    tty: bool,
    resized: bool,
    exit: Option<(i32, Instant)>,
}

impl Session {
    /// A session relaying `streams`.
    pub fn new(streams: Streams) -> Self {
        Self {
            stdout: Some(streams.stdout),
            stderr: streams.stderr,
            stdin: streams.stdin,
            stdin_buf: Vec::new(),
            stdin_closed: false,
            tty: streams.tty,
            resized: false,
            exit: None,
        }
    }

    /// Applies a host-to-guest message; returns the signal number of a Signal frame.
    pub fn handle(&mut self, message: Message) -> Option<i32> {
        match message {
            Message::Stdin(data) => {
                if self.stdin.is_some() && !self.stdin_closed {
                    self.stdin_buf.extend_from_slice(&data);
                }
            }
            Message::StdinClosed => {
                self.stdin_closed = true;
                self.close_stdin_if_done();
            }
            Message::Signal(number) => return Some(number),
            Message::Resize { rows, cols } => {
                if let Some(master) = self.stdin.as_ref().filter(|_| self.tty) {
                    self.resized |= set_window_size(master.as_fd(), rows, cols).is_ok();
                }
            }
            // The relay handles Exec; the rest only travel from the guest to the host.
            Message::Exec(_)
            | Message::Stdout(_)
            | Message::Stderr(_)
            | Message::Ready
            | Message::Exited(_) => {}
        }
        None
    }

    /// Whether a terminal size has been applied.
    pub fn resized(&self) -> bool {
        self.resized
    }

    /// The descriptors to poll: stdout, stderr (for reading, when `room`) and stdin (for
    /// writing, when input is waiting), each with its [`Stream`] tag.
    pub fn pollable(&self, room: bool) -> impl Iterator<Item = (Stream, BorrowedFd<'_>)> {
        let outputs = [
            (Stream::Stdout, self.stdout.as_ref()),
            (Stream::Stderr, self.stderr.as_ref()),
        ];
        let input = (Stream::Stdin, self.stdin.as_ref());
        outputs
            .into_iter()
            .filter(move |_| room)
            .chain(std::iter::once(input).filter(|_| !self.stdin_buf.is_empty()))
            .filter_map(|(stream, fd)| Some((stream, fd?.as_fd())))
    }

    /// Whether this session's stdin buffer is full (the channel must not be read).
    pub fn input_full(&self) -> bool {
        self.stdin_buf.len() >= INPUT_LIMIT
    }

    /// The process is gone or the VM ends: stop feeding its stdin.
    pub fn close_input(&mut self) {
        self.stdin = None;
        self.stdin_buf = Vec::new();
    }

    /// Whether some output stream has not reached end of file yet.
    pub fn outputs_open(&self) -> bool {
        self.stdout.is_some() || self.stderr.is_some()
    }

    /// Gives up on output streams that never reach end of file.
    pub fn abandon_outputs(&mut self) {
        self.stdout = None;
        self.stderr = None;
    }

    /// Records the exec process's Docker status; the session ends once its output drained.
    pub fn exited(&mut self, status: i32) {
        self.exit = Some((status, Instant::now()));
        self.close_input();
    }

    /// The exit status once the session is over: the process ended and its output reached
    /// end of file, or is still open [`LINGER`] after the end.
    pub fn finished(&mut self, now: Instant) -> Option<i32> {
        let (status, since) = self.exit?;
        if self.outputs_open() && now < since + LINGER {
            return None;
        }
        self.abandon_outputs();
        Some(status)
    }

    /// When [`finished`](Self::finished) should be asked again, for the poll timeout.
    pub fn deadline(&self) -> Option<Instant> {
        self.exit.map(|(_, since)| since + LINGER)
    }

    /// Stdin bytes waiting for the process.
    #[cfg(test)]
    pub fn pending_input(&self) -> usize {
        self.stdin_buf.len()
    }

    /// Whether init still holds the process's stdin.
    #[cfg(test)]
    pub fn has_stdin(&self) -> bool {
        self.stdin.is_some()
    }

    /// After the host's end of file, a pipe is closed once written out, so the process
    /// sees end of file. A terminal stays open (it is also the output; Docker's shim
    /// likewise only stops copying input).
    fn close_stdin_if_done(&mut self) {
        if self.stdin_closed && self.stdin_buf.is_empty() && !self.tty {
            self.stdin = None;
        }
    }

    /// Writes waiting input to the process's stdin; true when bytes moved.
    pub fn write_stdin(&mut self) -> bool {
        let Some(fd) = self.stdin.as_ref() else {
            return false;
        };
        match write(fd, &self.stdin_buf) {
            Ok(n) => {
                self.stdin_buf.drain(..n);
                self.close_stdin_if_done();
                n > 0
            }
            Err(Errno::EAGAIN | Errno::EINTR) => false,
            // EPIPE: the process closed its stdin; what is left can never be delivered.
            Err(_) => {
                self.stdin = None;
                self.stdin_buf = Vec::new();
                false
            }
        }
    }

    /// Reads one chunk of stdout or stderr into `scratch`.
    pub fn read_output(&mut self, stderr: bool, scratch: &mut [u8]) -> Output {
        let source = if stderr {
            &mut self.stderr
        } else {
            &mut self.stdout
        };
        let Some(fd) = source.as_ref() else {
            return Output::Nothing;
        };
        match read(fd, scratch) {
            Ok(n) if n > 0 => Output::Data(n),
            Err(Errno::EAGAIN | Errno::EINTR) => Output::Nothing,
            // 0 is end of file; a terminal master reports EIO once no slave is open.
            _ => {
                *source = None;
                Output::Nothing
            }
        }
    }
}

/// Which of a session's descriptors a poll slot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The stdout pipe or terminal master, read.
    Stdout,
    /// The stderr pipe, read.
    Stderr,
    /// The stdin pipe or terminal master, written.
    Stdin,
}

/// TIOCSWINSZ on the terminal master; the kernel sends SIGWINCH to the foreground group.
pub fn set_window_size(master: BorrowedFd<'_>, rows: u16, cols: u16) -> nix::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` through the pointer, which is valid for the
    // call; `master` is an open terminal descriptor.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    Errno::result(rc).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::fcntl::OFlag;
    use nix::unistd::pipe2;

    fn pipe() -> (OwnedFd, OwnedFd) {
        pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).expect("pipe")
    }

    #[test]
    fn an_exec_session_ends_when_its_output_drained_or_after_lingering() {
        let (out_r, out_w) = pipe();
        let mut session = Session::new(Streams {
            stdout: out_r,
            stderr: None,
            stdin: None,
            tty: false,
        });
        let now = Instant::now();
        assert_eq!(session.finished(now), None, "still running");
        session.exited(3);
        assert_eq!(session.finished(Instant::now()), None, "output still open");
        let deadline = session.deadline().expect("a deadline once exited");
        assert_eq!(session.finished(deadline), Some(3), "lingered long enough");
        assert!(!session.outputs_open());
        drop(out_w);

        let (out_r, out_w) = pipe();
        let mut session = Session::new(Streams {
            stdout: out_r,
            stderr: None,
            stdin: None,
            tty: false,
        });
        session.exited(0);
        drop(out_w);
        let mut scratch = [0u8; 16];
        assert!(matches!(
            session.read_output(false, &mut scratch),
            Output::Nothing
        ));
        assert_eq!(session.finished(Instant::now()), Some(0), "end of file");
    }

    #[test]
    fn input_is_dropped_once_closed_and_signals_are_returned() {
        let (in_r, in_w) = pipe();
        let mut session = Session::new(Streams {
            stdout: pipe().0,
            stderr: None,
            stdin: Some(in_w),
            tty: false,
        });
        assert_eq!(session.handle(Message::Signal(2)), Some(2));
        assert_eq!(session.handle(Message::Stdin(b"abc".to_vec())), None);
        assert_eq!(session.pollable(false).count(), 1, "stdin is waiting");
        assert!(session.write_stdin());
        session.handle(Message::StdinClosed);
        assert_eq!(session.pollable(true).count(), 1, "only stdout is left");
        session.handle(Message::Stdin(b"late".to_vec()));
        assert!(!session.write_stdin());
        let mut buf = [0u8; 8];
        assert_eq!(read(&in_r, &mut buf), Ok(3), "abc, then end of file");
        assert_eq!(read(&in_r, &mut buf), Ok(0));
    }
}
