//! Host-to-guest input for the virtio console: a bounded byte queue that host threads fill
//! through a cloneable [`ConsoleInput`] and the console device drains into the guest's
//! receive buffers, plus the `katalite-io` thread that delivers new bytes while the guest
//! runs without exiting to the VMM.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::confine::{self, ThreadRole};

/// Why [`ConsoleInput::send`] refused bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    /// [`ConsoleInput::close`] was called.
    #[error("console input is closed")]
    Closed,
    /// The VM this input belonged to has ended.
    #[error("the vm has ended")]
    Ended,
}

#[derive(Debug, Default)]
struct State {
    pending: VecDeque<u8>,
    closed: bool,
    ended: bool,
    /// Bytes arrived since the delivery thread last looked.
    fresh: bool,
}

#[derive(Debug)]
struct Shared {
    capacity: usize,
    /// Held for a whole `send`, so one call's bytes stay contiguous even when they enter
    /// the queue in pieces. Always taken before `state`.
    send_turn: Mutex<()>,
    state: Mutex<State>,
    /// Senders wait here for room.
    space: Condvar,
    /// The delivery thread waits here for fresh bytes.
    work: Condvar,
}

/// Host-side input for the guest's console (init's channel port): bytes given to
/// [`send`](Self::send) arrive in the guest in order, none lost or duplicated.
///
/// Clones share one queue; each `send` is contiguous in the stream even with several
/// sending threads. A handle serves one VM: once that VM ends, every clone refuses input
/// ([`InputError::Ended`]) and what was still queued is dropped. Dropping clones has no
/// effect on the stream; [`close`](Self::close) refuses further input explicitly.
#[derive(Debug, Clone)]
pub struct ConsoleInput {
    shared: Arc<Shared>,
}

impl Default for ConsoleInput {
    fn default() -> Self {
        Self::new()
    }
}

/// Locks a mutex whose data stays consistent across a panic (plain queues and flags).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ConsoleInput {
    /// Undelivered bytes a [`ConsoleInput::new`] holds before [`send`](Self::send) blocks.
    pub const DEFAULT_CAPACITY: usize = 1 << 20;
    /// Largest capacity accepted, so what one receive buffer is given stays a valid `u32`
    /// used length (§2.7.8).
    pub const MAX_CAPACITY: usize = 1 << 30;

    /// An input holding up to [`DEFAULT_CAPACITY`](Self::DEFAULT_CAPACITY) undelivered
    /// bytes.
    pub fn new() -> Self {
        Self::with_capacity(Self::DEFAULT_CAPACITY)
    }

    /// An input holding up to `capacity` undelivered bytes, clamped to
    /// 1..=[`MAX_CAPACITY`](Self::MAX_CAPACITY).
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                capacity: capacity.clamp(1, Self::MAX_CAPACITY),
                send_turn: Mutex::new(()),
                state: Mutex::new(State::default()),
                space: Condvar::new(),
                work: Condvar::new(),
            }),
        }
    }

    /// Queues `bytes` for the guest and returns once all of them are queued (not yet
    /// delivered). Blocks while the queue is full, i.e. while the guest does not read, so
    /// a fast host source cannot grow memory without bound. Bytes may be sent before the
    /// VM starts; they are delivered once the guest posts receive buffers.
    ///
    /// On error, a prefix of `bytes` may already be queued.
    pub fn send(&self, bytes: &[u8]) -> Result<(), InputError> {
        let shared = &*self.shared;
        let _turn = lock(&shared.send_turn);
        let mut state = lock(&shared.state);
        let mut rest = bytes;
        loop {
            if state.ended {
                return Err(InputError::Ended);
            }
            if state.closed {
                return Err(InputError::Closed);
            }
            if rest.is_empty() {
                return Ok(());
            }
            let room = shared.capacity.saturating_sub(state.pending.len());
            if room == 0 {
                state = shared
                    .space
                    .wait(state)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                continue;
            }
            let (now, later) = rest.split_at(room.min(rest.len()));
            state.pending.extend(now);
            state.fresh = true;
            shared.work.notify_one();
            rest = later;
        }
    }

    /// Refuses further input from every clone ([`InputError::Closed`]), waking senders
    /// blocked on a full queue; bytes already queued are still delivered.
    pub fn close(&self) {
        lock(&self.shared.state).closed = true;
        self.shared.space.notify_all();
    }

    /// Ends the input for good: drops what is queued, refuses senders, and stops the
    /// delivery thread. Called by the VM when it ends.
    fn end(&self) {
        let mut state = lock(&self.shared.state);
        state.ended = true;
        state.pending.clear();
        drop(state);
        self.shared.space.notify_all();
        self.shared.work.notify_all();
    }

    /// Runs `take` on the queued bytes (it removes what it delivered), then wakes the
    /// senders if room was made. The device calls this with its transport locked; nothing
    /// here takes the transport, so the lock order is transport, then queue.
    pub(crate) fn take_with<R>(&self, take: impl FnOnce(&mut VecDeque<u8>) -> R) -> R {
        let mut state = lock(&self.shared.state);
        let before = state.pending.len();
        let result = take(&mut state.pending);
        let freed = state.pending.len() < before;
        drop(state);
        if freed {
            self.shared.space.notify_all();
        }
        result
    }

    /// Blocks until bytes arrived since the last call (true) or the input ended (false).
    fn wait_for_fresh(&self) -> bool {
        let mut state = lock(&self.shared.state);
        loop {
            if state.ended {
                return false;
            }
            if state.fresh {
                state.fresh = false;
                return true;
            }
            state = self
                .shared
                .work
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }
}

