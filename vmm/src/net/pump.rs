//! The `katalite-net` thread: one epoll loop that owns the VM's [`NetBackend`], waiting on
//! the backend's descriptor, the link's wake eventfd and the device's queue-notify
//! ioeventfds. It feeds the guest's frames to the backend and the backend's frames to the
//! guest, running the device's queues itself: frames arrive while no vCPU exits (a guest
//! idle in HLT or spinning in user space), and the guest's notifications cost no exit to
//! the VMM.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use vmm_sys_util::eventfd::EventFd;

use super::{lock, Link, NetBackend};
use crate::virtio::{NET_RX_QUEUE, NET_TX_QUEUE};

const WAKE: Token = Token(0);
const BACKEND: Token = Token(1);
/// Notify eventfd `i` is token `NOTIFY + i`.
const NOTIFY: usize = 2;

/// Runs one VM's backend. Dropping it stops and joins the thread, which drops the
/// backend: every socket and listener it held is closed on every path out of the VM.
pub(crate) struct NetPump {
    link: Arc<Link>,
    backend: Option<Box<dyn NetBackend>>,
    notify: Vec<(EventFd, u32)>,
    thread: Option<JoinHandle<()>>,
}

impl NetPump {
    /// Takes charge of `backend` for the device behind `link`; no thread runs yet.
    /// `notify` pairs eventfds KVM signals when the guest notifies a queue
    /// (KVM_IOEVENTFD) with that queue's index.
    pub(crate) fn new(
        link: Arc<Link>,
        backend: Box<dyn NetBackend>,
        notify: Vec<(EventFd, u32)>,
    ) -> Self {
        Self {
            link,
            backend: Some(backend),
            notify,
            thread: None,
        }
    }

    /// Starts the thread. `kick(queue)` must lock the device's transport and run that
    /// queue, as if the driver had notified it; the thread calls it without holding any
    /// queue lock.
    pub(crate) fn start(&mut self, kick: impl FnMut(u32) + Send + 'static) -> io::Result<()> {
        let Some(mut backend) = self.backend.take() else {
            return Ok(());
        };
        let poll = Poll::new()?;
        let registry = poll.registry();
        registry.register(
            &mut SourceFd(&self.link.wake_fd()),
            WAKE,
            Interest::READABLE,
        )?;
        registry.register(
            &mut SourceFd(&backend.ready_fd()),
            BACKEND,
            Interest::READABLE,
        )?;
        let notify = std::mem::take(&mut self.notify);
        for (i, (fd, _)) in notify.iter().enumerate() {
            let token = Token(NOTIFY + i);
            registry.register(&mut SourceFd(&fd.as_raw_fd()), token, Interest::READABLE)?;
        }
        let link = self.link.clone();
        let thread = std::thread::Builder::new()
            .name("katalite-net".into())
            .stack_size(crate::THREAD_STACK_BYTES)
            .spawn(move || {
                crate::confine::enter(crate::confine::ThreadRole::Net);
                run(poll, &link, backend.as_mut(), kick, &notify);
            })?;
        self.thread = Some(thread);
        Ok(())
    }
}

impl Drop for NetPump {
    fn drop(&mut self) {
        self.link.stop();
        if let Some(thread) = self.thread.take() {
            // A panicking backend already reported itself; the VM is over either way.
            let _ = thread.join();
        }
    }
}

