//! A disk as a VM assembles it: the virtio-blk device, the ioeventfd through which KVM
//! hands the guest's QueueNotify writes straight to the disk's `katalite-blkN` thread (no
//! exit to the VMM, and no disk I/O on a vCPU), and that thread, which runs the queue
//! once the device sits behind its transport.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use kvm_ioctls::{IoEventAddress, VmFd};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Block, DiskConfig, DiskError};
use crate::virtio::MmioTransport;

/// The only queue of a virtio-blk device: requestq (§5.2.2).
const REQUEST_QUEUE: u32 = 0;
const STOP: Token = Token(0);
const NOTIFY: Token = Token(1);

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
) -> Result<(Box<Block>, BlockWorker), DiskSetupError> {
    let device = Box::new(Block::new(config)?);
    let notify = EventFd::new(EFD_NONBLOCK).map_err(DiskSetupError::Notify)?;
    // The guest notifies with a 32-bit write of the queue index (§4.2.3.3); KVM matches
    // the value, so only requestq's notifications skip the VMM.
    let addr = IoEventAddress::Mmio(window + u64::from(VIRTIO_MMIO_QUEUE_NOTIFY));
    vm.register_ioevent(&notify, &addr, REQUEST_QUEUE)
        .map_err(|err| DiskSetupError::Notify(io::Error::from_raw_os_error(err.errno())))?;
    let worker = BlockWorker::new(format!("katalite-blk{index}"), notify, device.more_work())
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

/// One disk's worker thread. Dropping it stops and joins the thread.
pub(crate) struct BlockWorker {
    name: String,
    notify: Option<EventFd>,
    more: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    wake: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl BlockWorker {
    /// A worker woken by `notify` (the queue's ioeventfd) that runs the queue again while
    /// the device sets `more`; no thread runs yet.
    pub(crate) fn new(name: String, notify: EventFd, more: Arc<AtomicBool>) -> io::Result<Self> {
        Ok(Self {
            name,
            notify: Some(notify),
            more,
            stop: Arc::default(),
            wake: EventFd::new(EFD_NONBLOCK)?,
            thread: None,
        })
    }

    /// Starts the thread; `kick` must run the device's queue (see [`run_queue`]).
    pub(crate) fn start(&mut self, kick: impl FnMut() + Send + 'static) -> io::Result<()> {
        let Some(notify) = self.notify.take() else {
            return Ok(());
        };
        let poll = Poll::new()?;
        let registry = poll.registry();
        registry.register(
            &mut SourceFd(&self.wake.as_raw_fd()),
            STOP,
            Interest::READABLE,
        )?;
        registry.register(
            &mut SourceFd(&notify.as_raw_fd()),
            NOTIFY,
            Interest::READABLE,
        )?;
        let (more, stop) = (self.more.clone(), self.stop.clone());
        let thread = std::thread::Builder::new()
            .name(self.name.clone())
            .spawn(move || run(poll, &notify, &more, &stop, kick))?;
        self.thread = Some(thread);
        Ok(())
    }
}

impl Drop for BlockWorker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Only fails if the counter would overflow, and then the thread is awake anyway.
        let _ = self.wake.write(1);
        if let Some(thread) = self.thread.take() {
            // A panic in the device already reported itself; the VM is over either way.
            let _ = thread.join();
        }
    }
}

fn run(
    mut poll: Poll,
    notify: &EventFd,
    more: &AtomicBool,
    stop: &AtomicBool,
    mut kick: impl FnMut(),
) {
    let mut events = Events::with_capacity(2);
    loop {
        if let Err(err) = poll.poll(&mut events, None) {
            if err.kind() != io::ErrorKind::Interrupted {
                return;
            }
        }
        // Resets the counter first: a notification during the run below is a new edge.
        let _ = notify.read();
        loop {
            if stop.load(Ordering::Acquire) {
                return;
            }
            kick();
            if !more.swap(false, Ordering::AcqRel) {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_ioctls::Kvm;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn notifications_run_the_queue_until_the_device_is_done_and_drop_stops_it() {
        let notify = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let guest = notify.try_clone().expect("clone");
        let more = Arc::new(AtomicBool::new(false));
        let mut worker =
            BlockWorker::new("katalite-blk-test".into(), notify, more.clone()).expect("worker");
        let (kicked, kicks) = mpsc::channel();
        // The device asks to be run twice more after the first kick.
        let mut left = 2;
        worker
            .start(move || {
                let _ = kicked.send(std::thread::current().name().map(str::to_owned));
                if left > 0 {
                    left -= 1;
                    more.store(true, Ordering::Release);
                }
            })
            .expect("start");
        let wait = || kicks.recv_timeout(Duration::from_secs(5)).expect("a kick");

        guest.write(1).expect("notify");
        for _ in 0..3 {
            assert_eq!(wait().as_deref(), Some("katalite-blk-test"));
        }
        assert!(kicks.recv_timeout(Duration::from_millis(50)).is_err());
        guest.write(1).expect("notify");
        assert!(wait().is_some());

        drop(worker);
        assert!(
            matches!(kicks.recv(), Err(mpsc::RecvError)),
            "the thread has exited"
        );
    }

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
