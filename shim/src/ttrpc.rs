//! ttrpc, containerd's RPC over a Unix stream socket (containerd/ttrpc 1.1): frames of a
//! 10-byte big-endian header (body length, stream id, type, flags) and a protobuf body,
//! `Request{service, method, payload}` one way and `Response{status, payload}` the other.
//! Every request is served on its own thread: containerd keeps a `Wait` pending on the
//! connection that carries the `Start` and `Kill` it is waiting for.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread;

use crate::proto::{fields, DecodeError, Encoder};

/// The largest body either side accepts.
pub const MAX_BODY: usize = 4 << 20;
const HEADER: usize = 10;
const REQUEST: u8 = 1;
const RESPONSE: u8 = 2;

/// The gRPC status codes the shim answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// A plain failure.
    Unknown = 2,
    /// A malformed or contradictory request.
    InvalidArgument = 3,
    /// No such container or process (or it has finished).
    NotFound = 5,
    /// The id is taken.
    AlreadyExists = 6,
    /// Not in a state that allows it.
    FailedPrecondition = 9,
    /// Too large a frame.
    ResourceExhausted = 8,
    /// A method the shim does not implement.
    Unimplemented = 12,
}

/// A failed call: what goes into `Response.status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The code.
    pub code: Code,
    /// One line for containerd's error.
    pub message: String,
}

impl Status {
    /// A status with `code` and `message`.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<DecodeError> for Status {
    fn from(err: DecodeError) -> Self {
        Status::new(Code::InvalidArgument, format!("bad request: {err}"))
    }
}

/// A method's answer: the encoded response message, or a status.
pub type Reply = Result<Vec<u8>, Status>;

/// What serves the requests of a connection.
pub trait Handler: Send + Sync + 'static {
    /// Answers `service`/`method` with `payload`.
    fn call(self: Arc<Self>, service: &str, method: &str, payload: &[u8]) -> Reply;
    /// Runs after each reply is written (the shim exits here once shut down).
    fn replied(&self) {}
}

struct Frame {
    stream: u32,
    kind: u8,
    /// None: the body was larger than [`MAX_BODY`] and was discarded.
    body: Option<Vec<u8>>,
}

fn read_frame(reader: &mut impl Read) -> io::Result<Option<Frame>> {
    let mut header = [0u8; HEADER];
    match reader.read_exact(&mut header) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(err) => return Err(err),
    }
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let stream = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    let body = if len > MAX_BODY {
        io::copy(&mut reader.take(len as u64), &mut io::sink())?;
        None
    } else {
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body)?;
        Some(body)
    };
    Ok(Some(Frame {
        stream,
        kind: header[8],
        body,
    }))
}

fn write_frame(writer: &mut impl Write, stream: u32, kind: u8, body: &[u8]) -> io::Result<()> {
    let len = u32::try_from(body.len())
        .ok()
        .filter(|len| *len as usize <= MAX_BODY)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "ttrpc message too large"))?;
    let mut frame = Vec::with_capacity(HEADER + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(&[kind, 0]);
    frame.extend_from_slice(body);
    writer.write_all(&frame)
}

/// A `Request`'s service, method and payload.
fn decode_request(body: &[u8]) -> Result<(String, String, Vec<u8>), DecodeError> {
    let (mut service, mut method, mut payload) = (String::new(), String::new(), Vec::new());
    fields(body, |field, value| {
        match field {
            1 => service = value.string()?,
            2 => method = value.string()?,
            3 => payload = value.bytes().to_vec(),
            _ => {}
        }
        Ok(())
    })?;
    Ok((service, method, payload))
}

fn encode_response(reply: &Reply) -> Vec<u8> {
    let mut status = Encoder::new();
    let mut response = Encoder::new();
    match reply {
        Ok(payload) => {
            response.message(1, &status.finish()).bytes(2, payload);
        }
        Err(err) => {
            status.uint(1, err.code as u64).string(2, &err.message);
            response.message(1, &status.finish());
        }
    }
    response.finish()
}

/// Serves one connection until the peer closes it.
pub fn serve(stream: UnixStream, handler: Arc<dyn Handler>) -> io::Result<()> {
    let writer = Arc::new(Mutex::new(stream.try_clone()?));
    let mut reader = io::BufReader::new(stream);
    while let Some(frame) = read_frame(&mut reader)? {
        if frame.kind != REQUEST {
            continue;
        }
        let (writer, handler) = (Arc::clone(&writer), Arc::clone(&handler));
        thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || {
                let reply = answer(&frame, Arc::clone(&handler));
                let written = match writer.lock() {
                    Ok(mut stream) => write_frame(
                        &mut *stream,
                        frame.stream,
                        RESPONSE,
                        &encode_response(&reply),
                    ),
                    Err(_) => Ok(()),
                };
                // A peer that went away loses its answer; the shim goes on.
                drop(written);
                handler.replied();
            })?;
    }
    Ok(())
}

