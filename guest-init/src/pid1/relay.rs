//! The channel multiplexer of init's single poll loop: frames from the host become stdin,
//! signals and terminal sizes of the session their stream names (the workload on stream
//! 0, exec sessions on others) or exec requests; every session's output becomes frames.
//! Both directions are bounded: while the channel cannot take more output, no session's
//! pipes are read (the process blocks writing), and while a stdin is full, the channel
//! is not read. Output is written as whole frames of up to [`MAX_PAYLOAD`] bytes, several
//! at once when more is pending, so the channel sees few, large writes.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Instant;

use guest_init::channel::{
    encode, output_header, ChannelError, Decoder, Message, HEADER_LEN, MAX_PAYLOAD,
};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::unistd::{read, write};

use super::session::{Output, Session, Stream, Streams};

/// The run workload's stream on the channel.
pub const WORKLOAD: u32 = 0;
/// Most output bytes waiting for the channel; reads stop before exceeding it.
const OUTGOING_LIMIT: usize = 4 * (HEADER_LEN + MAX_PAYLOAD);
/// Bytes read from the channel at a time.
const CHANNEL_READ: usize = 16 * 1024;

/// Something that went wrong on the channel; the relay goes on without that direction.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The host sent a frame that can never be valid; the channel is no longer read.
    #[error("malformed frame from the host, no longer reading the channel")]
    Protocol(#[from] ChannelError),
    /// The host asked for an exec session on a stream that is taken (or the workload's).
    #[error("exec request on stream {0}, which is in use")]
    StreamInUse(u32),
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
    Session(u32, Stream),
    Extra,
}

/// An `Exec` frame waiting for init to start its session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    /// The stream the host chose for the session.
    pub stream: u32,
    /// The JSON `ExecConfig`.
    pub config: Vec<u8>,
}

