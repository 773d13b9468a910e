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
    let worker = QueueWorker::new(format!("katalite-fs{index}"), notify, device.more_work())
        .map_err(ShareSetupError::Notify)?;
    Ok((device, worker))
}

/// What the worker calls: run both queues as if the driver had notified them.
pub(crate) fn run_queues(transport: Arc<Mutex<MmioTransport>>) -> impl FnMut() + Send {
    move || {
        let mut transport = transport.lock().unwrap_or_else(PoisonError::into_inner);
        for queue in QUEUES {
            transport.run_queue(queue);
        }
    }
}

#[cfg(test)]
mod tests;
