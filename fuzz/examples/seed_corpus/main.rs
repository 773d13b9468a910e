//! Writes the committed seed corpus, `fuzz/corpus/<target>/`: a few valid inputs per target
//! so that the fuzzer starts from real frames, layers, manifests and driver programs.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --example seed_corpus` rewrites them.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use guest_init::channel::{encode, Message};
use katalite_fuzz::driver::{program, Op, CHAIN_HEADER, CHAIN_STATUS};
use katalite_fuzz::input::put_bytes;
use katalite_fuzz::LAYER_SEPARATOR;

mod frames;

/// Named inputs of one target.
type Seeds = Vec<(&'static str, Vec<u8>)>;

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let seeds: Vec<(&str, Seeds)> = vec![
        ("channel_decoder", channel()),
        ("layer_merge", layers()),
        ("oci_manifest", oci()),
        ("usernet_frame", usernet()),
        ("virtio_rng", rng()),
        ("virtio_blk", blk()),
        ("virtio_fs", fs_requests()),
        ("virtio_net", net()),
        ("virtio_console", console()),
    ];
    for (target, inputs) in seeds {
        let dir: PathBuf = root.join(target);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        for (name, bytes) in inputs {
            fs::write(dir.join(name), bytes)?;
        }
    }
    Ok(())
}

fn channel() -> Seeds {
    let stream = |messages: &[(u32, Message)]| {
        // First byte 0: no split bytes, the rest is the channel stream.
        let mut out = vec![0];
        for (stream, message) in messages {
            encode(*stream, message, &mut out);
        }
        out
    };
    let exec = br#"{"Args":["sh","-c","echo hi"],"Env":["A=1"],"Tty":true,"ConsoleSize":[24,80]}"#;
    vec![
        (
            "run",
            stream(&[
                (0, Message::Ready),
                (0, Message::Stdout(b"hello\n".to_vec())),
                (0, Message::Stderr(b"oops\n".to_vec())),
                (0, Message::Exited(0)),
            ]),
        ),
        (
            "exec",
            stream(&[
                (3, Message::Exec(exec.to_vec())),
                (3, Message::Resize { rows: 24, cols: 80 }),
                (3, Message::Stdin(b"ls\n".to_vec())),
                (3, Message::StdinClosed),
                (3, Message::Signal(15)),
                (3, Message::Exited(137)),
            ]),
        ),
        ("split", {
            let mut out = stream(&[(1, Message::Stdout(vec![b'x'; 300]))]);
            out[0] = 3;
            out.splice(1..1, [0, 7, 200]);
            out
        }),
    ]
}

/// A tar stream of `entries`; each a header of `kind` with a path and content or target.
fn tar(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for &(path, kind, data) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_700_000_000);
        match kind {
            tar::EntryType::Symlink | tar::EntryType::Link => {
                header.set_size(0);
                builder
                    .append_link(&mut header, path, std::str::from_utf8(data).expect("utf-8"))
                    .expect("link");
            }
            _ => {
                header.set_size(data.len() as u64);
                builder.append_data(&mut header, path, data).expect("entry");
            }
        }
    }
    builder.into_inner().expect("tar")
}

fn layers() -> Seeds {
    use tar::EntryType::{Directory, Fifo, Link, Regular, Symlink};
    let base = tar(&[
        ("etc", Directory, b""),
        ("etc/hostname", Regular, b"box\n"),
        ("etc/passwd", Regular, b"root:x:0:0::/root:/bin/sh\n"),
        ("bin", Directory, b""),
        ("bin/busybox", Regular, b"\x7fELF"),
        ("bin/sh", Symlink, b"busybox"),
        ("bin/ls", Link, b"bin/busybox"),
        ("run/fifo", Fifo, b""),
    ]);
    let upper = tar(&[
        ("etc/.wh.passwd", Regular, b""),
        ("bin/.wh..wh..opq", Regular, b""),
        ("bin/new", Regular, b"new"),
    ]);
    let mut pax = tar::Builder::new(Vec::new());
    let long = format!("deep/{}/file", "d".repeat(200));
    pax.append_pax_extensions([
        ("path", long.as_bytes()),
        (
            "SCHILY.xattr.security.capability",
            &[1, 0, 0, 2, 0, 0x20, 0, 0][..],
        ),
        ("mtime", b"1700000000.5"),
    ])
    .expect("pax");
    let mut header = tar::Header::new_ustar();
    header.set_path("short").expect("path");
    header.set_size(2);
    header.set_mode(0o4755);
    header.set_cksum();
    pax.append(&header, &b"hi"[..]).expect("entry");
    let pax = pax.into_inner().expect("tar");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&base).expect("gzip");
    let gz = gz.finish().expect("gzip");
    vec![
        ("one_layer", base.clone()),
        (
            "whiteouts",
            [&base[..], LAYER_SEPARATOR, &upper[..]].concat(),
        ),
        ("pax", pax),
        ("gzip", gz),
    ]
}

