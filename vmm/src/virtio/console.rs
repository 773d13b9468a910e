//! virtio-console device (virtio 1.2 §5.3) with VIRTIO_CONSOLE_F_MULTIPORT and one port,
//! announced as a generic port (`/dev/vport<dev>p0` in the guest, see
//! [`console_control`](super::console_control)): the guest's output is handed in batches
//! to the console's writer thread (never written to the host here, so a stalled reader
//! holds back only the guest's transmit queue); host input queued in a [`ConsoleInput`]
//! fills the guest's receive buffers while the guest has the port open. The device runs on
//! the console's worker thread, woken by the queues' ioeventfd.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};

use super::console_control::{Control, CONTROL_RECEIVE_QUEUE, CONTROL_TRANSMIT_QUEUE};
use super::{read_config_space, ConsoleInput, DeviceError, VirtioDevice};
use crate::host_writer::OutputSender;
use crate::GuestMemory;

/// Size of receiveq0 and transmitq0. Linux's generic port queues up to 32 KiB per
/// transmit buffer, so a full transmitq holds 4 MiB of output: more than the writer takes
/// per wake-up (its 1 MiB queue), so a host that keeps up never makes the guest wait,
/// while a stalled host pins no more than that of the guest's memory. Linux keeps
/// receiveq0 full of page-sized buffers (512 KiB).
const QUEUE_SIZE: u16 = 128;
/// Size of the control queues: the handshake needs a few buffers; Linux fills the
/// control receiveq with a page each.
const CONTROL_QUEUE_SIZE: u16 = 32;
/// Index of receiveq0 (host to guest, §5.3.2).
pub(crate) const RECEIVE_QUEUE: u32 = 0;
/// Index of transmitq0 (guest to host).
pub(crate) const TRANSMIT_QUEUE: u32 = 1;
/// The order the console's worker runs its queues in when woken: the guest's control
/// messages first (its driver spins until they are taken), then the replies they call
/// for, then input (which the port's opening may have let through), then output.
pub(crate) const WORKER_QUEUES: [u32; 4] = [
    CONTROL_TRANSMIT_QUEUE,
    CONTROL_RECEIVE_QUEUE,
    RECEIVE_QUEUE,
    TRANSMIT_QUEUE,
];
/// VIRTIO_CONSOLE_F_MULTIPORT (§5.3.3): control queues and max_nr_ports.
const F_MULTIPORT: u64 = 1 << 1;
/// Output is gathered up to this many bytes before it is handed to the writer thread:
/// several of the guest's 32 KiB buffers per host write.
const BATCH_BYTES: usize = 256 * 1024;
/// A batch of at least this many bytes (one of Linux's 32 KiB buffers) is handed to the
/// writer whole; a smaller one is copied out and the batch buffer kept.
const HANDED_OVER_BYTES: usize = 32 * 1024;
/// Most bytes taken from one transmit chain. Linux sends at most 32 KiB per buffer; a
/// hostile chain naming gigabytes is cut here, so what the device queues past the writer's
/// capacity stays bounded.
pub(crate) const MAX_CHAIN_BYTES: usize = 1 << 20;

/// The virtio-console device.
pub struct Console {
    out: OutputSender,
    batch: Vec<u8>,
    input: ConsoleInput,
    /// Set while buffers wait in transmitq0 because the writer's queue is full.
    stalled: Arc<AtomicBool>,
    /// Transmit buffers were used without an interrupt yet (see [`Console::transmit`]).
    owed: bool,
    /// The last passes took output and notifications are off.
    streaming: bool,
    /// A pass found the ring empty while streaming and asked to look again later.
    lingered: bool,
    /// Set to have the worker run the queues again after `worker::LINGER`.
    later: Arc<AtomicBool>,
    control: Control,
}

impl Console {
    /// A console whose guest output goes to `out` and whose guest input comes from `input`.
    pub(crate) fn new(out: OutputSender, input: ConsoleInput) -> Self {
        Self {
            out,
            batch: Vec::with_capacity(BATCH_BYTES),
            input,
            stalled: Arc::default(),
            owed: false,
            streaming: false,
            lingered: false,
            later: Arc::default(),
            control: Control::default(),
        }
    }

    /// The input this console delivers to the guest.
    pub fn input(&self) -> &ConsoleInput {
        &self.input
    }

    /// The flag through which the console asks its worker to run it again a little later
    /// (see [`Console::transmit`]).
    pub(crate) fn later(&self) -> Arc<AtomicBool> {
        self.later.clone()
    }

    /// Whether transmitq0 was left with buffers because the writer's queue was full (the
    /// VM's owner drains it at the end).
    pub(crate) fn stalled(&self) -> Arc<AtomicBool> {
        self.stalled.clone()
    }

