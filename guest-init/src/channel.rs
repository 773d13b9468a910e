//! Framing of the one host<->init channel (the guest's virtio-console port named
//! [`PORT_NAME`], `/dev/vport<dev>p0`; or `/dev/hvc0` in raw mode where the port is a
//! console). Every message is a frame: kind (1 byte), stream (u32 LE), payload length
//! (u32 LE), payload. Stream 0 is the `run` workload; every other stream is one `exec`
//! session, opened by the host's `Exec` frame on a fresh stream id and closed by the
//! guest's `Exited` frame.

/// The name the VMM gives the channel's virtio-console port (VIRTIO_CONSOLE_PORT_NAME),
/// which init finds in `/sys/class/virtio-ports/*/name`. vmm has its own copy
/// (`vmm::virtio::CONSOLE_PORT_NAME`); the katalite crate's tests check they agree.
pub const PORT_NAME: &str = "katalite.channel";

/// Largest payload a frame may carry; anything larger is a protocol violation (a broken or
/// hostile peer), never buffered.
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// Bytes of a frame header.
pub const HEADER_LEN: usize = 9;

/// One message on the channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Guest → host: bytes the workload wrote to its stdout (or its terminal, with a TTY).
    Stdout(Vec<u8>),
    /// Guest → host: bytes the workload wrote to its stderr.
    Stderr(Vec<u8>),
    /// Host → guest: bytes for the workload's stdin.
    Stdin(Vec<u8>),
    /// Host → guest: the host's stdin reached end of file.
    StdinClosed,
    /// Host → guest: deliver this signal number to the workload.
    Signal(i32),
    /// Host → guest: the terminal's size changed (rows, columns).
    Resize {
        /// Rows of the host terminal.
        rows: u16,
        /// Columns of the host terminal.
        cols: u16,
    },
    /// Guest → host, init's first frame: the channel is open (a tty in raw mode) and read.
    /// The host must send nothing before it: the guest's console driver drops input that
    /// arrives while its port is not open (drivers/char/virtio_console.c, `in_intr`), and
    /// a tty's line discipline would mangle what arrives before raw mode.
    Ready,
    /// Host → guest, on a fresh stream id other than 0: start an exec session; the payload
    /// is a JSON [`ExecConfig`](crate::contract::ExecConfig) and must fit in one frame.
    Exec(Vec<u8>),
    /// Guest → host, last frame of an exec stream: the session's process ended with this
    /// Docker status (its code, 126 cannot execute, 127 not found, 128+n signal n).
    Exited(i32),
}

const KIND_STDOUT: u8 = 1;
const KIND_STDERR: u8 = 2;
const KIND_STDIN: u8 = 3;
const KIND_STDIN_CLOSED: u8 = 4;
const KIND_SIGNAL: u8 = 5;
const KIND_RESIZE: u8 = 6;
const KIND_READY: u8 = 7;
const KIND_EXEC: u8 = 8;
const KIND_EXITED: u8 = 9;

/// A malformed frame: the peer is broken or hostile and the channel must be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// The frame kind is unknown.
    #[error("unknown channel frame kind {0}")]
    UnknownKind(u8),
    /// The payload length exceeds [`MAX_PAYLOAD`].
    #[error("channel frame of {0} bytes exceeds the limit")]
    TooLarge(u32),
    /// The payload does not fit the kind (e.g. a signal frame of 3 bytes).
    #[error("malformed channel frame of kind {0}")]
    Malformed(u8),
}

/// A message with the stream it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// 0 for the run workload; exec sessions use their own ids.
    pub stream: u32,
    /// What the frame says.
    pub message: Message,
}

/// The header of a `Stdout` (or, with `stderr`, `Stderr`) frame of `len` payload bytes on
/// `stream`, for a sender that reads the payload straight into place behind it. `len` must
/// be at most [`MAX_PAYLOAD`].
pub fn output_header(stream: u32, stderr: bool, len: usize) -> [u8; HEADER_LEN] {
    debug_assert!(len <= MAX_PAYLOAD);
    let mut header = [0u8; HEADER_LEN];
    header[0] = if stderr { KIND_STDERR } else { KIND_STDOUT };
    header[1..5].copy_from_slice(&stream.to_le_bytes());
    header[5..].copy_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
    header
}