fn run(
    mut poll: Poll,
    link: &Link,
    backend: &mut dyn NetBackend,
    mut kick: impl FnMut(u32),
    notify: &[(EventFd, u32)],
) {
    let mut events = Events::with_capacity(8);
    let mut batch = Vec::new();
    // Work may be pending before the first edge (frames queued, a listener with clients).
    let mut timeout = Some(Duration::ZERO);
    loop {
        if let Err(err) = poll.poll(&mut events, timeout) {
            if err.kind() != io::ErrorKind::Interrupted {
                return;
            }
        }
        if link.stopping() {
            return;
        }
        link.clear_wake();
        for event in &events {
            let Some((fd, queue)) = event
                .token()
                .0
                .checked_sub(NOTIFY)
                .and_then(|i| notify.get(i))
            else {
                continue;
            };
            // Resets the counter; one run of the queue serves every notification so far.
            let _ = fd.read();
            kick(*queue);
        }

        let (frames, rerun) = lock(&link.tx).take_all();
        if rerun {
            // Chains the device left in the ring for want of room, or that the guest added
            // without notifying while we were busy.
            kick(NET_TX_QUEUE);
        }
        for frame in &frames {
            backend.send(frame);
        }

        let delay = backend.poll();
        let room = lock(&link.rx).room();
        while batch.len() < room {
            match backend.recv() {
                Some(frame) => batch.push(frame),
                None => break,
            }
        }
        if !batch.is_empty() {
            let mut rx = lock(&link.rx);
            batch.drain(..).for_each(|frame| {
                rx.push(frame);
            });
            drop(rx);
            kick(NET_RX_QUEUE);
        }
        // With the receive side full, nothing the backend does on a timer can reach the
        // guest: sleep until the device makes room (it wakes us) or the backend has input.
        timeout = if lock(&link.rx).is_full() {
            None
        } else {
            delay
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::os::fd::{AsRawFd, RawFd};
    use std::sync::mpsc;
    use std::sync::Mutex;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// Echoes every frame back with its first byte incremented, and offers `extra` frames
    /// of its own once its eventfd is signalled.
    struct Echo {
        fd: EventFd,
        pending: VecDeque<Vec<u8>>,
        extra: Arc<Mutex<Vec<Vec<u8>>>>,
    }

    impl NetBackend for Echo {
        fn ready_fd(&self) -> RawFd {
            self.fd.as_raw_fd()
        }
        fn send(&mut self, frame: &[u8]) {
            let mut reply = frame.to_vec();
            reply[0] += 1;
            self.pending.push_back(reply);
        }
        fn poll(&mut self) -> Option<Duration> {
            if self.fd.read().is_ok() {
                self.pending
                    .extend(self.extra.lock().expect("lock").drain(..));
            }
            None
        }
        fn recv(&mut self) -> Option<Vec<u8>> {
            self.pending.pop_front()
        }
    }

    #[test]
    fn frames_flow_both_ways_and_host_side_frames_arrive_unprompted() {
        let link = Arc::new(Link::new(4).expect("link"));
        let fd = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let extra = Arc::new(Mutex::new(Vec::new()));
        let backend = Echo {
            fd: fd.try_clone().expect("clone"),
            pending: VecDeque::new(),
            extra: extra.clone(),
        };
        let (kicked, kicks) = mpsc::channel();
        let notify = EventFd::new(EFD_NONBLOCK).expect("notify");
        let tx_notify = notify.try_clone().expect("clone");
        let mut pump = NetPump::new(
            link.clone(),
            Box::new(backend),
            vec![(notify, NET_TX_QUEUE)],
        );
        pump.start(move |queue| {
            let _ = kicked.send(queue);
        })
        .expect("start");
        let wait_kick = || kicks.recv_timeout(Duration::from_secs(5)).expect("a kick");

        lock(&link.tx).push(vec![1, 9]);
        link.wake();
        assert_eq!(wait_kick(), NET_RX_QUEUE);
        assert_eq!(lock(&link.rx).pop(), Some(vec![2, 9]));

        // The backend's own frames are delivered without any guest activity.
        extra.lock().expect("lock").push(vec![7]);
        fd.write(1).expect("signal");
        assert_eq!(wait_kick(), NET_RX_QUEUE);
        assert_eq!(lock(&link.rx).pop(), Some(vec![7]));

        // A device asking to be run again is.
        lock(&link.tx).set_rerun();
        link.wake();
        assert_eq!(wait_kick(), NET_TX_QUEUE);

        // So is a queue the guest notified through its ioeventfd.
        tx_notify.write(1).expect("notify");
        assert_eq!(wait_kick(), NET_TX_QUEUE);

        drop(pump);
        assert!(kicks.recv().is_err(), "the thread has exited");
    }

    #[test]
    fn a_full_receive_side_holds_frames_in_the_backend_until_room_is_made() {
        let link = Arc::new(Link::new(2).expect("link"));
        let fd = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let extra = Arc::new(Mutex::new((0..5u8).map(|i| vec![i]).collect::<Vec<_>>()));
        let backend = Echo {
            fd: fd.try_clone().expect("clone"),
            pending: VecDeque::new(),
            extra,
        };
        let (kicked, kicks) = mpsc::channel();
        let mut pump = NetPump::new(link.clone(), Box::new(backend), Vec::new());
        pump.start(move |queue| {
            let _ = kicked.send(queue);
        })
        .expect("start");
        fd.write(1).expect("signal");

        let mut received = Vec::new();
        while received.len() < 5 {
            kicks
                .recv_timeout(Duration::from_secs(5))
                .expect("a delivery");
            let mut rx = lock(&link.rx);
            assert!(rx.len() <= 2);
            while let Some(frame) = rx.pop() {
                received.push(frame[0]);
            }
            drop(rx);
            // What the device does after draining a full queue.
            link.wake();
        }

        assert_eq!(received, [0, 1, 2, 3, 4]);
        assert_eq!(lock(&link.rx).dropped(), 0, "held back, never dropped");
    }
}
