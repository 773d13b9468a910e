//! The FUSE server: decodes one request (header and arguments, all from guest memory and
//! so all hostile), calls the share, and encodes the reply. Every length is checked
//! against the bytes actually present; a request that cannot be parsed gets an error
//! reply, never a panic or an allocation the guest sized.

use std::ffi::CStr;

use rustix::io::Errno;
use vm_memory::ByteValued;

use super::abi::{self, init_flags, opcode, InHeader, OutHeader};
use super::share::xattrs::XattrReply;
use super::share::{Caller, Share};

/// Largest WRITE payload and READ reply, negotiated at INIT.
pub const MAX_WRITE: u32 = 1 << 20;
/// The same in pages (FUSE_MAX_PAGES).
const MAX_PAGES: u16 = 256;
/// Largest request accepted: a WRITE header and arguments plus MAX_WRITE bytes, or two
/// names and a SETXATTR value; anything longer is refused unread.
pub const MAX_REQUEST: usize = 4096 + MAX_WRITE as usize + 64 * 1024;

/// The arguments after the header, consumed front to back.
struct Args<'a>(&'a [u8]);

impl<'a> Args<'a> {
    fn obj<T: ByteValued + Default>(&mut self) -> Result<T, Errno> {
        let size = std::mem::size_of::<T>();
        if self.0.len() < size {
            return Err(Errno::INVAL);
        }
        let (head, rest) = self.0.split_at(size);
        let mut value = T::default();
        value.as_mut_slice().copy_from_slice(head);
        self.0 = rest;
        Ok(value)
    }

    /// A NUL-terminated string.
    fn name(&mut self) -> Result<&'a CStr, Errno> {
        let end = self.0.iter().position(|&b| b == 0).ok_or(Errno::INVAL)?;
        let (head, rest) = self.0.split_at(end + 1);
        self.0 = rest;
        CStr::from_bytes_with_nul(head).map_err(|_| Errno::INVAL)
    }

    fn rest(self) -> &'a [u8] {
        self.0
    }
}

/// What a request produced.
enum Reply {
    /// Nothing: FORGET, BATCH_FORGET and INTERRUPT are never answered.
    None,
    /// Success with no payload.
    Empty,
    /// Success with this payload (already in the reply buffer after the header).
    Payload,
}

pub struct Server {
    share: Share,
    initialized: bool,
}

fn push<T: ByteValued>(out: &mut Vec<u8>, value: &T) {
    out.extend_from_slice(value.as_slice());
}

impl Server {
    pub fn new(share: Share) -> Self {
        Self {
            share,
            initialized: false,
        }
    }

    /// Serves one request; returns the reply to put in the chain's writable part (empty
    /// when there is none to send). `out` is reused between requests.
    pub fn handle(&mut self, request: &[u8], out: &mut Vec<u8>) {
        out.clear();
        let mut args = Args(request);
        let Ok(header) = args.obj::<InHeader>() else {
            // Without a header there is no `unique` to answer.
            return;
        };
        out.resize(std::mem::size_of::<OutHeader>(), 0);
        let body = usize::try_from(header.len)
            .ok()
            .and_then(|len| len.checked_sub(std::mem::size_of::<InHeader>()))
            .and_then(|body| args.rest().get(..body));
        let result = if let Some(args) = body.filter(|_| header.total_extlen == 0) {
            if !self.initialized && header.opcode != opcode::INIT {
                Err(Errno::IO)
            } else {
                self.dispatch(&header, Args(args), out)
            }
        } else {
            Err(Errno::INVAL)
        };
        let error = match result {
            Ok(Reply::None) => {
                out.clear();
                return;
            }
            Ok(Reply::Empty) => {
                out.truncate(std::mem::size_of::<OutHeader>());
                0
            }
            Ok(Reply::Payload) => 0,
            Err(errno) => {
                out.truncate(std::mem::size_of::<OutHeader>());
                -errno.raw_os_error()
            }
        };
        let reply = OutHeader {
            len: u32::try_from(out.len()).unwrap_or(u32::MAX),
            error,
            unique: header.unique,
        };
        out[..std::mem::size_of::<OutHeader>()].copy_from_slice(reply.as_slice());
    }