    /// Moves queued host input into the available receiveq0 buffers, in order, each
    /// buffer used with the number of bytes written to it (§5.3.6.1, §2.7.8). Buffers stay
    /// available while there is nothing to send, and input stays queued while the guest
    /// has the port closed (a closed generic port throws away what arrives). At most one
    /// queue's worth of buffers is used per call.
    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemory) -> Result<bool, DeviceError> {
        if !self.control.guest_open() {
            return Ok(false);
        }
        self.input.take_with(|pending| {
            let mut used = false;
            for _ in 0..queue.size() {
                if pending.is_empty() {
                    break;
                }
                let Some(chain) = queue.iter(mem)?.next() else {
                    break;
                };
                let head = chain.head_index();
                let len = fill(chain, mem, pending);
                queue.add_used(mem, head, len)?;
                used = true;
            }
            Ok(used)
        })
    }

    /// Takes transmitted buffers while the writer has room: each is used with length 0
    /// (only read, §2.7.8). Once the writer is full the rest wait in the ring, where the
    /// guest's driver sees them pending, until the writer signals room on the console's
    /// notify eventfd and the worker runs the queue again.
    ///
    /// While output streams, the guest's notifications are off (VRING_USED_F_NO_NOTIFY,
    /// §2.7.10) and the writer wakes the worker when it takes the batch just handed over,
    /// so the worker gathers what the guest queued meanwhile in one pass: a guest writing
    /// a stream exits to the VMM about once per batch, not once per 32 KiB buffer. When a
    /// pass finds nothing, notifications go back on (and the ring is looked at once more
    /// for a buffer that raced them).
    ///
    /// A pass that finds the ring empty in the middle of a stream does not turn
    /// notifications back on at once: the guest is usually between two writes (on a busy
    /// host its vCPU had to wait for this thread), so the worker looks again after
    /// `worker::LINGER` and only a second empty pass ends the stream. The guest then queues
    /// several buffers per pass instead of kicking and being interrupted for each one.
    ///
    /// Used transmit buffers are announced by an interrupt only when the guest may be
    /// waiting for them: the ring was full when the pass began (Linux's port blocks its
    /// writer, or reports it not writable, only when no descriptor is free), or the stream
    /// ended (notifications back on). While the guest keeps adding buffers it reclaims the
    /// used ones itself on its next write. The owed interrupt is kept until then, as the
    /// spec lets a device delay its used-buffer notifications.
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemory) -> Result<bool, DeviceError> {
        let full = ring_full(queue, mem)?;
        let mut used = false;
        let ended = loop {
            let (took, stalled) = self.take_transmitted(queue, mem)?;
            used |= took;
            if took {
                self.streaming = true;
                self.lingered = false;
            }
            if stalled {
                break false;
            }
            if took && self.out.wake_on_take() {
                queue.disable_notification(mem)?;
                break false;
            }
            if !took && self.streaming && !self.lingered {
                queue.disable_notification(mem)?;
                self.lingered = true;
                self.later.store(true, Ordering::Release);
                break false;
            }
            if !queue.enable_notification(mem)? {
                self.streaming = false;
                self.lingered = false;
                break true;
            }
        };
        self.owed |= used;
        let interrupt = self.owed && (full || ended);
        if interrupt {
            self.owed = false;
        }
        Ok(interrupt)
    }

    /// One pass of [`transmit`](Self::transmit): whether buffers were used, and whether
    /// some were left because the writer is full.
    fn take_transmitted(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<(bool, bool), DeviceError> {
        let mut used = false;
        let mut stalled = false;
        self.stalled.store(false, Ordering::Release);
        for _ in 0..queue.size() {
            if !self.out.has_room() {
                self.flush();
                if !self.out.wake_when_room() {
                    self.stalled.store(true, Ordering::Release);
                    stalled = true;
                    break;
                }
            }
            let Some(chain) = queue.iter(mem)?.next() else {
                break;
            };
            let head = chain.head_index();
            self.gather(chain, mem);
            queue.add_used(mem, head, 0)?;
            used = true;
        }
        self.flush();
        Ok((used, stalled))
    }

    /// Appends the device-readable bytes of `chain` (up to [`MAX_CHAIN_BYTES`]) to the
    /// batch, in order, handing full batches to the writer.
    fn gather(&mut self, chain: DescriptorChain<&GuestMemory>, mem: &GuestMemory) {
        // A chain reaching outside guest memory is dropped whole rather than half-trusted.
        let Ok(mut reader) = chain.reader(mem) else {
            return;
        };
        let mut left = reader.available_bytes().min(MAX_CHAIN_BYTES);
        while left > 0 {
            if self.batch.len() >= BATCH_BYTES {
                self.flush();
            }
            let start = self.batch.len();
            let want = (BATCH_BYTES - start).min(left);
            self.batch.resize(start + want, 0);
            let got = reader.read(&mut self.batch[start..]).unwrap_or(0);
            self.batch.truncate(start + got);
            if got == 0 {
                break;
            }
            left -= got;
        }
    }

    /// Hands the batch to the writer thread: one of at least a guest buffer's worth as it
    /// is (replaced by a buffer the writer has finished with), a smaller one as an exact
    /// copy, so a guest sending many small buffers does not queue a whole batch's
    /// allocation for each (the writer bounds what it holds by allocated bytes).
    fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let chunk = if self.batch.len() >= HANDED_OVER_BYTES {
            let fresh = self.out.buffer(BATCH_BYTES);
            std::mem::replace(&mut self.batch, fresh)
        } else {
            let copy = self.batch.clone();
            self.batch.clear();
            copy
        };
        self.out.push(chunk);
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    // The control queues exist only with F_MULTIPORT (§5.3.2), which Linux always
    // accepts; a driver declining it sets up two queues and the transport refuses its
    // DRIVER_OK, as it does for any driver leaving a queue unset.
    fn queue_max_sizes(&self) -> &[u16] {
        &[
            QUEUE_SIZE,
            QUEUE_SIZE,
            CONTROL_QUEUE_SIZE,
            CONTROL_QUEUE_SIZE,
        ]
    }

    fn features(&self) -> u64 {
        F_MULTIPORT
    }

    // §5.3.4: cols and rows (0: F_SIZE is not offered), max_nr_ports (1) and emerg_wr
    // (F_EMERG_WRITE is not offered either).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 12];
        config[4..8].copy_from_slice(&1u32.to_le_bytes());
        read_config_space(&config, offset, data);
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<bool, DeviceError> {
        match u32::try_from(index) {
            Ok(TRANSMIT_QUEUE) => self.transmit(queue, mem),
            Ok(RECEIVE_QUEUE) => self.receive(queue, mem),
            Ok(CONTROL_TRANSMIT_QUEUE) => self.control.transmit(queue, mem),
            Ok(CONTROL_RECEIVE_QUEUE) => self.control.receive(queue, mem),
            _ => Ok(false),
        }
    }
}

