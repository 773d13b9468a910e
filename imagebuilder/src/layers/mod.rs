//! OCI layers to one newc archive in two streaming passes: the first reads only tar headers
//! and merges the layers into a tree (whiteouts, replacements, hard links); the second
//! streams the layers again and copies each surviving file's bytes straight from the
//! decompressor into the archive. Memory grows with the entry count (capped), never with
//! the image size, and nothing is ever extracted to the host's disk.

mod path;
mod tar;
mod tree;
mod xattr;

use std::fs::File;
use std::io::{self, BufReader, Read, Write};

use indicatif::ProgressBar;

pub use path::PathError;
pub use tar::TarError;
pub use tree::TreeError;
pub(crate) use tree::{Inode, InodeId, Meta, NodeId, NodeKind, Tree, ROOT};
pub use xattr::{BadXattr, Xattr, MAX_XATTR_BYTES};

use crate::cpio::{CpioError, CpioWriter, Entry, EntryKind};
use crate::image::{LayerBlob, LayerCompression};
use crate::limits::{Budget, Limits};
use tar::{Kind, TarReader};
use tree::Item;

/// Largest zstd window we decode (2^27 = 128 MiB, libzstd's own default cap): a frame
/// asking for more is a memory bomb, not a layer.
const ZSTD_WINDOW_LOG_MAX: u32 = 27;

/// Read buffer for layer files and decompressed streams.
const BUFFER: usize = 64 * 1024;

/// Why the layers of an image could not be turned into an archive; every variant names
/// the layer.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// The layer file could not be opened or its decompressor set up.
    #[error("open layer {digest}")]
    Open {
        /// The layer.
        digest: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The layer's stream is corrupt, truncated or over a limit.
    #[error("read layer {digest}")]
    Read {
        /// The layer.
        digest: String,
        /// Why.
        #[source]
        source: TarError,
    },
    /// A member cannot be applied (unsafe name, dangling hard link, limit...).
    #[error("layer {digest}: entry {path:?}")]
    Entry {
        /// The layer.
        digest: String,
        /// The member name as stored (lossy UTF-8).
        path: String,
        /// Why.
        #[source]
        source: TreeError,
    },
    /// The second pass found a different member than the first (the file changed).
    #[error("layer {digest} changed while it was being packed")]
    Changed {
        /// The layer.
        digest: String,
    },
    /// Copying a file's content from a layer into the archive failed.
    #[error("layer {digest}: copy {path:?}")]
    Copy {
        /// The layer.
        digest: String,
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: CpioError,
    },
    /// Writing an entry without content failed.
    #[error("write archive")]
    Write(#[from] CpioError),
    /// More entries than newc's 32-bit inode numbers can tell apart.
    #[error("too many entries for a newc archive")]
    TooManyEntries,
}

/// What the archive holds, and what the image had that the archive cannot.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UnpackStats {
    /// Directories written.
    pub directories: u64,
    /// Regular files written (distinct contents).
    pub files: u64,
    /// Extra names of regular files (hard links).
    pub hard_links: u64,
    /// Symlinks written.
    pub symlinks: u64,
    /// Named pipes written.
    pub fifos: u64,
    /// Bytes of file content written.
    pub content_bytes: u64,
    /// Device nodes left out: the guest's devtmpfs provides devices.
    pub devices_skipped: u64,
    /// Extended attributes (e.g. `security.capability`) dropped: newc has no xattrs, and
    /// the guest's workload runs as root inside its own VM.
    pub xattrs_dropped: u64,
}

