//! A real Linux guest on the user-mode network, through its own virtio-net driver: it pings
//! the gateway, downloads from a server on the host's loopback (10.0.2.2), resolves a name
//! through the DNS relay, then serves a file that the host fetches through a published
//! port. It needs a hardware-backed /dev/kvm and the guest kernel, so it is ignored by
//! default and run in the lab:
//! `KATALITE_TEST_KERNEL=vmlinux KATALITE_TEST_BUSYBOX=busybox net_guest --ignored`.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use vmm::net::usernet::{Protocol, UserNet, UserNetConfig, GUEST_MAC};
use vmm::{run, NetConfig, VmConfig, VmExit, VmStopper};

const BLOB: usize = 4 << 20;
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("lock")).into_owned()
    }

    /// The words after `MARK name` on the guest's console, once it printed them.
    fn mark(&self, name: &str) -> Option<String> {
        let text = self.text();
        let prefix = format!("MARK {name}");
        let line = text.lines().find(|line| line.starts_with(&prefix))?;
        Some(line[prefix.len()..].trim().to_owned())
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn blob() -> Vec<u8> {
    (0..BLOB)
        .map(|i| u8::try_from((i * 7 + i / 4096) % 256).expect("byte"))
        .collect()
}

/// A newc cpio archive (the initramfs format) of directories, files and device nodes.
fn cpio(entries: &[(&str, u32, u32, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let trailer = ("TRAILER!!!", 0, 0, &[][..]);
    for (ino, &(name, mode, rdev, data)) in (1u32..).zip(entries.iter().chain([&trailer])) {
        let fields = [
            ino,
            mode,
            0,
            0,
            1,
            0,
            u32::try_from(data.len()).expect("size"),
            0,
            0,
            rdev >> 8,
            rdev & 0xff,
            u32::try_from(name.len() + 1).expect("name"),
            0,
        ];
        out.extend(b"070701");
        for field in fields {
            out.extend(format!("{field:08x}").bytes());
        }
        out.extend(name.bytes());
        out.push(0);
        out.resize(out.len().next_multiple_of(4), 0);
        out.extend(data);
        out.resize(out.len().next_multiple_of(4), 0);
    }
    out
}

fn init_script(http_port: u16) -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t tmpfs tmp /tmp
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
echo nameserver 10.0.2.3 > /etc/resolv.conf
echo "MARK mtu $(cat /sys/class/net/eth0/mtu) $(cat /sys/class/net/eth0/address)"
ping -c 1 -W 10 10.0.2.2 > /dev/null && echo "MARK ping ok"
start=$(cut -d' ' -f1 /proc/uptime)
wget -q -O /tmp/blob http://10.0.2.2:{http_port}/blob
end=$(cut -d' ' -f1 /proc/uptime)
echo "MARK wget $(sha256sum /tmp/blob | cut -d' ' -f1) $start $end"
nslookup katalite.test | grep -q 10.0.2.2 && echo "MARK dns ok"
echo small > /tmp/small
httpd -p 8080 -h /tmp
echo "MARK ready"
sleep 600
"#
    )
}

/// Serves `data` to each HTTP request on `listener` (a GET of anything).
fn http_server(listener: TcpListener, data: Arc<Vec<u8>>) {
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                request.push(byte[0]);
            }
            let header = format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", data.len());
            let _ = stream
                .write_all(header.as_bytes())
                .and_then(|()| stream.write_all(&data));
        }
    });
}

/// A resolver answering A queries for any name with 10.0.2.2, others with no data.
fn dns_server(socket: UdpSocket) {
    thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((len, from)) = socket.recv_from(&mut buf) {
            let query = &buf[..len];
            let Some(name_end) = query[12..].iter().position(|&b| b == 0) else {
                continue;
            };
            let question_end = 12 + name_end + 1 + 4;
            if len < question_end {
                continue;
            }
            let qtype = u16::from_be_bytes([query[question_end - 4], query[question_end - 3]]);
            let answers = u16::from(qtype == 1);
            let mut reply = query[..2].to_vec();
            reply.extend([0x81, 0x80, 0, 1]);
            reply.extend(answers.to_be_bytes());
            reply.extend([0, 0, 0, 0]);
            reply.extend(&query[12..question_end]);
            if answers == 1 {
                reply.extend([0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 0, 2, 2]);
            }
            let _ = socket.send_to(&reply, from);
        }
    });
}

