//! EROFS images from synthetic layers, checked by erofs-utils' `fsck.erofs --extract`
//! (an independent reader) and by a small reader of our own for what fsck 1.5 does not
//! extract (xattrs, nids, directory order).

// The test reader indexes a whole image in memory on a 64-bit host.
#![allow(clippy::cast_possible_truncation)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use indicatif::ProgressBar;
use sha2::{Digest, Sha256};

use super::*;
use crate::image::LayerCompression;

/// Builds one layer tar in memory.
pub(crate) struct Layer(::tar::Builder<Vec<u8>>);

impl Layer {
    pub(crate) fn new() -> Self {
        Layer(::tar::Builder::new(Vec::new()))
    }

    fn header(kind: ::tar::EntryType, mode: u32, size: u64) -> ::tar::Header {
        let mut header = ::tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(size);
        header.set_mtime(1_700_000_000);
        header
    }

    pub(crate) fn add(
        mut self,
        path: &str,
        kind: ::tar::EntryType,
        mode: u32,
        data: &[u8],
    ) -> Self {
        let mut header = Self::header(kind, mode, data.len() as u64);
        self.0.append_data(&mut header, path, data).expect("append");
        self
    }

    pub(crate) fn dir(self, path: &str, mode: u32) -> Self {
        self.add(path, ::tar::EntryType::Directory, mode, b"")
    }

    pub(crate) fn file(self, path: &str, data: &[u8]) -> Self {
        self.add(path, ::tar::EntryType::Regular, 0o644, data)
    }

    fn owned(mut self, path: &str, mode: u32, uid: u64, gid: u64, data: &[u8]) -> Self {
        let mut header = Self::header(::tar::EntryType::Regular, mode, data.len() as u64);
        header.set_uid(uid);
        header.set_gid(gid);
        self.0.append_data(&mut header, path, data).expect("append");
        self
    }

    fn link(mut self, kind: ::tar::EntryType, path: &str, target: &str) -> Self {
        let mut header = Self::header(kind, 0o777, 0);
        self.0.append_link(&mut header, path, target).expect("link");
        self
    }

    /// A PAX header with `SCHILY.xattr.*` records for the next member.
    fn xattrs(mut self, xattrs: &[(&str, &[u8])]) -> Self {
        let mut data = Vec::new();
        for (name, value) in xattrs {
            let body = [b" SCHILY.xattr.", name.as_bytes(), b"=", value, b"\n"].concat();
            let mut len = body.len() + 1;
            while len.to_string().len() + body.len() != len {
                len += 1;
            }
            data.extend_from_slice(len.to_string().as_bytes());
            data.extend_from_slice(&body);
        }
        let mut header = ::tar::Header::new_ustar();
        header.set_path("PaxHeaders/x").expect("path");
        header.set_entry_type(::tar::EntryType::XHeader);
        header.set_size(data.len() as u64);
        header.set_cksum();
        self.0.append(&header, &data[..]).expect("pax");
        self
    }

    pub(crate) fn write(self, dir: &Path, name: &str) -> LayerBlob {
        let bytes = self.0.into_inner().expect("tar");
        let path = dir.join(name);
        fs::write(&path, &bytes).expect("write layer");
        LayerBlob {
            digest: format!("sha256:{name}"),
            path,
            compression: LayerCompression::None,
            size: bytes.len() as u64,
        }
    }
}

/// Writes the image of `layers` to `dir/image.erofs`.
fn build(dir: &Path, layers: &[LayerBlob]) -> (PathBuf, Vec<u8>, ErofsStats) {
    let (image, hashes, stats) = write_erofs(
        layers,
        Limits::default(),
        &ProgressBar::hidden(),
        Vec::new(),
        Vec::new(),
    )
    .expect("write erofs");
    let path = dir.join("image.erofs");
    fs::write(&path, &image).expect("write image");
    (path, hashes, stats)
}

