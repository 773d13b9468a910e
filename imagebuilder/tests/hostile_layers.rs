//! Hostile layers (testing.md §3), generated in code: each one packs to a clean error in
//! bounded time with nothing left in the packed cache, or to a safe archive whose names
//! all stay below the image root.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use imagebuilder::image::{ImageConfig, LayerBlob, LayerCompression, PulledImage};
use imagebuilder::layers::{LayerError, PathError, TarError, TreeError};
use imagebuilder::limits::{LimitError, Limits};
use imagebuilder::pack::{packed_initramfs, PackError, PackOptions};
use tar::EntryType;

/// Every case must finish well within this, whatever the layer claims to hold.
const TIME_BOUND: Duration = Duration::from_secs(20);

/// A tar header with `name` written raw (the `tar` crate refuses `..` and absolute names).
fn header(name: &[u8], kind: EntryType, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.as_old_mut().name[..name.len()].copy_from_slice(name);
    header.set_entry_type(kind);
    header.set_mode(0o644);
    header.set_size(size);
    header.set_cksum();
    header
}

fn link_header(name: &[u8], kind: EntryType, target: &[u8]) -> tar::Header {
    let mut header = header(name, kind, 0);
    header.as_old_mut().linkname[..target.len()].copy_from_slice(target);
    header.set_cksum();
    header
}

/// A complete tar stream of `entries` (header, content).
fn tar_of(entries: &[(tar::Header, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (header, data) in entries {
        builder.append(header, *data).expect("append");
    }
    builder.into_inner().expect("finish tar")
}

fn file(name: &str, data: &'static [u8]) -> (tar::Header, &'static [u8]) {
    (
        header(name.as_bytes(), EntryType::Regular, data.len() as u64),
        data,
    )
}

/// One PAX record, `"<len> <key>=<value>\n"`, where the length counts its own digits.
fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let body = [b" ", key.as_bytes(), b"=", value, b"\n"].concat();
    let mut len = body.len() + 1;
    while len.to_string().len() + body.len() != len {
        len += 1;
    }
    [len.to_string().as_bytes(), &body].concat()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).expect("gzip");
    encoder.finish().expect("gzip")
}

/// `n` MiB of zeros as concatenated gzip members: a few KiB on disk.
fn gzip_zeros_mib(n: usize) -> Vec<u8> {
    let member = gzip(&vec![0; 1 << 20]);
    member.repeat(n)
}

struct Case {
    layers: Vec<(Vec<u8>, LayerCompression)>,
    limits: Limits,
}

impl Case {
    fn plain(layers: Vec<Vec<u8>>) -> Self {
        Case {
            layers: layers
                .into_iter()
                .map(|bytes| (bytes, LayerCompression::None))
                .collect(),
            limits: Limits::default(),
        }
    }

    fn gzip(layer: Vec<u8>) -> Self {
        Case {
            layers: vec![(layer, LayerCompression::Gzip)],
            limits: Limits::default(),
        }
    }

    fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Packs the case into a fresh cache; returns the result and the packed files left.
    fn pack(&self) -> (Result<Vec<u8>, PackError>, Vec<String>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let layers = self
            .layers
            .iter()
            .enumerate()
            .map(|(i, (bytes, compression))| {
                let path = dir.path().join(format!("layer{i}"));
                fs::write(&path, bytes).expect("write layer");
                LayerBlob {
                    digest: format!("sha256:{i:064x}"),
                    path,
                    compression: *compression,
                    size: bytes.len() as u64,
                }
            })
            .collect();
        let image = PulledImage {
            reference: "hostile/image:latest".into(),
            manifest_digest: format!("sha256:{}", "f".repeat(64)),
            config: ImageConfig::default(),
            layers,
        };
        let cache = dir.path().join("cache");
        let opts = PackOptions {
            limits: self.limits,
            ..PackOptions::default()
        };
        let start = Instant::now();
        let result = packed_initramfs(&image, &cache, &opts);
        let elapsed = start.elapsed();
        assert!(elapsed < TIME_BOUND, "took {elapsed:?}");
        let result = result.map(|path| unzstd(&path));
        (result, packed_files(&cache.join("packed")))
    }