/// Appends the encoding of `message` on `stream` to `out`. Data larger than
/// [`MAX_PAYLOAD`] is split into several frames (an `Exec` payload must not be: the sender
/// checks its size first, see [`Message::Exec`]).
pub fn encode(stream: u32, message: &Message, out: &mut Vec<u8>) {
    let mut push = |kind: u8, payload: &[u8]| {
        out.push(kind);
        out.extend_from_slice(&stream.to_le_bytes());
        // Payloads are at most MAX_PAYLOAD (chunked below), which fits in u32.
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(payload);
    };
    let mut push_data = |kind: u8, data: &[u8]| {
        if data.is_empty() {
            push(kind, data);
        }
        for chunk in data.chunks(MAX_PAYLOAD) {
            push(kind, chunk);
        }
    };
    match message {
        Message::Stdout(data) => push_data(KIND_STDOUT, data),
        Message::Stderr(data) => push_data(KIND_STDERR, data),
        Message::Stdin(data) => push_data(KIND_STDIN, data),
        Message::StdinClosed => push_data(KIND_STDIN_CLOSED, &[]),
        Message::Ready => push_data(KIND_READY, &[]),
        Message::Signal(signal) => push_data(KIND_SIGNAL, &signal.to_le_bytes()),
        Message::Exec(config) => push_data(KIND_EXEC, config),
        Message::Exited(status) => push_data(KIND_EXITED, &status.to_le_bytes()),
        Message::Resize { rows, cols } => {
            let mut payload = [0u8; 4];
            payload[..2].copy_from_slice(&rows.to_le_bytes());
            payload[2..].copy_from_slice(&cols.to_le_bytes());
            push_data(KIND_RESIZE, &payload)
        }
    }
}

/// A frame header, checked.
struct Header {
    kind: u8,
    stream: u32,
    /// Payload bytes, at most [`MAX_PAYLOAD`].
    len: usize,
}

/// The header at the start of `bytes`, `None` if they are shorter than one, or an error
/// for a header no frame may have.
fn header(bytes: &[u8]) -> Result<Option<Header>, ChannelError> {
    let Some(header) = bytes.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let kind = header[0];
    let stream = u32::from_le_bytes([header[1], header[2], header[3], header[4]]);
    let len = u32::from_le_bytes([header[5], header[6], header[7], header[8]]);
    if !(KIND_STDOUT..=KIND_EXITED).contains(&kind) {
        return Err(ChannelError::UnknownKind(kind));
    }
    match usize::try_from(len) {
        Ok(len_usize) if len_usize <= MAX_PAYLOAD => Ok(Some(Header {
            kind,
            stream,
            len: len_usize,
        })),
        _ => Err(ChannelError::TooLarge(len)),
    }
}

/// A whole `Stdout` or `Stderr` frame, its payload borrowed from the received bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct OutputFrame<'a> {
    /// The stream it belongs to.
    pub stream: u32,
    /// A `Stderr` frame.
    pub stderr: bool,
    /// The output bytes.
    pub payload: &'a [u8],
}

/// The output frame at the start of `bytes` and the bytes it spans, without copying its
/// payload (the host's fast path for the workload's output); `None` when `bytes` start
/// with another kind of frame or only part of one (decode those with a [`Decoder`]); an
/// error for a header that can never be valid, as [`Decoder::next_frame`] gives.
pub fn output_frame(bytes: &[u8]) -> Result<Option<(OutputFrame<'_>, usize)>, ChannelError> {
    let Some(header) = header(bytes)? else {
        return Ok(None);
    };
    let end = HEADER_LEN + header.len;
    let (Some(payload), KIND_STDOUT | KIND_STDERR) = (bytes.get(HEADER_LEN..end), header.kind)
    else {
        return Ok(None);
    };
    let frame = OutputFrame {
        stream: header.stream,
        stderr: header.kind == KIND_STDERR,
        payload,
    };
    Ok(Some((frame, end)))
}

