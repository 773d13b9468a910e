//! One shared host directory as the FUSE server's file system ("passthrough"): node ids
//! stand for `O_PATH` descriptors of host inodes found beneath the share's root, handles
//! for files and directories opened from them.
//!
//! Confinement does not rest on path strings: the guest names one entry at a time
//! ([`names::entry_name`]), each is opened beneath its parent's descriptor with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, and symlinks are handed to the guest,
//! whose kernel resolves them within its own root, never followed here. Only regular files
//! and directories are ever opened for I/O; devices, fifos and sockets are not.

mod dirs;
mod files;
mod inodes;
pub mod names;
pub mod xattrs;

use std::collections::HashMap;
use std::ffi::CStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags, Stat};
use rustix::io::Errno;

use super::abi::{Attr, EntryOut, Kstatfs};
use inodes::Inodes;
pub use names::{IdMap, XattrPolicy};

/// How long the guest may cache names and attributes: a short while, because the host
/// side may change the share too (Docker's bind mounts show host changes at once).
const CACHE_SECS: u64 = 1;
/// Most files and directories the guest may hold open at once on one share.
pub const MAX_HANDLES: usize = 4096;
/// Most host inodes the guest may hold looked up at once on one share (each costs a
/// descriptor here until the guest forgets it).
pub const MAX_INODES: usize = 65536;

/// The share's rules, decided by the VM's configuration.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Refuse every change with EROFS.
    pub read_only: bool,
    pub xattrs: XattrPolicy,
    pub ids: IdMap,
}

/// The requester of one FUSE request, as its header names it.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// An open file or directory of the guest's.
struct Handle {
    fd: OwnedFd,
    /// The inode it was opened from.
    node: u64,
}

/// The file system of one share.
pub struct Share {
    inodes: Inodes,
    handles: HashMap<u64, Handle>,
    next_handle: u64,
    /// `/proc/self/fd`, to reopen `O_PATH` descriptors with real access modes.
    proc_fds: OwnedFd,
    policy: Policy,
}

impl Share {
    /// The share rooted at `root`, which must be a directory and not a symlink.
    pub fn new(root: &Path, policy: Policy) -> std::io::Result<Self> {
        // The caller resolved `root` already (it is canonical): a symlink swapped in since
        // is refused rather than followed.
        let fd = rustix::fs::open(
            root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let stat = rustix::fs::fstat(&fd)?;
        let proc_fds = rustix::fs::open(
            "/proc/self/fd",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Self {
            inodes: Inodes::new(fd, &stat),
            handles: HashMap::new(),
            next_handle: 1,
            proc_fds,
            policy,
        })
    }

    /// Forgets every node and handle (FUSE_DESTROY, or a new FUSE_INIT).
    pub fn reset(&mut self) {
        self.inodes.reset();
        self.handles.clear();
    }

    fn writable(&self) -> Result<(), Errno> {
        if self.policy.read_only {
            Err(Errno::ROFS)
        } else {
            Ok(())
        }
    }

    fn node_fd(&self, node: u64) -> Result<BorrowedFd<'_>, Errno> {
        self.inodes.fd(node)
    }

    /// The guest's attributes of a host stat.
    fn attr(&self, st: &Stat) -> Attr {
        let (uid, gid) = self.policy.ids.to_guest(st.st_uid, st.st_gid);
        Attr {
            ino: st.st_ino,
            size: u64::try_from(st.st_size).unwrap_or(0),
            blocks: u64::try_from(st.st_blocks).unwrap_or(0),
            atime: u64::try_from(st.st_atime).unwrap_or(0),
            mtime: u64::try_from(st.st_mtime).unwrap_or(0),
            ctime: u64::try_from(st.st_ctime).unwrap_or(0),
            atimensec: u32::try_from(st.st_atime_nsec).unwrap_or(0),
            mtimensec: u32::try_from(st.st_mtime_nsec).unwrap_or(0),
            ctimensec: u32::try_from(st.st_ctime_nsec).unwrap_or(0),
            mode: st.st_mode,
            nlink: u32::try_from(st.st_nlink).unwrap_or(u32::MAX),
            uid,
            gid,
            rdev: encode_dev(st.st_rdev),
            blksize: u32::try_from(st.st_blksize).unwrap_or(4096),
            flags: 0,
        }
    }