/// `fsck.erofs --extract` into a fresh directory (ownership and modes preserved).
pub(crate) fn fsck_extract(image: &Path) -> tempfile::TempDir {
    let out = tempfile::tempdir().expect("tempdir");
    let target = out.path().join("root");
    let result = Command::new("fsck.erofs")
        .arg(format!("--extract={}", target.display()))
        .arg("--preserve")
        .arg(image)
        .output()
        .expect("fsck.erofs not found: install erofs-utils (Debian package `erofs-utils`)");
    assert!(
        result.status.success(),
        "fsck.erofs rejected the image: {}{}",
        String::from_utf8_lossy(&result.stdout),
        String::from_utf8_lossy(&result.stderr)
    );
    out
}

/// Every entry below `root`: `path -> "kind mode uid:gid nlink detail"`.
fn listing(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).expect("read dir") {
            let path = entry.expect("entry").path();
            let meta = fs::symlink_metadata(&path).expect("stat");
            let kind = meta.file_type();
            let detail = if kind.is_dir() {
                stack.push(path.clone());
                "dir".to_string()
            } else if kind.is_symlink() {
                format!("-> {}", fs::read_link(&path).expect("link").display())
            } else if kind.is_fifo() {
                "fifo".to_string()
            } else {
                let data = fs::read(&path).expect("read");
                if data.len() <= 64 {
                    format!("{:?}", String::from_utf8_lossy(&data))
                } else {
                    format!(
                        "{} bytes {}",
                        data.len(),
                        hex::encode(Sha256::digest(&data))
                    )
                }
            };
            let name = path
                .strip_prefix(root)
                .expect("below")
                .display()
                .to_string();
            let line = format!(
                "{:o} {}:{} {} {detail}",
                meta.mode() & 0o7777,
                meta.uid(),
                meta.gid(),
                if kind.is_dir() { 0 } else { meta.nlink() }
            );
            out.insert(name, line);
        }
    }
    out
}

fn layered(dir: &Path) -> Vec<LayerBlob> {
    let long = "L".repeat(255);
    let deep: String = (0..60).map(|i| format!("d{i}/")).collect();
    let mut base = Layer::new()
        .dir("bin", 0o755)
        .owned("bin/busybox", 0o4755, 0, 0, b"busybox binary")
        .link(::tar::EntryType::Link, "bin/sh", "bin/busybox")
        .dir("etc", 0o755)
        .file("etc/passwd", b"root:x:0:0\n")
        .dir("etc/old", 0o755)
        .file("etc/old/conf", b"old")
        .dir("usr/lib", 0o755)
        .file("usr/lib/libc.so", b"libc")
        .link(::tar::EntryType::Symlink, "lib", "usr/lib")
        .add("run/ctl", ::tar::EntryType::Fifo, 0o600, b"")
        .add("dev/null", ::tar::EntryType::Char, 0o666, b"")
        .dir("tmp", 0o1777)
        .owned("home/www/index.html", 0o2640, 101, 4_000_000_000, b"<html>")
        .file("empty", b"")
        .file(&format!("names/{long}"), b"long name")
        .link(
            ::tar::EntryType::Symlink,
            "names/long-target",
            &"t".repeat(300),
        )
        .file(&format!("{deep}leaf"), b"deep")
        .file("big", &vec![7u8; 3 * 4096 + 5]);
    for i in 0..400 {
        // ~100 bytes per entry: several directory blocks.
        base = base.file(
            &format!("many/{i:04}-{}", "x".repeat(80)),
            format!("{i}").as_bytes(),
        );
    }
    let base = base.write(dir, "base");
    let update = Layer::new()
        .file("etc/.wh.old", b"")
        .file("etc/passwd", b"root:x:0:0\nwww:x:101:102\n")
        .dir("usr", 0o755)
        .file("usr/.wh..wh..opq", b"")
        .file("usr/share/doc", b"doc")
        .link(::tar::EntryType::Link, "bin/ash", "bin/busybox")
        .write(dir, "update");
    let top = Layer::new()
        .file("bin/.wh.busybox", b"")
        .file("etc/hostname", b"box\n")
        .dir("etc/passwd", 0o700)
        .file(&format!("many/.wh.0001-{}", "x".repeat(80)), b"")
        .write(dir, "top");
    vec![base, update, top]
}

