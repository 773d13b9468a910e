//! User stories for the network: nginx served through `-p` (page, 20 MB byte-exact, 50
//! parallel connections, a refused port, the port released after exit), a UDP published
//! port, outbound HTTP to the host katalite runs on (10.0.2.2), DNS through the relay, and
//! `--network none` with no way out.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::lifecycle::katalite_in;
use super::{katalite_busybox, sha256_hex, RUN_TIMEOUT};

/// How long a booting server may take to answer on its published port.
const SERVE_TIMEOUT: Duration = Duration::from_secs(240);

/// The registry image reference `library/NAME` and the flags to reach it over plain http.
fn local_image(name: &str) -> (String, String) {
    let registry = std::env::var("KATALITE_E2E_REGISTRY")
        .expect("KATALITE_E2E_REGISTRY must name the test registry: run `cargo xtask lab e2e`");
    (format!("{registry}/library/{name}"), registry)
}

/// A `katalite run` left running in the background; killed (and its stderr shown) if the
/// test ends early.
struct Background {
    child: Option<Child>,
}

impl Background {
    fn start(args: &[&str]) -> Self {
        let child = Command::new("katalite")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("katalite is on PATH");
        Self { child: Some(child) }
    }

    /// Panics with katalite's output if it already ended.
    fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("running");
        if let Some(status) = child.try_wait().expect("try_wait") {
            let child = self.child.take().expect("child");
            let output = child.wait_with_output().expect("output");
            panic!(
                "katalite ended early with {status}:\n--- stdout\n{}\n--- stderr\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }

    /// Sends SIGTERM (forwarded to the workload) and waits for katalite's exit status.
    fn terminate(mut self) -> Option<i32> {
        let mut child = self.child.take().expect("running");
        let pid = rustix::process::Pid::from_child(&child);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
        let deadline = Instant::now() + RUN_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("katalite did not end within {RUN_TIMEOUT:?} of SIGTERM");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            if let Ok(output) = child.wait_with_output() {
                eprintln!(
                    "background katalite:\n{}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
        }
    }
}

/// An HTTP/1.0 response: status code and body.
struct Response {
    status: u16,
    body: Vec<u8>,
}

/// `GET path` from `addr` with a fresh connection, read to the end.
fn get(addr: SocketAddr, path: &str) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no header end"))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
    Ok(Response {
        status,
        body: raw[split + 4..].to_vec(),
    })
}

/// Retries `GET /` until the server answers (it is booting), or panics after the timeout.
fn wait_until_served(server: &mut Background, addr: SocketAddr) -> Response {
    let deadline = Instant::now() + SERVE_TIMEOUT;
    loop {
        server.assert_running();
        match get(addr, "/") {
            Ok(response) => return response,
            Err(err) if Instant::now() > deadline => {
                panic!("nothing served on {addr} within {SERVE_TIMEOUT:?}: {err}")
            }
            Err(_) => thread::sleep(Duration::from_millis(250)),
        }
    }
}

/// What `seq 1 N` prints.
fn seq(n: u32) -> Vec<u8> {
    (1..=n)
        .flat_map(|i| format!("{i}\n").into_bytes())
        .collect()
}

/// A UDP echo for the guest: busybox-static has no UDP server applet, Debian's perl-base
/// (in the nginx image) has IO::Socket.
const UDP_ECHO: &str = "perl -MIO::Socket::INET -e '$s = IO::Socket::INET->new(LocalPort => 9000, \
    Proto => q(udp)) or die $!; while (defined $s->recv($m, 65536)) { $s->send($m) }'";

/// Lines `seq` prints for a body of about 20 MB (19.7 MB).
const BIG_LINES: u32 = 2_500_000;

#[test]
fn nginx_serves_a_published_port_with_big_bodies_parallel_clients_and_udp() {
    let (image, registry) = local_image("nginx");
    let script = format!(
        "seq 1 {BIG_LINES} > /usr/share/nginx/html/big || exit 1; {UDP_ECHO} & \
         exec nginx -g 'daemon off;'"
    );
    let mut server = Background::start(&[
        "run",
        "-q",
        "--insecure-registry",
        &registry,
        "-p",
        "18080:80",
        "-p",
        "127.0.0.1:18081:81",
        "-p",
        "18090:9000/udp",
        &image,
        "sh",
        "-c",
        &script,
    ]);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 18080));

    let page = wait_until_served(&mut server, addr);
    assert_eq!(page.status, 200);
    let text = String::from_utf8_lossy(&page.body);
    assert!(text.contains("<h1>Welcome to nginx!</h1>"), "{text}");

    // The big file is written before nginx starts, so it is complete once / answers.
    let big = get(addr, "/big").expect("GET /big");
    assert_eq!(big.status, 200);
    let expected = seq(BIG_LINES);
    assert_eq!(big.body.len(), expected.len(), "20 MB body length");
    assert!(
        sha256_hex(&big.body) == sha256_hex(&expected),
        "20 MB body differs"
    );

