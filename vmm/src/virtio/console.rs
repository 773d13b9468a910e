//! virtio-console device (virtio 1.2 §5.3) with a single port: the guest's hvc0 output goes
//! to a host writer, batched so a burst of writes costs one host write per notification;
//! host input queued in a [`ConsoleInput`] fills the guest's receive buffers.

use std::collections::VecDeque;
use std::io::{Read, Write};

use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};

use super::{drain_queue, ConsoleInput, DeviceError, VirtioDevice};
use crate::GuestMemory;

/// Size of receiveq0 and transmitq0.
const QUEUE_SIZE: u16 = 256;
/// Index of receiveq0 (host to guest, §5.3.2).
pub(crate) const RECEIVE_QUEUE: u32 = 0;
/// Index of transmitq0 (guest to host).
const TRANSMIT_QUEUE: usize = 1;
/// Output is gathered up to this many bytes before it is written to the host; the batch
/// never grows past it, so a guest flooding the console costs the host this much memory.
const BATCH_BYTES: usize = 64 * 1024;

/// The virtio-console device.
pub struct Console {
    out: Box<dyn Write + Send>,
    batch: Vec<u8>,
    input: ConsoleInput,
}

impl Console {
    /// A console whose guest output goes to `out` and whose guest input comes from `input`.
    pub fn new(out: Box<dyn Write + Send>, input: ConsoleInput) -> Self {
        Self {
            out,
            batch: Vec::with_capacity(BATCH_BYTES),
            input,
        }
    }

    /// The input this console delivers to the guest.
    pub fn input(&self) -> &ConsoleInput {
        &self.input
    }

    /// Moves queued host input into the available receiveq0 buffers, in order, each
    /// buffer used with the number of bytes written to it (§5.3.6.1, §2.7.8). Buffers stay
    /// available while there is nothing to send. As in [`drain_queue`], at most one
    /// queue's worth of buffers is used per call.
    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemory) -> Result<bool, DeviceError> {
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

    /// Appends the device-readable bytes of `chain` to the batch, in order.
    fn gather(&mut self, chain: DescriptorChain<&GuestMemory>, mem: &GuestMemory) {
        // A chain reaching outside guest memory is dropped whole rather than half-trusted.
        let Ok(mut reader) = chain.reader(mem) else {
            return;
        };
        while reader.available_bytes() > 0 {
            if self.batch.len() >= BATCH_BYTES {
                self.flush();
            }
            let start = self.batch.len();
            let want = (BATCH_BYTES - start).min(reader.available_bytes());
            self.batch.resize(start + want, 0);
            let got = reader.read(&mut self.batch[start..]).unwrap_or(0);
            self.batch.truncate(start + got);
            if got == 0 {
                break;
            }
        }
    }

    /// Writes the batch to the host. A failing host writer loses the bytes instead of
    /// stalling the guest: Linux's hvc path spins until its buffer is used
    /// (drivers/char/virtio_console.c, `__send_to_port`), so refusing would hang the guest.
    fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let _ = self
            .out
            .write_all(&self.batch)
            .and_then(|()| self.out.flush());
        self.batch.clear();
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    // §5.3.4: cols/rows, max_nr_ports and emerg_wr only mean something with
    // VIRTIO_CONSOLE_F_SIZE, F_MULTIPORT or F_EMERG_WRITE, none of which is offered.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<bool, DeviceError> {
        if index != TRANSMIT_QUEUE {
            return self.receive(queue, mem);
        }
        // Transmitted buffers are only read, so each is used with length 0 (§2.7.8).
        let used = drain_queue(queue, mem, |chain| {
            self.gather(chain, mem);
            Ok(0)
        });
        self.flush();
        used
    }
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
    use crate::virtio::tests::{guest_memory, used_elem, DATA_ADDR};
    use std::sync::{Arc, Mutex};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

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
        let mut console = Console::new(Box::new(out.clone()), ConsoleInput::new());

        assert!(console.process_queue(1, &mut queue, &mem).expect("process"));

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
        let mut console = Console::new(Box::new(out.clone()), ConsoleInput::new());

        assert!(console.process_queue(1, &mut queue, &mem).expect("process"));

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
        let mut console = Console::new(Box::new(out.clone()), ConsoleInput::new());

        assert!(console.process_queue(1, &mut queue, &mem).expect("process"));

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
        let mut console = Console::new(Box::new(out.clone()), ConsoleInput::new());

        assert!(console.process_queue(1, &mut queue, &mem).expect("process"));

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
        let mut console = Console::new(Box::new(SharedOut::default()), ConsoleInput::new());

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
        let mut console = Console::new(Box::new(Broken), ConsoleInput::new());

        assert!(console.process_queue(1, &mut queue, &mem).expect("process"));

        assert_eq!(queue.next_used(), 1);
        assert!(console.batch.is_empty());
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
        let mut console = Console::new(Box::new(SharedOut::default()), input.clone());
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
        let mut console = Console::new(Box::new(SharedOut::default()), input.clone());
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
        let mut console = Console::new(Box::new(SharedOut::default()), input.clone());
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
        let mut console = Console::new(Box::new(SharedOut::default()), input.clone());
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
}
