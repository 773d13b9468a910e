//! The wire between the virtio-net device (run on vCPU threads) and the `katalite-net`
//! thread that runs the backend: two bounded frame queues, like a NIC's rings, and an
//! eventfd that wakes the thread. Frames never wait anywhere unbounded.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Frames waiting in each direction before the link pushes back (transmit) or drops
/// (receive): 256 MTU-sized frames are ~400 KiB per direction.
pub const LINK_QUEUE_FRAMES: usize = 256;

/// A bounded FIFO of Ethernet frames.
#[derive(Debug)]
pub(crate) struct FrameQueue {
    frames: VecDeque<Vec<u8>>,
    capacity: usize,
    dropped: u64,
    /// The device wants its transmit queue run again once the thread has taken these
    /// frames: it stopped on a full queue, or it turned the guest's notifications off
    /// meanwhile.
    rerun: bool,
}

impl FrameQueue {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            frames: VecDeque::with_capacity(capacity),
            capacity,
            dropped: 0,
            rerun: false,
        }
    }

    /// Appends `frame`, or drops it (counted) when the queue is full, as a NIC does when
    /// its ring is.
    pub(crate) fn push(&mut self, frame: Vec<u8>) -> bool {
        if self.is_full() {
            self.dropped += 1;
            return false;
        }
        self.frames.push_back(frame);
        true
    }

    pub(crate) fn front(&self) -> Option<&[u8]> {
        self.frames.front().map(Vec::as_slice)
    }

    pub(crate) fn pop(&mut self) -> Option<Vec<u8>> {
        self.frames.pop_front()
    }

    /// Counts a frame the consumer threw away (one that fits no guest buffer).
    pub(crate) fn count_drop(&mut self) {
        self.dropped += 1;
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.frames.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    pub(crate) fn is_full(&self) -> bool {
        self.frames.len() >= self.capacity
    }

    /// Frames that fit before the queue is full.
    pub(crate) fn room(&self) -> usize {
        self.capacity.saturating_sub(self.frames.len())
    }

    /// Frames dropped so far.
    #[cfg(test)]
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped
    }

    pub(crate) fn set_rerun(&mut self) {
        self.rerun = true;
    }

    pub(crate) fn rerun(&self) -> bool {
        self.rerun
    }

    /// Takes every queued frame and whether the producer asked to be run again.
    pub(crate) fn take_all(&mut self) -> (VecDeque<Vec<u8>>, bool) {
        let frames = std::mem::replace(&mut self.frames, VecDeque::with_capacity(self.capacity));
        (frames, std::mem::take(&mut self.rerun))
    }
}

/// Shared by the device and the `katalite-net` thread. Lock order: a transport, then
/// one of these queues; nothing here takes a transport.
#[derive(Debug)]
pub(crate) struct Link {
    /// Toward the guest: filled by the thread, drained into receive buffers.
    pub(crate) rx: Mutex<FrameQueue>,
    /// From the guest: filled from transmit chains, drained by the thread.
    pub(crate) tx: Mutex<FrameQueue>,
    wake: EventFd,
    stopping: AtomicBool,
}

impl Link {
    pub(crate) fn new(capacity: usize) -> io::Result<Self> {
        Ok(Self {
            rx: Mutex::new(FrameQueue::new(capacity)),
            tx: Mutex::new(FrameQueue::new(capacity)),
            wake: EventFd::new(EFD_NONBLOCK)?,
            stopping: AtomicBool::new(false),
        })
    }

    /// Wakes the thread. Only fails if the counter would overflow, in which case the
    /// thread has a wake pending anyway.
    pub(crate) fn wake(&self) {
        let _ = self.wake.write(1);
    }

    /// Resets the wake counter; the thread calls this before looking at the queues.
    pub(crate) fn clear_wake(&self) {
        let _ = self.wake.read();
    }

    pub(crate) fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Asks the thread to end.
    pub(crate) fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        self.wake();
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }
}

/// Locks a queue; its frames stay consistent across a panic elsewhere.
pub(crate) fn lock(queue: &Mutex<FrameQueue>) -> MutexGuard<'_, FrameQueue> {
    queue
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_and_counts() {
        let mut queue = FrameQueue::new(2);
        assert!(queue.push(vec![1]));
        assert!(queue.push(vec![2]));
        assert!(queue.is_full());
        assert_eq!(queue.room(), 0);

        assert!(!queue.push(vec![3]));

        assert_eq!(queue.dropped(), 1);
        assert_eq!(queue.pop(), Some(vec![1]));
        assert_eq!(queue.front(), Some(&[2u8][..]));
        assert_eq!(queue.room(), 1);
    }

    #[test]
    fn take_all_empties_the_queue_and_reports_a_rerun_once() {
        let mut queue = FrameQueue::new(4);
        queue.push(vec![1]);
        queue.push(vec![2]);
        queue.set_rerun();

        let (frames, rerun) = queue.take_all();

        assert_eq!(frames, [vec![1], vec![2]]);
        assert!(rerun);
        assert!(queue.is_empty());
        assert!(!queue.take_all().1);
    }

    #[test]
    fn wakes_are_counted_until_cleared() {
        let link = Link::new(4).expect("link");
        link.wake();
        link.wake();
        assert_eq!(link.wake.read().expect("pending wakes"), 2);
        link.wake();
        link.clear_wake();
        assert!(link.wake.read().is_err(), "nothing pending after a clear");
        assert!(!link.stopping());
        link.stop();
        assert!(link.stopping());
    }
}