/// The VM's side of a [`ConsoleInput`]. While the guest runs, a `katalite-io` thread
/// calls the delivery function whenever bytes arrive, since the guest may be spinning or
/// halted and never exit to the VMM on its own. Dropping the pump ends the input and
/// joins the thread.
pub(crate) struct InputPump {
    input: ConsoleInput,
    thread: Option<JoinHandle<()>>,
}

impl InputPump {
    /// Takes charge of `input` for one VM; no thread runs yet.
    pub(crate) fn new(input: ConsoleInput) -> Self {
        Self {
            input,
            thread: None,
        }
    }

    /// Starts the `katalite-io` thread, which calls `deliver` after every arrival of bytes
    /// (it must lock the device and drain its receive queue). Bytes queued earlier count as
    /// an arrival. `deliver` runs outside the queue's lock, so it may wait for a vCPU that
    /// holds the device.
    pub(crate) fn start(&mut self, mut deliver: impl FnMut() + Send + 'static) -> io::Result<()> {
        let input = self.input.clone();
        let thread = std::thread::Builder::new()
            .name("katalite-io".into())
            .stack_size(crate::THREAD_STACK_BYTES)
            .spawn(move || {
                confine::enter(ThreadRole::Device);
                while input.wait_for_fresh() {
                    deliver();
                }
            })?;
        self.thread = Some(thread);
        Ok(())
    }
}