    fn dispatch(
        &mut self,
        header: &InHeader,
        mut args: Args<'_>,
        out: &mut Vec<u8>,
    ) -> Result<Reply, Errno> {
        let node = header.nodeid;
        let caller = Caller {
            uid: header.uid,
            gid: header.gid,
        };
        let share = &mut self.share;
        match header.opcode {
            opcode::INIT => return self.init(args, out),
            opcode::DESTROY => {
                share.reset();
                self.initialized = false;
                return Ok(Reply::Empty);
            }
            opcode::FORGET => {
                let forget: abi::ForgetIn = args.obj()?;
                share.forget(node, forget.nlookup);
                return Ok(Reply::None);
            }
            opcode::BATCH_FORGET => {
                let batch: abi::BatchForgetIn = args.obj()?;
                // The count is the guest's; only the entries actually present are read.
                for _ in 0..batch.count {
                    let Ok(one) = args.obj::<abi::ForgetOne>() else {
                        break;
                    };
                    share.forget(one.nodeid, one.nlookup);
                }
                return Ok(Reply::None);
            }
            opcode::INTERRUPT => return Ok(Reply::None),
            opcode::LOOKUP => push(out, &share.lookup(node, args.name()?)?),
            opcode::GETATTR => {
                let attr = share.getattr(node)?;
                push(
                    out,
                    &abi::AttrOut {
                        attr_valid: 1,
                        attr,
                        ..Default::default()
                    },
                );
            }
            opcode::SETATTR => {
                let set: abi::SetattrIn = args.obj()?;
                let attr = share.setattr(node, &set, caller)?;
                push(
                    out,
                    &abi::AttrOut {
                        attr_valid: 1,
                        attr,
                        ..Default::default()
                    },
                );
            }
            opcode::READLINK => out.extend_from_slice(&share.readlink(node)?),
            opcode::SYMLINK => {
                let name = args.name()?;
                let target = args.name()?;
                push(out, &share.symlink(node, name, target, caller)?);
            }
            opcode::MKNOD => {
                let mknod: abi::MknodIn = args.obj()?;
                push(out, &share.mknod(node, args.name()?, mknod.mode, caller)?);
            }
            opcode::MKDIR => {
                let mkdir: abi::MkdirIn = args.obj()?;
                push(out, &share.mkdir(node, args.name()?, mkdir.mode, caller)?);
            }
            opcode::UNLINK => {
                share.remove(node, args.name()?, false)?;
                return Ok(Reply::Empty);
            }
            opcode::RMDIR => {
                share.remove(node, args.name()?, true)?;
                return Ok(Reply::Empty);
            }
            opcode::RENAME => {
                let rename: abi::RenameIn = args.obj()?;
                let (old, new) = (args.name()?, args.name()?);
                share.rename(node, old, rename.newdir, new, 0)?;
                return Ok(Reply::Empty);
            }
            opcode::RENAME2 => {
                let rename: abi::Rename2In = args.obj()?;
                let (old, new) = (args.name()?, args.name()?);
                share.rename(node, old, rename.newdir, new, rename.flags)?;
                return Ok(Reply::Empty);
            }
            opcode::LINK => {
                let link: abi::LinkIn = args.obj()?;
                push(out, &share.link(link.oldnodeid, node, args.name()?)?);
            }
            opcode::OPEN => {
                let open: abi::OpenIn = args.obj()?;
                push(out, &share.open(node, open.flags)?);
            }
            opcode::CREATE => {
                let create: abi::CreateIn = args.obj()?;
                let (entry, open) =
                    share.create(node, args.name()?, create.flags, create.mode, caller)?;
                push(out, &entry);
                push(out, &open);
            }
            opcode::READ => {
                let read: abi::ReadIn = args.obj()?;
                let size = read.size.min(MAX_WRITE) as usize;
                share.read(read.fh, read.offset, size, out)?;
            }
            opcode::WRITE => {
                let write: abi::WriteIn = args.obj()?;
                let data = args.rest();
                let len = usize::try_from(write.size).map_err(|_| Errno::INVAL)?;
                let data = data.get(..len).ok_or(Errno::INVAL)?;
                let size = share.write(write.fh, write.offset, data, caller)?;
                push(out, &abi::WriteOut { size, padding: 0 });
            }
            opcode::STATFS => push(out, &share.statfs(node)?),
            opcode::RELEASE | opcode::RELEASEDIR => {
                let release: abi::ReleaseIn = args.obj()?;
                share.release(release.fh);
                return Ok(Reply::Empty);
            }
            opcode::FSYNC | opcode::FSYNCDIR => {
                let fsync: abi::FsyncIn = args.obj()?;
                share.fsync(fsync.fh, fsync.fsync_flags & 1 != 0)?;
                return Ok(Reply::Empty);
            }
            opcode::FLUSH => {
                let fh: u64 = args.obj()?;
                share.flush(fh)?;
                return Ok(Reply::Empty);
            }
            opcode::OPENDIR => push(out, &share.opendir(node)?),
            opcode::READDIR => {
                let read: abi::ReadIn = args.obj()?;
                let size = read.size.min(MAX_WRITE) as usize;
                share.readdir(read.fh, read.offset, size, out)?;
            }
            opcode::GETXATTR | opcode::LISTXATTR => {
                let get: abi::GetxattrIn = args.obj()?;
                let reply = if header.opcode == opcode::GETXATTR {
                    share.getxattr(node, args.name()?, get.size)?
                } else {
                    share.listxattr(node, get.size)?
                };
                match reply {
                    XattrReply::Size(size) => push(out, &abi::GetxattrOut { size, padding: 0 }),
                    XattrReply::Data(data) => out.extend_from_slice(&data),
                }
            }
            opcode::SETXATTR => {
                let set: abi::SetxattrIn = args.obj()?;
                let name = args.name()?;
                let len = usize::try_from(set.size).map_err(|_| Errno::INVAL)?;
                let value = args.rest().get(..len).ok_or(Errno::INVAL)?;
                share.setxattr(node, name, value, set.flags)?;
                return Ok(Reply::Empty);
            }
            opcode::REMOVEXATTR => {
                share.removexattr(node, args.name()?)?;
                return Ok(Reply::Empty);
            }
            opcode::FALLOCATE => {
                let fa: abi::FallocateIn = args.obj()?;
                share.fallocate(fa.fh, fa.offset, fa.length, fa.mode)?;
                return Ok(Reply::Empty);
            }
            opcode::LSEEK => {
                let seek: abi::LseekIn = args.obj()?;
                let offset = share.lseek(seek.fh, seek.offset, seek.whence)?;
                push(out, &abi::LseekOut { offset });
            }
            // ACCESS, locks, ioctl, poll, copy_file_range...: the guest kernel falls back
            // (default_permissions does access checks there) or reports ENOSYS.
            _ => return Err(Errno::NOSYS),
        }
        Ok(Reply::Payload)
    }

    fn init(&mut self, mut args: Args<'_>, out: &mut Vec<u8>) -> Result<Reply, Errno> {
        let init: abi::InitIn = args.obj()?;
        if init.major != abi::KERNEL_VERSION || init.minor < abi::KERNEL_MINOR_VERSION {
            return Err(Errno::PROTO);
        }
        if self.initialized {
            self.share.reset();
        }
        let wanted = init_flags::ASYNC_READ
            | init_flags::ATOMIC_O_TRUNC
            | init_flags::BIG_WRITES
            | init_flags::AUTO_INVAL_DATA
            | init_flags::PARALLEL_DIROPS
            | init_flags::MAX_PAGES;
        push(
            out,
            &abi::InitOut {
                major: abi::KERNEL_VERSION,
                minor: abi::KERNEL_MINOR_VERSION,
                max_readahead: init.max_readahead,
                flags: init.flags & wanted,
                max_background: 64,
                congestion_threshold: 48,
                max_write: MAX_WRITE,
                time_gran: 1,
                max_pages: MAX_PAGES,
                ..Default::default()
            },
        );
        self.initialized = true;
        Ok(Reply::Payload)
    }

    #[cfg(test)]
    pub fn share(&self) -> &Share {
        &self.share
    }
}