/// Whether every descriptor of `queue` is available to the device: the driver can add no
/// more until some are used.
fn ring_full(queue: &Queue, mem: &GuestMemory) -> Result<bool, DeviceError> {
    let avail = queue.avail_idx(mem, Ordering::Acquire)?;
    Ok((avail - std::num::Wrapping(queue.next_avail())).0 >= queue.size())
}

/// Writes the front of `pending` into the device-writable part of `chain`, removes what
/// was written, and returns its length. A chain reaching outside guest memory is used
/// empty rather than half-trusted.
fn fill(
    chain: DescriptorChain<&GuestMemory>,
    mem: &GuestMemory,
    pending: &mut VecDeque<u8>,
) -> u32 {
    let Ok(mut writer) = chain.writer(mem) else {
        return 0;
    };
    let (front, back) = pending.as_slices();
    let mut written = 0;
    for part in [front, back] {
        let n = writer.write(part).unwrap_or(0);
        written += n;
        if n < part.len() {
            break;
        }
    }
    pending.drain(..written);
    // At most the queued bytes, which ConsoleInput::MAX_CAPACITY keeps below 4 GiB.
    u32::try_from(written).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_writer::HostWriter;
    use crate::virtio::console_control::{
        ControlMessage, CONTROL_LEN, DEVICE_READY, PORT_ADD, PORT_NAME, PORT_NAME_EVENT, PORT_OPEN,
        PORT_READY,
    };
    use crate::virtio::tests::{guest_memory, used_elem, DATA_ADDR};
    use std::sync::Mutex;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// A writer the test can inspect after the console took ownership of it, counting the
    /// host writes so batching is observable.
    #[derive(Clone, Default)]
    struct SharedOut {
        bytes: Arc<Mutex<Vec<u8>>>,
        writes: Arc<Mutex<usize>>,
        largest: Arc<Mutex<usize>>,
    }

    impl Write for SharedOut {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.bytes.lock().expect("lock").extend_from_slice(buf);
            *self.writes.lock().expect("lock") += 1;
            let mut largest = self.largest.lock().expect("lock");
            *largest = buf.len().max(*largest);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A console writing through a writer thread to `out`; finish the writer before
    /// looking at what `out` got.
    fn console_to(out: impl Write + Send + 'static, input: ConsoleInput) -> (Console, HostWriter) {
        let writer =
            HostWriter::start("test-console", Box::new(out), 1 << 20, None).expect("writer");
        (Console::new(writer.sender(), input), writer)
    }

    /// [`console_to`] with port 0 opened by the guest, as init has it before input flows.
    fn open_console_to(
        out: impl Write + Send + 'static,
        input: ConsoleInput,
    ) -> (Console, HostWriter) {
        let (mut console, writer) = console_to(out, input);
        console.control.handle(ControlMessage {
            id: 0,
            event: PORT_OPEN,
            value: 1,
        });
        (console, writer)
    }

    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _buf: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(
            addr,
            len,
            u16::try_from(flags).expect("flags"),
            next,
        ))
    }

    #[test]
    fn transmits_several_chains_in_order_with_one_host_write() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = vq.create_queue().expect("queue");
        let parts: [&[u8]; 4] = [b"hello ", b"from ", b"the ", b"guest\n"];
        for (i, part) in parts.iter().enumerate() {
            let addr = DATA_ADDR + 0x100 * i as u64;
            mem.write_slice(part, GuestAddress(addr)).expect("write");
        }
        // Chain 0 is descriptors 0 -> 1 (two readable parts), chain 1 is 2, chain 2 is 3.
        let descs = [
            desc(DATA_ADDR, 6, VRING_DESC_F_NEXT, 1),
            desc(DATA_ADDR + 0x100, 5, 0, 0),
            desc(DATA_ADDR + 0x200, 4, 0, 0),
            desc(DATA_ADDR + 0x300, 6, 0, 0),
        ];
        vq.add_desc_chains(&descs, 0).expect("chains");
        let out = SharedOut::default();
        let (mut console, writer) = console_to(out.clone(), ConsoleInput::new());

        assert!(console.process_queue(1, &mut queue, &mem).expect("process"));
        writer.finish(true);

        assert_eq!(&*out.bytes.lock().expect("lock"), b"hello from the guest\n");
        assert_eq!(*out.writes.lock().expect("lock"), 1);
        assert_eq!(queue.next_used(), 3);
        assert_eq!(used_elem(&vq, 0), (0, 0));
        assert_eq!(used_elem(&vq, 1), (2, 0));
        assert_eq!(used_elem(&vq, 2), (3, 0));
    }

    #[test]
    fn output_larger_than_a_batch_arrives_whole() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = vq.create_queue().expect("queue");
        let len = BATCH_BYTES * 2 + 123;
        let data: Vec<u8> = (0..len)
            .map(|i| u8::try_from(i % 251).expect("byte"))
            .collect();
        mem.write_slice(&data, GuestAddress(DATA_ADDR))
            .expect("write");
        vq.build_desc_chain(&[desc(DATA_ADDR, u32::try_from(len).expect("len"), 0, 0)])
            .expect("chain");
        let out = SharedOut::default();
        let (mut console, writer) = console_to(out.clone(), ConsoleInput::new());

        assert!(console.process_queue(1, &mut queue, &mem).expect("process"));
        writer.finish(true);

        assert_eq!(*out.bytes.lock().expect("lock"), data);
        assert_eq!(*out.writes.lock().expect("lock"), 3);
        // A flood is streamed through the batch, never held whole.
        assert_eq!(*out.largest.lock().expect("lock"), BATCH_BYTES);
        assert!(console.batch.capacity() < 2 * BATCH_BYTES);
    }

    #[test]
    fn skips_writable_descriptors_and_chains_outside_memory() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = vq.create_queue().expect("queue");
        mem.write_slice(b"ok", GuestAddress(DATA_ADDR))
            .expect("write");
        mem.write_slice(b"no", GuestAddress(DATA_ADDR + 0x100))
            .expect("write");
        let descs = [
            desc(0xffff_ffff_0000, 0x1000, 0, 0),
            desc(DATA_ADDR, 2, VRING_DESC_F_NEXT, 2),
            desc(DATA_ADDR + 0x100, 2, VRING_DESC_F_WRITE, 0),
        ];
        vq.add_desc_chains(&descs, 0).expect("chains");
        let out = SharedOut::default();
        let (mut console, writer) = console_to(out.clone(), ConsoleInput::new());

        assert!(console.process_queue(1, &mut queue, &mem).expect("process"));
        writer.finish(true);

        assert_eq!(&*out.bytes.lock().expect("lock"), b"ok");
        assert_eq!(queue.next_used(), 2);
    }

    #[test]
    fn looping_chain_is_cut_at_the_queue_size() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = vq.create_queue().expect("queue");
        mem.write_slice(b"loop", GuestAddress(DATA_ADDR))
            .expect("write");
        // Descriptor 0 names itself as its successor.
        vq.add_desc_chains(&[desc(DATA_ADDR, 4, VRING_DESC_F_NEXT, 0)], 0)
            .expect("chain");
        let out = SharedOut::default();
        let (mut console, writer) = console_to(out.clone(), ConsoleInput::new());

        assert!(console.process_queue(1, &mut queue, &mem).expect("process"));
        writer.finish(true);

        assert_eq!(*out.bytes.lock().expect("lock"), b"loop".repeat(16));
        assert_eq!(queue.next_used(), 1);
    }

    #[test]
    fn receive_buffers_stay_available() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = vq.create_queue().expect("queue");
        vq.build_desc_chain(&[desc(DATA_ADDR, 64, VRING_DESC_F_WRITE, 0)])
            .expect("chain");
        let (mut console, _writer) = console_to(SharedOut::default(), ConsoleInput::new());

        assert!(!console.process_queue(0, &mut queue, &mem).expect("process"));

        assert_eq!(queue.next_avail(), 0);
        assert_eq!(vq.used().idx().load(), 0);
    }

    #[test]
    fn failing_host_output_still_completes_buffers() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = vq.create_queue().expect("queue");
        vq.build_desc_chain(&[desc(DATA_ADDR, 64, 0, 0)])
            .expect("chain");
        let (mut console, writer) = console_to(Broken, ConsoleInput::new());

        assert!(console.process_queue(1, &mut queue, &mem).expect("process"));
        writer.finish(true);

        assert_eq!(queue.next_used(), 1);
        assert!(console.batch.is_empty());
    }

    /// A host output whose writes each wait for the test to let them through.
    struct Gated(std::sync::mpsc::Receiver<()>, Arc<Mutex<Vec<u8>>>);

    impl Write for Gated {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .recv()
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
            self.1.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A console whose writer (of `capacity` bytes, waking `room`) blocks each host write
    /// until the test sends on the returned channel; the bytes written collect in the Vec.
    #[allow(clippy::type_complexity)]
    fn gated_console(
        capacity: usize,
    ) -> (
        Console,
        HostWriter,
        std::sync::mpsc::Sender<()>,
        Arc<Mutex<Vec<u8>>>,
        EventFd,
    ) {
        let (open, gate) = std::sync::mpsc::channel();
        let written = Arc::new(Mutex::new(Vec::new()));
        let room = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let writer = HostWriter::start(
            "test-console",
            Box::new(Gated(gate, written.clone())),
            capacity,
            Some(room.try_clone().expect("clone")),
        )
        .expect("writer");
        let console = Console::new(writer.sender(), ConsoleInput::new());
        (console, writer, open, written, room)
    }

    /// Waits up to 5 s for the writer to signal `room`.
    fn wait_for(room: &EventFd, what: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while room.read().is_err() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn a_full_writer_leaves_buffers_in_the_ring_until_it_has_room() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = vq.create_queue().expect("queue");
        mem.write_slice(&[b'x'; 64], GuestAddress(DATA_ADDR))
            .expect("write");
        let chains = |first: u16, count: u16| {
            let descs: Vec<_> = (0..count).map(|_| desc(DATA_ADDR, 64, 0, 0)).collect();
            vq.add_desc_chains(&descs, first).expect("chains");
        };
        let (mut console, writer, open, written, room) = gated_console(100);
        let stalled = console.stalled();

        chains(0, 4);
        // Used while the stream goes on: the interrupt is owed, not sent.
        assert!(!console.process_queue(1, &mut queue, &mem).expect("process"));
        assert_eq!(queue.next_used(), 4);
        // 256 bytes wait in the writer, past its 100: the next buffers stay in the ring.
        chains(4, 2);
        assert!(!console.process_queue(1, &mut queue, &mem).expect("process"));
        assert_eq!(queue.next_used(), 4);
        assert!(stalled.load(Ordering::Acquire));

        open.send(()).expect("open");
        // As the worker does: rerun on each signal (the writer's take of a batch, or its
        // room), until a pass finds the ring empty and sends the owed interrupt.
        // A pass that lingered asks to be run again without a signal.
        let later = console.later();
        let mut runs = 0;
        loop {
            if !later.swap(false, Ordering::AcqRel) {
                wait_for(&room, "room never signalled");
            }
            if console.process_queue(1, &mut queue, &mem).expect("process") {
                break;
            }
            runs += 1;
            assert!(runs < 6, "room signalled but the buffers never moved");
            let _ = open.send(());
        }
        assert_eq!(queue.next_used(), 6);
        assert!(!stalled.load(Ordering::Acquire));
        open.send(()).expect("open");
        writer.finish(true);
        assert_eq!(written.lock().expect("lock").len(), 6 * 64);
    }

    #[test]
    fn streaming_output_turns_notifications_off_until_a_pass_finds_nothing() {
        // VRING_USED_F_NO_NOTIFY in the used ring's flags.
        let mem = guest_memory();
        let notifications_off = |vq: &MockSplitQueue<GuestMemory>| {
            let flags: u16 = mem.read_obj(vq.used_addr()).expect("used flags");
            u16::from_le(flags) & 1 == 1
        };
        let vq = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = vq.create_queue().expect("queue");
        mem.write_slice(&[b'x'; 64], GuestAddress(DATA_ADDR))
            .expect("write");
        let chains = |first: u16, count: u16| {
            let descs: Vec<_> = (0..count).map(|_| desc(DATA_ADDR, 64, 0, 0)).collect();
            vq.add_desc_chains(&descs, first).expect("chains");
        };
        let (mut console, writer, open, written, room) = gated_console(1 << 20);

        // The writer blocks in its first write; the second batch waits in its queue, so a
        // take is coming: the guest need not notify buffers it adds meanwhile.
        // No interrupt while the stream goes on (the ring never filled).
        chains(0, 2);
        assert!(!console.process_queue(1, &mut queue, &mem).expect("process"));
        chains(2, 2);
        assert!(!console.process_queue(1, &mut queue, &mem).expect("process"));
        assert!(notifications_off(&vq));

        open.send(()).expect("open");
        wait_for(&room, "take never signalled");
        // The rerun finds the ring empty: in the middle of a stream it looks again later,
        // notifications still off and no interrupt yet.
        let later = console.later();
        assert!(!console.process_queue(1, &mut queue, &mem).expect("process"));
        assert!(notifications_off(&vq));
        assert!(
            later.swap(false, Ordering::AcqRel),
            "asked to run again later"
        );
        // Still nothing: the stream has ended, notifications go back on, and the interrupt
        // owed for the four used buffers is sent.
        assert!(console.process_queue(1, &mut queue, &mem).expect("process"));
        assert!(!notifications_off(&vq));
        assert!(!later.load(Ordering::Acquire));
        // Nothing more is owed.
        assert!(!console.process_queue(1, &mut queue, &mem).expect("process"));
        open.send(()).expect("open");
        writer.finish(true);
        assert_eq!(written.lock().expect("lock").len(), 4 * 64);
    }

    #[test]
    fn a_full_transmit_ring_is_answered_with_an_interrupt_at_once() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = vq.create_queue().expect("queue");
        mem.write_slice(&[b'y'; 64], GuestAddress(DATA_ADDR))
            .expect("write");
        let descs: Vec<_> = (0..16).map(|_| desc(DATA_ADDR, 64, 0, 0)).collect();
        vq.add_desc_chains(&descs, 0).expect("chains");
        let (mut console, writer, open, written, _room) = gated_console(1 << 20);
        // The guest's driver may be waiting for a free descriptor: it hears at once.
        assert!(console.process_queue(1, &mut queue, &mem).expect("process"));
        assert_eq!(queue.next_used(), 16);
        open.send(()).expect("open");
        open.send(()).expect("open");
        writer.finish(true);
        assert_eq!(written.lock().expect("lock").len(), 16 * 64);
    }

    /// `count` writable receive buffers of `len` bytes, one chain each, at DATA_ADDR +
    /// 0x100 * descriptor index, starting at descriptor `first`.
    fn post_buffers(vq: &MockSplitQueue<GuestMemory>, first: u16, count: u16, len: u32) {
        let descs: Vec<_> = (first..first + count)
            .map(|i| desc(DATA_ADDR + 0x100 * u64::from(i), len, VRING_DESC_F_WRITE, 0))
            .collect();
        vq.add_desc_chains(&descs, first).expect("chains");
    }

    fn read(mem: &GuestMemory, index: u16, len: u32) -> Vec<u8> {
        let mut data = vec![0; usize::try_from(len).expect("len")];
        mem.read_slice(
            &mut data,
            GuestAddress(DATA_ADDR + 0x100 * u64::from(index)),
        )
        .expect("read");
        data
    }

    #[test]
    fn input_sent_before_the_guest_posts_buffers_arrives_split_across_them() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = vq.create_queue().expect("queue");
        let input = ConsoleInput::new();
        let (mut console, _writer) = open_console_to(SharedOut::default(), input.clone());
        input.send(b"hello, ").expect("send");
        input.send(b"guest").expect("send");

        assert!(!console.process_queue(0, &mut queue, &mem).expect("process"));
        post_buffers(&vq, 0, 4, 5);
        assert!(console.process_queue(0, &mut queue, &mem).expect("process"));

        assert_eq!(vq.used().idx().load(), 3, "the fourth buffer is not needed");
        assert_eq!(used_elem(&vq, 0), (0, 5));
        assert_eq!(used_elem(&vq, 1), (1, 5));
        assert_eq!(used_elem(&vq, 2), (2, 2));
        assert_eq!(read(&mem, 0, 5), b"hello");
        assert_eq!(read(&mem, 1, 5), b", gue");
        assert_eq!(read(&mem, 2, 2), b"st");
        assert_eq!(queue.next_avail(), 3);

        // Nothing queued: the last buffer waits for the next input.
        assert!(!console.process_queue(0, &mut queue, &mem).expect("process"));
        assert_eq!(queue.next_avail(), 3);
        input.send(b"!").expect("send");
        assert!(console.process_queue(0, &mut queue, &mem).expect("process"));
        assert_eq!(used_elem(&vq, 3), (3, 1));
        assert_eq!(read(&mem, 3, 1), b"!");
    }

    #[test]
    fn a_chain_is_filled_across_its_writable_descriptors_only() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = vq.create_queue().expect("queue");
        let input = ConsoleInput::new();
        let (mut console, _writer) = open_console_to(SharedOut::default(), input.clone());
        mem.write_slice(b"RRRR", GuestAddress(DATA_ADDR))
            .expect("write");
        // Chain 0: a readable descriptor (skipped), then 3 + 4 writable bytes.
        let descs = [
            desc(DATA_ADDR, 4, VRING_DESC_F_NEXT, 1),
            desc(
                DATA_ADDR + 0x100,
                3,
                VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
                2,
            ),
            desc(DATA_ADDR + 0x200, 4, VRING_DESC_F_WRITE, 0),
        ];
        vq.add_desc_chains(&descs, 0).expect("chain");
        input.send(b"abcdefghij").expect("send");

        assert!(console.process_queue(0, &mut queue, &mem).expect("process"));

        assert_eq!(used_elem(&vq, 0), (0, 7));
        assert_eq!(read(&mem, 0, 4), b"RRRR");
        assert_eq!(read(&mem, 1, 3), b"abc");
        assert_eq!(read(&mem, 2, 4), b"defg");
        post_buffers(&vq, 3, 1, 16);
        assert!(console.process_queue(0, &mut queue, &mem).expect("process"));
        assert_eq!(used_elem(&vq, 1), (3, 3));
        assert_eq!(read(&mem, 3, 3), b"hij");
    }

    #[test]
    fn a_chain_outside_memory_is_used_empty_and_the_input_kept() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = vq.create_queue().expect("queue");
        let input = ConsoleInput::new();
        let (mut console, _writer) = open_console_to(SharedOut::default(), input.clone());
        let descs = [
            desc(0xffff_ffff_0000, 64, VRING_DESC_F_WRITE, 0),
            desc(DATA_ADDR + 0x100, 64, VRING_DESC_F_WRITE, 0),
        ];
        vq.add_desc_chains(&descs, 0).expect("chains");
        input.send(b"kept").expect("send");

        assert!(console.process_queue(0, &mut queue, &mem).expect("process"));

        assert_eq!(used_elem(&vq, 0), (0, 0));
        assert_eq!(used_elem(&vq, 1), (1, 4));
        assert_eq!(read(&mem, 1, 4), b"kept");
    }

    #[test]
    fn queued_bytes_that_wrap_inside_the_queue_are_written_in_order() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let chain = |len| {
            vq.build_desc_chain(&[desc(DATA_ADDR, len, VRING_DESC_F_WRITE, 0)])
                .expect("chain");
            let mut queue: Queue = vq.create_queue().expect("queue");
            queue.iter(&mem).expect("iter").next().expect("chain")
        };
        let mut pending = VecDeque::with_capacity(8);
        pending.extend(b"xxxxxa");
        pending.drain(..5);
        pending.extend(b"bcdefgh");
        assert!(
            !pending.as_slices().1.is_empty(),
            "the test needs a wrapped deque"
        );

        assert_eq!(fill(chain(7), &mem, &mut pending), 7);
        assert_eq!(read(&mem, 0, 7), b"abcdefg");
        assert_eq!(pending, b"h");
        assert_eq!(fill(chain(7), &mem, &mut pending), 1);
        assert!(pending.is_empty());
    }

    #[test]
    fn a_sender_blocked_on_a_full_input_resumes_as_the_guest_reads() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = vq.create_queue().expect("queue");
        let input = ConsoleInput::with_capacity(8);
        let (mut console, _writer) = open_console_to(SharedOut::default(), input.clone());
        let data: Vec<u8> = (0..40).collect();
        let sender = {
            let (input, data) = (input.clone(), data.clone());
            std::thread::spawn(move || input.send(&data))
        };

        let mut received = Vec::new();
        for index in 0..16 {
            if received.len() == data.len() {
                break;
            }
            post_buffers(&vq, index, 1, 6);
            while !console.process_queue(0, &mut queue, &mem).expect("process") {
                std::thread::yield_now();
            }
            let (head, len) = used_elem(&vq, usize::from(index));
            assert_eq!(u32::from(index), head);
            assert!(len <= 6);
            received.extend(read(&mem, index, len));
        }

        sender.join().expect("join").expect("send");
        assert_eq!(received, data);
    }

    /// The four queues of a console in one guest memory: receiveq0, transmitq0, control
    /// receiveq, control transmitq (rings at 0x1_0000 apart, below DATA_ADDR).
    fn four_queues(mem: &GuestMemory) -> Vec<MockSplitQueue<'_, GuestMemory>> {
        (1..=4u64)
            .map(|i| MockSplitQueue::create(mem, GuestAddress(0x1_0000 * i), 16))
            .collect()
    }

    /// Data of control buffers goes here, clear of the receive tests' buffers.
    const CONTROL_DATA: u64 = DATA_ADDR + 0x8000;

    /// What the guest's driver does to send a control message: `bytes` in one readable
    /// buffer on the control transmitq at descriptor `index`.
    fn send_control(mem: &GuestMemory, vq: &MockSplitQueue<GuestMemory>, index: u16, bytes: &[u8]) {
        let addr = CONTROL_DATA + 0x100 * u64::from(index);
        mem.write_slice(bytes, GuestAddress(addr)).expect("write");
        let len = u32::try_from(bytes.len()).expect("len");
        vq.add_desc_chains(&[desc(addr, len, 0, 0)], index)
            .expect("chain");
    }

    /// `count` control receive buffers of `len` bytes from descriptor `first`.
    fn post_control(vq: &MockSplitQueue<GuestMemory>, first: u16, count: u16, len: u32) {
        let descs: Vec<_> = (first..first + count)
            .map(|i| {
                let addr = CONTROL_DATA + 0x4000 + 0x100 * u64::from(i);
                desc(addr, len, VRING_DESC_F_WRITE, 0)
            })
            .collect();
        vq.add_desc_chains(&descs, first).expect("chains");
    }

    /// The control message (and appended data) the device wrote into receive buffer
    /// `index`, `len` bytes long.
    fn control_reply(mem: &GuestMemory, index: u16, len: u32) -> (ControlMessage, Vec<u8>) {
        let mut data = vec![0; usize::try_from(len).expect("len")];
        let addr = CONTROL_DATA + 0x4000 + 0x100 * u64::from(index);
        mem.read_slice(&mut data, GuestAddress(addr)).expect("read");
        let rest = data.split_off(CONTROL_LEN);
        (ControlMessage::parse(&data).expect("message"), rest)
    }

    fn message(id: u32, event: u16, value: u16) -> Vec<u8> {
        ControlMessage { id, event, value }.encode(&[])
    }

    #[test]
    fn offers_multiport_with_one_port_and_four_queues() {
        let (console, _writer) = console_to(SharedOut::default(), ConsoleInput::new());
        assert_eq!(console.features(), 1 << 1);
        assert_eq!(console.queue_max_sizes().len(), 4);
        let mut config = [0xffu8; 12];
        console.read_config(0, &mut config);
        assert_eq!(config, [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
        let mut ports = [0u8; 4];
        console.read_config(4, &mut ports);
        assert_eq!(u32::from_le_bytes(ports), 1);
        let mut past = [0xffu8; 4];
        console.read_config(12, &mut past);
        assert_eq!(past, [0; 4]);
    }

    #[test]
    fn the_handshake_announces_a_named_open_generic_port_and_lets_input_through() {
        let mem = guest_memory();
        let vqs = four_queues(&mem);
        let mut queues: Vec<Queue> = vqs.iter().map(|vq| vq.create_queue().expect("q")).collect();
        let input = ConsoleInput::new();
        let (mut console, _writer) = console_to(SharedOut::default(), input.clone());
        let mut run = |console: &mut Console, index: u32| {
            let i = usize::try_from(index).expect("index");
            console
                .process_queue(i, &mut queues[i], &mem)
                .expect("process")
        };
        post_buffers(&vqs[0], 0, 1, 16);
        input.send(b"early").expect("send");
        post_control(&vqs[2], 0, 8, 64);

        // Linux's probe: DEVICE_READY with VIRTIO_CONSOLE_BAD_ID.
        send_control(&mem, &vqs[3], 0, &message(u32::MAX, DEVICE_READY, 1));
        assert!(run(&mut console, CONTROL_TRANSMIT_QUEUE));
        assert_eq!(used_elem(&vqs[3], 0), (0, 0));
        assert!(run(&mut console, CONTROL_RECEIVE_QUEUE));
        assert_eq!(used_elem(&vqs[2], 0), (0, 8));
        let (add, _) = control_reply(&mem, 0, 8);
        assert_eq!((add.id, add.event), (0, PORT_ADD));

        // add_port: PORT_READY once the port's buffers are posted.
        send_control(&mem, &vqs[3], 1, &message(0, PORT_READY, 1));
        assert!(run(&mut console, CONTROL_TRANSMIT_QUEUE));
        assert!(run(&mut console, CONTROL_RECEIVE_QUEUE));
        let name_len = u32::try_from(CONTROL_LEN + PORT_NAME.len()).expect("len");
        assert_eq!(used_elem(&vqs[2], 1), (1, name_len));
        let (name, bytes) = control_reply(&mem, 1, name_len);
        assert_eq!((name.id, name.event), (0, PORT_NAME_EVENT));
        assert_eq!(bytes, b"katalite.channel");
        assert_eq!(used_elem(&vqs[2], 2), (2, 8));
        let (open, _) = control_reply(&mem, 2, 8);
        assert_eq!((open.id, open.event, open.value), (0, PORT_OPEN, 1));
        assert!(
            !run(&mut console, CONTROL_RECEIVE_QUEUE),
            "nothing more to say"
        );

        // Input waits until init opens the port.
        assert!(!run(&mut console, RECEIVE_QUEUE));
        send_control(&mem, &vqs[3], 2, &message(0, PORT_OPEN, 1));
        assert!(run(&mut console, CONTROL_TRANSMIT_QUEUE));
        assert!(run(&mut console, RECEIVE_QUEUE));
        assert_eq!(used_elem(&vqs[0], 0), (0, 5));
        assert_eq!(read(&mem, 0, 5), b"early");

        // Closed again: input is held.
        send_control(&mem, &vqs[3], 3, &message(0, PORT_OPEN, 0));
        assert!(run(&mut console, CONTROL_TRANSMIT_QUEUE));
        post_buffers(&vqs[0], 1, 1, 16);
        input.send(b"later").expect("send");
        assert!(!run(&mut console, RECEIVE_QUEUE));
        assert_eq!(console.control.ignored(), 0);
    }

    #[test]
    fn hostile_control_buffers_are_used_and_ignored() {
        let mem = guest_memory();
        let vqs = four_queues(&mem);
        let mut tx: Queue = vqs[3].create_queue().expect("queue");
        let mut rx: Queue = vqs[2].create_queue().expect("queue");
        let (mut console, _writer) = console_to(SharedOut::default(), ConsoleInput::new());
        let mut ready = message(0, PORT_READY, 1);
        send_control(&mem, &vqs[3], 0, &ready[..7]);
        ready.push(0);
        send_control(&mem, &vqs[3], 1, &ready);
        send_control(&mem, &vqs[3], 2, &message(5, PORT_READY, 1));
        send_control(&mem, &vqs[3], 3, &message(0, 0x4242, 1));
        // A writable descriptor holds no message; outside guest memory neither.
        vqs[3]
            .add_desc_chains(&[desc(CONTROL_DATA, 8, VRING_DESC_F_WRITE, 0)], 4)
            .expect("chain");
        vqs[3]
            .add_desc_chains(&[desc(0xffff_ffff_0000, 8, 0, 0)], 5)
            .expect("chain");

        assert!(console.process_queue(3, &mut tx, &mem).expect("process"));

        assert_eq!(tx.next_used(), 6);
        assert_eq!(console.control.ignored(), 6);
        assert_eq!(console.control.pending(), 0);
        post_control(&vqs[2], 0, 2, 64);
        assert!(!console.process_queue(2, &mut rx, &mem).expect("process"));
    }

    #[test]
    fn a_control_buffer_too_small_for_the_reply_is_used_empty() {
        let mem = guest_memory();
        let vqs = four_queues(&mem);
        let mut tx: Queue = vqs[3].create_queue().expect("queue");
        let mut rx: Queue = vqs[2].create_queue().expect("queue");
        let (mut console, _writer) = console_to(SharedOut::default(), ConsoleInput::new());
        send_control(&mem, &vqs[3], 0, &message(0, PORT_READY, 1));
        assert!(console.process_queue(3, &mut tx, &mem).expect("process"));
        // Room for PORT_OPEN but not for PORT_NAME's name.
        post_control(&vqs[2], 0, 2, 12);

        assert!(console.process_queue(2, &mut rx, &mem).expect("process"));

        assert_eq!(used_elem(&vqs[2], 0), (0, 0));
        assert_eq!(used_elem(&vqs[2], 1), (1, 8));
        assert_eq!(console.control.dropped(), 1);
        assert_eq!(console.control.pending(), 0);
    }
}
