//! Packs a host directory (a root filesystem the user points at) into a cpio archive,
//! keeping modes, owners, symlinks and hard links exactly as they are on disk. The walk goes
//! by descriptor: the root is opened once and each entry beneath its parent's descriptor
//! with `O_NOFOLLOW`, so a symlink swapped in mid-walk is never followed out of the tree;
//! the caps of [`Limits`] that bound an image's layers bound the walk too.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{openat, readlinkat, AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, FileStat, Mode, SFlag};

use crate::cpio::{CpioError, CpioWriter, Entry, EntryKind};
use crate::limits::{Budget, LimitError, Limits};

/// Errors while packing a directory.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// The root is not a directory.
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    /// Reading the tree failed.
    #[error("read {path}")]
    Read {
        /// The path that could not be read.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A name is not valid UTF-8 (newc names are bytes, but we keep them printable).
    #[error("{0} has a name that is not UTF-8")]
    BadName(PathBuf),
    /// An entry changed type between its listing and its open (a file became a FIFO...).
    #[error("{0} changed while being packed")]
    Changed(PathBuf),
    /// The tree exceeds one of the [`Limits`].
    #[error("{path} is over a limit")]
    Limit {
        /// Where the walk was when the cap was hit.
        path: PathBuf,
        /// Which cap.
        #[source]
        source: LimitError,
    },
    /// Writing the archive failed.
    #[error("write archive")]
    Archive(#[from] CpioError),
}

/// What the walk expects to find when it opens an entry it listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Directory,
    File,
}

/// Opens `name`, one component, beneath `dir` without following a symlink: if the entry
/// was swapped for a symlink after it was listed, the open fails (ELOOP, or ENOTDIR where a
/// directory is expected) instead of reaching outside the tree. Also returns what was
/// opened, checked to be what `expect` says.
fn open_beneath(
    dir: impl AsFd,
    name: &CStr,
    expect: Expect,
    path: &Path,
) -> Result<(OwnedFd, FileStat), PackError> {
    let read_err = |errno: Errno| PackError::Read {
        path: path.to_path_buf(),
        source: errno.into(),
    };
    // readdir never yields these; refusing them keeps this helper beneath `dir` whoever
    // calls it.
    if name.to_bytes().contains(&b'/') || matches!(name.to_bytes(), b"." | b"..") {
        return Err(read_err(Errno::EINVAL));
    }
    let mut flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOCTTY;
    flags |= match expect {
        Expect::Directory => OFlag::O_DIRECTORY,
        // A FIFO swapped in for a file would block this open until some writer came.
        Expect::File => OFlag::O_NONBLOCK,
    };
    let fd = openat(dir, name, flags, Mode::empty()).map_err(read_err)?;
    let stat = fstat(&fd).map_err(read_err)?;
    let wanted = match expect {
        Expect::Directory => SFlag::S_IFDIR,
        Expect::File => SFlag::S_IFREG,
    };
    if file_type(&stat) != wanted {
        return Err(PackError::Changed(path.to_path_buf()));
    }
    Ok((fd, stat))
}

fn file_type(stat: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits())
}

/// Packs the tree under `root` into `out` as a newc archive (with trailer), within
/// `limits`. Sockets and device nodes are skipped: the guest's devtmpfs provides devices,
/// and a socket file is meaningless in another kernel.
pub fn pack_dir<W: Write>(root: &Path, limits: &Limits, out: W) -> Result<W, PackError> {
    // The root is the one path resolved as given (it may well be a symlink the user typed).
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let dir = Dir::open(root, flags, Mode::empty()).map_err(|errno| match errno {
        Errno::ENOTDIR => PackError::NotADirectory(root.to_path_buf()),
        errno => PackError::Read {
            path: root.to_path_buf(),
            source: errno.into(),
        },
    })?;
    let mut packer = Packer {
        writer: CpioWriter::new(out),
        inodes: HashMap::new(),
        next_ino: 1,
        budget: Budget::new(*limits),
    };
    packer.walk(dir, root, "")?;
    Ok(packer.writer.finish()?)
}

struct Packer<W: Write> {
    writer: CpioWriter<W>,
    /// Host (dev, ino) → archive inode number, for files with more than one link.
    inodes: HashMap<(u64, u64), u32>,
    next_ino: u32,
    budget: Budget,
}