#[test]
fn every_kind_of_entry_survives_fsck_extraction() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (image, _, stats) = build(dir.path(), &layered(dir.path()));
    let out = fsck_extract(&image);
    let root = out.path().join("root");
    let got = listing(&root);
    let long = "L".repeat(255);
    let deep: String = (0..60).map(|i| format!("d{i}/")).collect();
    let want = |path: &str| got.get(path).map(String::as_str).unwrap_or("MISSING");
    // erofs-utils 1.5 extracts hard links as copies and loses setuid (chown after
    // chmod): those are checked with our own reader below.
    assert!(want("bin/ash").ends_with(" \"busybox binary\""));
    assert!(want("bin/sh").ends_with(" \"busybox binary\""));
    assert_eq!(want("bin/busybox"), "MISSING", "whited out");
    assert_eq!(want("etc/old"), "MISSING", "whited out directory");
    assert_eq!(want("etc/passwd"), "700 0:0 0 dir");
    assert_eq!(want("etc/hostname"), "644 0:0 1 \"box\\n\"");
    assert_eq!(want("usr/lib"), "MISSING", "opaque directory");
    assert_eq!(want("usr/share/doc"), "644 0:0 1 \"doc\"");
    assert_eq!(want("lib"), "777 0:0 1 -> usr/lib");
    assert_eq!(want("run/ctl"), "600 0:0 1 fifo");
    assert_eq!(want("dev/null"), "MISSING", "devices are left out");
    assert_eq!(want("tmp"), "1777 0:0 0 dir");
    assert_eq!(
        want("home/www/index.html"),
        "2640 101:4000000000 1 \"<html>\""
    );
    assert_eq!(want("empty"), "644 0:0 1 \"\"");
    assert_eq!(want(&format!("names/{long}")), "644 0:0 1 \"long name\"");
    assert_eq!(
        want("names/long-target"),
        format!("777 0:0 1 -> {}", "t".repeat(300))
    );
    assert_eq!(want(&format!("{deep}leaf")), "644 0:0 1 \"deep\"");
    let big = vec![7u8; 3 * 4096 + 5];
    assert_eq!(
        want("big"),
        format!(
            "644 0:0 1 {} bytes {}",
            big.len(),
            hex::encode(Sha256::digest(&big))
        )
    );
    let many: Vec<&String> = got.keys().filter(|k| k.starts_with("many/")).collect();
    assert_eq!(many.len(), 399);
    assert_eq!(
        want(&format!("many/0399-{}", "x".repeat(80))),
        "644 0:0 1 \"399\""
    );
    assert_eq!(
        stats,
        ErofsStats {
            directories: 13 + 60,
            files: 8 + 399,
            hard_links: 1,
            symlinks: 2,
            fifos: 1,
            content_bytes: 14 + 4 + 3 + 6 + 9 + 4 + 3 * 4096 + 5 + 1089,
            devices_skipped: 1,
            xattrs_kept: 0,
            xattrs_dropped: 0,
            blocks: fs::metadata(&image).expect("stat").len() / BLOCK_SIZE,
        }
    );
    // Our own reader: the big directory spans several blocks, sorted across them, and
    // lookups by binary search order find every name.
    let image = Reader(fs::read(&image).expect("read"));
    let many = image.lookup("many").expect("many");
    let entries = image.dir(many);
    assert!(image.inode(many).size > 2 * BLOCK_SIZE, "several blocks");
    let names: Vec<&Vec<u8>> = entries.iter().map(|(name, _)| name).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    assert_eq!(names[..2], [&b".".to_vec(), &b"..".to_vec()]);
    let root_nid = image.root();
    assert_eq!(
        image.inode(root_nid).nlink,
        2 + 10,
        "root: itself, its .., subdirs"
    );
    assert_eq!(
        image.dir(root_nid)[1],
        (b"..".to_vec(), root_nid),
        "root's .. is itself"
    );
    let sh = image.lookup("bin/sh").expect("sh");
    assert_eq!(
        image.lookup("bin/ash"),
        Some(sh),
        "one inode for both names"
    );
    let sh = image.inode(sh);
    assert_eq!((sh.mode, sh.nlink, sh.uid, sh.gid), (0o104755, 2, 0, 0));
    let www = image.inode(image.lookup("home/www/index.html").expect("www"));
    assert_eq!((www.mode, www.uid, www.gid), (0o102640, 101, 4_000_000_000));
    let tmp = image.inode(image.lookup("tmp").expect("tmp"));
    assert_eq!((tmp.mode, tmp.nlink), (0o041777, 2));
    let fifo = image.inode(image.lookup("run/ctl").expect("fifo"));
    assert_eq!((fifo.mode, fifo.size), (0o010600, 0));
    let empty = image.inode(image.lookup("empty").expect("empty"));
    assert_eq!((empty.mode, empty.size, empty.blkaddr), (0o100644, 0, 0));
}

