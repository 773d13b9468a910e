//! Host output off the VM's threads: a device hands its guest output to a bounded queue
//! and a writer thread of its own moves it to the host writer (a terminal, a pipe, a log
//! file). A host reader that stalls then stalls only that thread: the device sees a full
//! queue and stops taking the guest's buffers (backpressure on the virtqueue) or drops
//! bytes (the kernel log), and no vCPU or device worker ever blocks in a host write.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use crate::confine::{self, ThreadRole};

/// What a queued chunk costs beyond its allocation (its slot, the allocator's header).
const CHUNK_OVERHEAD: usize = 64;

/// Written buffers kept for the producer to fill again, at most. A streaming guest cycles
/// a few large buffers between the device and the writer; allocating each afresh cost
/// more than the copies themselves (measured in the lab with perf, 2026-12-07: musl's
/// allocator maps and unmaps every 256 KiB buffer, and the page faults, zeroing and TLB
/// flushes took about two thirds of the console and writer threads' time).
const SPARE_BUFFERS: usize = 4;

/// Buffers smaller than this are not worth keeping (the allocator serves them cheaply).
const SPARE_MIN_CAPACITY: usize = 64 * 1024;

/// Spare buffers are freed once the writer has been idle this long: a quiet VM holds no
/// memory for output it is not producing.
const SPARE_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

/// The memory a queued chunk holds.
fn cost(chunk: &[u8], capacity: usize) -> usize {
    capacity.max(chunk.len()) + CHUNK_OVERHEAD
}

/// A writer thread and its queue. Dropping it without [`finish`](Self::finish) leaves the
/// thread to end on its own (see [`finish`](Self::finish)).
pub(crate) struct HostWriter {
    sender: OutputSender,
    thread: Option<JoinHandle<()>>,
}

/// The producing side: what a device holds.
#[derive(Clone)]
pub(crate) struct OutputSender {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when a chunk arrives or the queue closes (the writer waits on it).
    arrived: Condvar,
    /// Signalled when the writer has taken bytes off (room) or has finished.
    taken: Condvar,
    capacity: usize,
    /// Written once room returns after a producer found the queue full: the device's
    /// worker polls it and runs its queue again.
    room: Option<EventFd>,
}

#[derive(Default)]
struct State {
    chunks: VecDeque<Vec<u8>>,
    /// What the queued chunks (and the one being written) cost: their allocated bytes plus
    /// [`CHUNK_OVERHEAD`] each, so the bound holds for memory, not only for payload.
    bytes: usize,
    /// No more chunks will come; the writer ends once the queue is empty.
    closed: bool,
    /// The writer thread has ended.
    done: bool,
    /// A producer found the queue full and waits for `room`.
    wants_room: bool,
    /// A producer wants `room` signalled when the writer next takes a chunk.
    wants_take: bool,
    /// Bytes dropped because the queue was full ([`OutputSender::push_or_drop`]).
    dropped: u64,
    /// Written buffers, emptied, for [`OutputSender::buffer`] (not counted in `bytes`:
    /// at most [`SPARE_BUFFERS`], freed after [`SPARE_IDLE`]).
    spare: Vec<Vec<u8>>,
}

impl HostWriter {
    /// Starts thread `name` writing to `out` whatever is queued, holding at most about
    /// `capacity` bytes; `room` is signalled when a full queue has room again.
    pub(crate) fn start(
        name: &str,
        out: Box<dyn Write + Send>,
        capacity: usize,
        room: Option<EventFd>,
    ) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            arrived: Condvar::new(),
            taken: Condvar::new(),
            capacity,
            room,
        });
        let writer = shared.clone();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .stack_size(crate::THREAD_STACK_BYTES)
            .spawn(move || {
                confine::enter(ThreadRole::Output);
                write_all_queued(&writer, out);
            })?;
        Ok(Self {
            sender: OutputSender { shared },
            thread: Some(thread),
        })
    }

    /// The producing side.
    pub(crate) fn sender(&self) -> OutputSender {
        self.sender.clone()
    }

    /// Closes the queue. With `drain`, waits until everything queued is written (as a
    /// program writing to a slow pipe would); without, returns at once and the thread
    /// ends when its current write does — or with the process, if nobody ever reads.
    pub(crate) fn finish(mut self, drain: bool) {
        self.sender.close();
        if let Some(thread) = self.thread.take() {
            if drain {
                // A panicking writer has lost its bytes either way.
                let _ = thread.join();
            }
        }
    }
}

impl Drop for HostWriter {
    fn drop(&mut self) {
        self.sender.close();
    }
}

