//! A disk as a VM assembles it: the virtio-blk device, the ioeventfd through which KVM
//! hands the guest's QueueNotify writes straight to the disk's `katalite-blkN` thread (no
//! exit to the VMM, and no disk I/O on a vCPU), and that thread, which runs the queue
//! once the device sits behind its transport.

use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use kvm_ioctls::{IoEventAddress, VmFd};
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Block, DiskConfig, DiskError};
use crate::confine::ThreadRole;
use crate::virtio::worker::QueueWorker;
use crate::virtio::MmioTransport;

/// The only queue of a virtio-blk device: requestq (§5.2.2).
const REQUEST_QUEUE: u32 = 0;

/// Why a disk could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DiskSetupError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] DiskError),
    /// The notification eventfd could not be created or registered with KVM.
    #[error("cannot set up the disk's queue notification")]
    Notify(#[source] io::Error),
}

/// The device for `config`, whose virtio-mmio window starts at `window`, and its worker,
/// to start once the device is behind its transport. `index` names the thread.
pub(crate) fn build(
    vm: &VmFd,
    window: u64,
    index: usize,
    config: DiskConfig,
) -> Result<(Box<Block>, QueueWorker), DiskSetupError> {
    let device = Box::new(Block::new(config)?);
    let notify = EventFd::new(EFD_NONBLOCK).map_err(DiskSetupError::Notify)?;
    // The guest notifies with a 32-bit write of the queue index (§4.2.3.3); KVM matches
    // the value, so only requestq's notifications skip the VMM.
    let addr = IoEventAddress::Mmio(window + u64::from(VIRTIO_MMIO_QUEUE_NOTIFY));
    vm.register_ioevent(&notify, &addr, REQUEST_QUEUE)
        .map_err(|err| DiskSetupError::Notify(io::Error::from_raw_os_error(err.errno())))?;
    let worker = QueueWorker::new(
        format!("katalite-blk{index}"),
        ThreadRole::Block,
        notify,
        device.more_work(),
    )
    .map_err(DiskSetupError::Notify)?;
    Ok((device, worker))
}

/// What the worker calls to run the queue: lock the transport and run requestq as if the
/// driver had notified it.
pub(crate) fn run_queue(transport: Arc<Mutex<MmioTransport>>) -> impl FnMut() + Send {
    move || {
        transport
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .run_queue(REQUEST_QUEUE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_ioctls::Kvm;

    #[test]
    fn requestq_notifications_get_an_ioeventfd() {
        // Like the tiny-guest tests: only where this host has a /dev/kvm.
        let Ok(kvm) = Kvm::new() else {
            return;
        };
        let vm = kvm.create_vm().expect("vm");
        let file = crate::virtio::block::tests::temp_file(&[0; 4096]);
        let config = || DiskConfig {
            file: file.try_clone().expect("clone"),
            read_only: true,
            block_hashes: None,
            id: String::new(),
            on_corrupt: Arc::new(|_| {}),
        };

        assert!(build(&vm, 0xd000_3000, 0, config()).is_ok());
        // The same address and value twice is refused: the registration took effect.
        assert!(matches!(
            build(&vm, 0xd000_3000, 1, config()),
            Err(DiskSetupError::Notify(_))
        ));
    }
}