fn oci() -> Seeds {
    let d = |n: char| format!("sha256:{}", n.to_string().repeat(64));
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":1234}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":5678}},{{"mediaType":"application/vnd.oci.image.layer.v1.tar+zstd","digest":"{}","size":9}}]}}"#,
        d('a'),
        d('b'),
        d('c')
    );
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":500,"platform":{{"architecture":"amd64","os":"linux"}},"annotations":{{"org.opencontainers.image.ref.name":"latest"}}}},{{"mediaType":"application/vnd.docker.distribution.manifest.v2+json","digest":"{}","size":501,"platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}}]}}"#,
        d('d'),
        d('e')
    );
    let config = r#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin"],"Entrypoint":null,"Cmd":["sh"],"WorkingDir":"/","User":"1000:1000","ExposedPorts":{"80/tcp":{}},"Volumes":{"/data":{}},"Labels":{"a":"b"},"StopSignal":"SIGTERM"},"rootfs":{"type":"layers","diff_ids":["sha256:00"]}}"#;
    let registries = "ca = [\"/etc/ca.pem\"]\n[registries.\"docker.io\"]\nmirrors = [\"mirror.local:5000\", \"http://10.0.0.1\"]\n[registries.\"localhost:5000\"]\ninsecure = true\nauth_hosts = [\"auth.local\"]\n";
    let with = |selector: u8, body: &str| [&[selector][..], body.as_bytes()].concat();
    vec![
        // Selectors: parser = byte % 8, content type (manifests) = byte >> 4.
        ("manifest", with(0x00, &manifest)),
        ("manifest_typed", with(0x10, &manifest)),
        ("index", with(0x20, &index)),
        ("docker_list", with(0x40, &index)),
        ("config", with(1, config)),
        ("registries", with(2, registries)),
        ("reference", with(3, "localhost:5000/team/app:v1.2")),
        ("reference_digest", with(3, &format!("busybox@{}", d('f')))),
        ("platform", with(4, "linux/arm64/v8")),
        ("limits", with(4, "total-size=8G,entries=100k,depth=64")),
        (
            "challenge",
            with(
                5,
                r#"Bearer realm="https://auth.example.org/token",service="registry",scope="repository:a/b:pull""#,
            ),
        ),
        ("challenge_basic", with(5, r#"Basic realm="Registry""#)),
    ]
}

fn usernet() -> Seeds {
    let join = |frames: &[Vec<u8>]| {
        let mut out = Vec::new();
        for frame in frames {
            put_bytes(&mut out, frame);
        }
        out
    };
    vec![
        ("arp", join(&[frames::arp_request([10, 0, 2, 2])])),
        ("ping", join(&[frames::icmp_echo([10, 0, 2, 2])])),
        (
            "dns",
            join(&[frames::udp([10, 0, 2, 3], 53, &frames::dns_query())]),
        ),
        (
            "syn",
            join(&[frames::tcp([192, 0, 2, 1], 80, frames::SYN, b"")]),
        ),
        (
            "mixed",
            join(&[
                frames::arp_request([10, 0, 2, 2]),
                frames::tcp([10, 0, 2, 2], 22, frames::ACK, b"data"),
                frames::udp([192, 0, 2, 9], 1234, b"hello"),
            ]),
        ),
    ]
}

/// Every device seed starts like Linux: all offered features, 16-entry queues.
const INIT: Op<'static> = Op::Init {
    features: u64::MAX,
    size_log2: 4,
};

