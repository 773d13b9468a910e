//! File operations: open, read, write, sync, allocate, seek, and attribute changes.

use std::os::fd::{AsFd, BorrowedFd};

use rustix::fs::{
    AtFlags, FallocateFlags, FileType, Mode, OFlags, SeekFrom, Timespec, Timestamps, UTIME_NOW,
    UTIME_OMIT,
};
use rustix::io::Errno;
use rustix::process::{Gid, Uid};

use super::{fd_name, Caller, Share};
use crate::virtio::fs::abi::{fattr, Attr, OpenOut, SetattrIn};

const SETID: u32 = 0o6000;

/// The host open flags for the guest's: its access mode and the flags that mean the same
/// on the host; never O_CREAT/O_EXCL (creating is CREATE's), O_NOCTTY, O_NONBLOCK,
/// O_DIRECT (alignment rules of the guest's page cache, not the host's) or O_NOATIME.
pub(super) fn open_flags(flags: u32) -> OFlags {
    let guest = OFlags::from_bits_retain(flags);
    guest
        & (OFlags::ACCMODE
            | OFlags::RWMODE
            | OFlags::APPEND
            | OFlags::TRUNC
            | OFlags::SYNC
            | OFlags::DSYNC
            | OFlags::EXCL)
}

fn wants_write(flags: OFlags) -> bool {
    flags.intersects(OFlags::WRONLY | OFlags::RDWR | OFlags::TRUNC | OFlags::APPEND)
}

impl Share {
    /// FUSE_OPEN: regular files only.
    pub fn open(&mut self, node: u64, flags: u32) -> Result<OpenOut, Errno> {
        let flags = open_flags(flags) - OFlags::EXCL;
        if wants_write(flags) {
            self.writable()?;
        }
        let fd = self.reopen(node, flags)?;
        let fh = self.add_handle(node, fd)?;
        Ok(OpenOut {
            fh,
            ..OpenOut::default()
        })
    }