#[test]
fn xattrs_are_kept_byte_exact_and_unsupported_ones_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let capability =
        b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00";
    let big = vec![b'v'; 5000];
    let layer = Layer::new()
        .xattrs(&[
            ("security.capability", capability),
            ("user.empty", b""),
            ("system.nfs4_acl", b"dropped"),
        ])
        .file("bin/ping", b"ping")
        .link(::tar::EntryType::Link, "bin/ping6", "bin/ping")
        .xattrs(&[("trusted.overlay.opaque", b"y"), ("user.big", &big)])
        .dir("etc", 0o755)
        .xattrs(&[("user.kind", b"symlink")])
        .link(::tar::EntryType::Symlink, "etc/link", "../bin/ping")
        .write(dir.path(), "x");
    let (image, _, stats) = build(dir.path(), &[layer]);
    assert_eq!((stats.xattrs_kept, stats.xattrs_dropped), (5, 1));
    fsck_extract(&image);
    let image = Reader(fs::read(&image).expect("read"));
    let ping = image.lookup("bin/ping").expect("ping");
    assert_eq!(
        image.lookup("bin/ping6"),
        Some(ping),
        "hard link, one inode"
    );
    assert_eq!(
        image.xattrs(ping),
        [
            (6, b"capability".to_vec(), capability.to_vec()),
            (1, b"empty".to_vec(), vec![])
        ]
    );
    let etc = image.lookup("etc").expect("etc");
    assert_eq!(
        image.xattrs(etc),
        [
            (4, b"overlay.opaque".to_vec(), b"y".to_vec()),
            (1, b"big".to_vec(), big.clone())
        ]
    );
    let link = image.lookup("etc/link").expect("link");
    assert_eq!(
        image.xattrs(link),
        [(1, b"kind".to_vec(), b"symlink".to_vec())]
    );
    assert_eq!(image.data(link), b"../bin/ping");
}

#[test]
fn block_list_holds_the_sha256_of_every_block() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (image, hashes, stats) = build(dir.path(), &layered(dir.path()));
    let bytes = fs::read(&image).expect("read");
    assert_eq!(bytes.len() as u64 % BLOCK_SIZE, 0);
    assert_eq!(bytes.len() as u64, stats.blocks * BLOCK_SIZE);
    let want: Vec<u8> = bytes
        .chunks(BLOCK_SIZE as usize)
        .flat_map(|block| Sha256::digest(block).to_vec())
        .collect();
    assert_eq!(hashes, want);
}

#[test]
fn names_longer_than_a_dirent_holds_are_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let layer = Layer::new()
        .file(&"n".repeat(256), b"x")
        .write(dir.path(), "x");
    let err = write_erofs(
        &[layer],
        Limits::default(),
        &ProgressBar::hidden(),
        Vec::new(),
        Vec::new(),
    )
    .expect_err("256-byte name");
    // The tree already refuses components longer than Linux's NAME_MAX.
    assert!(
        matches!(
            err,
            ErofsError::Layers(LayerError::Entry {
                source: crate::layers::TreeError::Path(crate::layers::PathError::ComponentTooLong),
                ..
            })
        ),
        "{err:?}"
    );
}

