//! A tiny registry on 127.0.0.1 (plain or TLS) that serves test images and misbehaves on
//! request: a handler may replace any response, and bodies can be cut short, reset, or
//! dripped. Every request is logged so tests can check what was (not) sent.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::images::{Blob, TestImage};

/// One logged request.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Path without the query.
    pub path: String,
    pub query: String,
    /// Lowercased header names.
    pub headers: HashMap<String, String>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// How a body goes out.
#[derive(Debug, Clone)]
pub enum Body {
    Full(Vec<u8>),
    /// Declares `declared` bytes, sends `bytes`, closes.
    Short {
        bytes: Vec<u8>,
        declared: usize,
    },
    /// Sends the first `after` bytes, then resets the connection (RST).
    Reset {
        bytes: Vec<u8>,
        after: usize,
    },
    /// Sends one byte every `every`.
    Drip {
        bytes: Vec<u8>,
        every: Duration,
    },
    /// Sends `bytes` without a Content-Length (the body ends when the connection closes), so
    /// nothing but the client's own count stops a body longer than its descriptor.
    Unframed(Vec<u8>),
    /// Sends the first `after` bytes, waits `pause`, sends the rest.
    Pause {
        bytes: Vec<u8>,
        after: usize,
        pause: Duration,
    },
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Body,
}

impl Response {
    pub fn new(status: u16, body: Vec<u8>) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Body::Full(body),
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn body(mut self, body: Body) -> Self {
        self.body = body;
        self
    }
}

type Handler = Arc<dyn Fn(&Request) -> Option<Response> + Send + Sync>;

#[derive(Default)]
struct State {
    manifests: HashMap<(String, String), (String, Vec<u8>)>,
    blobs: HashMap<String, Vec<u8>>,
    log: Vec<Request>,
    handler: Option<Handler>,
}

/// The server; it runs until the test process exits.
#[derive(Clone)]
pub struct FakeRegistry {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl FakeRegistry {
    /// A plain-http registry.
    pub fn start() -> Self {
        Self::serve(None)
    }

    /// An https registry with this rustls config.
    pub fn start_tls(config: Arc<rustls::ServerConfig>) -> Self {
        Self::serve(Some(config))
    }

    fn serve(tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (state, tls) = (shared.clone(), tls.clone());
                std::thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                    match tls {
                        None => serve_one(stream.try_clone().ok(), stream, &state),
                        Some(config) => {
                            let Ok(conn) = rustls::ServerConnection::new(config) else {
                                return;
                            };
                            let raw = stream.try_clone().ok();
                            serve_one(raw, rustls::StreamOwned::new(conn, stream), &state);
                        }
                    }
                });
            }
        });
        Self { addr, state }
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn add_manifest(&self, repo: &str, reference: &str, blob: &Blob) {
        let mut state = self.state.lock().expect("state");
        let value = (blob.media_type.clone(), blob.bytes.clone());
        state
            .manifests
            .insert((repo.into(), reference.into()), value.clone());
        state
            .manifests
            .insert((repo.into(), blob.digest.clone()), value);
    }

    pub fn add_blob(&self, blob: &Blob) {
        let mut state = self.state.lock().expect("state");
        state.blobs.insert(blob.digest.clone(), blob.bytes.clone());
    }

    /// Serves the image's manifest under `tag` and all its blobs.
    pub fn add_image(&self, repo: &str, tag: &str, image: &TestImage) {
        self.add_manifest(repo, tag, &image.manifest);
        for blob in image.blobs() {
            self.add_blob(blob);
        }
    }

    /// Replaces responses: `Some` wins over the default behaviour.
    pub fn set_handler(
        &self,
        handler: impl Fn(&Request) -> Option<Response> + Send + Sync + 'static,
    ) {
        self.state.lock().expect("state").handler = Some(Arc::new(handler));
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state.lock().expect("state").log.clone()
    }

    /// GET requests whose path ends with `suffix`.
    pub fn gets(&self, suffix: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path.ends_with(suffix))
            .count()
    }
}

fn serve_one(raw: Option<TcpStream>, mut stream: impl Read + Write, state: &Mutex<State>) {
    let Some(request) = read_request(&mut stream) else {
        return;
    };
    let handler = {
        let mut state = state.lock().expect("state");
        state.log.push(request.clone());
        state.handler.clone()
    };
    let response = handler
        .and_then(|h| h(&request))
        .unwrap_or_else(|| default_response(&request, state));
    write_response(raw, &mut stream, &request, response);
}

