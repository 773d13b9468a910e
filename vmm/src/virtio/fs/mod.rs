//! virtio-fs device (virtio 1.2 §5.11): a FUSE server for one shared host directory,
//! served by the share's own `katalite-fsN` thread, never on a vCPU.

mod abi;
mod config;
mod device;
mod server;
pub(crate) mod share;

use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use kvm_ioctls::{IoEventAddress, VmFd};
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use config::{is_valid_tag, FsShareConfig, MAX_TAG_LEN};
pub use device::Fs;

use super::worker::QueueWorker;
use super::MmioTransport;
use crate::confine::ThreadRole;
use server::Server;
use share::{IdMap, Policy, Share, XattrPolicy};

/// hiprio and the one request queue.
const QUEUES: [u32; 2] = [0, 1];

/// Why a share could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ShareSetupError {
    /// The tag is empty, too long or has other characters than letters, digits, `-`, `_`.
    #[error("invalid share tag {0:?}")]
    Tag(String),
    /// The directory cannot be opened.
    #[error("cannot open the shared directory {path}")]
    Root {
        /// The directory.
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    /// The notification eventfd could not be created or registered with KVM.
    #[error("cannot set up the share's queue notification")]
    Notify(#[source] io::Error),
}

/// The device for `config`, whose virtio-mmio window starts at `window`, and its worker.
pub(crate) fn build(
    vm: &VmFd,
    window: u64,
    index: usize,
    config: FsShareConfig,
) -> Result<(Box<Fs>, QueueWorker), ShareSetupError> {
    if !is_valid_tag(&config.tag) {
        return Err(ShareSetupError::Tag(config.tag));
    }
    let policy = Policy {
        read_only: config.read_only,
        xattrs: XattrPolicy {
            privileged_writes: false,
        },
        ids: IdMap::for_this_process(),
    };
    raise_fd_limit();
    let share = Share::new(&config.root, policy).map_err(|source| ShareSetupError::Root {
        path: config.root.clone(),
        source,
    })?;
    let device = Box::new(Fs::new(&config.tag, Server::new(share)));
    let notify = EventFd::new(EFD_NONBLOCK).map_err(ShareSetupError::Notify)?;
    let addr = IoEventAddress::Mmio(window + u64::from(VIRTIO_MMIO_QUEUE_NOTIFY));
    for queue in QUEUES {
        vm.register_ioevent(&notify, &addr, queue)
            .map_err(|err| ShareSetupError::Notify(io::Error::from_raw_os_error(err.errno())))?;
    }
    let worker = QueueWorker::new(
        format!("katalite-fs{index}"),
        ThreadRole::Fs,
        notify,
        device.more_work(),
    )
    .map_err(ShareSetupError::Notify)?;
    Ok((device, worker))
}

/// What the worker calls: run both queues as if the driver had notified them. The first
/// call, on the share's own thread, drops that thread's supplementary groups: host access
/// checks for the guest must not borrow groups the invoking user happens to be in.
pub(crate) fn run_queues(transport: Arc<Mutex<MmioTransport>>) -> impl FnMut() + Send {
    let mut first = true;
    move || {
        if std::mem::take(&mut first) {
            drop_thread_groups();
        }
        let mut transport = transport.lock().unwrap_or_else(PoisonError::into_inner);
        for queue in QUEUES {
            transport.run_queue(queue);
        }
    }
}

/// `setgroups(0, NULL)` for the calling thread only: the raw syscall, not libc's wrapper,
/// which applies it to every thread of the process. Without CAP_SETGID (rootless) it fails
/// and the user's own groups stay, which are the user's to use anyway.
fn drop_thread_groups() {
    // SAFETY: setgroups with a zero count reads no memory; it changes only this thread's
    // credentials.
    let _ = unsafe { libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) };
}

/// Lets the process hold a descriptor for every node the guest may keep looked up
/// ([`share::MAX_INODES`] per share): the guest kernel forgets inodes only under memory
/// pressure, so a guest that created 5000 files holds 5000 of them. As root the hard
/// limit is raised too (to `fs.nr_open`, at most 1M); otherwise the soft limit goes up to
/// the hard one.
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    const WANTED: u64 = 1 << 20;
    let limit = getrlimit(Resource::Nofile);
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .unwrap_or(WANTED);
    let target = WANTED.min(nr_open);
    if limit.maximum.is_some_and(|max| max < target) {
        let raised = Rlimit {
            current: Some(target),
            maximum: Some(target),
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            return;
        }
    }
    if limit.current < limit.maximum {
        // Best effort: the caps per share bound use either way, and hitting the limit is
        // an error for the guest's request, not for the VMM.
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        );
    }
}

#[cfg(test)]
mod tests;