    /// FUSE_READ: up to `size` bytes at `offset`, appended to `out`.
    pub fn read(&self, fh: u64, offset: u64, size: usize, out: &mut Vec<u8>) -> Result<(), Errno> {
        let fd = self.handle(fh)?.fd.as_fd();
        let start = out.len();
        out.resize(start + size, 0);
        let mut done = 0;
        while done < size {
            let at = offset.checked_add(done as u64).ok_or(Errno::INVAL)?;
            match rustix::io::pread(fd, &mut out[start + done..], at) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(Errno::INTR) => continue,
                Err(err) => {
                    out.truncate(start);
                    return Err(err);
                }
            }
        }
        out.truncate(start + done);
        Ok(())
    }

    /// FUSE_WRITE: `data` at `offset`; returns the bytes written. A write by someone other
    /// than the owner clears setuid/setgid first, whatever privileges the host process has.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8], caller: Caller) -> Result<u32, Errno> {
        self.writable()?;
        let fd = self.handle(fh)?.fd.as_fd();
        self.kill_setid(fd, caller)?;
        let mut done = 0;
        while done < data.len() {
            let at = offset.checked_add(done as u64).ok_or(Errno::FBIG)?;
            match rustix::io::pwrite(fd, &data[done..], at) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(Errno::INTR) => continue,
                Err(err) if done == 0 => return Err(err),
                Err(_) => break,
            }
        }
        u32::try_from(done).map_err(|_| Errno::INVAL)
    }

    /// Clears setuid/setgid of the file `fd` unless `caller` owns it (killpriv).
    fn kill_setid(&self, fd: BorrowedFd<'_>, caller: Caller) -> Result<(), Errno> {
        let st = rustix::fs::fstat(fd)?;
        if st.st_mode & SETID == 0 {
            return Ok(());
        }
        let (owner, _) = self.policy.ids.to_guest(st.st_uid, st.st_gid);
        if owner != caller.uid {
            rustix::fs::fchmod(fd, Mode::from_raw_mode(st.st_mode & 0o1777))?;
        }
        Ok(())
    }

    /// FUSE_FSYNC / FUSE_FSYNCDIR.
    pub fn fsync(&self, fh: u64, datasync: bool) -> Result<(), Errno> {
        let fd = self.handle(fh)?.fd.as_fd();
        if datasync {
            Ok(rustix::fs::fdatasync(fd)?)
        } else {
            Ok(rustix::fs::fsync(fd)?)
        }
    }

    /// FUSE_FLUSH: nothing is buffered here; only the handle is checked.
    pub fn flush(&self, fh: u64) -> Result<(), Errno> {
        self.handle(fh).map(|_| ())
    }

    /// FUSE_FALLOCATE.
    pub fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: u32) -> Result<(), Errno> {
        self.writable()?;
        let fd = self.handle(fh)?.fd.as_fd();
        let mode = FallocateFlags::from_bits(mode).ok_or(Errno::OPNOTSUPP)?;
        rustix::fs::fallocate(fd, mode, offset, length)
    }

    /// FUSE_LSEEK: SEEK_DATA and SEEK_HOLE (the kernel does the rest itself).
    pub fn lseek(&self, fh: u64, offset: u64, whence: u32) -> Result<u64, Errno> {
        let fd = self.handle(fh)?.fd.as_fd();
        let from = match whence {
            0 => SeekFrom::Start(offset),
            3 => SeekFrom::Data(offset),
            4 => SeekFrom::Hole(offset),
            _ => return Err(Errno::INVAL),
        };
        rustix::fs::seek(fd, from)
    }

    /// FUSE_SETATTR: mode, owner, size and times, each as asked.
    pub fn setattr(&mut self, node: u64, set: &SetattrIn, caller: Caller) -> Result<Attr, Errno> {
        let changes =
            fattr::MODE | fattr::UID | fattr::GID | fattr::SIZE | fattr::ATIME | fattr::MTIME;
        if set.valid & changes != 0 {
            self.writable()?;
        }
        let fd = self.node_fd(node)?;
        let st = rustix::fs::fstat(fd)?;
        let is_dir = FileType::from_raw_mode(st.st_mode) == FileType::Directory;
        let proc_name = fd_name(fd);
        if set.valid & fattr::MODE != 0 {
            // A guest may not make host programs setuid/setgid (directories may be setgid).
            if !is_dir && set.mode & SETID != 0 {
                return Err(Errno::PERM);
            }
            rustix::fs::chmodat(
                &self.proc_fds,
                proc_name.as_str(),
                Mode::from_raw_mode(set.mode & 0o7777),
                AtFlags::empty(),
            )?;
        }
        if set.valid & (fattr::UID | fattr::GID) != 0 {
            let uid = (set.valid & fattr::UID != 0).then_some(set.uid);
            let gid = (set.valid & fattr::GID != 0).then_some(set.gid);
            let (uid, gid) = self.policy.ids.to_host(uid, gid)?;
            // The host kernel clears setuid/setgid of a file whose owner changes.
            rustix::fs::chownat(
                fd,
                c"",
                uid.map(Uid::from_raw),
                gid.map(Gid::from_raw),
                AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
            )?;
        }
        if set.valid & fattr::SIZE != 0 {
            self.truncate(node, set, caller)?;
        }
        if set.valid & (fattr::ATIME | fattr::MTIME) != 0 {
            let time = |given: u32, now: u32, sec: u64, nsec: u32| {
                if set.valid & given == 0 {
                    Timespec {
                        tv_sec: 0,
                        tv_nsec: UTIME_OMIT,
                    }
                } else if set.valid & now != 0 {
                    Timespec {
                        tv_sec: 0,
                        tv_nsec: UTIME_NOW,
                    }
                } else {
                    Timespec {
                        tv_sec: i64::try_from(sec).unwrap_or(i64::MAX),
                        tv_nsec: i64::from(nsec).min(999_999_999),
                    }
                }
            };
            let times = Timestamps {
                last_access: time(fattr::ATIME, fattr::ATIME_NOW, set.atime, set.atimensec),
                last_modification: time(fattr::MTIME, fattr::MTIME_NOW, set.mtime, set.mtimensec),
            };
            rustix::fs::utimensat(&self.proc_fds, proc_name.as_str(), &times, AtFlags::empty())?;
        }
        self.getattr(node)
    }

    fn truncate(&mut self, node: u64, set: &SetattrIn, caller: Caller) -> Result<(), Errno> {
        let handle = (set.valid & fattr::FH != 0)
            .then(|| self.handles.get(&set.fh))
            .flatten()
            .filter(|h| h.node == node);
        let reopened;
        let fd = match handle {
            Some(handle) => handle.fd.as_fd(),
            None => {
                reopened = self.reopen(node, OFlags::WRONLY)?;
                reopened.as_fd()
            }
        };
        self.kill_setid(fd, caller)?;
        rustix::fs::ftruncate(fd, set.size)
    }
}