/// GET `path` from `addr`; the body and how long it took.
fn http_get(addr: SocketAddr, path: &str) -> (Vec<u8>, Duration) {
    let began = Instant::now();
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    write!(stream, "GET {path} HTTP/1.0\r\n\r\n").expect("request");
    let mut response = Vec::new();
    if let Err(err) = stream.read_to_end(&mut response) {
        panic!(
            "GET {path} from {addr}: {err} after {} bytes",
            response.len()
        );
    }
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("headers");
    (response[split + 4..].to_vec(), began.elapsed())
}

/// What the guest's network did, as seen from both sides.
struct Measured {
    log: String,
    served: Vec<u8>,
    fetch: Duration,
    small: Duration,
}

impl Measured {
    /// Checks what both networks must do and prints the throughput and latency.
    fn check_and_report(&self, name: &str, data: &[u8]) {
        let log = &self.log;
        let mark = |name: &str| {
            let prefix = format!("MARK {name}");
            let line = log.lines().find(|line| line.starts_with(&prefix));
            line.map(|line| line[prefix.len()..].trim().to_owned())
        };
        assert_eq!(mark("ping").as_deref(), Some("ok"), "{log}");
        let wget = mark("wget").expect("wget ran");
        let words: Vec<&str> = wget.split_whitespace().collect();
        let expected = hex::encode(Sha256::digest(data));
        assert_eq!(words.first(), Some(&expected.as_str()), "{log}");
        assert!(self.served == data, "published download byte-exact");
        let seconds = |s: &str| s.parse::<f64>().expect("uptime");
        let inbound = seconds(words[2]) - seconds(words[1]);
        let mib = data.len() as f64 / f64::from(1 << 20);
        eprintln!(
            "{name}: host->guest (guest wget from 10.0.2.2) {:.2} MiB/s; guest->host \
             (published port) {:.2} MiB/s; published GET of a small file {:.1} ms mean",
            mib / inbound.max(0.001),
            mib / self.fetch.as_secs_f64(),
            self.small.as_secs_f64() * 1000.0
        );
    }
}

/// Waits for the guest to be ready, then fetches the blob and 20 small files through the
/// published address.
fn measure(console: &Captured, published: SocketAddr, running: impl Fn() -> bool) -> Measured {
    let deadline = Instant::now() + Duration::from_secs(300);
    while console.mark("ready").is_none() {
        assert!(running(), "the guest ended early:\n{}", console.text());
        assert!(
            Instant::now() < deadline,
            "the guest never got ready:\n{}",
            console.text()
        );
        thread::sleep(Duration::from_millis(50));
    }
    eprintln!("{}", console.text());
    let (served, fetch) = http_get(published, "/blob");
    let small = (0..20)
        .map(|_| http_get(published, "/small").1)
        .sum::<Duration>()
        / 20;
    Measured {
        log: console.text(),
        served,
        fetch,
        small,
    }
}

/// The host side both guests talk to: an HTTP server on 127.0.0.1 and the guest's
/// initramfs pointing at it.
fn setup() -> (Vec<u8>, Arc<Vec<u8>>, Vec<u8>) {
    let kernel =
        std::fs::read(std::env::var("KATALITE_TEST_KERNEL").expect("kernel path")).expect("kernel");
    let busybox = std::fs::read(std::env::var("KATALITE_TEST_BUSYBOX").expect("busybox path"))
        .expect("busybox");
    let data = Arc::new(blob());
    let listener = TcpListener::bind((LOCALHOST, 0)).expect("http");
    let http_port = listener.local_addr().expect("addr").port();
    http_server(listener, data.clone());
    let script = init_script(http_port);
    let dir = 0o040_755;
    let initramfs = cpio(&[
        ("bin", dir, 0, b""),
        ("dev", dir, 0, b""),
        ("dev/console", 0o020_600, 5 << 8 | 1, b""),
        ("etc", dir, 0, b""),
        ("proc", dir, 0, b""),
        ("sys", dir, 0, b""),
        ("tmp", dir, 0, b""),
        ("bin/busybox", 0o100_755, 0, &busybox),
        ("init", 0o100_755, 0, script.as_bytes()),
    ]);
    (kernel, data, initramfs)
}