fn rng() -> Seeds {
    let read = |split| Op::Chain {
        queue: 0,
        split,
        readable: &[],
        writable: 64,
    };
    vec![
        ("read", program(&[INIT, read(0), read(0x0c)])),
        (
            "raw",
            program(&[
                INIT,
                Op::Desc {
                    queue: 0,
                    index: 0,
                    addr: 0x2_1000,
                    len: 32,
                    flags: 2,
                    next: 0,
                },
                Op::Avail { queue: 0, head: 0 },
                Op::Notify { queue: 0 },
                Op::Read {
                    offset: 0x70,
                    len: 4,
                },
            ]),
        ),
    ]
}

/// A virtio-blk request header (§5.2.6): type, reserved, sector.
fn blk_header(kind: u32, sector: u64) -> Vec<u8> {
    [&kind.to_le_bytes()[..], &[0; 4], &sector.to_le_bytes()].concat()
}

fn blk() -> Seeds {
    let read = blk_header(0, 2);
    let write = [blk_header(1, 8), vec![0x5a; 1024]].concat();
    let flush = blk_header(4, 0);
    let id = blk_header(8, 0);
    let chain = |readable, writable, split| Op::Chain {
        queue: 0,
        split: split | CHAIN_HEADER | CHAIN_STATUS,
        readable,
        writable,
    };
    let ops = |first: &[Op<'_>]| {
        program(
            &[INIT]
                .into_iter()
                .chain(first.iter().cloned())
                .collect::<Vec<_>>(),
        )
    };
    let requests = [
        chain(&read, 4096, 0),
        chain(&write, 0, 1),
        chain(&flush, 0, 0),
        chain(&id, 20, 0),
    ];
    vec![
        // First byte: the disk (0 verified, 1 corrupt block, 2 writable).
        ("verified", [vec![0], ops(&requests)].concat()),
        (
            "corrupt",
            [vec![1], ops(&[chain(&blk_header(0, 40), 4096, 0)])].concat(),
        ),
        ("writable", [vec![2], ops(&requests)].concat()),
    ]
}

/// A FUSE request: its header (the `fuse_in_header` of 40 bytes) and arguments.
fn fuse(opcode: u32, unique: u64, nodeid: u64, args: &[u8]) -> Vec<u8> {
    let len = u32::try_from(40 + args.len()).expect("small");
    let mut out = Vec::new();
    for word in [len, opcode] {
        out.extend_from_slice(&word.to_le_bytes());
    }
    out.extend_from_slice(&unique.to_le_bytes());
    out.extend_from_slice(&nodeid.to_le_bytes());
    out.extend_from_slice(&[0; 16]); // uid, gid, pid, total_extlen, padding
    out.extend_from_slice(args);
    out
}

fn words(values: &[u64], sizes: &[usize]) -> Vec<u8> {
    values
        .iter()
        .zip(sizes)
        .flat_map(|(v, &n)| v.to_le_bytes()[..n].to_vec())
        .collect()
}

