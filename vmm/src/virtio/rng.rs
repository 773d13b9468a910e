//! virtio-entropy device (virtio 1.2 §5.4): fills the driver's buffers with bytes from the
//! host's getrandom(2), so the guest kernel's random pool is seeded from its first second.

use std::io::Write;

use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::{DescriptorChain, Queue};

use super::{drain_queue, DeviceError, VirtioDevice};
use crate::GuestMemory;

/// Size of the single requestq (§5.4.2).
const QUEUE_SIZE: u16 = 256;
/// Most bytes one request receives: a guest asking for gigabytes gets this much, so each
/// notification costs the host a bounded amount of work.
const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;
/// Bytes drawn from getrandom per call.
const CHUNK: usize = 4096;

/// The virtio-rng device.
#[derive(Debug, Default)]
pub struct Rng;

impl Rng {
    /// A device drawing from the host's getrandom.
    pub fn new() -> Self {
        Self
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    // §5.4.4: the entropy device has no configuration space.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn process_queue(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<bool, DeviceError> {
        drain_queue(queue, mem, |chain| fill_chain(chain, mem))
    }
}

/// Fills the device-writable part of `chain` (§5.4.6.1: the device writes entropy into
/// every writable buffer, up to the cap) and returns how many bytes it wrote.
fn fill_chain(chain: DescriptorChain<&GuestMemory>, mem: &GuestMemory) -> Result<u32, DeviceError> {
    // A chain reaching outside guest memory is returned empty rather than half-trusted.
    let Ok(mut writer) = chain.writer(mem) else {
        return Ok(0);
    };
    let mut chunk = [0u8; CHUNK];
    let mut left = writer.available_bytes().min(MAX_BYTES_PER_REQUEST);
    while left > 0 {
        let n = left.min(CHUNK);
        getrandom::fill(&mut chunk[..n]).map_err(DeviceError::Entropy)?;
        if writer.write_all(&chunk[..n]).is_err() {
            break;
        }
        left -= n;
    }
    // Bounded by MAX_BYTES_PER_REQUEST, so the conversion cannot saturate.
    Ok(u32::try_from(writer.bytes_written()).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::tests::{guest_memory, used_elem, DATA_ADDR};
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    fn writable(addr: u64, len: u32) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(
            addr,
            len,
            u16::try_from(VRING_DESC_F_WRITE).expect("flag"),
            0,
        ))
    }

    #[test]
    fn fills_writable_buffer_and_reports_its_length() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = vq.create_queue().expect("queue");
        vq.build_desc_chain(&[writable(DATA_ADDR, 64)])
            .expect("chain");
        let mut rng = Rng::new();

        assert!(rng.process_queue(0, &mut queue, &mem).expect("process"));

        assert_eq!(used_elem(&vq, 0), (0, 64));
        let mut data = [0u8; 64];
        mem.read_slice(&mut data, GuestAddress(DATA_ADDR))
            .expect("read");
        // 64 zero bytes from getrandom would happen with probability 2^-512.
        assert!(data.iter().any(|&b| b != 0));
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(DATA_ADDR + 64))
                .expect("read"),
            0
        );
    }

    #[test]
    fn caps_each_request() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = vq.create_queue().expect("queue");
        vq.build_desc_chain(&[writable(DATA_ADDR, 256 * 1024)])
            .expect("chain");

        assert!(Rng::new()
            .process_queue(0, &mut queue, &mem)
            .expect("process"));

        assert_eq!(
            used_elem(&vq, 0),
            (0, u32::try_from(MAX_BYTES_PER_REQUEST).expect("cap"))
        );
    }

    #[test]
    fn chain_outside_memory_is_returned_empty() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = vq.create_queue().expect("queue");
        vq.build_desc_chain(&[writable(0xffff_ffff_0000, 64)])
            .expect("chain");

        assert!(Rng::new()
            .process_queue(0, &mut queue, &mem)
            .expect("process"));

        assert_eq!(used_elem(&vq, 0), (0, 0));
    }

    #[test]
    fn read_only_buffers_are_left_alone() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = vq.create_queue().expect("queue");
        let readable = RawDescriptor::from(Descriptor::new(DATA_ADDR, 32, 0, 0));
        vq.build_desc_chain(&[readable, writable(DATA_ADDR + 0x1000, 16)])
            .expect("chain");

        assert!(Rng::new()
            .process_queue(0, &mut queue, &mem)
            .expect("process"));

        assert_eq!(used_elem(&vq, 0), (0, 16));
        let mut data = [0u8; 32];
        mem.read_slice(&mut data, GuestAddress(DATA_ADDR))
            .expect("read");
        assert_eq!(data, [0u8; 32]);
    }
}