/// The relay's state between turns.
pub struct Relay {
    channel: OwnedFd,
    reading_channel: bool,
    channel_broken: bool,
    decoder: Decoder,
    outgoing: Vec<u8>,
    sent: usize,
    sessions: BTreeMap<u32, Session>,
    requests: Vec<ExecRequest>,
    signals: Vec<(u32, i32)>,
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
            sessions: BTreeMap::from([(WORKLOAD, Session::new(streams))]),
            requests: Vec::new(),
            signals: Vec::new(),
            problems: Vec::new(),
            scratch: vec![0; MAX_PAYLOAD],
        }
    }

    /// Waits up to `timeout` (shortened to the next exec session's drain deadline) for
    /// ready descriptors (the relay's and `extra`), then does all the I/O they allow.
    pub fn turn(
        &mut self,
        extra: BorrowedFd<'_>,
        timeout: PollTimeout,
    ) -> Result<Turn, RelayError> {
        let ready = self.poll(extra, self.bounded(timeout))?;
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
                Slot::Session(stream, Stream::Stdout) => self.read_output(stream, false),
                Slot::Session(stream, Stream::Stderr) => self.read_output(stream, true),
                Slot::Session(stream, Stream::Stdin) => self
                    .sessions
                    .get_mut(&stream)
                    .is_some_and(Session::write_stdin),
            };
            turn.progressed |= moved;
        }
        self.end_finished_sessions();
        // What this turn queued goes out now, not after another poll: the channel can
        // usually take it (a generic port queues up to 32 KiB per write for the host
        // without waiting), so each chunk read costs one poll instead of two.
        if !self.flushed() {
            turn.progressed |= self.flush_channel();
        }
        Ok(turn)
    }

    /// Signals the host asked for since the last call, as (stream, number), in order.
    pub fn take_signals(&mut self) -> Vec<(u32, i32)> {
        std::mem::take(&mut self.signals)
    }

    /// Exec sessions the host asked for since the last call, in order.
    pub fn take_exec_requests(&mut self) -> Vec<ExecRequest> {
        std::mem::take(&mut self.requests)
    }

    /// Problems met since the last call, for init to log.
    pub fn take_problems(&mut self) -> Vec<RelayError> {
        std::mem::take(&mut self.problems)
    }

    /// Whether the workload's terminal size has been applied (the host sends one with `-t`).
    pub fn resized(&self) -> bool {
        self.sessions.get(&WORKLOAD).is_some_and(Session::resized)
    }

    /// Starts relaying an exec session's `streams` on `stream`.
    pub fn add_session(&mut self, stream: u32, streams: Streams) {
        self.sessions.insert(stream, Session::new(streams));
    }

    /// Exec sessions still relayed (their process running or their output draining).
    pub fn exec_sessions(&self) -> usize {
        self.sessions.keys().filter(|&&s| s != WORKLOAD).count()
    }

    /// Ends a session that could not start: `message` on its stderr, then `status`.
    pub fn refuse(&mut self, stream: u32, message: &str, status: i32) {
        self.queue(stream, Message::Stderr(format!("{message}\n").into_bytes()));
        self.queue(stream, Message::Exited(status));
    }

    /// The exec session's process ended with Docker's `status`: the host gets it once the
    /// session's output is relayed.
    pub fn exited(&mut self, stream: u32, status: i32) {
        if let Some(session) = self
            .sessions
            .get_mut(&stream)
            .filter(|_| stream != WORKLOAD)
        {
            session.exited(status);
        }
        self.end_finished_sessions();
    }

    /// The workload is gone: stop feeding every stdin and stop reading the host.
    pub fn close_input(&mut self) {
        self.sessions.values_mut().for_each(Session::close_input);
        self.reading_channel = false;
    }

    /// Whether some output stream has not reached end of file yet.
    pub fn outputs_open(&self) -> bool {
        self.sessions.values().any(Session::outputs_open)
    }

    /// Gives up on output streams that never reach end of file.
    pub fn abandon_outputs(&mut self) {
        self.sessions
            .values_mut()
            .for_each(Session::abandon_outputs);
    }

    /// Whether every output frame has been handed to the channel.
    pub fn flushed(&self) -> bool {
        self.sent == self.outgoing.len()
    }

    /// The channel, for a final drain before init reports.
    pub fn channel(&self) -> BorrowedFd<'_> {
        self.channel.as_fd()
    }

    /// `timeout`, or less when an exec session's drain deadline comes first.
    fn bounded(&self, timeout: PollTimeout) -> PollTimeout {
        let Some(deadline) = self.sessions.values().filter_map(Session::deadline).min() else {
            return timeout;
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let millis = left.as_millis().saturating_add(1);
        let until = PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX);
        if timeout == PollTimeout::NONE {
            until
        } else {
            timeout.min(until)
        }
    }

    /// Sends Exited for every exec session whose process ended and whose output drained.
    fn end_finished_sessions(&mut self) {
        let now = Instant::now();
        let finished: Vec<(u32, i32)> = self
            .sessions
            .iter_mut()
            .filter(|(&stream, _)| stream != WORKLOAD)
            .filter_map(|(&stream, session)| Some((stream, session.finished(now)?)))
            .collect();
        for (stream, status) in finished {
            self.sessions.remove(&stream);
            self.queue(stream, Message::Exited(status));
        }
    }

    /// Polls the descriptors that have something to do; returns those that are ready.
    fn poll(
        &self,
        extra: BorrowedFd<'_>,
        timeout: PollTimeout,
    ) -> Result<Vec<(Slot, PollFlags)>, RelayError> {
        let room = self.has_room();
        let mut channel = PollFlags::empty();
        let input_full = self.sessions.values().any(Session::input_full);
        if self.reading_channel && !input_full {
            channel |= PollFlags::POLLIN;
        }
        if !self.flushed() {
            channel |= PollFlags::POLLOUT;
        }
        let mut slots = Vec::new();
        let mut fds = Vec::new();
        // A descriptor polled for nothing still reports POLLHUP: leave it out.
        if !channel.is_empty() {
            slots.push(Slot::Channel);
            fds.push(PollFd::new(self.channel.as_fd(), channel));
        }
        for (&stream, session) in &self.sessions {
            for (which, fd) in session.pollable(room) {
                let flags = match which {
                    Stream::Stdin => PollFlags::POLLOUT,
                    Stream::Stdout | Stream::Stderr => PollFlags::POLLIN,
                };
                slots.push(Slot::Session(stream, which));
                fds.push(PollFd::new(fd, flags));
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
                Ok(Some(frame)) => self.dispatch(frame.stream, frame.message),
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

    /// Hands a host frame to its session. Frames for a stream with no session are dropped:
    /// the session may have ended while the host was still sending.
    fn dispatch(&mut self, stream: u32, message: Message) {
        if let Message::Exec(config) = message {
            let taken = self.sessions.contains_key(&stream)
                || self.requests.iter().any(|r| r.stream == stream);
            if stream == WORKLOAD || taken {
                self.problems.push(RelayError::StreamInUse(stream));
            } else {
                self.requests.push(ExecRequest { stream, config });
            }
            return;
        }
        if let Some(session) = self.sessions.get_mut(&stream) {
            if let Some(signal) = session.handle(message) {
                self.signals.push((stream, signal));
            }
        }
    }

    /// Reads a session's output into frames on its stream, straight into the outgoing
    /// buffer behind each frame's header: while the pipe yields whole frames and the
    /// bound allows, so a full pipe becomes several frames (one channel write) per turn.
    fn read_output(&mut self, stream: u32, stderr: bool) -> bool {
        let mut moved = false;
        // Several sessions may be ready in one turn: each read keeps to the bound.
        while self.has_room() {
            let Some(session) = self.sessions.get_mut(&stream) else {
                break;
            };
            if self.channel_broken {
                // Output is discarded, but still read so the process never blocks on it.
                match session.read_output(stderr, &mut self.scratch) {
                    Output::Data(_) => {
                        moved = true;
                        continue;
                    }
                    Output::Nothing => break,
                }
            }
            if self.sent > 0 {
                self.outgoing.drain(..self.sent);
                self.sent = 0;
            }
            let start = self.outgoing.len();
            let payload = start + HEADER_LEN;
            self.outgoing.resize(payload + MAX_PAYLOAD, 0);
            let n = match session.read_output(stderr, &mut self.outgoing[payload..]) {
                Output::Data(n) => n,
                Output::Nothing => {
                    self.outgoing.truncate(start);
                    break;
                }
            };
            self.outgoing.truncate(payload + n);
            self.outgoing[start..payload].copy_from_slice(&output_header(stream, stderr, n));
            moved = true;
            if n < MAX_PAYLOAD {
                // The pipe is empty for now; poll says when it has more.
                break;
            }
        }
        moved
    }

    /// Appends a frame to the outgoing buffer (dropped once the channel is broken).
    fn queue(&mut self, stream: u32, message: Message) {
        if self.channel_broken {
            return;
        }
        if self.sent > 0 {
            self.outgoing.drain(..self.sent);
            self.sent = 0;
        }
        encode(stream, &message, &mut self.outgoing);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pid1::session::INPUT_LIMIT;
    use guest_init::channel::Frame;
    use nix::fcntl::OFlag;
    use nix::unistd::pipe2;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
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

    impl Relay {
        fn workload(&self) -> &Session {
            &self.sessions[&WORKLOAD]
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
            encode(WORKLOAD, &message, &mut bytes);
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
    fn output_read_in_a_turn_is_written_in_the_same_turn() {
        let mut rig = rig();
        put(&rig.stdout, b"at once");
        rig.turn();
        rig.host.set_nonblocking(true).expect("nonblocking");
        let mut bytes = vec![0u8; 64];
        let n = rig.host.read(&mut bytes).expect("a frame already");
        assert_eq!(joined(&decode(&bytes[..n]), false), b"at once");
        assert!(rig.relay.flushed());
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
        assert!(!rig.relay.workload().has_stdin());
    }

    #[test]
    fn stdin_stops_being_read_from_the_host_when_the_workload_does_not_read() {
        let mut rig = rig();
        let chunk = vec![b'x'; 32 * 1024];
        let mut host = rig.host.try_clone().expect("clone");
        host.set_nonblocking(true).expect("nonblocking");
        let mut frame = Vec::new();
        encode(WORKLOAD, &Message::Stdin(chunk), &mut frame);
        for _ in 0..500 {
            // The host keeps sending as long as its socket takes it.
            let _ = host.write(&frame);
            rig.turn();
            let bound = INPUT_LIMIT + CHANNEL_READ + HEADER_LEN + MAX_PAYLOAD;
            assert!(rig.relay.workload().pending_input() <= bound);
        }
        assert!(rig.relay.workload().pending_input() >= INPUT_LIMIT - 64 * 1024);
    }

    #[test]
    fn signals_are_queued_for_init_in_order() {
        let mut rig = rig();
        rig.send(Message::Signal(15));
        rig.send(Message::Signal(2));
        rig.turn();
        assert_eq!(rig.relay.take_signals(), vec![(0, 15), (0, 2)]);
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
        assert!(rig.relay.workload().pending_input() == 0);
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
            WORKLOAD,
            &Message::Resize {
                rows: 33,
                cols: 101,
            },
            &mut bytes,
        );
        encode(WORKLOAD, &Message::StdinClosed, &mut bytes);
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
        assert!(relay.workload().has_stdin());
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