    fn entry(&self, node: u64, st: &Stat) -> EntryOut {
        EntryOut {
            nodeid: node,
            generation: 0,
            entry_valid: CACHE_SECS,
            attr_valid: CACHE_SECS,
            entry_valid_nsec: 0,
            attr_valid_nsec: 0,
            attr: self.attr(st),
        }
    }

    /// FUSE_LOOKUP: finds `name` in directory `parent` and takes a reference on it.
    pub fn lookup(&mut self, parent: u64, name: &CStr) -> Result<EntryOut, Errno> {
        let name = names::entry_name(name)?;
        let fd = rustix::fs::openat2(
            self.node_fd(parent)?,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        )?;
        let stat = rustix::fs::fstat(&fd)?;
        let node = self.inodes.insert(fd, &stat)?;
        Ok(self.entry(node, &stat))
    }

    /// FUSE_FORGET: the guest dropped `count` references to `node`.
    pub fn forget(&mut self, node: u64, count: u64) {
        self.inodes.forget(node, count);
    }

    /// FUSE_GETATTR.
    pub fn getattr(&self, node: u64) -> Result<Attr, Errno> {
        let st = rustix::fs::fstat(self.node_fd(node)?)?;
        Ok(self.attr(&st))
    }

    /// FUSE_STATFS.
    pub fn statfs(&self, node: u64) -> Result<Kstatfs, Errno> {
        let st = rustix::fs::fstatvfs(self.node_fd(node)?)?;
        Ok(Kstatfs {
            blocks: st.f_blocks,
            bfree: st.f_bfree,
            bavail: st.f_bavail,
            files: st.f_files,
            ffree: st.f_ffree,
            bsize: u32::try_from(st.f_bsize).unwrap_or(4096),
            namelen: u32::try_from(st.f_namemax).unwrap_or(255),
            frsize: u32::try_from(st.f_frsize).unwrap_or(4096),
            padding: 0,
            spare: [0; 6],
        })
    }

    /// Opens `node` again with real access (`flags`), through `/proc/self/fd`: `O_PATH`
    /// descriptors cannot do I/O. Only regular files and directories are opened.
    fn reopen(&self, node: u64, flags: OFlags) -> Result<OwnedFd, Errno> {
        let fd = self.node_fd(node)?;
        let kind = FileType::from_raw_mode(rustix::fs::fstat(fd)?.st_mode);
        let dir = flags.contains(OFlags::DIRECTORY);
        match kind {
            FileType::RegularFile if !dir => {}
            FileType::Directory if dir => {}
            FileType::Directory => return Err(Errno::ISDIR),
            _ if dir => return Err(Errno::NOTDIR),
            // Devices, fifos and sockets are the guest kernel's business, never opened
            // here (a fifo would block this thread, a device would be the host's).
            _ => return Err(Errno::NXIO),
        }
        let path = fd_name(fd);
        rustix::fs::openat(
            &self.proc_fds,
            path.as_str(),
            flags | OFlags::CLOEXEC,
            Mode::empty(),
        )
    }

    fn add_handle(&mut self, node: u64, fd: OwnedFd) -> Result<u64, Errno> {
        if self.handles.len() >= MAX_HANDLES {
            return Err(Errno::NFILE);
        }
        let fh = self.next_handle;
        self.next_handle += 1;
        self.handles.insert(fh, Handle { fd, node });
        Ok(fh)
    }

    fn handle(&self, fh: u64) -> Result<&Handle, Errno> {
        self.handles.get(&fh).ok_or(Errno::BADF)
    }

    /// FUSE_RELEASE / FUSE_RELEASEDIR.
    pub fn release(&mut self, fh: u64) {
        self.handles.remove(&fh);
    }

    /// Live handles and nodes, for tests and limits.
    #[cfg(test)]
    pub fn counts(&self) -> (usize, usize) {
        (self.handles.len(), self.inodes.len())
    }
}

/// The name of `fd` under `/proc/self/fd`.
fn fd_name(fd: BorrowedFd<'_>) -> String {
    use std::os::fd::AsRawFd;
    fd.as_fd().as_raw_fd().to_string()
}

/// The kernel's `new_encode_dev`: FUSE carries device numbers in 32 bits.
fn encode_dev(dev: u64) -> u32 {
    let major = rustix::fs::major(dev);
    let minor = rustix::fs::minor(dev);
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

#[cfg(test)]
pub(crate) mod tests;