    /// Expects a clean error, and nothing (not even a temporary file) in the cache.
    fn rejects(&self) -> LayerError {
        let (result, left) = self.pack();
        assert!(left.is_empty(), "cache holds {left:?}");
        match result {
            Err(PackError::Layers { source, .. }) => source,
            other => panic!("expected a layer error, got {other:?}"),
        }
    }

    /// Expects success; returns the archive's names, each checked to stay below the root.
    fn accepts(&self) -> Vec<String> {
        let (result, left) = self.pack();
        let archive = result.expect("safe image packs");
        assert_eq!(left.len(), 1, "one packed file");
        let names = cpio_names(&archive);
        for name in &names {
            assert!(
                !name.starts_with('/') && !name.split('/').any(|part| part == ".."),
                "unsafe name {name:?}"
            );
        }
        names
    }
}

fn packed_files(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|entry| {
                    entry
                        .expect("entry")
                        .file_name()
                        .to_string_lossy()
                        .into_owned()
                })
                .collect()
        })
        .unwrap_or_default()
}

fn unzstd(path: &PathBuf) -> Vec<u8> {
    let mut bytes = Vec::new();
    zstd::stream::read::Decoder::new(fs::File::open(path).expect("open packed"))
        .expect("zstd")
        .read_to_end(&mut bytes)
        .expect("decompress packed");
    bytes
}