/// Incremental decoder: feed it bytes as they arrive, take whole frames out. Holds at most
/// one frame's worth of bytes beyond what was fed.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds received bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet decoded.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Bytes still needed to complete the frame being received: 0 when nothing is
    /// buffered (or a whole frame is, or a header that [`next_frame`](Self::next_frame)
    /// rejects).
    pub fn missing(&self) -> usize {
        match header(&self.buf) {
            _ if self.buf.is_empty() => 0,
            Ok(None) => HEADER_LEN - self.buf.len(),
            Ok(Some(header)) => (HEADER_LEN + header.len).saturating_sub(self.buf.len()),
            Err(_) => 0,
        }
    }

    /// The next whole frame, `None` if more bytes are needed, or an error for a frame that
    /// can never be valid (the caller must stop reading from this peer).
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ChannelError> {
        let Some(Header {
            kind,
            stream,
            len: len_usize,
        }) = header(&self.buf)?
        else {
            return Ok(None);
        };
        if self.buf.len() < HEADER_LEN + len_usize {
            return Ok(None);
        }
        let payload: Vec<u8> = self.buf[HEADER_LEN..HEADER_LEN + len_usize].to_vec();
        self.buf.drain(..HEADER_LEN + len_usize);
        let message = match kind {
            KIND_STDOUT => Message::Stdout(payload),
            KIND_STDERR => Message::Stderr(payload),
            KIND_STDIN => Message::Stdin(payload),
            KIND_STDIN_CLOSED => Message::StdinClosed,
            KIND_SIGNAL | KIND_EXITED => {
                let bytes: [u8; 4] = payload
                    .try_into()
                    .map_err(|_| ChannelError::Malformed(kind))?;
                let number = i32::from_le_bytes(bytes);
                if kind == KIND_SIGNAL {
                    Message::Signal(number)
                } else {
                    Message::Exited(number)
                }
            }
            KIND_EXEC if !payload.is_empty() => Message::Exec(payload),
            KIND_RESIZE => {
                let bytes: [u8; 4] = payload
                    .try_into()
                    .map_err(|_| ChannelError::Malformed(kind))?;
                Message::Resize {
                    rows: u16::from_le_bytes([bytes[0], bytes[1]]),
                    cols: u16::from_le_bytes([bytes[2], bytes[3]]),
                }
            }
            KIND_READY if payload.is_empty() => Message::Ready,
            _ => return Err(ChannelError::Malformed(kind)),
        };
        Ok(Some(Frame { stream, message }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(messages: &[Message]) -> Vec<Frame> {
        let mut bytes = Vec::new();
        for (i, message) in messages.iter().enumerate() {
            encode(u32::try_from(i).expect("few"), message, &mut bytes);
        }
        let mut decoder = Decoder::new();
        let mut frames = Vec::new();
        // Feed one byte at a time: frames must come out whole regardless of arrival.
        for byte in bytes {
            decoder.feed(&[byte]);
            while let Some(frame) = decoder.next_frame().expect("valid") {
                frames.push(frame);
            }
        }
        assert_eq!(decoder.pending(), 0);
        frames
    }

    #[test]
    fn every_message_round_trips() {
        let messages = vec![
            Message::Stdout(b"hello".to_vec()),
            Message::Stderr(Vec::new()),
            Message::Stdin(vec![0, 255, 10]),
            Message::StdinClosed,
            Message::Signal(15),
            Message::Resize { rows: 24, cols: 80 },
            Message::Ready,
            Message::Exec(b"{\"Args\":[\"sh\"]}".to_vec()),
            Message::Exited(127),
            Message::Exited(-1),
        ];
        let frames = round_trip(&messages);
        let decoded: Vec<Message> = frames.iter().map(|f| f.message.clone()).collect();
        assert_eq!(decoded, messages);
        assert_eq!(frames[4].stream, 4);
    }

    #[test]
    fn an_output_header_matches_the_encoding_of_its_frame() {
        for (stderr, message) in [
            (false, Message::Stdout(vec![1, 2, 3])),
            (true, Message::Stderr(vec![9; MAX_PAYLOAD])),
        ] {
            let (Message::Stdout(data) | Message::Stderr(data)) = &message else {
                unreachable!()
            };
            let mut encoded = Vec::new();
            encode(7, &message, &mut encoded);
            assert_eq!(encoded[..HEADER_LEN], output_header(7, stderr, data.len()));
            assert_eq!(&encoded[HEADER_LEN..], &data[..]);
        }
    }

    #[test]
    fn large_data_is_split_into_bounded_frames() {
        let data = vec![7u8; MAX_PAYLOAD * 2 + 5];
        let frames = round_trip(&[Message::Stdout(data.clone())]);
        assert_eq!(frames.len(), 3);
        let joined: Vec<u8> = frames
            .into_iter()
            .flat_map(|f| match f.message {
                Message::Stdout(d) => d,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(joined, data);
    }

    #[test]
    fn hostile_frames_are_rejected_without_buffering() {
        let mut decoder = Decoder::new();
        decoder.feed(&[KIND_STDOUT, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(decoder.next_frame(), Err(ChannelError::TooLarge(u32::MAX)));
        let mut decoder = Decoder::new();
        decoder.feed(&[99, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(decoder.next_frame(), Err(ChannelError::UnknownKind(99)));
        let mut decoder = Decoder::new();
        decoder.feed(&[KIND_SIGNAL, 0, 0, 0, 0, 3, 0, 0, 0, 1, 2, 3]);
        assert_eq!(
            decoder.next_frame(),
            Err(ChannelError::Malformed(KIND_SIGNAL))
        );
        let mut decoder = Decoder::new();
        decoder.feed(&[KIND_READY, 0, 0, 0, 0, 1, 0, 0, 0, 0]);
        assert_eq!(
            decoder.next_frame(),
            Err(ChannelError::Malformed(KIND_READY))
        );
        let mut decoder = Decoder::new();
        decoder.feed(&[KIND_EXITED + 1, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            decoder.next_frame(),
            Err(ChannelError::UnknownKind(KIND_EXITED + 1))
        );
    }

    #[test]
    fn malformed_exec_frames_are_rejected() {
        let mut decoder = Decoder::new();
        decoder.feed(&[KIND_EXITED, 5, 0, 0, 0, 2, 0, 0, 0, 1, 0]);
        assert_eq!(
            decoder.next_frame(),
            Err(ChannelError::Malformed(KIND_EXITED))
        );
        // An exec without a config can never start anything.
        let mut decoder = Decoder::new();
        decoder.feed(&[KIND_EXEC, 5, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            decoder.next_frame(),
            Err(ChannelError::Malformed(KIND_EXEC))
        );
    }

    #[test]
    fn old_kinds_keep_their_numbers() {
        let mut bytes = Vec::new();
        encode(0, &Message::Ready, &mut bytes);
        encode(7, &Message::Exec(b"{}".to_vec()), &mut bytes);
        encode(7, &Message::Exited(3), &mut bytes);
        assert_eq!(bytes[0], 7);
        assert_eq!(&bytes[9..14], &[8, 7, 0, 0, 0]);
        assert_eq!(bytes[20], 9);
        assert_eq!(&bytes[29..], &3i32.to_le_bytes());
    }

    #[test]
    fn output_frames_are_borrowed_whole_and_other_frames_left_to_the_decoder() {
        let mut bytes = Vec::new();
        encode(0, &Message::Stdout(b"out".to_vec()), &mut bytes);
        encode(3, &Message::Stderr(b"err".to_vec()), &mut bytes);
        encode(0, &Message::Ready, &mut bytes);
        let (frame, len) = output_frame(&bytes).expect("valid").expect("whole");
        assert_eq!(
            frame,
            OutputFrame {
                stream: 0,
                stderr: false,
                payload: b"out"
            }
        );
        assert_eq!(len, HEADER_LEN + 3);
        let rest = &bytes[len..];
        let (frame, len) = output_frame(rest).expect("valid").expect("whole");
        assert_eq!(
            (frame.stream, frame.stderr, frame.payload),
            (3, true, &b"err"[..])
        );
        let rest = &rest[len..];
        assert_eq!(output_frame(rest), Ok(None), "a Ready frame");
        assert_eq!(output_frame(&bytes[..len - 1]), Ok(None), "part of a frame");
        assert_eq!(output_frame(&bytes[..4]), Ok(None), "part of a header");
        let mut bad = bytes.clone();
        bad[0] = 77;
        assert_eq!(output_frame(&bad), Err(ChannelError::UnknownKind(77)));
        bad[0] = KIND_STDOUT;
        let too_large = u32::try_from(MAX_PAYLOAD + 1).expect("fits");
        bad[5..9].copy_from_slice(&too_large.to_le_bytes());
        assert!(matches!(output_frame(&bad), Err(ChannelError::TooLarge(_))));
    }

    #[test]
    fn missing_counts_what_completes_the_frame_being_received() {
        let mut bytes = Vec::new();
        encode(0, &Message::Stdout(b"hello".to_vec()), &mut bytes);
        let mut decoder = Decoder::new();
        assert_eq!(decoder.missing(), 0);
        decoder.feed(&bytes[..4]);
        assert_eq!(decoder.missing(), HEADER_LEN - 4);
        decoder.feed(&bytes[4..HEADER_LEN + 1]);
        assert_eq!(decoder.missing(), 4);
        decoder.feed(&bytes[HEADER_LEN + 1..]);
        assert_eq!(decoder.missing(), 0);
        assert!(decoder.next_frame().expect("valid").is_some());
        assert_eq!(decoder.missing(), 0);
    }
}