/// Merges `layers` (lowest first) and writes the result to `out` as a newc archive with
/// trailer. Sockets cannot occur (tar has no socket type); device nodes are left out;
/// xattrs are dropped; a hard link whose target does not exist when the link is applied
/// is an error (as in tar extraction); a whiteout of its own directory (`.wh..`) is an
/// error; the root entry `./` is accepted and its metadata ignored.
pub fn write_cpio<W: Write>(
    layers: &[LayerBlob],
    limits: Limits,
    progress: &ProgressBar,
    out: W,
) -> Result<(W, UnpackStats), LayerError> {
    let mut stats = UnpackStats::default();
    let tree = plan(layers, limits, progress, &mut stats)?;
    let mut writer = CpioWriter::new(out);
    let mut inodes = InodeNumbers(0);
    tree.walk(|path, meta, item| -> Result<(), LayerError> {
        let ino = inodes.next()?;
        match item {
            Item::Dir => {
                stats.directories += 1;
                writer.add(&entry(path, EntryKind::Directory, meta, ino, 1))?;
            }
            Item::Symlink(target) => {
                stats.symlinks += 1;
                writer.add_symlink(&entry(path, EntryKind::Symlink, meta, ino, 1), target)?;
            }
            Item::Fifo => {
                stats.fifos += 1;
                writer.add(&entry(path, EntryKind::Fifo, meta, ino, 1))?;
            }
        }
        Ok(())
    })?;
    stream_files(
        layers,
        &tree,
        limits,
        progress,
        |layer, _, inode, content| {
            let ino = inodes.next()?;
            let nlink = u32::try_from(inode.names.len()).map_err(|_| LayerError::TooManyEntries)?;
            for (i, &name) in inode.names.iter().enumerate() {
                let path = tree.path(name);
                if i == 0 {
                    let kind = EntryKind::File { size: inode.size };
                    let entry = entry(&path, kind, inode.meta, ino, nlink);
                    writer
                        .add_file(&entry, &mut &mut *content)
                        .map_err(|source| LayerError::Copy {
                            digest: layer.digest.clone(),
                            path: path.clone(),
                            source,
                        })?;
                    stats.files += 1;
                    stats.content_bytes += inode.size;
                } else {
                    // newc: later names of an inode carry no data (the kernel's
                    // maybe_link() links them to the first) but the same owner and mode,
                    // which the kernel applies again.
                    let entry = entry(&path, EntryKind::HardLink, inode.meta, ino, nlink);
                    writer.add(&entry)?;
                    stats.hard_links += 1;
                }
            }
            Ok::<(), LayerError>(())
        },
    )?;
    Ok((writer.finish()?, stats))
}

/// The second pass: streams the layers again and hands `copy` each surviving file's
/// content, layer by layer in member order (the order [`Tree::wanted`] gives), straight
/// from the decompressor. `copy` must read exactly the inode's size; a member that is
/// not the one the first pass saw is [`LayerError::Changed`].
pub(crate) fn stream_files<E: From<LayerError>>(
    layers: &[LayerBlob],
    tree: &Tree,
    limits: Limits,
    progress: &ProgressBar,
    mut copy: impl FnMut(&LayerBlob, InodeId, &Inode, &mut dyn Read) -> Result<(), E>,
) -> Result<(), E> {
    // A fresh budget: the second pass reads the same bytes the first one was allowed.
    let mut budget = Budget::new(limits);
    for (index, layer) in layers.iter().enumerate() {
        let wanted = tree.wanted(index);
        if wanted.is_empty() {
            continue;
        }
        let changed = || LayerError::Changed {
            digest: layer.digest.clone(),
        };
        let mut tar = TarReader::new(open(layer, progress)?, &mut budget);
        let mut ordinal = 0;
        for &(want, inode) in wanted {
            let header = loop {
                let header = tar
                    .next_header()
                    .map_err(|source| read_error(layer, source))?
                    .ok_or_else(changed)?;
                ordinal += 1;
                if ordinal - 1 == want {
                    break header;
                }
            };
            let id = inode;
            let inode = tree.inode(id);
            if header.kind != Kind::File || header.size != inode.size {
                return Err(changed().into());
            }
            copy(layer, id, inode, &mut tar)?;
        }
    }
    Ok(())
}

