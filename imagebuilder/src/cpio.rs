//! A streaming writer of the "newc" cpio format (magic `070701`), the only format the
//! kernel's initramfs unpacker reads (Documentation/driver-api/early-userspace/buffer-format.rst).

use std::io::{self, Read, Write};

/// Longest path we write; the kernel rejects names past PATH_MAX.
const MAX_NAME_LEN: usize = 4095;

/// Errors while writing an archive.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    /// The entry name is empty, too long, or contains a NUL byte.
    #[error("invalid archive entry name {0:?}")]
    BadName(String),
    /// A field does not fit the 32-bit newc header.
    #[error("archive entry {0:?} is too large for newc")]
    TooLarge(String),
    /// The sink failed.
    #[error("write archive")]
    Io(#[from] io::Error),
}

/// What an entry is; the payload of files and symlinks is written separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory.
    Directory,
    /// A regular file of `size` bytes.
    File {
        /// Length of the content that follows.
        size: u64,
    },
    /// A symbolic link; the target is the payload.
    Symlink,
    /// A hard link to an earlier file entry with the same inode number (newc rule: the
    /// first entry of an inode carries the data, later ones are links).
    HardLink,
    /// A named pipe.
    Fifo,
}

/// Metadata of one archive entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path inside the archive, without a leading `/` (e.g. `bin/sh`).
    pub name: String,
    /// What the entry is.
    pub kind: EntryKind,
    /// Permission bits including setuid/setgid/sticky (the file type bits are derived).
    pub mode: u32,
    /// Owner as stored in the image.
    pub uid: u32,
    /// Group as stored in the image.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: u32,
    /// Inode number; entries sharing it (with `nlink > 1`) are hard links.
    pub ino: u32,
    /// Link count.
    pub nlink: u32,
}