fn fs_requests() -> Seeds {
    // INIT 7.31 with every flag; then, on the root (1): LOOKUP "file" (node 2), OPEN it
    // (handle 1), READ, WRITE, a directory listing, MKDIR and a SETXATTR.
    let init = fuse(
        26,
        1,
        0,
        &words(&[7, 31, 1 << 17, u64::from(u32::MAX)], &[4; 4]),
    );
    let lookup = fuse(1, 2, 1, b"file\0");
    let open = fuse(14, 3, 2, &words(&[2, 0], &[4, 4]));
    let read = fuse(
        15,
        4,
        2,
        &words(&[1, 0, 4096, 0, 0, 0, 0], &[8, 8, 4, 4, 8, 4, 4]),
    );
    let write_in = words(&[1, 2, 5, 0, 0, 0, 0], &[8, 8, 4, 4, 8, 4, 4]);
    let write = fuse(16, 5, 2, &[write_in, b"world".to_vec()].concat());
    let opendir = fuse(27, 6, 1, &words(&[0, 0], &[4, 4]));
    let readdir = fuse(
        28,
        7,
        1,
        &words(&[2, 0, 4096, 0, 0, 0, 0], &[8, 8, 4, 4, 8, 4, 4]),
    );
    let mkdir = fuse(
        9,
        8,
        1,
        &[words(&[0o755, 0o022], &[4, 4]), b"new\0".to_vec()].concat(),
    );
    let setxattr = fuse(
        21,
        9,
        2,
        &[words(&[3, 0], &[4, 4]), b"user.k\0abc".to_vec()].concat(),
    );
    let escape = fuse(1, 10, 1, b"escape\0");
    let forget = fuse(2, 0, 2, &words(&[1], &[8]));
    let session = [
        init, lookup, open, read, write, opendir, readdir, mkdir, setxattr, escape,
    ];
    let mut ops = vec![INIT];
    ops.extend(session.iter().map(|bytes| Op::Chain {
        queue: 1,
        split: 0,
        readable: bytes,
        writable: 4096,
    }));
    ops.push(Op::Chain {
        queue: 0,
        split: 0,
        readable: &forget,
        writable: 0,
    });
    // What fuzzing found first: a MKDIR whose requester is uid -1 (now EINVAL).
    let mut hostile = session[7].clone();
    hostile[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
    let minus_one = [&session[0], &hostile].map(|bytes| Op::Chain {
        queue: 1,
        split: 0,
        readable: bytes,
        writable: 4096,
    });
    let minus_one = [&[INIT][..], &minus_one].concat();
    vec![
        // First byte: bit 0 makes the share read-only.
        ("session", [vec![0], program(&ops)].concat()),
        ("read_only", [vec![1], program(&ops)].concat()),
        (
            "mkdir_as_uid_minus_one",
            [vec![0], program(&minus_one)].concat(),
        ),
    ]
}

fn net() -> Seeds {
    let frame = frames::udp([10, 0, 2, 2], 9, b"to the network");
    let tx = [vec![0; 12], frame.clone()].concat();
    let rx_frame = frames::arp_request([10, 0, 2, 15]);
    let ops = [
        INIT,
        Op::Chain {
            queue: 1,
            split: 0,
            readable: &tx,
            writable: 0,
        },
        Op::Extra { bytes: &[] },
        Op::Chain {
            queue: 0,
            split: 0,
            readable: &[],
            writable: 1526,
        },
        Op::Extra { bytes: &rx_frame },
        Op::Read {
            offset: 0x100,
            len: 6,
        },
    ];
    vec![("send_and_receive", program(&ops))]
}

fn console() -> Seeds {
    let mut output = Vec::new();
    encode(0, &Message::Ready, &mut output);
    encode(0, &Message::Stdout(b"hello\n".to_vec()), &mut output);
    let ops = [
        INIT,
        Op::Chain {
            queue: 1,
            split: 1,
            readable: &output,
            writable: 0,
        },
        Op::Chain {
            queue: 0,
            split: 0,
            readable: &[],
            writable: 256,
        },
        Op::Extra {
            bytes: b"input from the host",
        },
    ];
    // The control handshake as Linux's driver does it, then init's PORT_OPEN, input and
    // output (control messages: id u32, event u16, value u16, little-endian).
    let control = |id: u32, event: u16, value: u16| {
        let mut out = id.to_le_bytes().to_vec();
        out.extend_from_slice(&event.to_le_bytes());
        out.extend_from_slice(&value.to_le_bytes());
        out
    };
    let device_ready = control(u32::MAX, 0, 1);
    let port_ready = control(0, 3, 1);
    let port_open = control(0, 6, 1);
    let control_buffer = Op::Chain {
        queue: 2,
        split: 0,
        readable: &[],
        writable: 64,
    };
    let send = |message| Op::Chain {
        queue: 3,
        split: 0,
        readable: message,
        writable: 0,
    };
    let handshake = [
        INIT,
        control_buffer.clone(),
        control_buffer.clone(),
        control_buffer.clone(),
        control_buffer,
        send(&device_ready),
        Op::Extra { bytes: &[] },
        Op::Chain {
            queue: 0,
            split: 0,
            readable: &[],
            writable: 256,
        },
        send(&port_ready),
        Op::Extra { bytes: &[] },
        send(&port_open),
        Op::Extra {
            bytes: b"input from the host",
        },
        Op::Chain {
            queue: 1,
            split: 1,
            readable: &output,
            writable: 0,
        },
    ];
    vec![
        ("output_and_input", program(&ops)),
        ("handshake", program(&handshake)),
    ]
}
