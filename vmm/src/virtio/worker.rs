//! A device's worker thread: woken by the ioeventfd KVM signals when the guest notifies a
//! queue (no exit to the VMM, and no device I/O on a vCPU), it runs the device's queues
//! while the device asks for more.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::{IoEventAddress, VmFd};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::confine::{self, ThreadRole};

const STOP: Token = Token(0);
const NOTIFY: Token = Token(1);

/// One device's worker thread. Dropping it stops and joins the thread.
pub(crate) struct QueueWorker {
    name: String,
    role: ThreadRole,
    notify: Option<EventFd>,
    more: Arc<AtomicBool>,
    /// Set by the device when it wants the queue run again after [`LINGER`] even without a
    /// notification (see [`QueueWorker::with_later`]).
    later: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    wake: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl QueueWorker {
    /// A worker woken by `notify` (the queue's ioeventfd) that runs the queue again while
    /// the device sets `more`; no thread runs yet.
    pub(crate) fn new(
        name: String,
        role: ThreadRole,
        notify: EventFd,
        more: Arc<AtomicBool>,
    ) -> io::Result<Self> {
        Ok(Self {
            name,
            role,
            notify: Some(notify),
            more,
            later: Arc::default(),
            stop: Arc::default(),
            wake: EventFd::new(EFD_NONBLOCK)?,
            thread: None,
        })
    }

    /// The worker also runs the queue [`LINGER`] after a run that left `later` set, unless
    /// a notification comes first.
    pub(crate) fn with_later(mut self, later: Arc<AtomicBool>) -> Self {
        self.later = later;
        self
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
        let (more, later) = (self.more.clone(), self.later.clone());
        let (stop, role) = (self.stop.clone(), self.role);
        let thread = std::thread::Builder::new()
            .name(self.name.clone())
            .stack_size(crate::THREAD_STACK_BYTES)
            .spawn(move || {
                confine::enter(role);
                run(poll, &notify, [&more, &later], &stop, kick);
            })?;
        self.thread = Some(thread);
        Ok(())
    }
}

/// One eventfd that KVM signals when the guest notifies any of `queues` of the device
/// whose virtio-mmio window starts at `window`: the guest writes the queue index to
/// QueueNotify with a 32-bit write (§4.2.3.3), which KVM matches, so those notifications
/// never exit to the VMM.
pub(crate) fn notify_eventfd(vm: &VmFd, window: u64, queues: &[u32]) -> io::Result<EventFd> {
    let notify = EventFd::new(EFD_NONBLOCK)?;
    let addr = IoEventAddress::Mmio(window + u64::from(VIRTIO_MMIO_QUEUE_NOTIFY));
    for &queue in queues {
        vm.register_ioevent(&notify, &addr, queue)
            .map_err(|err| io::Error::from_raw_os_error(err.errno()))?;
    }
    Ok(notify)
}

impl Drop for QueueWorker {
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

/// How long a device that set `later` waits for more work before its queue runs again: long
/// enough for a guest streaming output to queue several buffers, short enough not to be
/// seen on a terminal.
pub(crate) const LINGER: Duration = Duration::from_micros(500);

fn run(
    mut poll: Poll,
    notify: &EventFd,
    [more, later]: [&AtomicBool; 2],
    stop: &AtomicBool,
    mut kick: impl FnMut(),
) {
    let mut events = Events::with_capacity(2);
    loop {
        let timeout = later.swap(false, Ordering::AcqRel).then_some(LINGER);
        if let Err(err) = poll.poll(&mut events, timeout) {
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
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn notifications_run_the_queue_until_the_device_is_done_and_drop_stops_it() {
        let notify = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let guest = notify.try_clone().expect("clone");
        let more = Arc::new(AtomicBool::new(false));
        let mut worker = QueueWorker::new(
            "katalite-blk-test".into(),
            ThreadRole::Block,
            notify,
            more.clone(),
        )
        .expect("worker");
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
    fn a_device_that_sets_later_is_run_again_without_a_notification() {
        let notify = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let guest = notify.try_clone().expect("clone");
        let later = Arc::new(AtomicBool::new(false));
        let mut worker = QueueWorker::new(
            "katalite-cons-test".into(),
            ThreadRole::Device,
            notify,
            Arc::default(),
        )
        .expect("worker")
        .with_later(later.clone());
        let (kicked, kicks) = mpsc::channel();
        let mut first = true;
        worker
            .start(move || {
                let _ = kicked.send(std::time::Instant::now());
                if first {
                    first = false;
                    later.store(true, Ordering::Release);
                }
            })
            .expect("start");
        guest.write(1).expect("notify");
        let one = kicks.recv_timeout(Duration::from_secs(5)).expect("a kick");
        let two = kicks
            .recv_timeout(Duration::from_secs(5))
            .expect("run again after LINGER");
        assert!(two.duration_since(one) >= LINGER);
        assert!(kicks.recv_timeout(Duration::from_millis(50)).is_err());
        drop(worker);
    }
}