    let clients: Vec<_> = (0..50)
        .map(|_| thread::spawn(move || get(addr, "/").map(|r| (r.status, r.body.len()))))
        .collect();
    for client in clients {
        let (status, len) = client.join().expect("client").expect("parallel GET");
        assert_eq!(status, 200);
        assert_eq!(len, page.body.len());
    }

    // Nothing listens on the guest's port 81: the host client's connection is reset (or
    // closed) without a byte, as with a refused connection.
    let refused = get(SocketAddr::from((Ipv4Addr::LOCALHOST, 18081)), "/");
    assert!(refused.is_err(), "port 81 answered");

    let udp = UdpSocket::bind("127.0.0.1:0").expect("udp bind");
    udp.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut echoed = None;
    // perl may still be starting: a lost datagram is retried.
    for attempt in 0..24 {
        let message = format!("ping {attempt}");
        udp.send_to(message.as_bytes(), "127.0.0.1:18090")
            .expect("send");
        let mut buf = [0u8; 64];
        if let Ok((n, _)) = udp.recv_from(&mut buf) {
            echoed = Some((message, String::from_utf8_lossy(&buf[..n]).into_owned()));
            break;
        }
    }
    let (sent, got) = echoed.expect("no UDP echo through the published port");
    assert_eq!(got, sent);

    server.assert_running();
    let status = server.terminate();
    assert!(
        matches!(status, Some(0) | Some(143)),
        "nginx on SIGTERM: {status:?}"
    );
    // Every exit path releases the published ports.
    TcpListener::bind(addr).expect("port 18080 is free again");
    UdpSocket::bind("127.0.0.1:18090").expect("udp port 18090 is free again");
}

/// Serves `data` to every connection on `listener` as an HTTP/1.0 response.
fn serve(listener: TcpListener, data: Arc<Vec<u8>>) {
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let data = Arc::clone(&data);
            thread::spawn(move || {
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request);
                let head = format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", data.len());
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&data);
            });
        }
    });
}

#[test]
fn the_container_fetches_from_the_host_and_resolves_names() {
    // A server on the host katalite runs on (the lab machine), which the guest reaches as
    // its gateway 10.0.2.2 when allowed to reach the host.
    let blob: Vec<u8> = (0..4u32 << 20)
        .map(|i| u8::try_from((i * 7 + i / 4096) % 251).expect("byte"))
        .collect();
    let digest = sha256_hex(&blob);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    serve(listener, Arc::new(blob));

    // A name the lab's own resolver knows (Debian's mirror, which the lab uses for apt).
    let name = "deb.debian.org";
    let known: Vec<String> = (name, 80)
        .to_socket_addrs()
        .unwrap_or_else(|err| panic!("the lab itself cannot resolve {name}: {err}"))
        .map(|addr| addr.ip().to_string())
        .collect();

    let script = format!(
        "wget -q -O - http://10.0.2.2:{port}/blob | sha256sum; \
         nslookup {name}; \
         ping -c 1 -W 10 10.0.2.2 > /dev/null && echo ping ok"
    );
    let run = katalite_busybox(
        &["--network", "user:allow_host_loopback=true"],
        &["sh", "-c", &script],
    );
    assert_eq!(run.status, Some(0), "{}", run.describe());
    assert!(
        run.stdout.starts_with(&digest),
        "sha256 of the download\n{}",
        run.describe()
    );
    assert!(
        known.iter().any(|ip| run.stdout.contains(ip.as_str())),
        "{name} should resolve to one of {known:?}\n{}",
        run.describe()
    );
    assert!(run.stdout.contains("ping ok"), "{}", run.describe());
}

#[test]
fn by_default_the_host_is_unreachable_but_the_outside_world_is_not() {
    // A server on the lab machine's loopback, and one on all its addresses.
    let loopback = TcpListener::bind("127.0.0.1:0").expect("bind");
    let loopback_port = loopback.local_addr().expect("addr").port();
    serve(loopback, Arc::new(b"host loopback".to_vec()));
    let any = TcpListener::bind("0.0.0.0:0").expect("bind");
    let any_port = any.local_addr().expect("addr").port();
    serve(any, Arc::new(b"host address".to_vec()));
    // The lab machine's own address: where its packets to the outer host come from.
    let (_, registry) = local_image("busybox");
    let probe = UdpSocket::bind("0.0.0.0:0").expect("udp");
    probe.connect(&registry).expect("route to the outer host");
    let own = probe.local_addr().expect("own address").ip();
    // The registry runs on the outer host: an ordinary outside address for the guest,
    // reached through the lab machine's default gateway.
    // (No `wget -T`: this busybox's wget crashes with it.) A refused destination is reset.
    let script = format!(
        "wget -q -O - http://10.0.2.2:{loopback_port}/ || echo LOOPBACK-REFUSED; \
         wget -q -O - http://{own}:{any_port}/ || echo HOST-REFUSED; \
         wget -q -O - http://169.254.169.254/ || echo METADATA-REFUSED; \
         wget -q -O - http://{registry}/v2/ && echo; echo OUTSIDE-DONE"
    );
    let run = katalite_busybox(&[], &["sh", "-c", &script]);
    assert_eq!(run.status, Some(0), "{}", run.describe());
    assert!(!run.stderr.contains("Segmentation"), "{}", run.describe());
    for line in [
        "LOOPBACK-REFUSED",
        "HOST-REFUSED",
        "METADATA-REFUSED",
        "{}",
        "OUTSIDE-DONE",
    ] {
        assert!(run.stdout.contains(line), "{line}\n{}", run.describe());
    }
    assert!(!run.stdout.contains("host loopback"), "{}", run.describe());
    assert!(!run.stdout.contains("host address"), "{}", run.describe());
}