impl Drop for InputPump {
    fn drop(&mut self) {
        self.input.end();
        if let Some(thread) = self.thread.take() {
            // A panicking `deliver` already reported itself; the VM is over either way.
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    fn pending(input: &ConsoleInput) -> Vec<u8> {
        input.take_with(|pending| pending.iter().copied().collect())
    }

    /// Takes up to `n` queued bytes, as a device with an `n`-byte buffer would.
    fn take(input: &ConsoleInput, n: usize) -> Vec<u8> {
        input.take_with(|pending| {
            let n = n.min(pending.len());
            pending.drain(..n).collect()
        })
    }

    fn wait_for_len(input: &ConsoleInput, len: usize) {
        while pending(input).len() < len {
            std::thread::yield_now();
        }
    }

    #[test]
    fn sends_queue_in_order() {
        let input = ConsoleInput::new();
        input.send(b"one ").expect("send");
        input.clone().send(b"two").expect("send");
        assert_eq!(pending(&input), b"one two");
        assert_eq!(take(&input, 3), b"one");
        assert_eq!(pending(&input), b" two");
    }

    #[test]
    fn a_full_queue_blocks_the_sender_until_room_is_made() {
        let input = ConsoleInput::with_capacity(4);
        input.send(b"abc").expect("send");
        let (done, finished) = mpsc::channel();
        let sender = {
            let input = input.clone();
            std::thread::spawn(move || {
                let result = input.send(b"defgh");
                let _ = done.send(result);
            })
        };

        // "d" fits; "efgh" waits for room, which comes two bytes at a time.
        assert!(finished.recv_timeout(Duration::from_millis(100)).is_err());
        assert_eq!(pending(&input), b"abcd");
        assert_eq!(take(&input, 2), b"ab");
        wait_for_len(&input, 4);
        assert_eq!(take(&input, 4), b"cdef");
        wait_for_len(&input, 2);
        assert_eq!(take(&input, 4), b"gh");
        assert_eq!(
            finished
                .recv_timeout(Duration::from_secs(5))
                .expect("the sender finished"),
            Ok(())
        );
        sender.join().expect("join");
    }

    #[test]
    fn concurrent_sends_stay_contiguous() {
        let input = ConsoleInput::with_capacity(8);
        let senders: Vec<_> = [b'a', b'b', b'c']
            .into_iter()
            .map(|byte| {
                let input = input.clone();
                std::thread::spawn(move || input.send(&[byte; 20]))
            })
            .collect();
        let mut received = Vec::new();
        while received.len() < 60 {
            received.extend(take(&input, 3));
            std::thread::yield_now();
        }
        for sender in senders {
            sender.join().expect("join").expect("send");
        }
        for run in received.chunks(20) {
            assert!(
                run.iter().all(|&b| b == run[0]),
                "interleaved: {received:?}"
            );
        }
    }

    #[test]
    fn close_refuses_new_input_and_wakes_blocked_senders_but_keeps_queued_bytes() {
        let input = ConsoleInput::with_capacity(2);
        let sender = {
            let input = input.clone();
            std::thread::spawn(move || input.send(b"xyz"))
        };
        wait_for_len(&input, 2);

        input.close();

        assert_eq!(sender.join().expect("join"), Err(InputError::Closed));
        assert_eq!(input.send(b"late"), Err(InputError::Closed));
        assert_eq!(pending(&input), b"xy");
    }

    #[test]
    fn dropping_the_pump_ends_the_input() {
        let input = ConsoleInput::with_capacity(1);
        input.send(b"q").expect("send");
        let sender = {
            let input = input.clone();
            std::thread::spawn(move || input.send(b"blocked"))
        };
        let mut pump = InputPump::new(input.clone());
        pump.start(|| {}).expect("start");

        drop(pump);

        assert_eq!(sender.join().expect("join"), Err(InputError::Ended));
        assert_eq!(input.send(b"x"), Err(InputError::Ended));
        assert!(pending(&input).is_empty());
    }

    #[test]
    fn the_pump_delivers_bytes_sent_before_and_after_it_starts() {
        let input = ConsoleInput::new();
        input.send(b"early").expect("send");
        let (delivered, deliveries) = mpsc::channel();
        let mut pump = InputPump::new(input.clone());
        let drain = input.clone();
        pump.start(move || {
            let _ = delivered.send(take(&drain, usize::MAX));
        })
        .expect("start");
        let next = || {
            deliveries
                .recv_timeout(Duration::from_secs(5))
                .expect("a delivery")
        };

        assert_eq!(next(), b"early");
        input.send(b"late").expect("send");
        assert_eq!(next(), b"late");
        drop(pump);
        assert!(deliveries.recv().is_err(), "the thread has exited");
    }
}