impl OutputSender {
    fn state(&self) -> MutexGuard<'_, State> {
        // Counters and a queue of whole chunks, each updated under the lock in one step:
        // a panic elsewhere cannot leave them torn.
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the queue can take more (it holds less than its capacity, or the writer is
    /// gone and anything pushed is discarded).
    pub(crate) fn has_room(&self) -> bool {
        let state = self.state();
        state.done || state.bytes < self.shared.capacity
    }

    /// If the queue is full, asks for the `room` eventfd to be signalled once it has room
    /// again and returns false; returns true if there is room now.
    pub(crate) fn wake_when_room(&self) -> bool {
        let mut state = self.state();
        if state.done || state.bytes < self.shared.capacity {
            return true;
        }
        state.wants_room = true;
        false
    }

    /// Asks for the `room` eventfd to be signalled when the writer next takes a chunk
    /// off the queue, and returns true; returns false (asking nothing) when no chunk is
    /// queued, as then no take is coming. A device that keeps the guest's notifications
    /// off while it streams uses this to run its queue again as soon as the writer is
    /// ready for the next batch.
    pub(crate) fn wake_on_take(&self) -> bool {
        let mut state = self.state();
        if state.done || state.chunks.is_empty() || self.shared.room.is_none() {
            return false;
        }
        state.wants_take = true;
        true
    }

    /// An empty buffer of at least `capacity` bytes, one the writer has finished with if
    /// there is one.
    pub(crate) fn buffer(&self, capacity: usize) -> Vec<u8> {
        let spare = self.state().spare.pop();
        match spare {
            Some(buffer) if buffer.capacity() >= capacity => buffer,
            _ => Vec::with_capacity(capacity),
        }
    }

    /// Blocks until the queue has room (or the writer is gone).
    pub(crate) fn wait_for_room(&self) {
        let mut state = self.state();
        while !state.done && state.bytes >= self.shared.capacity {
            state = self
                .shared
                .taken
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Queues `chunk` whatever the fill level: the caller checked [`has_room`](Self::has_room)
    /// and bounds what it pushes past the capacity.
    pub(crate) fn push(&self, chunk: Vec<u8>) {
        if chunk.is_empty() {
            return;
        }
        let mut state = self.state();
        if state.done || state.closed {
            return;
        }
        state.bytes += cost(&chunk, chunk.capacity());
        state.chunks.push_back(chunk);
        self.shared.arrived.notify_one();
    }

    /// Queues a copy of `data` if it fits, else drops it (and counts it): for output that
    /// must never hold its producer back.
    pub(crate) fn push_or_drop(&self, data: &[u8]) {
        let mut state = self.state();
        if state.done || state.closed || data.is_empty() {
            return;
        }
        let chunk = data.to_vec();
        let cost = cost(&chunk, chunk.capacity());
        if state.bytes + cost > self.shared.capacity {
            state.dropped += data.len() as u64;
            return;
        }
        state.bytes += cost;
        state.chunks.push_back(chunk);
        self.shared.arrived.notify_one();
    }

    /// Bytes dropped by [`push_or_drop`](Self::push_or_drop) so far.
    #[cfg(test)]
    pub(crate) fn dropped(&self) -> u64 {
        self.state().dropped
    }

    fn close(&self) {
        let mut state = self.state();
        state.closed = true;
        self.shared.arrived.notify_one();
    }
}

/// The writer thread: writes chunks in order until the queue is closed and empty. A
/// failing host writer loses its bytes (a closed terminal must not stop the guest); the
/// writer keeps draining so the producer never waits on a dead output.
fn write_all_queued(shared: &Shared, mut out: Box<dyn Write + Send>) {
    let lock = || shared.state.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        let chunk = {
            let mut state = lock();
            loop {
                if let Some(chunk) = state.chunks.pop_front() {
                    if std::mem::take(&mut state.wants_take) {
                        signal_room(shared);
                    }
                    break chunk;
                }
                if state.closed {
                    state.done = true;
                    state.spare = Vec::new();
                    shared.taken.notify_all();
                    return;
                }
                if state.spare.is_empty() {
                    state = shared
                        .arrived
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner);
                    continue;
                }
                let (next, waited) = shared
                    .arrived
                    .wait_timeout(state, SPARE_IDLE)
                    .unwrap_or_else(PoisonError::into_inner);
                state = next;
                if waited.timed_out() && state.chunks.is_empty() {
                    state.spare = Vec::new();
                }
            }
        };
        let _ = out.write_all(&chunk).and_then(|()| out.flush());
        let mut state = lock();
        state.bytes -= cost(&chunk, chunk.capacity());
        if chunk.capacity() >= SPARE_MIN_CAPACITY && state.spare.len() < SPARE_BUFFERS {
            let mut chunk = chunk;
            chunk.clear();
            state.spare.push(chunk);
        }
        // Half empty before waking the producer, so a full queue is refilled in big steps
        // rather than one chunk per wake-up.
        if state.wants_room && state.bytes <= shared.capacity / 2 {
            state.wants_room = false;
            signal_room(shared);
        }
        shared.taken.notify_all();
    }
}

/// Wakes the producing device's worker through the `room` eventfd.
fn signal_room(shared: &Shared) {
    if let Some(room) = &shared.room {
        // Only fails if the counter would overflow, and then the worker is awake.
        let _ = room.write(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    /// A host writer that blocks every write until the test lets it through.
    struct Gate {
        open: mpsc::Receiver<()>,
        written: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.open
                .recv()
                .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
            self.written.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn gated() -> (Gate, mpsc::Sender<()>, Arc<Mutex<Vec<u8>>>) {
        let (open, gate) = mpsc::channel();
        let written = Arc::default();
        let out = Gate {
            open: gate,
            written: Arc::clone(&written),
        };
        (out, open, written)
    }

    #[test]
    fn a_stalled_reader_fills_the_queue_and_room_wakes_the_producer() {
        let (out, open, written) = gated();
        let room = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let writer = HostWriter::start(
            "test-writer",
            Box::new(out),
            4 * (4 + CHUNK_OVERHEAD),
            Some(room.try_clone().expect("clone")),
        )
        .expect("start");
        let sender = writer.sender();
        for _ in 0..4 {
            assert!(sender.has_room());
            sender.push(b"abcd".to_vec());
        }
        // The writer holds the first chunk in its blocked write; all four are counted.
        assert!(!sender.has_room());
        assert!(!sender.wake_when_room());
        assert!(room.read().is_err(), "no room signalled yet");
        // Two chunks through: half the capacity left, so the producer is woken.
        open.send(()).expect("open");
        open.send(()).expect("open");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while room.read().is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "room was never signalled"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        open.send(()).expect("open");
        open.send(()).expect("open");
        writer.finish(true);
        assert_eq!(&*written.lock().expect("lock"), b"abcdabcdabcdabcd");
    }

    #[test]
    fn finish_without_drain_does_not_wait_for_a_stalled_reader() {
        let (out, open, _written) = gated();
        let writer = HostWriter::start("test-writer", Box::new(out), 8, None).expect("start");
        writer.sender().push(b"stuck".to_vec());
        let (done, finished) = mpsc::channel();
        std::thread::spawn(move || {
            writer.finish(false);
            let _ = done.send(());
        });
        finished
            .recv_timeout(Duration::from_secs(5))
            .expect("finish returned while the write is blocked");
        drop(open);
    }

    #[test]
    fn push_or_drop_keeps_the_bound_and_counts_what_it_drops() {
        let (out, open, written) = gated();
        let capacity = 10 + 2 * CHUNK_OVERHEAD;
        let writer =
            HostWriter::start("test-writer", Box::new(out), capacity, None).expect("start");
        let sender = writer.sender();
        sender.push_or_drop(b"123456");
        sender.push_or_drop(b"7890");
        sender.push_or_drop(b"x");
        assert_eq!(sender.dropped(), 1);
        for _ in 0..2 {
            open.send(()).expect("open");
        }
        writer.finish(true);
        assert_eq!(&*written.lock().expect("lock"), b"1234567890");
    }

    #[test]
    fn a_broken_output_is_drained_so_producers_never_wait() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let writer = HostWriter::start("test-writer", Box::new(Broken), 4, None).expect("start");
        let sender = writer.sender();
        for _ in 0..100 {
            sender.wait_for_room();
            sender.push(b"data".to_vec());
        }
        writer.finish(true);
        assert!(sender.has_room());
    }

    #[test]
    fn written_buffers_come_back_to_the_producer() {
        let (out, open, written) = gated();
        let writer = HostWriter::start("test-writer", Box::new(out), 1 << 20, None).expect("start");
        let sender = writer.sender();
        let mut chunk = sender.buffer(SPARE_MIN_CAPACITY);
        chunk.extend_from_slice(b"big");
        let address = chunk.as_ptr();
        sender.push(chunk);
        open.send(()).expect("open");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let reused = loop {
            let buffer = sender.buffer(SPARE_MIN_CAPACITY);
            if buffer.as_ptr() == address {
                break buffer;
            }
            assert!(std::time::Instant::now() < deadline, "never reused");
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(reused.is_empty());
        // A small chunk is not kept: the next buffer is a fresh one.
        sender.push(b"small".to_vec());
        open.send(()).expect("open");
        writer.finish(true);
        assert_eq!(&*written.lock().expect("lock"), b"bigsmall");
    }
}