#[test]
fn network_none_has_loopback_only_and_no_route_out() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    serve(listener, Arc::new(b"reachable".to_vec()));
    let script = format!(
        "ls /sys/class/net; echo routes:; ip route; \
         wget -q -O - http://10.0.2.2:{port}/ && echo escaped; \
         ping -c 1 -W 2 127.0.0.1 > /dev/null && echo loopback ok"
    );
    let run = katalite_busybox(&["--network", "none"], &["sh", "-c", &script]);
    assert_eq!(run.status, Some(0), "{}", run.describe());
    let (links, rest) = run.stdout.split_once("routes:").expect("marker");
    assert_eq!(links.split_whitespace().collect::<Vec<_>>(), ["lo"]);
    assert!(!rest.contains("default"), "{}", run.describe());
    assert!(!run.stdout.contains("escaped"), "{}", run.describe());
    assert!(run.stdout.contains("loopback ok"), "{}", run.describe());
}

#[test]
fn a_published_port_in_use_fails_before_boot() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let publish = format!("{port}:80");
    let run = katalite_busybox(&["-p", &publish], &["true"]);
    assert_eq!(run.status, Some(125), "{}", run.describe());
    assert!(run.stderr.contains("cannot publish"), "{}", run.describe());
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.describe());
}

#[test]
fn a_detached_nginx_keeps_serving_after_its_launching_shell_exits() {
    let (image, registry) = local_image("nginx");
    let runtime = tempfile::tempdir().expect("tempdir");
    // The launching shell ends as soon as `run -d` printed the id.
    let launch =
        format!("katalite run -d -q --insecure-registry {registry} --name web -p 18082:80 {image}");
    let shell = Command::new("sh")
        .args(["-c", &launch])
        .env("KATALITE_RUNTIME_DIR", runtime.path())
        .stdin(Stdio::null())
        .output()
        .expect("sh");
    assert!(
        shell.status.success(),
        "{}",
        String::from_utf8_lossy(&shell.stderr)
    );

    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 18082));
    let deadline = Instant::now() + SERVE_TIMEOUT;
    let page = loop {
        match get(addr, "/") {
            Ok(page) => break page,
            Err(err) if Instant::now() > deadline => panic!("web never served: {err}"),
            Err(_) => thread::sleep(Duration::from_millis(250)),
        }
    };
    assert_eq!(page.status, 200);
    assert!(String::from_utf8_lossy(&page.body).contains("Welcome to nginx!"));
    let ps = katalite_in(runtime.path(), &["ps"]);
    assert!(
        ps.stdout.contains("127.0.0.1:18082->80/tcp") && ps.stdout.contains("web"),
        "{}",
        ps.describe()
    );

    let stop = katalite_in(runtime.path(), &["stop", "web"]);
    assert_eq!(stop.status, Some(0), "{}", stop.describe());
    TcpListener::bind(addr).expect("port 18082 is released after stop");
    let rm = katalite_in(runtime.path(), &["rm", "web"]);
    assert_eq!(rm.status, Some(0), "{}", rm.describe());
}

#[test]
fn a_tap_device_carries_the_guest_to_a_server_on_its_host_side() {
    // In a network namespace of its own, so the TAP's 10.0.2.0/24 cannot meet the lab's.
    let www = tempfile::tempdir().expect("tempdir");
    std::fs::write(www.path().join("index.html"), "through the tap\n").expect("page");
    let busybox = super::rootfs("busybox");
    let script = format!(
        "set -e
        ip link set lo up
        tunctl -t ktap0 > /dev/null
        ip addr add 10.0.2.2/24 dev ktap0
        ip link set ktap0 up
        httpd -p 10.0.2.2:8080 -h {www}
        katalite run --rootfs {busybox} --network tap:ktap0 -- sh -c \
            'wget -q -O - http://10.0.2.2:8080/ && ping -c 1 -W 10 10.0.2.2 > /dev/null && \
             echo ping ok'",
        www = www.path().display()
    );
    let output = Command::new("unshare")
        .args(["-n", "sh", "-c", &script])
        .stdin(Stdio::null())
        .output()
        .expect("busybox unshare");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        output.status
    );
    assert_eq!(stdout, "through the tap\nping ok\n", "{stderr}");
}