/// The first pass: every header of every layer, content skipped. Counts every xattr
/// seen as dropped (what the newc archive does); writers that keep them count anew.
pub(crate) fn plan(
    layers: &[LayerBlob],
    limits: Limits,
    progress: &ProgressBar,
    stats: &mut UnpackStats,
) -> Result<Tree, LayerError> {
    let mut budget = Budget::new(limits);
    let mut tree = Tree::default();
    for (index, layer) in layers.iter().enumerate() {
        let mut tar = TarReader::new(open(layer, progress)?, &mut budget);
        let mut ordinal = 0;
        while let Some(header) = tar
            .next_header()
            .map_err(|source| read_error(layer, source))?
        {
            stats.xattrs_dropped += header.xattrs.len() as u64;
            tree.apply(index, ordinal, &header, tar.budget())
                .map_err(|source| LayerError::Entry {
                    digest: layer.digest.clone(),
                    path: String::from_utf8_lossy(&header.path).into_owned(),
                    source,
                })?;
            ordinal += 1;
        }
    }
    tree.finish(layers.len());
    stats.devices_skipped = tree.devices;
    Ok(tree)
}

/// Opens a layer file behind its decompressor, counting its bytes on `progress`. Both
/// decoders read every frame or member to the end and reject trailing garbage;
/// `write_cpio` reads to the end in the first pass.
fn open(layer: &LayerBlob, progress: &ProgressBar) -> Result<Box<dyn Read>, LayerError> {
    let open_error = |source| LayerError::Open {
        digest: layer.digest.clone(),
        source,
    };
    let file = File::open(&layer.path).map_err(open_error)?;
    let file = BufReader::with_capacity(BUFFER, progress.wrap_read(file));
    Ok(match layer.compression {
        LayerCompression::None => Box::new(file),
        LayerCompression::Gzip => Box::new(BufReader::with_capacity(
            BUFFER,
            flate2::bufread::MultiGzDecoder::new(file),
        )),
        LayerCompression::Zstd => {
            let mut decoder = zstd::stream::read::Decoder::with_buffer(file).map_err(open_error)?;
            decoder
                .window_log_max(ZSTD_WINDOW_LOG_MAX)
                .map_err(open_error)?;
            Box::new(BufReader::with_capacity(BUFFER, decoder))
        }
    })
}

fn read_error(layer: &LayerBlob, source: TarError) -> LayerError {
    LayerError::Read {
        digest: layer.digest.clone(),
        source,
    }
}

fn entry(path: &str, kind: EntryKind, meta: Meta, ino: u32, nlink: u32) -> Entry {
    Entry {
        name: path.to_string(),
        kind,
        mode: meta.mode,
        uid: meta.uid,
        gid: meta.gid,
        mtime: meta.mtime,
        ino,
        nlink,
    }
}

/// Inode numbers of the archive, one per entry (hard links share one).
struct InodeNumbers(u32);