#[test]
fn truncated_layers_name_the_layer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let layer = Layer::new()
        .file("f", &vec![1u8; 10_000])
        .write(dir.path(), "x");
    let bytes = fs::read(&layer.path).expect("read");
    fs::write(&layer.path, &bytes[..6000]).expect("truncate");
    let err = write_erofs(
        &[layer],
        Limits::default(),
        &ProgressBar::hidden(),
        Vec::new(),
        Vec::new(),
    )
    .expect_err("truncated");
    assert!(
        matches!(err, ErofsError::Layers(LayerError::Read { .. })),
        "{err:?}"
    );
}

#[test]
fn a_hundred_thousand_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut layer = Layer::new();
    for d in 0..10 {
        for f in 0..10_000 {
            layer = layer.file(&format!("d{d}/f{f:05}"), format!("{d}/{f}").as_bytes());
        }
    }
    let layer = layer.write(dir.path(), "many");
    let (image, _, stats) = build(dir.path(), &[layer]);
    assert_eq!(stats.files, 100_000);
    let out = fsck_extract(&image);
    let root = out.path().join("root");
    let mut count = 0;
    for d in 0..10 {
        for entry in fs::read_dir(root.join(format!("d{d}"))).expect("dir") {
            let entry = entry.expect("entry");
            let name = entry.file_name().into_string().expect("utf-8");
            let f: u32 = name[1..].parse().expect("number");
            assert_eq!(
                fs::read(entry.path()).expect("read"),
                format!("{d}/{f}").as_bytes()
            );
            count += 1;
        }
    }
    assert_eq!(count, 100_000);
}

