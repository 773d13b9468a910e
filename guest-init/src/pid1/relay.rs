//! The I/O half of init's single poll loop: frames from the host channel become the
//! workload's stdin, signals and terminal sizes; its stdout and stderr (or its terminal)
//! become frames. Both directions are bounded: while the channel cannot take more output,
//! the workload's pipes are not read (it blocks writing), and while its stdin is full, the
//! channel is not read.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use guest_init::channel::{encode, ChannelError, Decoder, Message, HEADER_LEN, MAX_PAYLOAD};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::unistd::{read, write};

/// The run workload's stream on the channel.
const STREAM: u32 = 0;
/// Most output bytes waiting for the channel; reads stop before exceeding it.
const OUTGOING_LIMIT: usize = 4 * (HEADER_LEN + MAX_PAYLOAD);
/// Most stdin bytes waiting for the workload; the channel is not read beyond it.
const INPUT_LIMIT: usize = 256 * 1024;
/// Bytes read from the channel at a time.
const CHANNEL_READ: usize = 16 * 1024;

/// init's ends of the workload's stdio, all non-blocking.
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

/// Something that went wrong on the channel; the relay goes on without that direction.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The host sent a frame that can never be valid; the channel is no longer read.
    #[error("malformed frame from the host, no longer reading the channel")]
    Protocol(#[from] ChannelError),
    /// Reading the channel failed; it is no longer read.
    #[error("cannot read the channel")]
    Read(#[source] Errno),
    /// Writing the channel failed; output is discarded from now on.
    #[error("cannot write the channel, dropping the workload's output")]
    Write(#[source] Errno),
    /// poll(2) itself failed.
    #[error("poll failed")]
    Poll(#[source] Errno),
}

/// What one [`Relay::turn`] saw.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Turn {
    /// The extra descriptor (init's signalfd) is readable.
    pub extra_ready: bool,
    /// Some bytes moved in either direction.
    pub progressed: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    Channel,
    Stdout,
    Stderr,
    Stdin,
    Extra,
}

/// The relay's state between turns.
pub struct Relay {
    channel: OwnedFd,
    reading_channel: bool,
    channel_broken: bool,
    decoder: Decoder,
    outgoing: Vec<u8>,
    sent: usize,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    stdin: Option<OwnedFd>,
    stdin_buf: Vec<u8>,
    stdin_closed: bool,
    tty: bool,
    resized: bool,
    signals: Vec<i32>,
    problems: Vec<RelayError>,
    scratch: Vec<u8>,
}

impl Relay {
    /// A relay between `channel` (the host, non-blocking) and the workload's `streams`.
    pub fn new(channel: OwnedFd, streams: Streams) -> Self {
        Self {
            channel,
            reading_channel: true,
            channel_broken: false,
            decoder: Decoder::new(),
            outgoing: Vec::new(),
            sent: 0,
            stdout: Some(streams.stdout),
            stderr: streams.stderr,
            stdin: streams.stdin,
            stdin_buf: Vec::new(),
            stdin_closed: false,
            tty: streams.tty,
            resized: false,
            signals: Vec::new(),
            problems: Vec::new(),
            scratch: vec![0; MAX_PAYLOAD],
        }
    }

    /// Waits up to `timeout` for ready descriptors (the relay's and `extra`), then does
    /// all the I/O they allow.
    pub fn turn(
        &mut self,
        extra: BorrowedFd<'_>,
        timeout: PollTimeout,
    ) -> Result<Turn, RelayError> {
        let ready = self.poll(extra, timeout)?;
        let mut turn = Turn::default();
        for (slot, revents) in ready {
            let readable =
                revents.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR);
            let writable = revents.intersects(PollFlags::POLLOUT | PollFlags::POLLERR);
            let moved = match slot {
                Slot::Extra => {
                    turn.extra_ready = true;
                    false
                }
                Slot::Channel => {
                    let wrote = writable && self.flush_channel();
                    let read = readable && self.reading_channel && self.read_channel();
                    wrote || read
                }
                Slot::Stdout => self.read_output(false),
                Slot::Stderr => self.read_output(true),
                Slot::Stdin => self.write_stdin(),
            };
            turn.progressed |= moved;
        }
        Ok(turn)
    }

    /// Signals the host asked for since the last call, in order.
    pub fn take_signals(&mut self) -> Vec<i32> {
        std::mem::take(&mut self.signals)
    }

    /// Problems met since the last call, for init to log.
    pub fn take_problems(&mut self) -> Vec<RelayError> {
        std::mem::take(&mut self.problems)
    }

    /// Whether a terminal size has been applied (the host sends one with `-t`).
    pub fn resized(&self) -> bool {
        self.resized
    }

    /// The workload is gone: stop feeding its stdin and stop reading the host.
    pub fn close_input(&mut self) {
        self.stdin = None;
        self.stdin_buf = Vec::new();
        self.reading_channel = false;
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

    /// Whether every output frame has been handed to the channel.
    pub fn flushed(&self) -> bool {
        self.sent == self.outgoing.len()
    }

    /// The channel, for a final drain before init reports.
    pub fn channel(&self) -> BorrowedFd<'_> {
        self.channel.as_fd()
    }

    /// Polls the descriptors that have something to do; returns those that are ready.
    fn poll(
        &self,
        extra: BorrowedFd<'_>,
        timeout: PollTimeout,
    ) -> Result<Vec<(Slot, PollFlags)>, RelayError> {
        let room = self.has_room();
        let mut channel = PollFlags::empty();
        if self.reading_channel && self.stdin_buf.len() < INPUT_LIMIT {
            channel |= PollFlags::POLLIN;
        }
        if !self.flushed() {
            channel |= PollFlags::POLLOUT;
        }
        let candidates = [
            (Slot::Channel, Some(&self.channel), channel),
            (Slot::Stdout, self.stdout.as_ref(), PollFlags::POLLIN),
            (Slot::Stderr, self.stderr.as_ref(), PollFlags::POLLIN),
            (Slot::Stdin, self.stdin.as_ref(), PollFlags::POLLOUT),
        ];
        let mut slots = Vec::with_capacity(5);
        let mut fds = Vec::with_capacity(5);
        for (slot, fd, flags) in candidates {
            let wanted = match slot {
                Slot::Stdout | Slot::Stderr => room,
                Slot::Stdin => !self.stdin_buf.is_empty(),
                Slot::Channel | Slot::Extra => !flags.is_empty(),
            };
            // A descriptor polled for nothing still reports POLLHUP: leave it out.
            if let Some(fd) = fd.filter(|_| wanted) {
                slots.push(slot);
                fds.push(PollFd::new(fd.as_fd(), flags));
            }
        }
        slots.push(Slot::Extra);
        fds.push(PollFd::new(extra, PollFlags::POLLIN));
        loop {
            match poll(&mut fds, timeout) {
                Ok(_) => break,
                Err(Errno::EINTR) => continue,
                Err(err) => return Err(RelayError::Poll(err)),
            }
        }
        Ok(slots
            .into_iter()
            .zip(&fds)
            .filter_map(|(slot, fd)| Some((slot, fd.revents()?)).filter(|(_, r)| !r.is_empty()))
            .collect())
    }

    fn has_room(&self) -> bool {
        self.outgoing.len() - self.sent + HEADER_LEN + MAX_PAYLOAD <= OUTGOING_LIMIT
    }

    /// Reads what the host sent and acts on every whole frame.
    fn read_channel(&mut self) -> bool {
        let mut buf = [0u8; CHANNEL_READ];
        let n = match read(&self.channel, &mut buf) {
            Ok(0) => {
                self.reading_channel = false;
                return false;
            }
            Ok(n) => n,
            Err(Errno::EAGAIN | Errno::EINTR) => return false,
            Err(err) => {
                self.reading_channel = false;
                self.problems.push(RelayError::Read(err));
                return false;
            }
        };
        self.decoder.feed(&buf[..n]);
        loop {
            match self.decoder.next_frame() {
                Ok(Some(frame)) if frame.stream == STREAM => self.handle(frame.message),
                // Other streams belong to exec sessions, which this init does not run.
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(err) => {
                    self.reading_channel = false;
                    self.decoder = Decoder::new();
                    self.problems.push(RelayError::Protocol(err));
                    break;
                }
            }
        }
        true
    }

    fn handle(&mut self, message: Message) {
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
            Message::Signal(number) => self.signals.push(number),
            Message::Resize { rows, cols } => {
                if let Some(master) = self.stdin.as_ref().filter(|_| self.tty) {
                    self.resized |= set_window_size(master.as_fd(), rows, cols).is_ok();
                }
            }
            // These only travel from the guest to the host.
            Message::Stdout(_) | Message::Stderr(_) | Message::Ready | Message::Exited(_) => {}
            // Exec sessions are not run by this init yet.
            Message::Exec(_) => {}
        }
    }

    /// After the host's end of file, a pipe is closed once written out, so the workload
    /// sees end of file. A terminal stays open (it is also the output; Docker's shim
    /// likewise only stops copying input).
    fn close_stdin_if_done(&mut self) {
        if self.stdin_closed && self.stdin_buf.is_empty() && !self.tty {
            self.stdin = None;
        }
    }

    fn write_stdin(&mut self) -> bool {
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
            // EPIPE: the workload closed its stdin; what is left can never be delivered.
            Err(_) => {
                self.stdin = None;
                self.stdin_buf = Vec::new();
                false
            }
        }
    }

    /// Reads one chunk of the workload's output into a frame.
    fn read_output(&mut self, stderr: bool) -> bool {
        let source = if stderr {
            &mut self.stderr
        } else {
            &mut self.stdout
        };
        let Some(fd) = source.as_ref() else {
            return false;
        };
        let n = match read(fd, &mut self.scratch) {
            Ok(n) if n > 0 => n,
            Err(Errno::EAGAIN | Errno::EINTR) => return false,
            // 0 is end of file; a terminal master reports EIO once no slave is open.
            _ => {
                *source = None;
                return false;
            }
        };
        if self.channel_broken {
            return true;
        }
        if self.sent > 0 {
            self.outgoing.drain(..self.sent);
            self.sent = 0;
        }
        let data = self.scratch[..n].to_vec();
        let message = if stderr {
            Message::Stderr(data)
        } else {
            Message::Stdout(data)
        };
        encode(STREAM, &message, &mut self.outgoing);
        true
    }

    /// Writes as much pending output to the channel as it takes.
    fn flush_channel(&mut self) -> bool {
        let mut moved = false;
        while self.sent < self.outgoing.len() {
            match write(&self.channel, &self.outgoing[self.sent..]) {
                Ok(n) if n > 0 => {
                    self.sent += n;
                    moved = true;
                }
                Ok(_) | Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => {}
                Err(err) => {
                    self.channel_broken = true;
                    self.outgoing = Vec::new();
                    self.sent = 0;
                    self.problems.push(RelayError::Write(err));
                    break;
                }
            }
        }
        if self.sent == self.outgoing.len() {
            self.outgoing.clear();
            self.sent = 0;
        }
        moved
    }
}