impl<W: Write> Packer<W> {
    /// Archives the entries of `dir` (at `host` on the host, `prefix` in the archive). Each
    /// level keeps its directory open while its children are walked: the depth limit (128
    /// by default) also bounds the descriptors held.
    fn walk(&mut self, mut dir: Dir, host: &Path, prefix: &str) -> Result<(), PackError> {
        let mut names = self.list(&mut dir, host)?;
        // Sorted for reproducible archives.
        names.sort();
        for name in names {
            let path = host.join(OsStr::from_bytes(name.to_bytes()));
            let text = name
                .to_str()
                .map_err(|_| PackError::BadName(path.clone()))?;
            let archived = if prefix.is_empty() {
                text.to_string()
            } else {
                format!("{prefix}/{text}")
            };
            self.add(&dir, &name, &path, archived)?;
        }
        Ok(())
    }

    /// The names in `dir`, counted against the entry and memory caps as they are read, so
    /// that a directory of millions of entries stops the walk before it fills memory.
    fn list(&mut self, dir: &mut Dir, host: &Path) -> Result<Vec<CString>, PackError> {
        let mut names = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(|errno| PackError::Read {
                path: host.to_path_buf(),
                source: errno.into(),
            })?;
            let name = entry.file_name();
            if matches!(name.to_bytes(), b"." | b"..") {
                continue;
            }
            let over = |source| PackError::Limit {
                path: host.to_path_buf(),
                source,
            };
            self.budget.charge_entry().map_err(over)?;
            self.budget
                .charge_tree(name.to_bytes().len())
                .map_err(over)?;
            names.push(name.to_owned());
        }
        Ok(names)
    }

    fn add(
        &mut self,
        dir: &Dir,
        name: &CStr,
        path: &Path,
        archived: String,
    ) -> Result<(), PackError> {
        let over = |source| PackError::Limit {
            path: path.to_path_buf(),
            source,
        };
        let read_err = |errno: Errno| PackError::Read {
            path: path.to_path_buf(),
            source: errno.into(),
        };
        self.budget
            .check_name_length(archived.len())
            .map_err(over)?;
        let depth = archived.split('/').count();
        self.budget.check_depth(depth).map_err(over)?;
        let listed = fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(read_err)?;
        let kind = file_type(&listed);
        if kind == SFlag::S_IFDIR {
            let (fd, stat) = open_beneath(dir, name, Expect::Directory, path)?;
            let entry = entry_of(archived, EntryKind::Directory, &stat);
            self.writer.add(&entry)?;
            let child = Dir::from_fd(fd).map_err(read_err)?;
            return self.walk(child, path, &entry.name);
        }
        if kind == SFlag::S_IFLNK {
            let target = readlinkat(dir, name).map_err(read_err)?;
            let target = target
                .to_str()
                .ok_or_else(|| PackError::BadName(path.to_path_buf()))?;
            self.budget.check_name_length(target.len()).map_err(over)?;
            self.budget.charge_tree(target.len()).map_err(over)?;
            let entry = entry_of(archived, EntryKind::Symlink, &listed);
            self.writer.add_symlink(&entry, target)?;
        } else if kind == SFlag::S_IFREG {
            let (fd, stat) = open_beneath(dir, name, Expect::File, path)?;
            self.add_file(archived, fd, &stat, path)?;
        } else if kind == SFlag::S_IFIFO {
            self.writer
                .add(&entry_of(archived, EntryKind::Fifo, &listed))?;
        }
        Ok(())
    }

    /// Archives the regular file open at `fd`, or a link to its first name.
    fn add_file(
        &mut self,
        archived: String,
        fd: OwnedFd,
        stat: &FileStat,
        path: &Path,
    ) -> Result<(), PackError> {
        let size = u64::try_from(stat.st_size).unwrap_or(0);
        let over = |source| PackError::Limit {
            path: path.to_path_buf(),
            source,
        };
        self.budget.check_file_size(size).map_err(over)?;
        let mut entry = entry_of(archived, EntryKind::File { size }, stat);
        let nlink = stat.st_nlink;
        if nlink > 1 {
            entry.nlink = u32::try_from(nlink).unwrap_or(u32::MAX);
            let key = (stat.st_dev, stat.st_ino);
            if let Some(&ino) = self.inodes.get(&key) {
                entry.ino = ino;
                entry.kind = EntryKind::HardLink;
                self.writer.add(&entry)?;
                return Ok(());
            }
            self.next_ino += 1;
            self.inodes.insert(key, self.next_ino);
            entry.ino = self.next_ino;
        }
        self.budget.charge_bytes(size).map_err(over)?;
        self.writer.add_file(&entry, &mut File::from(fd))?;
        Ok(())
    }
}

