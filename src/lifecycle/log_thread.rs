//! The container log, written off the output path. The console's writer shows the
//! workload's output and queues a copy here; a thread of its own encodes the copy into the
//! json-file log. Encoding is the costly part (binary output becomes six bytes per control
//! byte: measured in the lab, logging took more than half of a foreground run's time for
//! 32 MiB of zeros), so the terminal no longer waits for it. The queue is bounded: a
//! workload that outpaces its log for longer than [`QUEUE_BYTES`] waits, as it does under
//! Docker's default (blocking) log mode, so the log stays complete.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use super::logfile::{JsonLog, Stream};
use super::time::Timestamp;
use crate::confine::{self, Role};

/// Most bytes waiting for the log thread (plus one chunk): a burst up to this size costs
/// the output nothing.
pub const QUEUE_BYTES: usize = 4 << 20;

/// What a queued chunk costs beyond its bytes (its slot, the allocator's header).
const CHUNK_OVERHEAD: usize = 64;

struct Chunk {
    stream: Stream,
    time: Timestamp,
    data: Vec<u8>,
}

#[derive(Default)]
struct State {
    chunks: VecDeque<Chunk>,
    bytes: usize,
    /// No more chunks are taken; the thread ends once the queue is written.
    closed: bool,
}

struct Queue {
    state: Mutex<State>,
    /// Signalled when a chunk arrives, one is written, or the queue closes.
    changed: Condvar,
    limit: usize,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A queue of whole chunks and a counter, each changed in one step under the lock.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed
            .wait(state)
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// The log as the output's writers see it: clones share one queue and one thread.
#[derive(Clone)]
pub struct SharedLog {
    queue: Arc<Queue>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl SharedLog {
    /// Starts the thread writing `log`.
    pub fn start(log: JsonLog) -> io::Result<Self> {
        Self::with_limit(log, QUEUE_BYTES)
    }

    fn with_limit(mut log: JsonLog, limit: usize) -> io::Result<Self> {
        let unstarted = Self::unstarted(limit);
        let writer = unstarted.queue.clone();
        let thread = std::thread::Builder::new()
            .name("katalite-log".into())
            .spawn(move || {
                confine::enter(Role::Log);
                write_queued(&writer, &mut log);
            })?;
        *unstarted
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(thread);
        Ok(unstarted)
    }

    /// The queue alone, with no thread taking from it yet.
    fn unstarted(limit: usize) -> Self {
        Self {
            queue: Arc::new(Queue {
                state: Mutex::default(),
                changed: Condvar::new(),
                limit,
            }),
            thread: Arc::default(),
        }
    }

    /// A `Write` logging everything as `stream`.
    pub fn stream(&self, stream: Stream) -> LogStream {
        LogStream {
            log: self.clone(),
            stream,
        }
    }

    /// Queues a copy of `data`, received now, waiting while the queue is full. Once the
    /// log is finished, data is dropped: the run is over.
    fn push(&self, stream: Stream, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let time = Timestamp::now();
        let mut state = self.queue.lock();
        while !state.closed && state.bytes >= self.queue.limit {
            state = self.queue.wait(state);
        }
        if state.closed {
            return;
        }
        state.bytes += data.len() + CHUNK_OVERHEAD;
        state.chunks.push_back(Chunk {
            stream,
            time,
            data: data.to_vec(),
        });
        self.queue.changed.notify_all();
    }

    /// Writes out everything queued and ends the thread; later output is not logged.
    pub fn finish(&self) {
        self.queue.lock().closed = true;
        self.queue.changed.notify_all();
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            // A panicking writer has lost its entries either way.
            let _ = thread.join();
        }
    }
}

/// The log thread: writes chunks in order until the queue is closed and empty. A failing
/// write loses that chunk's entries, as a full disk would; the output goes on.
fn write_queued(queue: &Queue, log: &mut JsonLog) {
    let mut state = queue.lock();
    loop {
        let Some(chunk) = state.chunks.pop_front() else {
            if state.closed {
                return;
            }
            state = queue.wait(state);
            continue;
        };
        drop(state);
        let _ = log.write_at(chunk.stream, chunk.time, &chunk.data);
        state = queue.lock();
        state.bytes -= chunk.data.len() + CHUNK_OVERHEAD;
        queue.changed.notify_all();
    }
}

/// Writes one stream into the shared log.
#[derive(Clone)]
pub struct LogStream {
    log: SharedLog,
    stream: Stream,
}

impl Write for LogStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.log.push(self.stream, buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes to `out` and logs a copy (a foreground run shows and logs its output, as
/// Docker does, even what `out` refused). A log failure never fails the write: the
/// terminal matters more.
pub struct Tee<W> {
    out: W,
    log: Option<LogStream>,
}

impl<W> Tee<W> {
    /// `out`, copied into `log` (if there is one).
    pub fn new(out: W, log: Option<LogStream>) -> Self {
        Self { out, log }
    }
}

impl<W: Write> Write for Tee<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Shown first: whoever reads the output waits for it, nobody waits for the log.
        let shown = self.out.write_all(buf);
        if let Some(log) = &mut self.log {
            let _ = log.write(buf);
        }
        shown?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::logfile::LogReader;
    use std::path::Path;
    use std::time::Duration;

    fn logs(path: &Path) -> Vec<(String, String)> {
        LogReader::new(path)
            .read_all()
            .expect("read")
            .into_iter()
            .map(|e| (e.log, e.stream))
            .collect()
    }

    #[test]
    fn a_tee_shows_and_logs_in_order_once_finished() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("container.log");
        let log = SharedLog::start(JsonLog::open(&path).expect("open")).expect("start");
        let mut shown = Vec::new();
        let mut tee = Tee::new(&mut shown, Some(log.stream(Stream::Stderr)));
        tee.write_all(b"hi\n").expect("write");
        log.stream(Stream::Stdout)
            .write_all(b"out\0binary\n")
            .expect("write");
        log.finish();
        assert_eq!(shown, b"hi\n");
        assert_eq!(
            logs(&path),
            [
                ("hi\n".into(), "stderr".into()),
                ("out\0binary\n".into(), "stdout".into())
            ]
        );
        // After the end, output is no longer logged (and nothing waits).
        log.stream(Stream::Stdout)
            .write_all(b"late\n")
            .expect("write");
        assert_eq!(logs(&path).len(), 2);
    }

    #[test]
    fn a_full_queue_holds_the_writer_back_until_the_log_catches_up() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("container.log");
        let log = SharedLog::unstarted(10);
        log.stream(Stream::Stdout)
            .write_all(b"first\n")
            .expect("write");
        let writer = {
            let log = log.clone();
            std::thread::spawn(move || {
                log.stream(Stream::Stdout)
                    .write_all(b"second\n")
                    .expect("write");
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(!writer.is_finished(), "the queue is full: the writer waits");
        let queue = log.queue.clone();
        let mut json = JsonLog::open(&path).expect("open");
        let thread = std::thread::spawn(move || write_queued(&queue, &mut json));
        writer.join().expect("writer");
        log.finish();
        thread.join().expect("log thread");
        let got: Vec<_> = logs(&path).into_iter().map(|(l, _)| l).collect();
        assert_eq!(got, ["first\n", "second\n"]);
    }
}