fn read_request(stream: &mut impl Read) -> Option<Request> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = HashMap::new();
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).ok()?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    if let Some(len) = headers
        .get("content-length")
        .and_then(|l| l.parse::<usize>().ok())
    {
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body).ok()?;
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    Some(Request {
        method,
        path: path.to_string(),
        query: query.to_string(),
        headers,
    })
}

fn default_response(request: &Request, state: &Mutex<State>) -> Response {
    let state = state.lock().expect("state");
    let path = request.path.as_str();
    if path == "/v2/" || path == "/v2" {
        return Response::new(200, b"{}".to_vec());
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Response::new(404, Vec::new());
    };
    if let Some((repo, reference)) = rest.rsplit_once("/manifests/") {
        return match state
            .manifests
            .get(&(repo.to_string(), reference.to_string()))
        {
            Some((media_type, bytes)) => Response::new(200, bytes.clone())
                .header("Content-Type", media_type)
                .header(
                    "Docker-Content-Digest",
                    &imagebuilder::digest::Digest::of(bytes).to_string(),
                ),
            None => Response::new(
                404,
                br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#
                    .to_vec(),
            )
            .header("Content-Type", "application/json"),
        };
    }
    if let Some((_, digest)) = rest.rsplit_once("/blobs/") {
        let Some(bytes) = state.blobs.get(digest) else {
            return Response::new(
                404,
                br#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}"#.to_vec(),
            )
            .header("Content-Type", "application/json");
        };
        let start = request
            .header("range")
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok());
        return match start {
            Some(start) if start < bytes.len() => Response::new(206, bytes[start..].to_vec())
                .header(
                    "Content-Range",
                    &format!("bytes {start}-{}/{}", bytes.len() - 1, bytes.len()),
                ),
            _ => Response::new(200, bytes.clone()),
        }
        .header("Content-Type", "application/octet-stream");
    }
    Response::new(404, Vec::new())
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        301 | 302 | 307 => "Redirect",
        401 => "Unauthorized",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

fn write_response(
    raw: Option<TcpStream>,
    stream: &mut impl Write,
    request: &Request,
    response: Response,
) {
    let (declared, bytes) = match &response.body {
        Body::Full(b)
        | Body::Unframed(b)
        | Body::Reset { bytes: b, .. }
        | Body::Drip { bytes: b, .. }
        | Body::Pause { bytes: b, .. } => (b.len(), b.clone()),
        Body::Short { bytes, declared } => (*declared, bytes.clone()),
    };
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        response.status,
        reason(response.status)
    );
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !matches!(response.body, Body::Unframed(_)) {
        head.push_str(&format!("Content-Length: {declared}\r\n"));
    }
    head.push_str("Connection: close\r\n\r\n");
    if stream.write_all(head.as_bytes()).is_err() || request.method == "HEAD" {
        let _ = stream.flush();
        return;
    }
    match response.body {
        Body::Full(_) | Body::Short { .. } | Body::Unframed(_) => {
            let _ = stream.write_all(&bytes);
        }
        Body::Reset { after, .. } => {
            let _ = stream.write_all(&bytes[..after.min(bytes.len())]);
            let _ = stream.flush();
            std::thread::sleep(Duration::from_millis(50));
            if let Some(raw) = raw {
                reset(&raw);
            }
            return;
        }
        Body::Pause { after, pause, .. } => {
            let after = after.min(bytes.len());
            if stream
                .write_all(&bytes[..after])
                .and_then(|()| stream.flush())
                .is_err()
            {
                return;
            }
            std::thread::sleep(pause);
            let _ = stream.write_all(&bytes[after..]);
        }
        Body::Drip { every, .. } => {
            for byte in bytes {
                if stream
                    .write_all(&[byte])
                    .and_then(|()| stream.flush())
                    .is_err()
                {
                    return;
                }
                std::thread::sleep(every);
            }
        }
    }
    let _ = stream.flush();
}

/// Closes with an RST instead of a FIN (SO_LINGER with a zero timeout).
fn reset(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the fd is a live socket owned by `stream` for the duration of the call, and the
    // option value points at a properly sized `linger` struct that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::linger>()).expect("small"),
        )
    };
    assert_eq!(rc, 0, "setsockopt SO_LINGER");
    // Closing the last descriptor (this one and the caller's) now sends the RST.
}