#[test]
#[ignore = "needs a hardware-backed /dev/kvm and the guest kernel: run it in the lab"]
fn a_linux_guest_uses_the_user_network_both_ways() {
    let (kernel, data, initramfs) = setup();
    let resolver = UdpSocket::bind((LOCALHOST, 0)).expect("dns");
    let mut config = UserNetConfig::new(vec![resolver.local_addr().expect("addr")]);
    dns_server(resolver);
    config.max_connections = 64;
    let mut net = UserNet::new(config).expect("user net");
    let published = net
        .publish(LOCALHOST, 0, 8080, Protocol::Tcp)
        .expect("publish");
    let serial = Captured::default();
    let stopper = VmStopper::new();
    let vm = {
        let (serial, stopper) = (serial.clone(), stopper.clone());
        thread::spawn(move || {
            run(VmConfig {
                vcpus: 2,
                memory_mib: 256,
                kernel: &kernel,
                kernel_cache: None,
                initramfs: vec![initramfs.into()],
                cmdline: "rdinit=/init quiet loglevel=3",
                loaded: None,
                console: Box::new(io::sink()),
                console_input: None,
                stopper: Some(stopper),
                serial: Box::new(serial),
                network: Some(NetConfig {
                    mac: GUEST_MAC,
                    backend: Box::new(net),
                }),
                disks: Vec::new(),
                shares: Vec::new(),
            })
        })
    };

    let measured = measure(&serial, published, || !vm.is_finished());
    stopper.stop();
    let exit = vm.join().expect("vm thread").expect("vm");

    assert_eq!(exit, VmExit::Stopped);
    let log = &measured.log;
    assert_eq!(
        serial.mark("mtu").as_deref(),
        Some("1500 52:54:00:12:34:56"),
        "{log}"
    );
    assert_eq!(serial.mark("dns").as_deref(), Some("ok"), "{log}");
    measured.check_and_report("katalite user network", &data);
}

/// A child process killed when the test ends, however it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The same guest under QEMU's microvm with its user network (`-netdev user`), the peer
/// the issue compares against. `KATALITE_TEST_QEMU` is the command that runs
/// qemu-system-x86_64 (in the lab, through the host's loader).
#[test]
#[ignore = "needs a hardware-backed /dev/kvm, QEMU and the guest kernel: run it in the lab"]
fn qemu_user_network_peer_measured_the_same_way() {
    let (_, data, initramfs) = setup();
    let qemu = std::env::var("KATALITE_TEST_QEMU").expect("qemu command");
    let kernel = std::env::var("KATALITE_TEST_KERNEL").expect("kernel path");
    let initrd = std::env::temp_dir().join(format!("net-guest-{}.cpio", std::process::id()));
    std::fs::write(&initrd, &initramfs).expect("initrd");
    let port = TcpListener::bind((LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut words = qemu.split_whitespace();
    let child = std::process::Command::new(words.next().expect("qemu"))
        .args(words)
        .args(["-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host"])
        .args(["-m", "256"])
        .args(["-smp", "2", "-nodefaults", "-no-user-config", "-nographic"])
        .args(["-serial", "stdio", "-no-reboot", "-kernel", &kernel])
        .arg("-initrd")
        .arg(&initrd)
        .args([
            "-append",
            "console=ttyS0 reboot=t rdinit=/init quiet loglevel=3",
        ])
        .arg("-netdev")
        .arg(format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:8080"))
        .args(["-device", "virtio-net-device,netdev=n0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("qemu starts");
    let mut child = Killed(child);
    let console = Captured::default();
    let mut out = child.0.stdout.take().expect("stdout");
    let reader = {
        let mut console = console.clone();
        thread::spawn(move || io::copy(&mut out, &mut console))
    };

    let measured = measure(&console, SocketAddr::from((LOCALHOST, port)), || {
        !reader.is_finished()
    });
    drop(child);
    let _ = std::fs::remove_file(&initrd);

    measured.check_and_report("qemu -netdev user", &data);
}