fn answer(frame: &Frame, handler: Arc<dyn Handler>) -> Reply {
    if frame.stream.is_multiple_of(2) {
        return Err(Status::new(
            Code::InvalidArgument,
            "StreamID must be odd for client initiated streams",
        ));
    }
    let Some(body) = &frame.body else {
        return Err(Status::new(
            Code::ResourceExhausted,
            format!("message larger than {MAX_BODY} bytes"),
        ));
    };
    let (service, method, payload) = decode_request(body)?;
    handler.call(&service, &method, &payload)
}

/// A client's call on `stream` (one at a time): sends the request as stream `id` and
/// reads frames until its response.
pub fn call(
    stream: &mut UnixStream,
    id: u32,
    service: &str,
    method: &str,
    payload: &[u8],
) -> io::Result<Reply> {
    let mut request = Encoder::new();
    request
        .string(1, service)
        .string(2, method)
        .message(3, payload);
    write_frame(stream, id, REQUEST, &request.finish())?;
    loop {
        let frame = read_frame(stream)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "ttrpc: closed"))?;
        if frame.kind != RESPONSE || frame.stream != id {
            continue;
        }
        let body = frame.body.unwrap_or_default();
        return decode_response(&body)
            .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err));
    }
}

fn decode_response(body: &[u8]) -> Result<Reply, DecodeError> {
    let (mut code, mut message, mut payload) = (0u64, String::new(), Vec::new());
    fields(body, |field, value| {
        match field {
            1 => fields(value.bytes(), |field, value| {
                match field {
                    1 => code = value.uint(),
                    2 => message = value.string()?,
                    _ => {}
                }
                Ok(())
            })?,
            2 => payload = value.bytes().to_vec(),
            _ => {}
        }
        Ok(())
    })?;
    if code == 0 {
        Ok(Ok(payload))
    } else {
        Ok(Err(Status::new(
            Code::Unknown,
            format!("code {code}: {message}"),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;

    impl Handler for Echo {
        fn call(self: Arc<Self>, service: &str, method: &str, payload: &[u8]) -> Reply {
            match (service, method) {
                ("svc", "Echo") => Ok(payload.to_vec()),
                _ => Err(Status::new(
                    Code::Unimplemented,
                    format!("{service}/{method}"),
                )),
            }
        }
    }

    #[test]
    fn requests_and_responses_cross_a_socket() {
        let (client, server) = UnixStream::pair().expect("pair");
        let server = thread::spawn(move || serve(server, Arc::new(Echo)));
        let mut client = client;
        let reply = call(&mut client, 1, "svc", "Echo", b"hi").expect("call");
        assert_eq!(reply, Ok(b"hi".to_vec()));
        let reply = call(&mut client, 3, "svc", "Nope", b"").expect("call");
        assert!(matches!(reply, Err(status) if status.message.contains("code 12: svc/Nope")));
        drop(client);
        server.join().expect("join").expect("serve");
    }

    #[test]
    fn the_wire_matches_the_reference_example() {
        // docs/containerd-shim-v2.md: Connect's reply {1234, 1240} on stream 1.
        let mut out = Vec::new();
        let body = encode_response(&Ok(vec![0x08, 0xd2, 0x09, 0x10, 0xd8, 0x09]));
        write_frame(&mut out, 1, RESPONSE, &body).expect("write");
        assert_eq!(
            out,
            [0, 0, 0, 10, 0, 0, 0, 1, 2, 0, 0x0a, 0, 0x12, 6, 0x08, 0xd2, 0x09, 0x10, 0xd8, 0x09]
        );
    }

    #[test]
    fn even_streams_and_oversize_frames_are_refused() {
        let frame = Frame {
            stream: 2,
            kind: REQUEST,
            body: Some(Vec::new()),
        };
        assert_eq!(
            answer(&frame, Arc::new(Echo)).expect_err("refused").code,
            Code::InvalidArgument
        );
        let mut wire = Vec::new();
        wire.extend_from_slice(&u32::try_from(MAX_BODY + 1).expect("fits").to_be_bytes());
        wire.extend_from_slice(&[0, 0, 0, 1, REQUEST, 0]);
        wire.resize(HEADER + MAX_BODY + 1, 0);
        let frame = read_frame(&mut wire.as_slice())
            .expect("read")
            .expect("frame");
        assert_eq!(
            answer(&frame, Arc::new(Echo)).expect_err("refused").code,
            Code::ResourceExhausted
        );
        assert!(read_frame(&mut [0u8, 0, 0].as_slice())
            .expect("eof")
            .is_none());
        assert!(read_frame(&mut [0u8; 0].as_slice()).expect("eof").is_none());
    }
}