/// The Linux kernel's own reader: needs root and loop devices, hence ignored by default.
/// Run with `cargo test -p imagebuilder --lib erofs::tests::kernel -- --ignored`.
#[test]
#[ignore = "needs root, loop devices and an erofs-capable kernel"]
fn kernel_mounts_the_image() {
    let dir = tempfile::tempdir().expect("tempdir");
    let capability =
        b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00";
    let mut layers = layered(dir.path());
    layers.push(
        Layer::new()
            .xattrs(&[("security.capability", capability)])
            .owned("bin/ping", 0o4755, 0, 0, b"ping")
            .write(dir.path(), "caps"),
    );
    let (image, _, _) = build(dir.path(), &layers);
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).expect("mkdir");
    let run = |args: &[&std::ffi::OsStr]| {
        let status = Command::new(args[0])
            .args(&args[1..])
            .status()
            .expect("spawn");
        assert!(status.success(), "{args:?}");
    };
    run(&[
        "mount".as_ref(),
        "-t".as_ref(),
        "erofs".as_ref(),
        "-o".as_ref(),
        "loop,ro".as_ref(),
        image.as_os_str(),
        mnt.as_os_str(),
    ]);
    let checks = std::panic::catch_unwind(|| {
        let got = listing(&mnt);
        assert_eq!(got["bin/sh"], "4755 0:0 2 \"busybox binary\"");
        assert_eq!(
            fs::metadata(mnt.join("bin/sh")).expect("sh").ino(),
            fs::metadata(mnt.join("bin/ash")).expect("ash").ino()
        );
        assert_eq!(
            got["home/www/index.html"],
            "2640 101:4000000000 1 \"<html>\""
        );
        assert_eq!(got["run/ctl"], "600 0:0 1 fifo");
        for i in (0..400).filter(|&i| i != 1) {
            let name = format!("many/{i:04}-{}", "x".repeat(80));
            assert_eq!(
                fs::read(mnt.join(&name)).expect(&name),
                format!("{i}").as_bytes()
            );
        }
        let path = std::ffi::CString::new(mnt.join("bin/ping").as_os_str().as_encoded_bytes())
            .expect("path");
        let mut value = [0u8; 64];
        // SAFETY: both pointers are valid NUL-terminated strings and the buffer length
        // is the buffer's.
        let n = unsafe {
            libc::getxattr(
                path.as_ptr(),
                c"security.capability".as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        assert_eq!(&value[..usize::try_from(n).expect("getxattr")], capability);
    });
    run(&["umount".as_ref(), mnt.as_os_str()]);
    checks.expect("checks on the mounted image");
}

/// A minimal EROFS reader for what fsck.erofs 1.5 does not extract.
struct Reader(Vec<u8>);

struct RawInode {
    layout: u16,
    mode: u16,
    uid: u32,
    gid: u32,
    xattr_size: usize,
    size: u64,
    blkaddr: u64,
    nlink: u32,
}

impl Reader {
    fn u16(&self, at: u64) -> u16 {
        let at = at as usize;
        u16::from_le_bytes(self.0[at..at + 2].try_into().expect("2"))
    }

    fn u32(&self, at: u64) -> u32 {
        let at = at as usize;
        u32::from_le_bytes(self.0[at..at + 4].try_into().expect("4"))
    }

    fn u64(&self, at: u64) -> u64 {
        let at = at as usize;
        u64::from_le_bytes(self.0[at..at + 8].try_into().expect("8"))
    }

    fn root(&self) -> u64 {
        assert_eq!(self.u32(1024), MAGIC);
        assert_eq!(self.0[1024 + 12], 12);
        u64::from(self.u16(1024 + 14))
    }

    fn inode(&self, nid: u64) -> RawInode {
        let at = nid * 32;
        let format = self.u16(at);
        assert_eq!(format & 1, 1, "extended inode");
        let icount = self.u16(at + 2);
        RawInode {
            layout: format >> 1,
            mode: self.u16(at + 4),
            uid: self.u32(at + 24),
            gid: self.u32(at + 28),
            xattr_size: if icount == 0 {
                0
            } else {
                12 + 4 * (icount as usize - 1)
            },
            size: self.u64(at + 8),
            blkaddr: u64::from(self.u32(at + 16)),
            nlink: self.u32(at + 44),
        }
    }

    fn data(&self, nid: u64) -> Vec<u8> {
        let inode = self.inode(nid);
        let whole = if inode.layout == 2 {
            inode.size / 4096 * 4096
        } else {
            inode.size
        };
        let start = (inode.blkaddr * 4096) as usize;
        let mut data = self.0[start..start + whole as usize].to_vec();
        if inode.layout == 2 {
            let tail = (nid * 32 + 64) as usize + inode.xattr_size;
            let len = (inode.size - whole) as usize;
            assert!(tail % 4096 + len <= 4096, "inline tail crosses a block");
            data.extend_from_slice(&self.0[tail..tail + len]);
        }
        data
    }

    fn dir(&self, nid: u64) -> Vec<(Vec<u8>, u64)> {
        let data = self.data(nid);
        let mut out = Vec::new();
        for block in data.chunks(4096) {
            let count = usize::from(u16::from_le_bytes([block[8], block[9]])) / 12;
            for i in 0..count {
                let e = &block[i * 12..];
                let nid = u64::from_le_bytes(e[0..8].try_into().expect("8"));
                let start = usize::from(u16::from_le_bytes([e[8], e[9]]));
                let end = if i + 1 < count {
                    usize::from(u16::from_le_bytes([e[20], e[21]]))
                } else {
                    block[start..]
                        .iter()
                        .position(|&b| b == 0)
                        .map_or(block.len(), |n| start + n)
                };
                out.push((block[start..end].to_vec(), nid));
            }
        }
        out
    }

    fn lookup(&self, path: &str) -> Option<u64> {
        path.split('/').try_fold(self.root(), |dir, name| {
            self.dir(dir)
                .into_iter()
                .find(|(entry, _)| entry == name.as_bytes())
                .map(|(_, nid)| nid)
        })
    }

    fn xattrs(&self, nid: u64) -> Vec<(u8, Vec<u8>, Vec<u8>)> {
        let inode = self.inode(nid);
        let mut at = (nid * 32 + 64 + 12) as usize;
        let end = (nid * 32 + 64) as usize + inode.xattr_size;
        let mut out = Vec::new();
        while at < end {
            let (len, index) = (usize::from(self.0[at]), self.0[at + 1]);
            let value_len = usize::from(self.u16(at as u64 + 2));
            let name = self.0[at + 4..at + 4 + len].to_vec();
            let value = self.0[at + 4 + len..at + 4 + len + value_len].to_vec();
            out.push((index, name, value));
            at += (4 + len + value_len).next_multiple_of(4);
        }
        out
    }
}
