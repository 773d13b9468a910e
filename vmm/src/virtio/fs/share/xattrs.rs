//! Extended attributes, filtered by the share's [`XattrPolicy`](super::XattrPolicy).
//! They are reached through `/proc/self/fd/N`, the one way to name any inode we hold
//! (symlinks and special files included) without a path the guest influences.

use std::ffi::CStr;
use std::os::fd::AsRawFd;

use rustix::fs::XattrFlags;
use rustix::io::Errno;

use super::Share;

/// Largest value or name list passed either way (XATTR_SIZE_MAX).
pub const XATTR_SIZE_MAX: usize = 64 * 1024;

/// What a size query or a read returns: the size alone (the guest asked with 0), or the data.
pub enum XattrReply {
    Size(u32),
    Data(Vec<u8>),
}

impl Share {
    fn proc_path(&self, node: u64) -> Result<String, Errno> {
        Ok(format!("/proc/self/fd/{}", self.node_fd(node)?.as_raw_fd()))
    }

    /// FUSE_GETXATTR.
    pub fn getxattr(&self, node: u64, name: &CStr, size: u32) -> Result<XattrReply, Errno> {
        if !self.policy.xattrs.may_read(name.to_bytes()) {
            return Err(Errno::NODATA);
        }
        let path = self.proc_path(node)?;
        let len = rustix::fs::getxattr_query(path.as_str(), name)?;
        if size == 0 {
            return Ok(XattrReply::Size(
                u32::try_from(len).map_err(|_| Errno::TOOBIG)?,
            ));
        }
        let size = usize::try_from(size)
            .unwrap_or(usize::MAX)
            .min(XATTR_SIZE_MAX);
        if len > size {
            return Err(Errno::RANGE);
        }
        let mut value = vec![0u8; len];
        let n = rustix::fs::getxattr(path.as_str(), name, &mut value[..])?;
        value.truncate(n);
        Ok(XattrReply::Data(value))
    }

    /// FUSE_LISTXATTR: the names the guest may read, NUL-terminated.
    pub fn listxattr(&self, node: u64, size: u32) -> Result<XattrReply, Errno> {
        let path = self.proc_path(node)?;
        let mut raw = vec![0u8; XATTR_SIZE_MAX];
        let n = rustix::fs::listxattr(path.as_str(), &mut raw[..])?;
        raw.truncate(n);
        let mut names = Vec::with_capacity(n);
        for name in raw.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            if self.policy.xattrs.may_read(name) {
                names.extend_from_slice(name);
                names.push(0);
            }
        }
        if size == 0 {
            return Ok(XattrReply::Size(
                u32::try_from(names.len()).map_err(|_| Errno::TOOBIG)?,
            ));
        }
        if names.len() > usize::try_from(size).unwrap_or(usize::MAX) {
            return Err(Errno::RANGE);
        }
        Ok(XattrReply::Data(names))
    }

    /// FUSE_SETXATTR.
    pub fn setxattr(&self, node: u64, name: &CStr, value: &[u8], flags: u32) -> Result<(), Errno> {
        self.writable()?;
        if !self.policy.xattrs.may_write(name.to_bytes()) {
            return Err(Errno::PERM);
        }
        if value.len() > XATTR_SIZE_MAX {
            return Err(Errno::TOOBIG);
        }
        let flags = XattrFlags::from_bits(flags).ok_or(Errno::INVAL)?;
        rustix::fs::setxattr(self.proc_path(node)?.as_str(), name, value, flags)
    }

    /// FUSE_REMOVEXATTR.
    pub fn removexattr(&self, node: u64, name: &CStr) -> Result<(), Errno> {
        self.writable()?;
        if !self.policy.xattrs.may_write(name.to_bytes()) {
            return Err(Errno::PERM);
        }
        rustix::fs::removexattr(self.proc_path(node)?.as_str(), name)
    }
}