impl InodeNumbers {
    fn next(&mut self) -> Result<u32, LayerError> {
        self.0 = self.0.checked_add(1).ok_or(LayerError::TooManyEntries)?;
        Ok(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;
    use std::process::{Command, Stdio};

    /// Builds one layer tar in memory with the `tar` crate.
    struct Layer(::tar::Builder<Vec<u8>>);

    impl Layer {
        fn new() -> Self {
            Layer(::tar::Builder::new(Vec::new()))
        }

        fn add(mut self, path: &str, kind: ::tar::EntryType, mode: u32, data: &[u8]) -> Self {
            let mut header = ::tar::Header::new_gnu();
            header.set_entry_type(kind);
            header.set_mode(mode);
            header.set_size(data.len() as u64);
            header.set_mtime(1_700_000_000);
            self.0.append_data(&mut header, path, data).expect("append");
            self
        }

        fn dir(self, path: &str, mode: u32) -> Self {
            self.add(path, ::tar::EntryType::Directory, mode, b"")
        }

        fn file(self, path: &str, data: &[u8]) -> Self {
            self.add(path, ::tar::EntryType::Regular, 0o644, data)
        }

        fn owned(mut self, path: &str, mode: u32, uid: u64, gid: u64, data: &[u8]) -> Self {
            let mut header = ::tar::Header::new_gnu();
            header.set_mode(mode);
            header.set_uid(uid);
            header.set_gid(gid);
            header.set_size(data.len() as u64);
            self.0.append_data(&mut header, path, data).expect("append");
            self
        }

        fn link(mut self, kind: ::tar::EntryType, path: &str, target: &str) -> Self {
            let mut header = ::tar::Header::new_gnu();
            header.set_entry_type(kind);
            header.set_mode(0o777);
            self.0.append_link(&mut header, path, target).expect("link");
            self
        }

        fn write(self, dir: &Path, name: &str, compression: LayerCompression) -> LayerBlob {
            let tar = self.0.into_inner().expect("tar");
            let bytes = match compression {
                LayerCompression::None => tar,
                LayerCompression::Gzip => {
                    let mut encoder =
                        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                    encoder.write_all(&tar).expect("gzip");
                    encoder.finish().expect("gzip")
                }
                LayerCompression::Zstd => zstd::encode_all(&tar[..], 3).expect("zstd"),
            };
            let path = dir.join(name);
            std::fs::write(&path, &bytes).expect("write layer");
            LayerBlob {
                digest: format!("sha256:{name}"),
                path,
                compression,
                size: bytes.len() as u64,
            }
        }
    }

    fn run_cpio(args: &[&str], dir: &Path, archive: &[u8]) -> String {
        let mut child = Command::new("cpio")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cpio (Debian package `cpio`) must be installed for this test");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(archive)
            .expect("feed cpio");
        let out = child.wait_with_output().expect("wait for cpio");
        assert!(out.status.success(), "cpio {args:?} failed");
        String::from_utf8(out.stdout).expect("utf-8 listing")
    }

    /// `cpio -tvn` lines reduced to `mode nlink uid:gid name` (dates dropped).
    fn verbose_listing(archive: &[u8]) -> Vec<String> {
        let text = run_cpio(&["-t", "-v", "-n", "--quiet"], Path::new("/"), archive);
        let mut lines: Vec<String> = text
            .lines()
            .map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                format!(
                    "{} {} {}:{} {}",
                    fields[0],
                    fields[1],
                    fields[2],
                    fields[3],
                    fields[8..].join(" ")
                )
            })
            .collect();
        lines.sort();
        lines
    }

    fn image(dir: &Path) -> Vec<LayerBlob> {
        let base = Layer::new()
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
            .owned("home/www/index.html", 0o2640, 101, 102, b"<html>")
            .write(dir, "base", LayerCompression::Gzip);
        let update = Layer::new()
            .file("etc/.wh.old", b"")
            .file("etc/passwd", b"root:x:0:0\nwww:x:101:102\n")
            .dir("usr", 0o755)
            .file("usr/.wh..wh..opq", b"")
            .file("usr/share/doc", b"doc")
            .link(::tar::EntryType::Link, "bin/ash", "bin/busybox")
            .write(dir, "update", LayerCompression::Zstd);
        let top = Layer::new()
            .file("bin/.wh.busybox", b"")
            .file("etc/hostname", b"box\n")
            .dir("etc/passwd", 0o700)
            .write(dir, "top", LayerCompression::None);
        vec![base, update, top]
    }

