//! The `network` job: boots one VMM whose guest serves HTTP on a published port (busybox
//! `httpd`, with a CGI that downloads from a server run here), then measures through it
//! from L1: host→guest downloads, guest→host downloads, connect + small GET latency, and the
//! VMM's memory with many connections open. It prints raw numbers; xtask summarises them.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use super::{code, ms, read_lines, spawn, Line, MAX_LINES};

/// Longest a single request may stall before the sample fails.
const IO_TIMEOUT: Duration = Duration::from_secs(120);

/// How often the published port is tried while the guest boots.
const READY_POLL: Duration = Duration::from_millis(100);

/// What the guest's small page holds (`/small`, written by the guest script).
const SMALL_BODY: &[u8] = b"ok\n";

/// What the guest's CGI prints after a complete download.
const PULLED: &str = "pulled";

/// The job's parameters (`job["network"]`, written by xtask's `bench/net.rs`).
struct Probe {
    /// Host port published to the guest's port 80.
    port: u16,
    /// Port of the server the guest downloads from (10.0.2.2 in the guest).
    server_port: u16,
    /// Bytes of each download, both ways.
    bytes: u64,
    /// Unrecorded downloads per direction first.
    warmup_transfers: u64,
    /// Recorded downloads per direction.
    transfers: u64,
    /// Sequential connect + GET samples.
    latency_samples: u64,
    /// Connections held open for the memory figure.
    connections: u64,
    /// How long after the held connections opened the memory is read.
    settle: Duration,
    /// Longest wait for the first answer on the published port.
    ready_timeout: Duration,
}

impl Probe {
    fn from_job(job: &Value) -> Result<Self> {
        let params = &job["network"];
        let number = |name: &str| {
            params[name]
                .as_u64()
                .with_context(|| format!("network job without {name}"))
        };
        let port = |name: &str| u16::try_from(number(name)?).context("port out of range");
        Ok(Self {
            port: port("port")?,
            server_port: port("server_port")?,
            bytes: number("bytes")?,
            warmup_transfers: number("warmup_transfers")?,
            transfers: number("transfers")?,
            latency_samples: number("latency_samples")?,
            connections: number("connections")?,
            settle: Duration::from_millis(number("settle_ms")?),
            ready_timeout: Duration::from_secs(number("ready_timeout_s")?),
        })
    }
}

/// Runs the VMM in `argv` and measures through its published port. A failed step ends the
/// sample with `error` and the VMM's first output lines; the figures taken before it stay.
pub fn network(argv: &[String], job: &Value) -> Result<Value> {
    let probe = Probe::from_job(job)?;
    let server = BlobServer::start(probe.server_port, probe.bytes)?;
    let (mut child, start) = spawn(argv, Stdio::piped(), Stdio::piped())?;
    let (sender, lines) = mpsc::channel();
    read_lines(
        child.stdout.take().context("no stdout")?,
        start,
        sender.clone(),
    );
    read_lines(child.stderr.take().context("no stderr")?, start, sender);
    let mut sample = json!({});
    let outcome = measure(&probe, &server, &mut child, start, &mut sample);
    let _ = child.kill();
    sample["status"] = code(child.wait().ok());
    if let Err(err) = outcome {
        sample["error"] = format!("{err:#}").into();
        sample["output"] = first_lines(&lines).into();
    }
    drop(server);
    Ok(sample)
}

