//! Directory operations: creating, linking, renaming and removing entries, and reading
//! directories. Every new entry is made beneath its parent's descriptor by a single name.

use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, RawDir, RenameFlags, ResolveFlags, SeekFrom};
use rustix::io::Errno;

use super::{fd_name, names, Caller, Share};
use crate::virtio::fs::abi::{Dirent, EntryOut, OpenOut};

/// Mode bits a guest may give a new file: permissions and sticky, but not setuid/setgid
/// on non-directories, which would let a guest plant privileged programs on the host.
fn creation_mode(mode: u32, dir: bool) -> Mode {
    let allowed = if dir { 0o7777 } else { 0o1777 };
    Mode::from_raw_mode(mode & allowed)
}

/// Resolution flags for names inside the share: stay beneath the parent, follow nothing.
pub(super) fn beneath() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS
}

impl Share {
    /// Gives a new entry the requester's ids (as root; rootless it stays the invoking
    /// user's), or the parent's group where the parent is setgid, as Linux does.
    fn own_new_entry(&self, parent: u64, name: &CStr, caller: Caller) -> Result<(), Errno> {
        if !self.policy.ids.chowns_new_files() {
            return Ok(());
        }
        let parent_fd = self.node_fd(parent)?;
        let parent_st = rustix::fs::fstat(parent_fd)?;
        let gid = if parent_st.st_mode & 0o2000 != 0 {
            parent_st.st_gid
        } else {
            caller.gid
        };
        // The requester's ids come from the guest's request header: checked like a chown's.
        let (uid, gid) = self.policy.ids.to_host(Some(caller.uid), Some(gid))?;
        rustix::fs::chownat(
            parent_fd,
            name,
            uid.map(rustix::process::Uid::from_raw),
            gid.map(rustix::process::Gid::from_raw),
            AtFlags::SYMLINK_NOFOLLOW,
        )?;
        Ok(())
    }

    /// Owns and looks up an entry just made; if that fails the entry is removed again,
    /// so a failed request leaves nothing behind.
    fn finish_new_entry(
        &mut self,
        parent: u64,
        name: &CStr,
        caller: Caller,
        dir: bool,
    ) -> Result<EntryOut, Errno> {
        let result = self
            .own_new_entry(parent, name, caller)
            .and_then(|()| self.lookup(parent, name));
        if result.is_err() {
            let flags = if dir {
                AtFlags::REMOVEDIR
            } else {
                AtFlags::empty()
            };
            if let Ok(fd) = self.node_fd(parent) {
                let _ = rustix::fs::unlinkat(fd, name, flags);
            }
        }
        result
    }

    /// FUSE_MKDIR.
    pub fn mkdir(
        &mut self,
        parent: u64,
        name: &CStr,
        mode: u32,
        caller: Caller,
    ) -> Result<EntryOut, Errno> {
        self.writable()?;
        let name = names::entry_name(name)?;
        rustix::fs::mkdirat(self.node_fd(parent)?, name, creation_mode(mode, true))?;
        self.finish_new_entry(parent, name, caller, true)
    }

    /// FUSE_MKNOD: regular files, fifos and sockets; never device nodes.
    pub fn mknod(
        &mut self,
        parent: u64,
        name: &CStr,
        mode: u32,
        caller: Caller,
    ) -> Result<EntryOut, Errno> {
        self.writable()?;
        let name = names::entry_name(name)?;
        let kind = FileType::from_raw_mode(mode);
        match kind {
            FileType::RegularFile | FileType::Fifo | FileType::Socket => {}
            _ => return Err(Errno::PERM),
        }
        rustix::fs::mknodat(
            self.node_fd(parent)?,
            name,
            kind,
            creation_mode(mode, false),
            0,
        )?;
        self.finish_new_entry(parent, name, caller, false)
    }

    /// FUSE_SYMLINK: the target is stored as given; it is the guest's to resolve.
    pub fn symlink(
        &mut self,
        parent: u64,
        name: &CStr,
        target: &CStr,
        caller: Caller,
    ) -> Result<EntryOut, Errno> {
        self.writable()?;
        let name = names::entry_name(name)?;
        rustix::fs::symlinkat(target, self.node_fd(parent)?, name)?;
        self.finish_new_entry(parent, name, caller, false)
    }

