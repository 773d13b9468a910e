//! The host side of the frame channel (`guest_init::channel`): [`Demux`] turns the guest's
//! Stdout/Stderr frames back into bytes on fd 1 and fd 2, in order and with bounded memory;
//! frames of exec streams go to their session through the exec [`Router`]; [`ToGuest`]
//! holds host-to-guest frames until init announces Ready; [`pump_stdin`] turns the host's
//! stdin into Stdin frames.

use std::io::{self, Read, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use anyhow::anyhow;
use guest_init::channel::{self, encode, Decoder, Message, HEADER_LEN, MAX_PAYLOAD};
use vmm::ConsoleInput;

use crate::confine::{self, Role};
use crate::exec::Router;

/// The stream of the `run` workload on the channel.
pub const STREAM: u32 = 0;

/// What the demux tells its owner.
#[derive(Debug)]
pub enum Event {
    /// Init announced that it reads the channel: host-to-guest frames may flow.
    Ready,
    /// Something is wrong and the VM should end.
    Fault(Fault),
}

/// Why the demux asks for the VM to end.
#[derive(Debug)]
pub enum Fault {
    /// The guest broke the channel protocol; nothing it sends is trusted any more.
    Malformed(anyhow::Error),
    /// The host's stdout or stderr is a closed pipe (a reader like `head` went away).
    BrokenPipe,
}

/// The virtio console's host side: decodes frames and writes Stdout payloads to `out` and
/// Stderr payloads to `err`, flushing each, so the two stay in the order the guest sent
/// them. It reports init's Ready to `on_event`; on a [`Fault`] it reports it once and
/// discards everything after.
pub struct Demux<O, E, F> {
    decoder: Decoder,
    out: O,
    err: E,
    on_event: F,
    failed: bool,
    router: Option<Router>,
}

impl<O: Write, E: Write, F: FnMut(Event)> Demux<O, E, F> {
    /// A demux writing to `out` and `err`, reporting to `on_event`.
    pub fn new(out: O, err: E, on_event: F) -> Self {
        Self {
            decoder: Decoder::new(),
            out,
            err,
            on_event,
            failed: false,
            router: None,
        }
    }

    /// Routes the frames of other streams than the workload's to their exec sessions
    /// (without a router, any other stream is a protocol violation).
    pub fn routing(mut self, router: Router) -> Self {
        self.router = Some(router);
        self
    }

    /// Writes every whole frame the decoder holds; the first fault ends the demux.
    fn drain(&mut self) -> Result<(), Fault> {
        while let Some(frame) = self
            .decoder
            .next_frame()
            .map_err(|e| Fault::Malformed(e.into()))?
        {
            if frame.stream != STREAM {
                let routed = match &self.router {
                    Some(router) => router.route(frame.stream, &frame.message),
                    None => Err(anyhow!("a frame for unknown stream {}", frame.stream)),
                };
                routed.map_err(Fault::Malformed)?;
                continue;
            }
            match &frame.message {
                Message::Stdout(data) => self.output(false, data)?,
                Message::Stderr(data) => self.output(true, data)?,
                Message::Ready => (self.on_event)(Event::Ready),
                Message::Stdin(_) => return Err(host_to_guest("stdin")),
                Message::StdinClosed => return Err(host_to_guest("stdin-closed")),
                Message::Signal(_) => return Err(host_to_guest("signal")),
                Message::Resize { .. } => return Err(host_to_guest("resize")),
                Message::Exec(_) => return Err(host_to_guest("exec")),
                Message::Exited(_) => {
                    return Err(Fault::Malformed(anyhow!(
                        "an exited frame on the workload's stream"
                    )))
                }
            }
        }
        Ok(())
    }

    /// Writes the workload's output to `out` (or, for stderr, `err`).
    fn output(&mut self, stderr: bool, data: &[u8]) -> Result<(), Fault> {
        let written = if stderr {
            write_flushed(&mut self.err, data)
        } else {
            write_flushed(&mut self.out, data)
        };
        // Any other host-side write error loses the bytes, as a full disk would;
        // stopping the workload for it would be worse.
        if written.is_err_and(|e| e.kind() == io::ErrorKind::BrokenPipe) {
            return Err(Fault::BrokenPipe);
        }
        Ok(())
    }

    /// Takes what it can from the start of `bytes` and says how much: a whole output frame
    /// of the workload is written straight from them (no copy into the decoder and out
    /// again: most of what the console carries); anything else goes to the decoder, only
    /// as many bytes as complete the frame it holds, so the next frame starts on the
    /// straight path again. The decoder never holds more than one frame.
    fn take(&mut self, bytes: &[u8]) -> Result<usize, Fault> {
        if self.decoder.pending() == 0 {
            let whole = channel::output_frame(bytes).map_err(|e| Fault::Malformed(e.into()))?;
            if let Some((frame, len)) = whole.filter(|(frame, _)| frame.stream == STREAM) {
                self.output(frame.stderr, frame.payload)?;
                return Ok(len);
            }
        }
        let wanted = match self.decoder.missing() {
            0 => HEADER_LEN,
            missing => missing,
        };
        let fed = wanted.min(bytes.len());
        self.decoder.feed(&bytes[..fed]);
        self.drain()?;
        Ok(fed)
    }
}

/// The fault of a guest sending a frame only the host may send.
fn host_to_guest(kind: &str) -> Fault {
    Fault::Malformed(anyhow!("a host-to-guest {kind} frame came from the guest"))
}

fn write_flushed(to: &mut impl Write, data: &[u8]) -> io::Result<()> {
    to.write_all(data)?;
    to.flush()
}

impl<O: Write, E: Write, F: FnMut(Event)> Write for Demux<O, E, F> {
    /// Always takes all of `buf`: refusing would only make the console drop it.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut rest = buf;
        while !rest.is_empty() && !self.failed {
            match self.take(rest) {
                Ok(taken) => rest = &rest[taken..],
                Err(fault) => {
                    self.failed = true;
                    self.decoder = Decoder::new();
                    (self.on_event)(Event::Fault(fault));
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Whether host-to-guest frames may flow yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    /// Init has not announced Ready: the guest's console driver would drop input
    /// (drivers/char/virtio_console.c discards data before the port is opened).
    Waiting,
    Open,
    /// The VM ended; nothing more is sent.
    Closed,
}

/// The host-to-guest direction of the channel, shared by the threads that send (signals,
/// resizes, stdin): [`send`](Self::send) waits until init is ready, keeps each frame
/// whole, and blocks while the guest's queue is full.
#[derive(Clone)]
pub struct ToGuest {
    input: ConsoleInput,
    gate: Arc<(Mutex<Gate>, Condvar)>,
}

impl ToGuest {
    /// Frames for `input`, held until [`open`](Self::open).
    pub fn new(input: ConsoleInput) -> Self {
        Self {
            input,
            gate: Arc::new((Mutex::new(Gate::Waiting), Condvar::new())),
        }
    }

    fn gate(&self) -> MutexGuard<'_, Gate> {
        // A plain enum replaced whole: a panic elsewhere cannot leave it torn.
        self.gate.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, to: Gate) {
        let mut gate = self.gate();
        if *gate != Gate::Closed {
            *gate = to;
        }
        self.gate.1.notify_all();
    }

    /// Init is ready: let frames through.
    pub fn open(&self) {
        self.set(Gate::Open);
    }

    /// The VM ended: refuse frames from now on, waking every waiting sender.
    pub fn close(&self) {
        self.set(Gate::Closed);
    }

    /// Sends `message` on the workload's stream once init is ready; false when the VM has
    /// ended (the caller should stop sending).
    pub fn send(&self, message: &Message) -> bool {
        self.send_on(STREAM, message)
    }

    /// Sends `message` on `stream` (an exec session's, or the workload's) once init is
    /// ready; false when the VM has ended.
    pub fn send_on(&self, stream: u32, message: &Message) -> bool {
        let mut gate = self.gate();
        while *gate == Gate::Waiting {
            gate = self
                .gate
                .1
                .wait(gate)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if *gate == Gate::Closed {
            return false;
        }
        drop(gate);
        let mut frame = Vec::new();
        encode(stream, message, &mut frame);
        self.input.send(&frame).is_ok()
    }
}

/// Starts the `katalite-stdin` thread: it copies the host's stdin into Stdin frames and
/// ends with a StdinClosed frame at end of file (or on a read error), or as soon as the VM
/// refuses input. It is not joined: a read may block forever, and `docker run -i` does not
/// wait for stdin either.
pub fn pump_stdin(to_guest: ToGuest) -> io::Result<()> {
    pump_stdin_with(move |message| to_guest.send(&message))
}

/// [`pump_stdin`] with the messages going to `send` (an exec session's connection).
pub fn pump_stdin_with(send: impl FnMut(Message) -> bool + Send + 'static) -> io::Result<()> {
    std::thread::Builder::new()
        .name("katalite-stdin".into())
        .stack_size(vmm::THREAD_STACK_BYTES)
        .spawn(move || {
            confine::enter(Role::Stdin);
            pump(io::stdin().lock(), send);
        })?;
    Ok(())
}

/// Reads `from` until end of file, passing each read to `send` as a Stdin message, then
/// StdinClosed. Stops early when `send` returns false.
fn pump(mut from: impl Read, mut send: impl FnMut(Message) -> bool) {
    let mut buf = vec![0u8; MAX_PAYLOAD];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if !send(Message::Stdin(buf[..n].to_vec())) {
            return;
        }
    }
    send(Message::StdinClosed);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(messages: &[(u32, Message)]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for (stream, message) in messages {
            encode(*stream, message, &mut bytes);
        }
        bytes
    }

    /// The bytes of a frame with the largest payload.
    const FRAME: usize = HEADER_LEN + MAX_PAYLOAD;

    /// Feeds `bytes` in `piece`-sized writes; returns stdout, stderr and the faults.
    fn demux(bytes: &[u8], piece: usize) -> (Vec<u8>, Vec<u8>, Vec<Fault>) {
        let (mut out, mut err, mut faults) = (Vec::new(), Vec::new(), Vec::new());
        let mut demux = Demux::new(&mut out, &mut err, |event| match event {
            Event::Fault(fault) => faults.push(fault),
            Event::Ready => {}
        });
        for part in bytes.chunks(piece) {
            assert_eq!(demux.write(part).expect("write"), part.len());
        }
        drop(demux);
        (out, err, faults)
    }

    #[test]
    fn the_vmm_names_the_channel_port_as_init_looks_for_it() {
        assert_eq!(
            vmm::virtio::CONSOLE_PORT_NAME,
            guest_init::channel::PORT_NAME
        );
    }

    #[test]
    fn stdout_and_stderr_come_apart_byte_exact_however_split() {
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let bytes = frames(&[
            (0, Message::Stdout(b"one\n".to_vec())),
            (0, Message::Stderr(b"warn\n".to_vec())),
            (0, Message::Stdout(big.clone())),
            (0, Message::Stderr(Vec::new())),
            (0, Message::Stdout(b"end".to_vec())),
        ]);
        for piece in [1, 7, 4096, FRAME + 3, 256 * 1024, bytes.len()] {
            let (out, err, faults) = demux(&bytes, piece);
            assert!(faults.is_empty(), "{faults:?}");
            assert_eq!(out.len(), 4 + big.len() + 3);
            assert_eq!(&out[..4], b"one\n");
            assert_eq!(&out[4..4 + big.len()], &big[..]);
            assert_eq!(&out[4 + big.len()..], b"end");
            assert_eq!(err, b"warn\n");
        }
    }

    #[test]
    fn a_malformed_frame_faults_once_and_nothing_after_it_is_written() {
        let mut bytes = frames(&[(0, Message::Stdout(b"before".to_vec()))]);
        bytes.extend_from_slice(&[99, 0, 0, 0, 0, 1, 0, 0, 0, b'x']);
        bytes.extend(frames(&[(0, Message::Stdout(b"after".to_vec()))]));
        let (out, _, faults) = demux(&bytes, 5);
        assert_eq!(out, b"before");
        assert_eq!(faults.len(), 1);
        let message = match &faults[0] {
            Fault::Malformed(e) => format!("{e:#}"),
            Fault::BrokenPipe => panic!("not a broken pipe"),
        };
        assert!(message.contains("kind 99"), "{message}");
    }

    #[test]
    fn an_oversized_length_faults_without_waiting_for_the_payload() {
        let bytes = [1, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f];
        let (out, _, faults) = demux(&bytes, bytes.len());
        assert!(out.is_empty());
        assert!(matches!(faults.as_slice(), [Fault::Malformed(_)]));
    }

    #[test]
    fn host_bound_kinds_and_other_streams_are_protocol_violations() {
        for bad in [
            (0, Message::Signal(15)),
            (0, Message::Stdin(b"x".to_vec())),
            (0, Message::StdinClosed),
            (0, Message::Resize { rows: 1, cols: 1 }),
            (3, Message::Stdout(b"x".to_vec())),
        ] {
            let (out, _, faults) = demux(&frames(std::slice::from_ref(&bad)), 64);
            assert!(out.is_empty(), "{bad:?}");
            assert!(
                matches!(faults.as_slice(), [Fault::Malformed(_)]),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn exec_streams_reach_their_session_and_unknown_ones_fault() {
        use std::os::unix::net::UnixStream;
        let router = Router::default();
        let (ours, mut theirs) = UnixStream::pair().expect("socketpair");
        let stream = router.open(std::sync::Arc::new(ours)).expect("open");
        let bytes = frames(&[
            (stream, Message::Stdout(b"exec out".to_vec())),
            (0, Message::Stdout(b"workload".to_vec())),
            (stream, Message::Exited(0)),
            (stream + 1, Message::Stdout(b"nobody".to_vec())),
            (0, Message::Stdout(b"after the fault".to_vec())),
        ]);
        let (mut out, mut faults) = (Vec::new(), Vec::new());
        let mut demux = Demux::new(&mut out, Vec::new(), |event| match event {
            Event::Fault(fault) => faults.push(fault),
            Event::Ready => {}
        })
        .routing(router);
        demux.write_all(&bytes).expect("write");
        drop(demux);
        assert_eq!(out, b"workload");
        assert!(matches!(faults.as_slice(), [Fault::Malformed(_)]));
        let mut received = Vec::new();
        theirs.read_to_end(&mut received).expect("read");
        let mut expected = Vec::new();
        encode(0, &Message::Stdout(b"exec out".to_vec()), &mut expected);
        encode(0, &Message::Exited(0), &mut expected);
        assert_eq!(received, expected);
    }

    #[test]
    fn memory_stays_bounded_while_a_frame_trickles_in() {
        let mut bytes = frames(&[(0, Message::Stdout(vec![5; MAX_PAYLOAD]))]);
        bytes.extend(frames(&[(0, Message::Stdout(vec![6; MAX_PAYLOAD]))]));
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut demux = Demux::new(&mut out, &mut err, |_| panic!("no event"));
        // One huge write: whole frames go straight out, nothing is buffered.
        demux.write_all(&bytes).expect("write");
        assert_eq!(demux.decoder.pending(), 0);
        // A frame cut short is held, and only it: completing it empties the decoder, so
        // the next frame takes the straight path again.
        demux.write_all(&bytes[..FRAME - 1]).expect("write");
        assert_eq!(demux.decoder.pending(), FRAME - 1);
        demux
            .write_all(&bytes[FRAME - 1..FRAME + 10])
            .expect("write");
        assert_eq!(demux.decoder.pending(), 10);
        demux.write_all(&bytes[FRAME + 10..]).expect("write");
        assert_eq!(demux.decoder.pending(), 0);
        drop(demux);
        assert_eq!(out.len(), 4 * MAX_PAYLOAD);
    }

    #[test]
    fn a_closed_stdout_pipe_is_a_fault() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut events = Vec::new();
        let mut demux = Demux::new(Closed, Vec::new(), |e| events.push(e));
        let bytes = frames(&[
            (0, Message::Stdout(b"x".to_vec())),
            (0, Message::Stdout(b"y".to_vec())),
        ]);
        demux.write_all(&bytes).expect("write");
        drop(demux);
        assert!(matches!(
            events.as_slice(),
            [Event::Fault(Fault::BrokenPipe)]
        ));
    }

    #[test]
    fn ready_is_reported_in_order_with_the_output() {
        let bytes = frames(&[(0, Message::Ready), (0, Message::Stdout(b"x".to_vec()))]);
        let mut seen = Vec::new();
        let mut out = Vec::new();
        let mut demux = Demux::new(&mut out, Vec::new(), |e| seen.push(format!("{e:?}")));
        demux.write_all(&bytes[..HEADER_LEN]).expect("write");
        demux.write_all(&bytes[HEADER_LEN..]).expect("write");
        drop(demux);
        assert_eq!(seen, ["Ready"]);
        assert_eq!(out, b"x");
    }

    #[test]
    fn frames_to_the_guest_wait_for_ready() {
        let to_guest = ToGuest::new(ConsoleInput::new());
        let (done, sent) = std::sync::mpsc::channel();
        let sender = {
            let to_guest = to_guest.clone();
            std::thread::spawn(move || {
                let _ = done.send(to_guest.send(&Message::Signal(15)));
            })
        };
        let wait = std::time::Duration::from_millis(100);
        assert!(sent.recv_timeout(wait).is_err(), "sent before Ready");
        to_guest.open();
        assert_eq!(sent.recv_timeout(wait * 50).ok(), Some(true));
        sender.join().expect("join");
        // Once the VM ended, nothing is sent, and closing wins over a late Ready.
        to_guest.close();
        to_guest.open();
        assert!(!to_guest.send(&Message::StdinClosed));
    }

    #[test]
    fn closing_wakes_senders_still_waiting_for_ready() {
        let to_guest = ToGuest::new(ConsoleInput::new());
        let sender = {
            let to_guest = to_guest.clone();
            std::thread::spawn(move || to_guest.send(&Message::Signal(2)))
        };
        std::thread::sleep(std::time::Duration::from_millis(20));
        to_guest.close();
        assert!(!sender.join().expect("join"));
    }

    #[test]
    fn stdin_becomes_messages_then_closed() {
        let data: Vec<u8> = (0..150_000u32).map(|i| (i % 253) as u8).collect();
        let mut sent = Vec::new();
        pump(&data[..], |message| {
            sent.push(message);
            true
        });
        let (last, rest) = sent.split_last().expect("messages");
        assert_eq!(*last, Message::StdinClosed);
        let mut joined = Vec::new();
        for message in rest {
            match message {
                Message::Stdin(d) => {
                    assert!(d.len() <= MAX_PAYLOAD);
                    joined.extend_from_slice(d);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(joined, data);
    }

    #[test]
    fn the_pump_stops_when_the_vm_refuses_input() {
        let mut calls = 0;
        pump(&[1u8; 10][..], |_| {
            calls += 1;
            false
        });
        assert_eq!(calls, 1, "no StdinClosed after a refusal");
    }

    #[test]
    fn empty_stdin_is_only_closed() {
        let mut sent = Vec::new();
        pump(io::empty(), |message| {
            sent.push(message);
            true
        });
        assert_eq!(sent, [Message::StdinClosed]);
    }
}