/// TIOCSWINSZ on the terminal master; the kernel sends SIGWINCH to the foreground group.
fn set_window_size(master: BorrowedFd<'_>, rows: u16, cols: u16) -> nix::Result<()> {
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
    use guest_init::channel::Frame;
    use nix::fcntl::OFlag;
    use nix::unistd::pipe2;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    /// A relay wired to test ends: the host's side of the channel, the workload's ends of
    /// its pipes, and an idle stand-in for the signalfd.
    struct Rig {
        relay: Relay,
        host: UnixStream,
        stdout: Option<OwnedFd>,
        stderr: Option<OwnedFd>,
        stdin: OwnedFd,
        idle: (OwnedFd, OwnedFd),
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).expect("pipe")
    }

    fn rig() -> Rig {
        let (host, guest) = UnixStream::pair().expect("socketpair");
        guest.set_nonblocking(true).expect("nonblocking");
        let (out_r, out_w) = pipe();
        let (err_r, err_w) = pipe();
        let (in_r, in_w) = pipe();
        let streams = Streams {
            stdout: out_r,
            stderr: Some(err_r),
            stdin: Some(in_w),
            tty: false,
        };
        Rig {
            relay: Relay::new(OwnedFd::from(guest), streams),
            host,
            stdout: Some(out_w),
            stderr: Some(err_w),
            stdin: in_r,
            idle: pipe(),
        }
    }

    impl Rig {
        fn turn(&mut self) -> Turn {
            self.relay
                .turn(self.idle.0.as_fd(), PollTimeout::from(1u8))
                .expect("turn")
        }

        fn send(&mut self, message: Message) {
            let mut bytes = Vec::new();
            encode(STREAM, &message, &mut bytes);
            self.host.write_all(&bytes).expect("host write");
        }

        /// Turns until the outputs reached end of file and everything was sent, then
        /// returns what the host received, decoded.
        fn finish(&mut self) -> Vec<Frame> {
            self.stdout = None;
            self.stderr = None;
            for _ in 0..1000 {
                if !self.relay.outputs_open() && self.relay.flushed() {
                    break;
                }
                self.turn();
            }
            assert!(!self.relay.outputs_open() && self.relay.flushed());
            self.host.set_nonblocking(true).expect("nonblocking");
            let mut bytes = Vec::new();
            let _ = self.host.read_to_end(&mut bytes);
            decode(&bytes)
        }
    }

    fn decode(bytes: &[u8]) -> Vec<Frame> {
        let mut decoder = Decoder::new();
        decoder.feed(bytes);
        let mut frames = Vec::new();
        while let Some(frame) = decoder.next_frame().expect("valid frames") {
            frames.push(frame);
        }
        assert_eq!(decoder.pending(), 0, "a partial frame was sent");
        frames
    }

    fn joined(frames: &[Frame], stderr: bool) -> Vec<u8> {
        frames
            .iter()
            .filter_map(|frame| match (&frame.message, stderr) {
                (Message::Stdout(data), false) | (Message::Stderr(data), true) => {
                    Some(data.as_slice())
                }
                _ => None,
            })
            .flatten()
            .copied()
            .collect()
    }

    fn put(fd: &Option<OwnedFd>, bytes: &[u8]) {
        let fd = fd.as_ref().expect("open");
        assert_eq!(write(fd, bytes), Ok(bytes.len()));
    }

    #[test]
    fn stdout_and_stderr_become_separate_frames_each_in_order() {
        let mut rig = rig();
        put(&rig.stdout, b"one ");
        rig.turn();
        put(&rig.stderr, b"err1 ");
        put(&rig.stdout, b"two");
        rig.turn();
        put(&rig.stderr, b"err2");
        let frames = rig.finish();
        assert!(frames.iter().all(|f| f.stream == 0));
        assert_eq!(joined(&frames, false), b"one two");
        assert_eq!(joined(&frames, true), b"err1 err2");
    }

    #[test]
    fn a_slow_host_stalls_the_workload_instead_of_growing_memory() {
        let mut rig = rig();
        let data: Vec<u8> = (0..4 * 1024 * 1024).map(|i: u32| (i % 251) as u8).collect();
        // The workload writes everything (blocking) from a thread while the host reads
        // nothing at first.
        let writer = rig.stdout.take().expect("stdout");
        let payload = data.clone();
        let workload = std::thread::spawn(move || {
            let mut file = std::fs::File::from(writer);
            let flags = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GETFL).expect("flags");
            let blocking = OFlag::from_bits_truncate(flags) - OFlag::O_NONBLOCK;
            nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_SETFL(blocking)).expect("blocking");
            file.write_all(&payload).expect("workload write");
        });
        for _ in 0..200 {
            rig.turn();
            assert!(rig.relay.outgoing.len() - rig.relay.sent <= OUTGOING_LIMIT);
            assert!(rig.relay.outgoing.capacity() <= 2 * OUTGOING_LIMIT);
        }
        assert!(
            !workload.is_finished(),
            "the workload should be blocked on its pipe"
        );

        // Now the host reads; everything arrives intact.
        let mut host = rig.host.try_clone().expect("clone");
        let reader = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            host.read_to_end(&mut bytes).expect("host read");
            bytes
        });
        for _ in 0..100_000 {
            if workload.is_finished() {
                break;
            }
            rig.turn();
        }
        workload.join().expect("workload thread");
        rig.stderr = None;
        for _ in 0..10_000 {
            if !rig.relay.outputs_open() && rig.relay.flushed() {
                break;
            }
            rig.turn();
        }
        drop(rig);
        let frames = decode(&reader.join().expect("reader thread"));
        assert!(frames.iter().all(|f| match &f.message {
            Message::Stdout(d) => d.len() <= MAX_PAYLOAD,
            _ => false,
        }));
        assert_eq!(joined(&frames, false), data);
    }

    #[test]
    fn stdin_frames_reach_the_workload_and_end_of_file_closes_it() {
        let mut rig = rig();
        rig.send(Message::Stdin(b"hello ".to_vec()));
        rig.send(Message::Stdin(b"world".to_vec()));
        rig.send(Message::StdinClosed);
        for _ in 0..10 {
            rig.turn();
        }
        let mut received = Vec::new();
        let mut reader = std::fs::File::from(rig.stdin.try_clone().expect("dup"));
        reader
            .read_to_end(&mut received)
            .expect("end of file, not EAGAIN");
        assert_eq!(received, b"hello world");
        assert!(rig.relay.stdin.is_none());
    }

    #[test]
    fn stdin_stops_being_read_from_the_host_when_the_workload_does_not_read() {
        let mut rig = rig();
        let chunk = vec![b'x'; 32 * 1024];
        let mut host = rig.host.try_clone().expect("clone");
        host.set_nonblocking(true).expect("nonblocking");
        let mut frame = Vec::new();
        encode(STREAM, &Message::Stdin(chunk), &mut frame);
        for _ in 0..500 {
            // The host keeps sending as long as its socket takes it.
            let _ = host.write(&frame);
            rig.turn();
            let bound = INPUT_LIMIT + CHANNEL_READ + HEADER_LEN + MAX_PAYLOAD;
            assert!(rig.relay.stdin_buf.len() <= bound);
        }
        assert!(rig.relay.stdin_buf.len() >= INPUT_LIMIT - 64 * 1024);
    }

    #[test]
    fn signals_are_queued_for_init_in_order() {
        let mut rig = rig();
        rig.send(Message::Signal(15));
        rig.send(Message::Signal(2));
        rig.turn();
        assert_eq!(rig.relay.take_signals(), vec![15, 2]);
        assert!(rig.relay.take_signals().is_empty());
    }

    #[test]
    fn a_malformed_frame_stops_reading_the_host_but_not_the_output() {
        let mut rig = rig();
        rig.host
            .write_all(&[99, 0, 0, 0, 0, 0, 0, 0, 0])
            .expect("garbage");
        rig.send(Message::Stdin(b"after".to_vec()));
        rig.turn();
        let problems = rig.relay.take_problems();
        assert!(matches!(problems.as_slice(), [RelayError::Protocol(_)]));
        rig.turn();
        assert!(rig.relay.stdin_buf.is_empty());
        assert_eq!(read(&rig.stdin, &mut [0u8; 8]), Err(Errno::EAGAIN));
        put(&rig.stdout, b"still relayed");
        assert_eq!(joined(&rig.finish(), false), b"still relayed");
    }

    #[test]
    fn terminal_resizes_apply_to_the_pty_and_output_ends_with_the_slave() {
        let (host, guest) = UnixStream::pair().expect("socketpair");
        guest.set_nonblocking(true).expect("nonblocking");
        let pty = nix::pty::openpty(None, None).expect("openpty");
        let master = pty.master;
        let flags = nix::fcntl::fcntl(&master, nix::fcntl::FcntlArg::F_GETFL).expect("flags");
        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&master, nix::fcntl::FcntlArg::F_SETFL(flags)).expect("nonblock");
        let streams = Streams {
            stdin: Some(master.try_clone().expect("dup")),
            stdout: master,
            stderr: None,
            tty: true,
        };
        let mut relay = Relay::new(OwnedFd::from(guest), streams);
        let mut host = host;
        let mut bytes = Vec::new();
        encode(
            STREAM,
            &Message::Resize {
                rows: 33,
                cols: 101,
            },
            &mut bytes,
        );
        encode(STREAM, &Message::StdinClosed, &mut bytes);
        host.write_all(&bytes).expect("host write");
        let (idle, _keep) = pipe();
        let timeout = PollTimeout::from(10u16);
        for _ in 0..100 {
            if relay.resized() {
                break;
            }
            relay.turn(idle.as_fd(), timeout).expect("turn");
        }
        assert!(relay.resized());
        let mut size = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one winsize through the valid pointer.
        let rc = unsafe { libc::ioctl(pty.slave.as_raw_fd(), libc::TIOCGWINSZ, &mut size) };
        assert_eq!(rc, 0);
        assert_eq!((size.ws_row, size.ws_col), (33, 101));
        // End of input leaves the terminal open; the slave's output still arrives.
        assert!(relay.stdin.is_some());
        assert_eq!(write(&pty.slave, b"tty output"), Ok(10));
        drop(pty.slave);
        for _ in 0..100 {
            if !relay.outputs_open() && relay.flushed() {
                break;
            }
            relay.turn(idle.as_fd(), timeout).expect("turn");
        }
        assert!(
            !relay.outputs_open(),
            "EIO after the slave closed is end of file"
        );
        host.set_nonblocking(true).expect("nonblocking");
        let mut received = Vec::new();
        let _ = host.read_to_end(&mut received);
        // The line discipline turns \n into \r\n, but there is none here.
        assert_eq!(joined(&decode(&received), false), b"tty output");
    }
}