/// Names in the archive according to Debian's `cpio -t`.
fn cpio_names(archive: &[u8]) -> Vec<String> {
    let mut child = Command::new("cpio")
        .args(["-t", "--quiet"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("cpio (Debian package `cpio`) must be installed");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(archive)
        .expect("feed cpio");
    let out = child.wait_with_output().expect("cpio");
    assert!(out.status.success(), "cpio -t failed");
    let mut names: Vec<String> = String::from_utf8(out.stdout)
        .expect("utf-8")
        .lines()
        .map(str::to_string)
        .collect();
    names.sort();
    names
}

fn is_path_error(err: &LayerError, want: fn(&PathError) -> bool) -> bool {
    matches!(err, LayerError::Entry { source: TreeError::Path(path), .. } if want(path))
}

fn is_limit(err: &LayerError, want: fn(&LimitError) -> bool) -> bool {
    match err {
        LayerError::Read {
            source: TarError::Limit(limit),
            ..
        }
        | LayerError::Entry {
            source: TreeError::Limit(limit) | TreeError::Path(PathError::Limit(limit)),
            ..
        } => want(limit),
        _ => false,
    }
}

#[test]
fn dot_dot_escape_is_rejected() {
    let err = Case::plain(vec![tar_of(&[file("a/../../etc/passwd", b"x")])]).rejects();
    assert!(
        is_path_error(&err, |e| matches!(e, PathError::Escapes)),
        "{err:?}"
    );
    let err = Case::plain(vec![tar_of(&[file("..", b"")])]).rejects();
    assert!(
        is_path_error(&err, |e| matches!(e, PathError::Escapes)),
        "{err:?}"
    );
}

#[test]
fn absolute_path_is_rejected() {
    let err = Case::plain(vec![tar_of(&[file("/etc/passwd", b"x")])]).rejects();
    assert!(
        is_path_error(&err, |e| matches!(e, PathError::Absolute)),
        "{err:?}"
    );
}

#[test]
fn symlink_out_of_root_is_never_written_through() {
    let lower = tar_of(&[
        (
            link_header(b"evil", EntryType::Symlink, b"../../../../etc"),
            b"",
        ),
        (link_header(b"abs", EntryType::Symlink, b"/etc"), b""),
    ]);
    let upper = tar_of(&[file("evil/passwd", b"pwned"), file("abs/shadow", b"pwned")]);
    let names = Case::plain(vec![lower, upper]).accepts();
    assert_eq!(names, ["abs", "abs/shadow", "evil", "evil/passwd"]);
    // The same within one layer: the symlink is replaced by a directory.
    let one = tar_of(&[
        (link_header(b"evil", EntryType::Symlink, b"/etc"), b""),
        file("evil/passwd", b"pwned"),
    ]);
    assert_eq!(Case::plain(vec![one]).accepts(), ["evil", "evil/passwd"]);
}

#[test]
fn hard_links_to_outside_or_missing_targets_are_rejected() {
    let outside = tar_of(&[(link_header(b"h", EntryType::Link, b"../../etc/shadow"), b"")]);
    let err = Case::plain(vec![outside]).rejects();
    assert!(
        matches!(
            &err,
            LayerError::Entry {
                source: TreeError::LinkTarget(PathError::Escapes),
                ..
            }
        ),
        "{err:?}"
    );
    let absolute = tar_of(&[(link_header(b"h", EntryType::Link, b"/etc/shadow"), b"")]);
    let err = Case::plain(vec![absolute]).rejects();
    assert!(
        matches!(
            &err,
            LayerError::Entry {
                source: TreeError::LinkTarget(PathError::Absolute),
                ..
            }
        ),
        "{err:?}"
    );
    let missing = tar_of(&[(link_header(b"h", EntryType::Link, b"nowhere"), b"")]);
    let err = Case::plain(vec![missing]).rejects();
    assert!(
        matches!(
            &err,
            LayerError::Entry {
                source: TreeError::MissingLinkTarget(_),
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn device_nodes_are_left_out_and_fifos_kept() {
    let layer = tar_of(&[
        (header(b"dev/sda", EntryType::Block, 0), b""),
        (header(b"dev/mem", EntryType::Char, 0), b""),
        (header(b"run/pipe", EntryType::Fifo, 0), b""),
    ]);
    assert_eq!(
        Case::plain(vec![layer]).accepts(),
        ["dev", "run", "run/pipe"]
    );
}

#[test]
fn huge_names_are_rejected_quickly() {
    let long = format!("{}/f", "d/".repeat(3000));
    let mut builder = tar::Builder::new(Vec::new());
    let mut head = tar::Header::new_gnu();
    head.set_size(0);
    builder
        .append_data(&mut head, &long, &b""[..])
        .expect("long name");
    let err = Case::plain(vec![builder.into_inner().expect("tar")]).rejects();
    assert!(
        is_limit(&err, |l| matches!(l, LimitError::NameLength(_))),
        "{err:?}"
    );

    let component = "c".repeat(300);
    let mut builder = tar::Builder::new(Vec::new());
    builder
        .append_data(&mut head, &component, &b""[..])
        .expect("long component");
    let err = Case::plain(vec![builder.into_inner().expect("tar")]).rejects();
    assert!(
        is_path_error(&err, |e| matches!(e, PathError::ComponentTooLong)),
        "{err:?}"
    );

    // A GNU long-name header that claims 1 GiB: refused before anything is buffered.
    let mut bomb = header(b"././@LongLink", EntryType::GNULongName, 1 << 30)
        .as_bytes()
        .to_vec();
    bomb.extend_from_slice(&[b'a'; 4096]);
    let err = Case::plain(vec![bomb]).rejects();
    assert!(
        is_limit(&err, |l| matches!(l, LimitError::NameLength(_))),
        "{err:?}"
    );

    // The same for a PAX extended header.
    let mut bomb = header(b"PaxHeader", EntryType::XHeader, 1 << 30)
        .as_bytes()
        .to_vec();
    bomb.extend_from_slice(&[b'1'; 4096]);
    let err = Case::plain(vec![bomb]).rejects();
    assert!(
        matches!(
            &err,
            LayerError::Read {
                source: TarError::PaxTooLarge,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn nul_bytes_end_raw_names_and_are_rejected_in_pax_names() {
    // In a ustar name field the first NUL ends the name: what follows is never seen.
    let raw = tar_of(&[(
        header(b"safe\0/../../etc/passwd", EntryType::Regular, 1),
        b"x",
    )]);
    assert_eq!(Case::plain(vec![raw]).accepts(), ["safe"]);
    let record = pax_record("path", b"a\0/../../../etc/x");
    let pax = header(b"PaxHeader", EntryType::XHeader, record.len() as u64);
    let layer = tar_of(&[(pax, &record[..]), file("f", b"x")]);
    let err = Case::plain(vec![layer]).rejects();
    assert!(
        is_path_error(&err, |e| matches!(e, PathError::Nul)),
        "{err:?}"
    );
}

#[test]
fn duplicate_entries_last_one_wins() {
    let layer = tar_of(&[file("etc/motd", b"first"), file("etc/motd", b"second!")]);
    let (result, _) = Case::plain(vec![layer]).pack();
    let archive = result.expect("packs");
    let text = String::from_utf8_lossy(&archive);
    assert!(text.contains("second!") && !text.contains("first"));
}

#[test]
fn whiteouts_of_the_root_are_rejected() {
    for name in [&b".wh.."[..], b".wh.", b"./.wh...", b"a/.wh.."] {
        let lower = tar_of(&[file("keep", b"x")]);
        let upper = tar_of(&[(header(name, EntryType::Regular, 0), b"")]);
        let err = Case::plain(vec![lower, upper]).rejects();
        assert!(
            matches!(
                &err,
                LayerError::Entry {
                    source: TreeError::WhiteoutOfDirectory,
                    ..
                }
            ),
            "{name:?}: {err:?}"
        );
    }
    // A root entry that is not a directory.
    let err = Case::plain(vec![tar_of(&[file("./", b"")])]).rejects();
    assert!(
        matches!(
            &err,
            LayerError::Entry {
                source: TreeError::RootNotDirectory,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn gzip_bomb_of_a_huge_zero_file_hits_a_limit_at_its_header() {
    // 8 GiB of zeros declared; the blob is ~8 MiB of repeated gzip members.
    let mut blob = gzip(header(b"zeros", EntryType::Regular, 8 << 30).as_bytes());
    blob.extend(gzip_zeros_mib(8));
    let err = Case::gzip(blob.clone()).rejects();
    assert!(
        is_limit(&err, |l| matches!(l, LimitError::FileSize(_))),
        "{err:?}"
    );
    let no_file_cap = Limits {
        file_size: u64::MAX,
        ..Limits::default()
    };
    let err = Case::gzip(blob).limits(no_file_cap).rejects();
    assert!(
        is_limit(&err, |l| matches!(l, LimitError::TotalSize(_))),
        "{err:?}"
    );
}

#[test]
fn files_under_the_file_cap_still_hit_the_total_cap() {
    let limits = Limits {
        total_size: 96 << 20,
        ..Limits::default()
    };
    let mut blob = Vec::new();
    for i in 0..4u8 {
        blob.extend(gzip(
            header(&[b'f', b'0' + i], EntryType::Regular, 32 << 20).as_bytes(),
        ));
        blob.extend(gzip_zeros_mib(32));
    }
    let err = Case::gzip(blob).limits(limits).rejects();
    assert!(
        is_limit(&err, |l| matches!(l, LimitError::TotalSize(_))),
        "{err:?}"
    );
}

#[test]
fn zeros_after_the_end_are_bounded_too() {
    let limits = Limits {
        total_size: 64 << 20,
        ..Limits::default()
    };
    let mut blob = gzip(&tar_of(&[file("f", b"x")]));
    blob.extend(gzip_zeros_mib(1024));
    let err = Case::gzip(blob).limits(limits).rejects();
    assert!(
        is_limit(&err, |l| matches!(l, LimitError::TotalSize(_))),
        "{err:?}"
    );
}

#[test]
fn a_million_tiny_files_hit_the_entry_cap() {
    // 510k headers (more than the default cap of 500k) as repeated gzip members.
    let mut thousand = Vec::new();
    for _ in 0..1000 {
        thousand.extend_from_slice(header(b"tiny", EntryType::Regular, 0).as_bytes());
    }
    let blob = gzip(&thousand).repeat(510);
    let err = Case::gzip(blob).rejects();
    assert!(
        is_limit(&err, |l| matches!(l, LimitError::Entries(_))),
        "{err:?}"
    );
    // Distinct names under a lower cap exercise the tree as well.
    let entries: Vec<_> = (0..3000)
        .map(|i| {
            (
                header(
                    format!("d{}/f{i}", i % 50).as_bytes(),
                    EntryType::Regular,
                    0,
                ),
                &b""[..],
            )
        })
        .collect();
    let limits = Limits {
        entries: 2000,
        ..Limits::default()
    };
    let err = Case::plain(vec![tar_of(&entries)]).limits(limits).rejects();
    assert!(
        is_limit(&err, |l| matches!(l, LimitError::Entries(_))),
        "{err:?}"
    );
}

#[test]
fn very_deep_trees_hit_the_depth_cap() {
    let deep = format!("{}f", "d/".repeat(200));
    let mut builder = tar::Builder::new(Vec::new());
    let mut head = tar::Header::new_gnu();
    head.set_size(0);
    builder
        .append_data(&mut head, &deep, &b""[..])
        .expect("deep");
    let err = Case::plain(vec![builder.into_inner().expect("tar")]).rejects();
    assert!(
        is_limit(&err, |l| matches!(l, LimitError::Depth(_))),
        "{err:?}"
    );
}

#[test]
fn truncated_and_trailing_garbage_streams_are_rejected() {
    let tar = tar_of(&[file("etc/motd", b"hello"), file("bin/sh", b"#!")]);
    let gz = gzip(&tar);
    let zst = zstd::encode_all(&tar[..], 3).expect("zstd");
    let cases = [
        (tar[..tar.len() - 1024].to_vec(), LayerCompression::None),
        (tar[..700].to_vec(), LayerCompression::None),
        ([&tar[..], b"garbage"].concat(), LayerCompression::None),
        (gz[..gz.len() - 10].to_vec(), LayerCompression::Gzip),
        (gz[..gz.len() / 2].to_vec(), LayerCompression::Gzip),
        ([&gz[..], b"garbage"].concat(), LayerCompression::Gzip),
        (zst[..zst.len() - 5].to_vec(), LayerCompression::Zstd),
        ([&zst[..], b"garbage"].concat(), LayerCompression::Zstd),
        (Vec::new(), LayerCompression::None),
    ];
    for (i, (bytes, compression)) in cases.into_iter().enumerate() {
        let case = Case {
            layers: vec![(bytes, compression)],
            limits: Limits::default(),
        };
        let err = case.rejects();
        assert!(matches!(err, LayerError::Read { .. }), "case {i}: {err:?}");
    }
}

#[test]
fn owner_ids_beyond_32_bits_are_rejected() {
    let mut head = header(b"f", EntryType::Regular, 0);
    head.set_uid(1 << 32);
    head.set_cksum();
    let err = Case::plain(vec![tar_of(&[(head, &b""[..])])]).rejects();
    assert!(
        matches!(
            &err,
            LayerError::Entry {
                source: TreeError::IdTooLarge(_),
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn security_capability_xattrs_are_dropped() {
    let record = pax_record(
        "SCHILY.xattr.security.capability",
        b"\x01\0\0\x02\0\x20\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
    );
    let pax = header(b"PaxHeader", EntryType::XHeader, record.len() as u64);
    let layer = tar_of(&[(pax, &record[..]), file("usr/bin/ping", b"elf")]);
    assert_eq!(
        Case::plain(vec![layer]).accepts(),
        ["usr", "usr/bin", "usr/bin/ping"]
    );
}