/// The steps, in order, each adding its figures to `sample`.
fn measure(
    probe: &Probe,
    server: &BlobServer,
    child: &mut Child,
    start: Instant,
    sample: &mut Value,
) -> Result<()> {
    sample["ready_ms"] = wait_ready(probe, child, start)?.into();

    let mut latency = Vec::new();
    for _ in 0..probe.latency_samples {
        let started = Instant::now();
        let response = get(probe.port, "/small").context("connect + GET /small")?;
        latency.push(ms(started));
        ensure!(
            response.is(SMALL_BODY),
            "GET /small answered {}",
            response.status
        );
    }
    sample["latency_ms"] = latency.into();
    sample["rss_idle_kib"] = proc_status_kib(child.id(), "VmRSS")?.into();

    let mut inbound = Vec::new();
    for round in 0..probe.warmup_transfers + probe.transfers {
        let (bytes, took) = download(probe.port, "/blob").context("GET /blob")?;
        ensure!(
            bytes == probe.bytes,
            "GET /blob gave {bytes} of {} bytes",
            probe.bytes
        );
        if round >= probe.warmup_transfers {
            inbound.push(json!([bytes, took]));
        }
    }
    sample["inbound"] = inbound.into();

    let mut outbound = Vec::new();
    for round in 0..probe.warmup_transfers + probe.transfers {
        server.discard_records();
        let response = get(probe.port, "/cgi-bin/pull").context("GET /cgi-bin/pull")?;
        let body = String::from_utf8_lossy(&response.body);
        ensure!(
            response.status == 200 && body.contains(PULLED),
            "the guest's download failed ({}): {}",
            response.status,
            body.trim()
        );
        let served = server.next_record()?;
        if round >= probe.warmup_transfers {
            outbound.push(json!([served.bytes, served.ms]));
        }
    }
    sample["outbound"] = outbound.into();

    let mut held = Vec::new();
    for n in 0..probe.connections {
        held.push(open_streaming(probe.port).with_context(|| format!("connection {}", n + 1))?);
    }
    thread::sleep(probe.settle);
    sample["connections_open"] = held.len().into();
    sample["rss_conns_kib"] = proc_status_kib(child.id(), "VmRSS")?.into();
    sample["hwm_kib"] = proc_status_kib(child.id(), "VmHWM")?.into();
    Ok(())
}

/// Polls `/small` until the guest answers; returns ms since the VMM started.
fn wait_ready(probe: &Probe, child: &mut Child, start: Instant) -> Result<f64> {
    loop {
        if let Ok(response) = get(probe.port, "/small") {
            if response.is(SMALL_BODY) {
                return Ok(ms(start));
            }
        }
        if let Some(status) = child.try_wait().context("cannot wait")? {
            bail!("the VMM exited ({status}) before the guest served port 80");
        }
        if start.elapsed() > probe.ready_timeout {
            bail!(
                "no answer on 127.0.0.1:{} after {} s",
                probe.port,
                probe.ready_timeout.as_secs()
            );
        }
        thread::sleep(READY_POLL);
    }
}

/// The first lines the VMM printed, for a failed sample (the readers end as it exits).
fn first_lines(lines: &Receiver<Line>) -> Vec<Value> {
    let mut out = Vec::new();
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(2)) {
        if out.len() < MAX_LINES {
            out.push(json!([line.at_ms, line.text]));
        }
    }
    out
}

/// `name:` of `/proc/PID/status`, in KiB.
fn proc_status_kib(pid: u32, name: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {name} in /proc/{pid}/status"))
}

/// Connects to the published port and sends `GET path` (HTTP/1.0: the server closes after
/// the response, so end of file ends it).
fn request(port: u16, path: &str) -> Result<TcpStream> {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&address, IO_TIMEOUT).context("cannot connect")?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: guest\r\n\r\n").as_bytes())
        .context("cannot send the request")?;
    Ok(stream)
}

/// A whole small response.
struct Response {
    status: u16,
    body: Vec<u8>,
}

impl Response {
    fn is(&self, body: &[u8]) -> bool {
        self.status == 200 && self.body == body
    }
}

fn get(port: u16, path: &str) -> Result<Response> {
    let mut stream = request(port, path)?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .context("cannot read the response")?;
    let (status, header_len) = parse_head(&raw)?.context("incomplete response")?;
    Ok(Response {
        status,
        body: raw[header_len..].to_vec(),
    })
}