impl Entry {
    /// An entry owned by root with the given kind and permission bits.
    pub fn new(name: impl Into<String>, kind: EntryKind, mode: u32) -> Self {
        Entry {
            name: name.into(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: 0,
            ino: 0,
            nlink: 1,
        }
    }

    fn type_bits(&self) -> u32 {
        match self.kind {
            EntryKind::Directory => libc_mode::S_IFDIR,
            EntryKind::File { .. } | EntryKind::HardLink => libc_mode::S_IFREG,
            EntryKind::Symlink => libc_mode::S_IFLNK,
            EntryKind::Fifo => libc_mode::S_IFIFO,
        }
    }
}

/// File type bits of `st_mode`, fixed by POSIX and the newc format.
mod libc_mode {
    pub const S_IFDIR: u32 = 0o040000;
    pub const S_IFREG: u32 = 0o100000;
    pub const S_IFLNK: u32 = 0o120000;
    pub const S_IFIFO: u32 = 0o010000;
}

/// Writes newc entries to `W`, tracking the offset for the format's 4-byte alignment.
pub struct CpioWriter<W: Write> {
    out: W,
    offset: u64,
    next_ino: u32,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive on `out`.
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            offset: 0,
            next_ino: 1,
        }
    }

    /// Writes a directory, fifo or hard-link entry (no payload).
    pub fn add(&mut self, entry: &Entry) -> Result<(), CpioError> {
        self.header(entry, 0)
    }

    /// Writes a file entry and its content; `content` must yield exactly the entry's size.
    pub fn add_file(
        &mut self,
        entry: &Entry,
        content: &mut impl io::Read,
    ) -> Result<(), CpioError> {
        let EntryKind::File { size } = entry.kind else {
            return Err(CpioError::BadName(entry.name.clone()));
        };
        self.header(entry, size)?;
        let copied = io::copy(&mut content.by_ref().take(size), &mut self.out)?;
        if copied != size {
            return Err(CpioError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} shrank while being archived", entry.name),
            )));
        }
        self.offset += size;
        self.pad()
    }

    /// Writes a symlink entry pointing at `target`.
    pub fn add_symlink(&mut self, entry: &Entry, target: &str) -> Result<(), CpioError> {
        self.header(entry, target.len() as u64)?;
        self.out.write_all(target.as_bytes())?;
        self.offset += target.len() as u64;
        self.pad()
    }

    /// Writes the trailer and returns the sink.
    pub fn finish(mut self) -> Result<W, CpioError> {
        let trailer = Entry::new("TRAILER!!!", EntryKind::File { size: 0 }, 0);
        self.header_raw(&trailer, 0, 0)?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn header(&mut self, entry: &Entry, size: u64) -> Result<(), CpioError> {
        let name = &entry.name;
        if name.is_empty()
            || name.len() > MAX_NAME_LEN
            || name.contains('\0')
            || name.starts_with('/')
        {
            return Err(CpioError::BadName(name.clone()));
        }
        let ino = if entry.ino == 0 {
            self.next_ino += 1;
            self.next_ino
        } else {
            entry.ino
        };
        self.header_raw(entry, size, ino)
    }

    fn header_raw(&mut self, entry: &Entry, size: u64, ino: u32) -> Result<(), CpioError> {
        let size = u32::try_from(size).map_err(|_| CpioError::TooLarge(entry.name.clone()))?;
        let mode = if entry.name == "TRAILER!!!" {
            0
        } else {
            entry.type_bits() | (entry.mode & 0o7777)
        };
        let fields = [
            ino,
            mode,
            entry.uid,
            entry.gid,
            entry.nlink,
            entry.mtime,
            size,
            0,
            0,
            0,
            0,
        ];
        let mut header = String::with_capacity(110);
        header.push_str("070701");
        for field in fields {
            header.push_str(&format!("{field:08x}"));
        }
        let name_len = u32::try_from(entry.name.len() + 1)
            .map_err(|_| CpioError::TooLarge(entry.name.clone()))?;
        header.push_str(&format!("{name_len:08x}{:08x}", 0));
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(entry.name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.offset += 110 + u64::from(name_len);
        self.pad()
    }

    fn pad(&mut self) -> Result<(), CpioError> {
        let padding = (4 - (self.offset % 4) as usize) % 4;
        self.out.write_all(&[0u8; 3][..padding])?;
        self.offset += padding as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(build: impl FnOnce(&mut CpioWriter<Vec<u8>>)) -> Vec<u8> {
        let mut writer = CpioWriter::new(Vec::new());
        build(&mut writer);
        writer.finish().expect("finish")
    }

    #[test]
    fn header_layout_matches_newc() {
        let bytes = archive(|w| {
            let mut entry = Entry::new("etc", EntryKind::Directory, 0o755);
            entry.ino = 7;
            w.add(&entry).expect("dir");
        });
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.starts_with("070701"));
        assert_eq!(&text[6..14], "00000007");
        assert_eq!(&text[14..22], "000041ed");
        assert_eq!(&text[94..102], "00000004"); // "etc\0"
        assert_eq!(&text[110..113], "etc");
        assert_eq!(bytes.len() % 4, 0);
        assert!(text.contains("TRAILER!!!"));
    }

    #[test]
    fn rejects_bad_names() {
        let mut writer = CpioWriter::new(Vec::new());
        for name in ["", "/abs", "a\0b"] {
            let entry = Entry::new(name, EntryKind::Directory, 0o755);
            assert!(matches!(writer.add(&entry), Err(CpioError::BadName(_))));
        }
        let long = "x".repeat(MAX_NAME_LEN + 1);
        assert!(writer
            .add(&Entry::new(long, EntryKind::Directory, 0o755))
            .is_err());
    }

    #[test]
    fn short_content_is_an_error() {
        let mut writer = CpioWriter::new(Vec::new());
        let entry = Entry::new("f", EntryKind::File { size: 10 }, 0o644);
        assert!(writer.add_file(&entry, &mut &b"abc"[..]).is_err());
    }
}
