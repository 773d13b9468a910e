//! The workload's stdio on the host side of the frame channel (`guest_init::channel`):
//! [`Demux`] turns the guest's Stdout/Stderr frames back into bytes on fd 1 and fd 2, in
//! order and with bounded memory; [`pump_stdin`] turns the host's stdin into Stdin frames.

use std::io::{self, Read, Write};

use anyhow::anyhow;
use guest_init::channel::{encode, Decoder, Message, HEADER_LEN, MAX_PAYLOAD};

/// The stream of the `run` workload on the channel.
pub const STREAM: u32 = 0;

/// Bytes fed to the decoder at once: with at most one partial frame left over, the decoder
/// never holds more than two frames' worth however large the console's writes are.
const FEED: usize = HEADER_LEN + MAX_PAYLOAD;

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
/// them. On a [`Fault`] it calls `on_fault` once and discards everything after.
pub struct Demux<O, E, F> {
    decoder: Decoder,
    out: O,
    err: E,
    on_fault: F,
    failed: bool,
}

impl<O: Write, E: Write, F: FnMut(Fault)> Demux<O, E, F> {
    /// A demux writing to `out` and `err`, reporting faults to `on_fault`.
    pub fn new(out: O, err: E, on_fault: F) -> Self {
        Self {
            decoder: Decoder::new(),
            out,
            err,
            on_fault,
            failed: false,
        }
    }

    /// Writes every whole frame the decoder holds; the first fault ends the demux.
    fn drain(&mut self) -> Result<(), Fault> {
        while let Some(frame) = self
            .decoder
            .next_frame()
            .map_err(|e| Fault::Malformed(e.into()))?
        {
            if frame.stream != STREAM {
                return Err(Fault::Malformed(anyhow!(
                    "a frame for unknown stream {}",
                    frame.stream
                )));
            }
            let written = match &frame.message {
                Message::Stdout(data) => write_flushed(&mut self.out, data),
                Message::Stderr(data) => write_flushed(&mut self.err, data),
                other => {
                    return Err(Fault::Malformed(anyhow!(
                        "a host-to-guest message from the guest: {other:?}"
                    )))
                }
            };
            // Any other host-side write error loses the bytes, as a full disk would;
            // stopping the workload for it would be worse.
            if written.is_err_and(|e| e.kind() == io::ErrorKind::BrokenPipe) {
                return Err(Fault::BrokenPipe);
            }
        }
        Ok(())
    }
}

fn write_flushed(to: &mut impl Write, data: &[u8]) -> io::Result<()> {
    to.write_all(data)?;
    to.flush()
}

impl<O: Write, E: Write, F: FnMut(Fault)> Write for Demux<O, E, F> {
    /// Always takes all of `buf`: refusing would only make the console drop it.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for chunk in buf.chunks(FEED) {
            if self.failed {
                break;
            }
            self.decoder.feed(chunk);
            if let Err(fault) = self.drain() {
                self.failed = true;
                self.decoder = Decoder::new();
                (self.on_fault)(fault);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Starts the `katalite-stdin` thread: it copies the host's stdin into Stdin frames for
/// `send` and ends with a StdinClosed frame at end of file (or on a read error), or as soon
/// as `send` refuses bytes (the VM ended). It is not joined: a read may block forever, and
/// `docker run -i` does not wait for stdin either.
pub fn pump_stdin(send: impl FnMut(&[u8]) -> bool + Send + 'static) -> io::Result<()> {
    std::thread::Builder::new()
        .name("katalite-stdin".into())
        .spawn(move || pump(io::stdin().lock(), send))?;
    Ok(())
}

/// Reads `from` until end of file, passing each read as encoded Stdin frames to `send`,
/// then a StdinClosed frame. Stops early when `send` returns false.
fn pump(mut from: impl Read, mut send: impl FnMut(&[u8]) -> bool) {
    let mut buf = vec![0u8; MAX_PAYLOAD];
    let mut frame = Vec::with_capacity(HEADER_LEN + MAX_PAYLOAD);
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        frame.clear();
        encode(STREAM, &Message::Stdin(buf[..n].to_vec()), &mut frame);
        if !send(&frame) {
            return;
        }
    }
    frame.clear();
    encode(STREAM, &Message::StdinClosed, &mut frame);
    send(&frame);
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_init::channel::Frame;

    fn frames(messages: &[(u32, Message)]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for (stream, message) in messages {
            encode(*stream, message, &mut bytes);
        }
        bytes
    }

    /// Feeds `bytes` in `piece`-sized writes; returns stdout, stderr and the faults.
    fn demux(bytes: &[u8], piece: usize) -> (Vec<u8>, Vec<u8>, Vec<Fault>) {
        let (mut out, mut err, mut faults) = (Vec::new(), Vec::new(), Vec::new());
        let mut demux = Demux::new(&mut out, &mut err, |f| faults.push(f));
        for part in bytes.chunks(piece) {
            assert_eq!(demux.write(part).expect("write"), part.len());
        }
        drop(demux);
        (out, err, faults)
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
        for piece in [1, 7, 4096, FEED + 3, bytes.len()] {
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
    fn memory_stays_bounded_while_a_frame_trickles_in() {
        let mut bytes = frames(&[(0, Message::Stdout(vec![5; MAX_PAYLOAD]))]);
        bytes.extend(frames(&[(0, Message::Stdout(vec![6; MAX_PAYLOAD]))]));
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut demux = Demux::new(&mut out, &mut err, |_| panic!("no fault"));
        // One huge write: the decoder is fed piecewise and drained between pieces.
        demux.write_all(&bytes).expect("write");
        assert_eq!(demux.decoder.pending(), 0);
        demux.write_all(&bytes[..FEED - 1]).expect("write");
        assert!(demux.decoder.pending() < FEED);
        drop(demux);
        assert_eq!(out.len(), 2 * MAX_PAYLOAD);
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
        let mut faults = Vec::new();
        let mut demux = Demux::new(Closed, Vec::new(), |f| faults.push(f));
        let bytes = frames(&[
            (0, Message::Stdout(b"x".to_vec())),
            (0, Message::Stdout(b"y".to_vec())),
        ]);
        demux.write_all(&bytes).expect("write");
        drop(demux);
        assert!(matches!(faults.as_slice(), [Fault::BrokenPipe]));
    }

    fn decode_all(bytes: &[u8]) -> Vec<Frame> {
        let mut decoder = Decoder::new();
        decoder.feed(bytes);
        std::iter::from_fn(|| decoder.next_frame().expect("valid")).collect()
    }

    #[test]
    fn stdin_becomes_frames_then_closed() {
        let data: Vec<u8> = (0..150_000u32).map(|i| (i % 253) as u8).collect();
        let mut sent = Vec::new();
        pump(&data[..], |frame| {
            sent.extend_from_slice(frame);
            true
        });
        let frames = decode_all(&sent);
        let (last, rest) = frames.split_last().expect("frames");
        assert_eq!(last.message, Message::StdinClosed);
        let mut joined = Vec::new();
        for frame in rest {
            assert_eq!(frame.stream, STREAM);
            match &frame.message {
                Message::Stdin(d) => joined.extend_from_slice(d),
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
        pump(io::empty(), |frame| {
            sent.extend_from_slice(frame);
            true
        });
        let frames = decode_all(&sent);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].message, Message::StdinClosed);
    }
}