    /// FUSE_CREATE: creates and opens a regular file.
    pub fn create(
        &mut self,
        parent: u64,
        name: &CStr,
        flags: u32,
        mode: u32,
        caller: Caller,
    ) -> Result<(EntryOut, OpenOut), Errno> {
        self.writable()?;
        let name = names::entry_name(name)?;
        let flags = super::files::open_flags(flags) | OFlags::CREATE | OFlags::NOFOLLOW;
        let fd: OwnedFd = rustix::fs::openat2(
            self.node_fd(parent)?,
            name,
            flags | OFlags::CLOEXEC,
            creation_mode(mode, false),
            beneath(),
        )?;
        let entry = self.finish_new_entry(parent, name, caller, false)?;
        match self.add_handle(entry.nodeid, fd) {
            Ok(fh) => Ok((
                entry,
                OpenOut {
                    fh,
                    ..OpenOut::default()
                },
            )),
            Err(err) => {
                self.forget(entry.nodeid, 1);
                Err(err)
            }
        }
    }

    /// FUSE_UNLINK / FUSE_RMDIR.
    pub fn remove(&mut self, parent: u64, name: &CStr, dir: bool) -> Result<(), Errno> {
        self.writable()?;
        let name = names::entry_name(name)?;
        let flags = if dir {
            AtFlags::REMOVEDIR
        } else {
            AtFlags::empty()
        };
        rustix::fs::unlinkat(self.node_fd(parent)?, name, flags)
    }

    /// FUSE_RENAME / FUSE_RENAME2: NOREPLACE and EXCHANGE; WHITEOUT would make a device
    /// node on the host and is refused.
    pub fn rename(
        &mut self,
        parent: u64,
        name: &CStr,
        new_parent: u64,
        new_name: &CStr,
        flags: u32,
    ) -> Result<(), Errno> {
        self.writable()?;
        let name = names::entry_name(name)?;
        let new_name = names::entry_name(new_name)?;
        let allowed = RenameFlags::NOREPLACE | RenameFlags::EXCHANGE;
        let flags = RenameFlags::from_bits(flags)
            .filter(|f| allowed.contains(*f))
            .ok_or(Errno::INVAL)?;
        let old_dir = self.node_fd(parent)?;
        let new_dir = self.node_fd(new_parent)?;
        rustix::fs::renameat_with(old_dir, name, new_dir, new_name, flags)
    }

    /// FUSE_LINK: a new name in the share for an inode already in it.
    pub fn link(&mut self, node: u64, new_parent: u64, new_name: &CStr) -> Result<EntryOut, Errno> {
        self.writable()?;
        let new_name = names::entry_name(new_name)?;
        let fd = self.node_fd(node)?;
        if FileType::from_raw_mode(rustix::fs::fstat(fd)?.st_mode) == FileType::Directory {
            return Err(Errno::PERM);
        }
        // linkat(fd, "", AT_EMPTY_PATH) needs CAP_DAC_READ_SEARCH; through /proc it does
        // not, and the link is to exactly the inode we hold.
        rustix::fs::linkat(
            &self.proc_fds,
            fd_name(fd).as_str(),
            self.node_fd(new_parent)?,
            new_name,
            AtFlags::SYMLINK_FOLLOW,
        )?;
        self.lookup(new_parent, new_name)
    }

    /// FUSE_READLINK.
    pub fn readlink(&self, node: u64) -> Result<Vec<u8>, Errno> {
        let target = rustix::fs::readlinkat(self.node_fd(node)?, c"", Vec::new())?;
        Ok(target.into_bytes())
    }

    /// FUSE_OPENDIR.
    pub fn opendir(&mut self, node: u64) -> Result<OpenOut, Errno> {
        let fd = self.reopen(node, OFlags::RDONLY | OFlags::DIRECTORY)?;
        let fh = self.add_handle(node, fd)?;
        Ok(OpenOut {
            fh,
            ..OpenOut::default()
        })
    }

    /// FUSE_READDIR: entries from the position `offset` (a cookie an earlier answer gave),
    /// as many as fit in `size` bytes, appended to `out`.
    pub fn readdir(
        &mut self,
        fh: u64,
        offset: u64,
        size: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), Errno> {
        let handle = self.handle(fh)?;
        let fd = handle.fd.as_fd();
        rustix::fs::seek(fd, SeekFrom::Start(offset))?;
        let mut buf = vec![MaybeUninit::<u8>::uninit(); size.clamp(512, 64 * 1024)];
        let mut dir = RawDir::new(fd, &mut buf);
        let start = out.len();
        while let Some(entry) = dir.next() {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            let Ok(namelen) = u32::try_from(name.len()) else {
                continue;
            };
            let record = std::mem::size_of::<Dirent>() + name.len();
            let padded = record.next_multiple_of(8);
            if out.len() - start + padded > size {
                break;
            }
            let dirent = Dirent {
                ino: entry.ino(),
                off: entry.next_entry_cookie(),
                namelen,
                type_: entry.file_type().as_raw_mode() >> 12,
            };
            out.extend_from_slice(vm_memory::ByteValued::as_slice(&dirent));
            out.extend_from_slice(name);
            out.resize(out.len() + (padded - record), 0);
        }
        Ok(())
    }
}