    #[test]
    fn merged_layers_match_debian_cpio_listing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let layers = image(dir.path());
        let (archive, stats) = write_cpio(
            &layers,
            Limits::default(),
            &ProgressBar::hidden(),
            Vec::new(),
        )
        .expect("pack");
        assert_eq!(
            verbose_listing(&archive),
            [
                "-rw-r--r-- 1 0:0 etc/hostname",
                "-rw-r--r-- 1 0:0 usr/share/doc",
                "-rw-r-S--- 1 101:102 home/www/index.html",
                "-rwsr-xr-x 2 0:0 bin/ash",
                "-rwsr-xr-x 2 0:0 bin/sh",
                "drwx------ 1 0:0 etc/passwd",
                "drwxr-xr-x 1 0:0 bin",
                "drwxr-xr-x 1 0:0 dev",
                "drwxr-xr-x 1 0:0 etc",
                "drwxr-xr-x 1 0:0 home",
                "drwxr-xr-x 1 0:0 home/www",
                "drwxr-xr-x 1 0:0 run",
                "drwxr-xr-x 1 0:0 usr",
                "drwxr-xr-x 1 0:0 usr/share",
                "drwxrwxrwt 1 0:0 tmp",
                "lrwxrwxrwx 1 0:0 lib -> usr/lib",
                "prw------- 1 0:0 run/ctl",
            ]
        );
        assert_eq!(
            stats,
            UnpackStats {
                directories: 10,
                files: 4,
                hard_links: 1,
                symlinks: 1,
                fifos: 1,
                content_bytes: 14 + 4 + 3 + 6,
                devices_skipped: 1,
                xattrs_dropped: 0,
            }
        );
    }

    #[test]
    fn debian_cpio_extracts_contents_and_hard_links() {
        let dir = tempfile::tempdir().expect("tempdir");
        let layers = image(dir.path());
        let (archive, _) = write_cpio(
            &layers,
            Limits::default(),
            &ProgressBar::hidden(),
            Vec::new(),
        )
        .expect("pack");
        let out = tempfile::tempdir().expect("tempdir");
        run_cpio(
            &["-i", "-d", "-m", "--quiet", "--no-absolute-filenames"],
            out.path(),
            &archive,
        );
        let root = out.path();
        let read = |path: &str| std::fs::read(root.join(path)).expect(path);
        assert_eq!(read("bin/sh"), b"busybox binary");
        assert_eq!(read("bin/ash"), b"busybox binary");
        let ino = |path: &str| std::fs::metadata(root.join(path)).expect(path).ino();
        assert_eq!(
            ino("bin/sh"),
            ino("bin/ash"),
            "hard link kept across layers"
        );
        assert!(!root.join("bin/busybox").exists(), "whited out");
        assert!(!root.join("etc/old").exists(), "whited out directory");
        assert!(
            root.join("etc/passwd").is_dir(),
            "file replaced by a directory"
        );
        assert!(!root.join("usr/lib").exists(), "opaque directory");
        assert_eq!(read("usr/share/doc"), b"doc");
        assert!(!root.join("dev/null").exists(), "devices are left out");
        assert_eq!(
            std::fs::read_link(root.join("lib")).expect("symlink"),
            Path::new("usr/lib")
        );
    }

    #[test]
    fn corrupt_layers_name_the_layer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut layers = image(dir.path());
        let bytes = std::fs::read(&layers[1].path).expect("read");
        std::fs::write(&layers[1].path, &bytes[..bytes.len() / 2]).expect("truncate");
        let err = write_cpio(
            &layers,
            Limits::default(),
            &ProgressBar::hidden(),
            Vec::new(),
        )
        .expect_err("truncated");
        assert!(
            matches!(&err, LayerError::Read { digest, .. } if digest == "sha256:update"),
            "{err:?}"
        );
        layers[1].path = dir.path().join("missing");
        let err = write_cpio(
            &layers,
            Limits::default(),
            &ProgressBar::hidden(),
            Vec::new(),
        )
        .expect_err("missing");
        assert!(matches!(err, LayerError::Open { .. }));
    }

    #[test]
    fn unsafe_names_name_the_layer_and_entry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut tar = ::tar::Builder::new(Vec::new());
        let mut header = ::tar::Header::new_gnu();
        header.as_old_mut().name[..9].copy_from_slice(b"../escape");
        header.set_size(0);
        header.set_cksum();
        tar.append(&header, &b""[..]).expect("append");
        let bytes = tar.into_inner().expect("tar");
        let path = dir.path().join("evil");
        std::fs::write(&path, bytes).expect("write");
        let layer = LayerBlob {
            digest: "sha256:evil".into(),
            path,
            compression: LayerCompression::None,
            size: 0,
        };
        let err = write_cpio(
            &[layer],
            Limits::default(),
            &ProgressBar::hidden(),
            Vec::new(),
        )
        .expect_err("escapes");
        let LayerError::Entry {
            digest,
            path,
            source,
        } = err
        else {
            panic!("wrong error {err:?}");
        };
        assert_eq!(
            (digest.as_str(), path.as_str()),
            ("sha256:evil", "../escape")
        );
        assert!(matches!(source, TreeError::Path(PathError::Escapes)));
    }
}
