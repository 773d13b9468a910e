//! Packs a host directory (a root filesystem the user points at) into a cpio archive,
//! keeping modes, owners, symlinks and hard links exactly as they are on disk.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::cpio::{CpioError, CpioWriter, Entry, EntryKind};

/// Deepest directory nesting accepted (a guard against loops through bind mounts).
const MAX_DEPTH: usize = 256;

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
    /// The tree is nested deeper than we accept.
    #[error("{0} is nested too deeply")]
    TooDeep(PathBuf),
    /// Writing the archive failed.
    #[error("write archive")]
    Archive(#[from] CpioError),
}

/// Packs the tree under `root` into `out` as a newc archive (with trailer). Sockets and
/// device nodes are skipped: the guest's devtmpfs provides devices, and a socket file is
/// meaningless in another kernel.
pub fn pack_dir<W: Write>(root: &Path, out: W) -> Result<W, PackError> {
    let read_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PackError::Read { path, source }
    };
    let meta = fs::metadata(root).map_err(read_err(root))?;
    if !meta.is_dir() {
        return Err(PackError::NotADirectory(root.to_path_buf()));
    }
    let mut packer = Packer {
        writer: CpioWriter::new(out),
        inodes: HashMap::new(),
        next_ino: 1,
    };
    packer.walk(root, "", 0)?;
    Ok(packer.writer.finish()?)
}

struct Packer<W: Write> {
    writer: CpioWriter<W>,
    /// Host (dev, ino) → archive inode number, for files with more than one link.
    inodes: HashMap<(u64, u64), u32>,
    next_ino: u32,
}

impl<W: Write> Packer<W> {
    fn walk(&mut self, dir: &Path, prefix: &str, depth: usize) -> Result<(), PackError> {
        if depth > MAX_DEPTH {
            return Err(PackError::TooDeep(dir.to_path_buf()));
        }
        let read_err = |source| PackError::Read {
            path: dir.to_path_buf(),
            source,
        };
        let mut names: Vec<_> = fs::read_dir(dir)
            .map_err(read_err)?
            .map(|entry| entry.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(read_err)?;
        // Sorted for reproducible archives.
        names.sort();
        for name in names {
            let path = dir.join(&name);
            let name = name
                .to_str()
                .ok_or_else(|| PackError::BadName(path.clone()))?;
            let archived = if prefix.is_empty() {
                name.to_string()
            } else {
                format!("{prefix}/{name}")
            };
            self.add(&path, archived, depth)?;
        }
        Ok(())
    }

    fn add(&mut self, path: &Path, name: String, depth: usize) -> Result<(), PackError> {
        let read_err = |source| PackError::Read {
            path: path.to_path_buf(),
            source,
        };
        let meta = fs::symlink_metadata(path).map_err(read_err)?;
        let file_type = meta.file_type();
        let mut entry = Entry::new(name, EntryKind::Directory, meta.mode() & 0o7777);
        entry.uid = meta.uid();
        entry.gid = meta.gid();
        entry.mtime = u32::try_from(meta.mtime().max(0)).unwrap_or(u32::MAX);
        if file_type.is_dir() {
            let prefix = entry.name.clone();
            self.writer.add(&entry)?;
            return self.walk(path, &prefix, depth + 1);
        }
        if file_type.is_symlink() {
            let target = fs::read_link(path).map_err(read_err)?;
            let target = target
                .to_str()
                .ok_or_else(|| PackError::BadName(path.to_path_buf()))?;
            entry.kind = EntryKind::Symlink;
            self.writer.add_symlink(&entry, target)?;
        } else if file_type.is_file() {
            entry.kind = EntryKind::File { size: meta.len() };
            if meta.nlink() > 1 {
                entry.nlink = u32::try_from(meta.nlink()).unwrap_or(u32::MAX);
                if let Some(&ino) = self.inodes.get(&(meta.dev(), meta.ino())) {
                    entry.ino = ino;
                    entry.kind = EntryKind::HardLink;
                    self.writer.add(&entry)?;
                    return Ok(());
                }
                self.next_ino += 1;
                self.inodes.insert((meta.dev(), meta.ino()), self.next_ino);
                entry.ino = self.next_ino;
            }
            let mut file = File::open(path).map_err(read_err)?;
            self.writer.add_file(&entry, &mut file)?;
        } else if file_type.is_fifo() {
            entry.kind = EntryKind::Fifo;
            self.writer.add(&entry)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};
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
        let archive = pack_dir(tree.path(), Vec::new()).expect("pack");
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
        let archive = pack_dir(tree.path(), Vec::new()).expect("pack");
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
        let err = pack_dir(&tree.path().join("etc/hostname"), Vec::new()).expect_err("not a dir");
        assert!(matches!(err, PackError::NotADirectory(_)));
    }
}
