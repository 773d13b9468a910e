//! virtio-console device (virtio 1.2 §5.3) with a single port: the guest's hvc0 output goes
//! to a host writer, batched so a burst of writes costs one host write per notification.

use std::io::{Read, Write};

use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_queue::{DescriptorChain, Queue};

use super::{drain_queue, DeviceError, VirtioDevice};
use crate::GuestMemory;

/// Size of receiveq0 and transmitq0.
const QUEUE_SIZE: u16 = 256;
/// Index of transmitq0 (guest to host); receiveq0 is 0 (§5.3.2).
const TRANSMIT_QUEUE: usize = 1;
/// Output is gathered up to this many bytes before it is written to the host.
const BATCH_BYTES: usize = 64 * 1024;

/// The virtio-console device.
pub struct Console {
    out: Box<dyn Write + Send>,
    batch: Vec<u8>,
}

impl Console {
    /// A console whose guest output goes to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self {
            out,
            batch: Vec::with_capacity(BATCH_BYTES),
        }
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
        // receiveq0 buffers stay available until there is host input for them (§5.3.6.1).
        if index != TRANSMIT_QUEUE {
            return Ok(false);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::tests::{guest_memory, used_elem, DATA_ADDR};
    use std::sync::{Arc, Mutex};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress};

    /// A writer the test can inspect after the console took ownership of it, counting the
    /// host writes so batching is observable.
    #[derive(Clone, Default)]
    struct SharedOut {
        bytes: Arc<Mutex<Vec<u8>>>,
        writes: Arc<Mutex<usize>>,
    }

    impl Write for SharedOut {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.bytes.lock().expect("lock").extend_from_slice(buf);
            *self.writes.lock().expect("lock") += 1;
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
        let mut console = Console::new(Box::new(out.clone()));

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
        let mut console = Console::new(Box::new(out.clone()));

        assert!(console.process_queue(1, &mut queue, &mem).expect("process"));

        assert_eq!(*out.bytes.lock().expect("lock"), data);
        assert_eq!(*out.writes.lock().expect("lock"), 3);
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
        let mut console = Console::new(Box::new(out.clone()));

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
        let mut console = Console::new(Box::new(out.clone()));

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
        let mut console = Console::new(Box::new(SharedOut::default()));

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
        let mut console = Console::new(Box::new(Broken));

        assert!(console.process_queue(1, &mut queue, &mem).expect("process"));

        assert_eq!(queue.next_used(), 1);
        assert!(console.batch.is_empty());
    }
}