/// The status code and header length of a response starting with `raw`, once the whole
/// head arrived. Bare LF line ends are accepted too: busybox httpd passes a CGI's own
/// header lines through as the script wrote them.
fn parse_head(raw: &[u8]) -> Result<Option<(u16, usize)>> {
    let crlf = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| (at, at + 4));
    let lf = raw
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|at| (at, at + 2));
    let Some((end, header_len)) = [crlf, lf].into_iter().flatten().min() else {
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&raw[..end]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("bad status line {:?}", head.lines().next()))?;
    Ok(Some((status, header_len)))
}

/// Downloads `path`, counting the body; returns its size and the ms from the request sent
/// to the last byte.
fn download(port: u16, path: &str) -> Result<(u64, f64)> {
    let mut stream = request(port, path)?;
    let started = Instant::now();
    let mut buf = vec![0u8; 1 << 16];
    let mut head = Vec::new();
    let mut body: Option<u64> = None;
    loop {
        let n = stream.read(&mut buf).context("cannot read the response")?;
        if n == 0 {
            break;
        }
        match body.as_mut() {
            Some(count) => *count += n as u64,
            None => {
                head.extend_from_slice(&buf[..n]);
                if let Some((status, header_len)) = parse_head(&head)? {
                    ensure!(status == 200, "status {status}");
                    body = Some((head.len() - header_len) as u64);
                }
            }
        }
    }
    let body = body.context("incomplete response")?;
    Ok((body, ms(started)))
}

/// Opens a connection that downloads `/blob` and waits for its first bytes, so it is
/// established end to end (the guest accepted and forked); the rest is never read.
fn open_streaming(port: u16) -> Result<TcpStream> {
    let mut stream = request(port, "/blob")?;
    let mut first = [0u8; 1];
    ensure!(
        stream.read(&mut first).context("no response")? == 1,
        "closed before answering"
    );
    Ok(stream)
}

/// One download served to the guest.
struct Served {
    /// Body bytes written.
    bytes: u64,
    /// From its request read to the guest's close (its last byte read).
    ms: f64,
}

/// The server the guest downloads from: every request gets `bytes` zeros, and each
/// download is reported once the guest closed its end.
struct BlobServer {
    records: Receiver<Result<Served>>,
    port: u16,
    accepting: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl BlobServer {
    fn start(port: u16, bytes: u64) -> Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))
            .with_context(|| format!("cannot listen on 127.0.0.1:{port}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (sender, records) = mpsc::channel();
        let accepting = {
            let stop = stop.clone();
            thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let served = stream
                        .context("accept failed")
                        .and_then(|s| serve(s, bytes));
                    if sender.send(served).is_err() {
                        break;
                    }
                }
            })
        };
        Ok(Self {
            records,
            port,
            accepting: Some(accepting),
            stop,
        })
    }

    fn discard_records(&self) {
        while self.records.try_recv().is_ok() {}
    }

    fn next_record(&self) -> Result<Served> {
        self.records
            .recv_timeout(IO_TIMEOUT)
            .context("the guest's download never reached the server")?
    }
}

impl Drop for BlobServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the blocked accept so the thread sees the flag and the port is freed.
        let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port));
        if let Some(thread) = self.accepting.take() {
            let _ = thread.join();
        }
    }
}

/// Answers one request with `bytes` zeros, then waits for the client's close.
fn serve(mut stream: TcpStream, bytes: u64) -> Result<Served> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).context("cannot read the request")?;
        ensure!(n > 0, "the client closed before its request ended");
        head.extend_from_slice(&buf[..n]);
    }
    let started = Instant::now();
    let header = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {bytes}\r\nContent-Type: application/octet-stream\r\n\
         Connection: close\r\n\r\n"
    );
    stream.write_all(header.as_bytes())?;
    let chunk = vec![0u8; 1 << 16];
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left.min(chunk.len() as u64)).unwrap_or(chunk.len());
        stream.write_all(&chunk[..n]).context("cannot send")?;
        left -= n as u64;
    }
    // The client closes once it has read everything (Content-Length); a reset counts too.
    let _ = stream.shutdown(Shutdown::Write);
    while matches!(stream.read(&mut buf), Ok(1..)) {}
    Ok(Served {
        bytes,
        ms: ms(started),
    })
}