/// An archive entry carrying `stat`'s mode, owner and modification time.
fn entry_of(name: String, kind: EntryKind, stat: &FileStat) -> Entry {
    let mut entry = Entry::new(name, kind, stat.st_mode & 0o7777);
    entry.uid = stat.st_uid;
    entry.gid = stat.st_gid;
    entry.mtime = u32::try_from(stat.st_mtime.max(0)).unwrap_or(u32::MAX);
    entry
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
    use std::process::{Command, Stdio};

    fn sample_tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        fs::create_dir_all(root.join("bin")).expect("mkdir");
        fs::create_dir_all(root.join("etc/empty")).expect("mkdir");
        fs::write(root.join("bin/tool"), b"#!/bin/sh\necho hi\n").expect("write");
        fs::set_permissions(root.join("bin/tool"), fs::Permissions::from_mode(0o4755))
            .expect("chmod");
        fs::hard_link(root.join("bin/tool"), root.join("bin/tool-link")).expect("link");
        symlink("tool", root.join("bin/sh")).expect("symlink");
        fs::write(root.join("etc/hostname"), b"box\n").expect("write");
        dir
    }

    /// Unpacks with Debian's `cpio -i` (the oracle for the format) into a fresh folder.
    fn unpack_with_cpio(archive: &[u8]) -> tempfile::TempDir {
        let out = tempfile::tempdir().expect("tempdir");
        let mut child = Command::new("cpio")
            .args(["-i", "-d", "-m", "--quiet", "--no-absolute-filenames"])
            .current_dir(out.path())
            .stdin(Stdio::piped())
            .spawn()
            .expect("cpio (Debian package `cpio`) must be installed for this test");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(archive)
            .expect("feed cpio");
        assert!(child.wait().expect("wait").success(), "cpio -i failed");
        out
    }

    #[test]
    fn round_trips_through_debian_cpio() {
        let tree = sample_tree();
        let archive = pack_dir(tree.path(), &Limits::default(), Vec::new()).expect("pack");
        let out = unpack_with_cpio(&archive);
        let root = out.path();
        assert_eq!(
            fs::read(root.join("bin/tool")).expect("read"),
            b"#!/bin/sh\necho hi\n"
        );
        assert_eq!(
            fs::read(root.join("bin/tool-link")).expect("read"),
            b"#!/bin/sh\necho hi\n"
        );
        let mode = fs::metadata(root.join("bin/tool")).expect("stat").mode();
        assert_eq!(mode & 0o7777, 0o4755, "setuid bit kept");
        let tool = fs::metadata(root.join("bin/tool")).expect("stat");
        let link = fs::metadata(root.join("bin/tool-link")).expect("stat");
        assert_eq!(tool.ino(), link.ino(), "hard link kept as a link");
        assert_eq!(
            fs::read_link(root.join("bin/sh")).expect("readlink"),
            Path::new("tool")
        );
        assert!(root.join("etc/empty").is_dir());
    }

    #[test]
    fn listing_matches_cpio_t() {
        let tree = sample_tree();
        let archive = pack_dir(tree.path(), &Limits::default(), Vec::new()).expect("pack");
        let mut child = Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cpio must be installed");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&archive)
            .expect("feed");
        let listing = child.wait_with_output().expect("wait");
        let names = String::from_utf8(listing.stdout).expect("utf8");
        let names: Vec<&str> = names.lines().collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/sh",
                "bin/tool",
                "bin/tool-link",
                "etc",
                "etc/empty",
                "etc/hostname"
            ]
        );
    }

    #[test]
    fn a_file_is_not_a_root() {
        let tree = sample_tree();
        let file = tree.path().join("etc/hostname");
        let err = pack_dir(&file, &Limits::default(), Vec::new()).expect_err("not a dir");
        assert!(matches!(err, PackError::NotADirectory(_)));
    }

    /// `cpio -t -v`'s first column (`lrwxrwxrwx`...) for `name`.
    fn listed_mode(archive: &[u8], name: &str) -> String {
        let mut child = Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cpio must be installed");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(archive)
            .expect("feed");
        let listing = child.wait_with_output().expect("wait");
        let listing = String::from_utf8(listing.stdout).expect("utf8");
        let line = listing
            .lines()
            .find(|l| l.split_whitespace().nth(8) == Some(name))
            .unwrap_or_else(|| panic!("{name} not in {listing}"));
        line.split_whitespace().next().expect("mode").to_string()
    }

    #[test]
    fn symlinks_out_of_the_tree_stay_symlinks() {
        let tree = sample_tree();
        symlink("/", tree.path().join("escape")).expect("symlink");
        symlink("/etc/passwd", tree.path().join("etc/passwd")).expect("symlink");
        let archive = pack_dir(tree.path(), &Limits::default(), Vec::new()).expect("pack");
        assert!(listed_mode(&archive, "escape").starts_with('l'));
        assert!(listed_mode(&archive, "etc/passwd").starts_with('l'));
        let out = unpack_with_cpio(&archive);
        assert_eq!(
            fs::read_link(out.path().join("escape")).expect("readlink"),
            Path::new("/")
        );
        assert_eq!(
            fs::read_link(out.path().join("etc/passwd")).expect("readlink"),
            Path::new("/etc/passwd")
        );
    }

    #[test]
    fn a_symlink_swapped_in_is_not_followed() {
        // The walk lists a name, then opens it: a symlink put there in between must fail
        // the open, whatever it points at.
        let tree = sample_tree();
        let root = Dir::open(tree.path(), OFlag::O_RDONLY, Mode::empty()).expect("root");
        let outside = tempfile::tempdir().expect("tempdir");
        fs::write(outside.path().join("secret"), b"host data").expect("write");
        symlink(outside.path(), tree.path().join("to-dir")).expect("symlink");
        symlink(outside.path().join("secret"), tree.path().join("to-file")).expect("symlink");
        let errno_of = |name: &str, expect: Expect| {
            let name = CString::new(name).expect("name");
            match open_beneath(
                &root,
                &name,
                expect,
                Path::new(name.to_str().expect("utf8")),
            ) {
                Err(PackError::Read { source, .. }) => source.raw_os_error(),
                other => panic!("{name:?} as {expect:?}: {other:?}"),
            }
        };
        for (name, expect) in [
            ("to-dir", Expect::Directory),
            ("to-file", Expect::File),
            ("to-dir", Expect::File),
            ("to-file", Expect::Directory),
        ] {
            let errno = errno_of(name, expect);
            assert!(
                errno == Some(libc::ELOOP) || errno == Some(libc::ENOTDIR),
                "{name} as {expect:?}: {errno:?}"
            );
        }
        // Nor may a name climb out or down.
        assert_eq!(errno_of("..", Expect::Directory), Some(libc::EINVAL));
        assert_eq!(errno_of("bin/tool", Expect::File), Some(libc::EINVAL));
        // What is there is opened.
        let name = CString::new("bin").expect("name");
        let (_, stat) =
            open_beneath(&root, &name, Expect::Directory, Path::new("bin")).expect("a directory");
        assert_eq!(
            stat.st_ino,
            fs::metadata(tree.path().join("bin")).expect("stat").ino()
        );
    }

    #[test]
    fn a_fifo_where_a_file_was_listed_is_refused_without_blocking() {
        let tree = sample_tree();
        let fifo = tree.path().join("etc/hostname");
        fs::remove_file(&fifo).expect("rm");
        nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o644)).expect("mkfifo");
        let root = Dir::open(tree.path(), OFlag::O_RDONLY, Mode::empty()).expect("root");
        let etc = Dir::openat(&root, "etc", OFlag::O_RDONLY, Mode::empty()).expect("etc");
        let name = CString::new("hostname").expect("name");
        assert!(matches!(
            open_beneath(&etc, &name, Expect::File, &fifo),
            Err(PackError::Changed(_))
        ));
        // As listed, a FIFO is archived as one.
        let archive = pack_dir(tree.path(), &Limits::default(), Vec::new()).expect("pack");
        assert!(listed_mode(&archive, "etc/hostname").starts_with('p'));
    }

    #[test]
    fn each_limit_stops_the_walk_with_its_name() {
        let tree = sample_tree();
        fs::create_dir_all(tree.path().join("a/b/c")).expect("mkdir");
        // 7 entries in the sample, 3 more here; files of 18 + 18 (a link) + 4 bytes.
        let cases = [
            ("entries=9", "more entries than the entries limit of 9"),
            (
                "file-size=17",
                "a file exceeds the file-size limit of 17 bytes",
            ),
            ("total-size=21", "the total-size limit of 21 bytes"),
            ("depth=2", "deeper than the depth limit of 2"),
            ("name-length=6", "the name-length limit of 6 bytes"),
            ("tree-bytes=20", "the tree-bytes limit of 20 bytes"),
        ];
        for (spec, needle) in cases {
            let mut limits = Limits::default();
            limits.apply_overrides(spec).expect("valid");
            let err = pack_dir(tree.path(), &limits, Vec::new()).expect_err(spec);
            let PackError::Limit { path, source } = &err else {
                panic!("{spec}: {err:?}");
            };
            let line = format!("{err}: {source}");
            assert!(line.contains(needle), "{spec}: {line}");
            assert!(path.starts_with(tree.path()), "{spec}: {}", path.display());
        }
        // The whole tree fits exactly its own counts.
        let mut limits = Limits::default();
        limits
            .apply_overrides("entries=10,file-size=18,total-size=22,depth=3")
            .expect("valid");
        pack_dir(tree.path(), &limits, Vec::new()).expect("at the limits");
    }
}
