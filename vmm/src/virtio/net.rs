//! virtio-net device (virtio 1.2 §5.1) with one receive and one transmit queue: moves
//! Ethernet frames between the guest's buffers and the bounded [`Link`] queues that the
//! `katalite-net` thread serves. No offloads and no mergeable receive buffers: frames are
//! at most one 1500-byte-MTU frame, which fits the buffers Linux posts without them.

use std::io::{Read, Write};
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};

use super::{DeviceError, VirtioDevice};
use crate::net::{lock, FrameQueue, Link, MAX_FRAME_LEN};
use crate::GuestMemory;

/// Index of receiveq1 (§5.1.2).
pub(crate) const NET_RX_QUEUE: u32 = 0;
/// Index of transmitq1.
pub(crate) const NET_TX_QUEUE: u32 = 1;
/// Size of each queue.
const QUEUE_SIZE: u16 = 256;
/// `struct virtio_net_hdr` with VIRTIO_F_VERSION_1: num_buffers is always present (§5.1.6).
pub(crate) const NET_HDR_LEN: usize = 12;
/// Offset of num_buffers in the header.
const NUM_BUFFERS_OFFSET: usize = 10;
/// Smallest frame worth handing on: an Ethernet header.
const MIN_FRAME_LEN: usize = 14;
/// The MTU announced with VIRTIO_NET_F_MTU (§5.1.4): Linux then caps the interface there.
const MTU: u16 = 1500;

/// The virtio-net device.
pub struct Net {
    /// `struct virtio_net_config` (§5.1.4): mac, status, max_virtqueue_pairs, mtu.
    config: [u8; 12],
    link: Arc<Link>,
}

impl Net {
    /// A NIC with `mac`, moving frames through `link`.
    pub(crate) fn new(mac: [u8; 6], link: Arc<Link>) -> Self {
        let mut config = [0u8; 12];
        config[..6].copy_from_slice(&mac);
        let status = u16::try_from(VIRTIO_NET_S_LINK_UP).unwrap_or(1);
        config[6..8].copy_from_slice(&status.to_le_bytes());
        // max_virtqueue_pairs (8..10) only means something with VIRTIO_NET_F_MQ.
        config[10..12].copy_from_slice(&MTU.to_le_bytes());
        Self { config, link }
    }

    /// Fills available receive buffers with queued frames, in order, each behind a zeroed
    /// header whose num_buffers is 1 (§5.1.6.4: required without VIRTIO_NET_F_MRG_RXBUF).
    /// A frame larger than the buffer offered is dropped and the buffer kept for the next.
    ///
    /// The guest is only asked to notify new buffers while frames wait for them
    /// (VRING_USED_F_NO_NOTIFY otherwise, §2.7.10): the thread delivering frames reads
    /// the ring itself, so the guest's refills need not exit to the VMM.
    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemory) -> Result<bool, DeviceError> {
        let mut rx = lock(&self.link.rx);
        let was_full = rx.is_full();
        let mut used = false;
        for _ in 0..2 {
            used |= fill_buffers(queue, mem, &mut rx)?;
            if rx.is_empty() {
                queue.disable_notification(mem)?;
                break;
            }
            // Out of buffers with frames waiting: have the guest tell us about new ones,
            // and look again for any it added before it could see that.
            if !queue.enable_notification(mem)? {
                break;
            }
        }
        let freed = was_full && !rx.is_full();
        drop(rx);
        if freed {
            // The thread stops pulling from the backend while the queue is full.
            self.link.wake();
        }
        Ok(used)
    }

    /// Moves transmitted frames to the link. When it is full the remaining chains stay in
    /// the ring (backpressure, no loss) and the thread runs this queue again later.
    ///
    /// While the thread has frames to take, the guest's notifications are off
    /// (VRING_USED_F_NO_NOTIFY, §2.7.10) and the thread runs this queue again after taking
    /// them, so a guest sending a stream exits to the VMM once per burst, not per frame.
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemory) -> Result<bool, DeviceError> {
        let mut tx = lock(&self.link.tx);
        // The thread takes every queued frame at once, so a non-empty queue means a wake
        // is already on its way.
        let was_empty = tx.is_empty();
        let mut used = false;
        for _ in 0..2 {
            used |= take_frames(queue, mem, &mut tx)?;
            if used || tx.rerun() {
                queue.disable_notification(mem)?;
                tx.set_rerun();
                break;
            }
            // Idle: notifications back on, then a last look for a chain that raced them.
            if !queue.enable_notification(mem)? {
                break;
            }
        }
        let wake = was_empty && !tx.is_empty();
        drop(tx);
        if wake {
            self.link.wake();
        }
        Ok(used)
    }
}

/// Moves queued frames into available receive buffers; whether any buffer was used.
fn fill_buffers(
    queue: &mut Queue,
    mem: &GuestMemory,
    rx: &mut FrameQueue,
) -> Result<bool, DeviceError> {
    let mut used = false;
    for _ in 0..queue.size() {
        let Some(frame) = rx.front() else {
            break;
        };
        let Some(chain) = queue.iter(mem)?.next() else {
            break;
        };
        let head = chain.head_index();
        match write_frame(chain, mem, frame) {
            Delivery::Written(len) => {
                queue.add_used(mem, head, len)?;
                used = true;
                rx.pop();
            }
            Delivery::TooSmall => {
                queue.go_to_previous_position();
                rx.pop();
                rx.count_drop();
            }
            // A chain reaching outside guest memory is used empty, which Linux counts as a
            // length error; the frame waits for a sound buffer.
            Delivery::BadChain => {
                queue.add_used(mem, head, 0)?;
                used = true;
            }
        }
    }
    Ok(used)
}

/// Moves transmit chains' frames to `tx` until the ring is empty or `tx` full (then asks
/// for a rerun); whether any chain was used.
fn take_frames(
    queue: &mut Queue,
    mem: &GuestMemory,
    tx: &mut FrameQueue,
) -> Result<bool, DeviceError> {
    let mut used = false;
    for _ in 0..queue.size() {
        if tx.is_full() {
            tx.set_rerun();
            break;
        }
        let Some(chain) = queue.iter(mem)?.next() else {
            break;
        };
        let head = chain.head_index();
        match read_frame(chain, mem) {
            Some(frame) => {
                tx.push(frame);
            }
            None => tx.count_drop(),
        }
        // Transmit buffers are only read: used length 0 (§2.7.8).
        queue.add_used(mem, head, 0)?;
        used = true;
    }
    Ok(used)
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS | 1 << VIRTIO_NET_F_MTU
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_space(&self.config, offset, data);
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<bool, DeviceError> {
        match u32::try_from(index) {
            Ok(NET_RX_QUEUE) => self.receive(queue, mem),
            Ok(NET_TX_QUEUE) => self.transmit(queue, mem),
            _ => Ok(false),
        }
    }
}

enum Delivery {
    Written(u32),
    TooSmall,
    BadChain,
}

/// Writes the header and `frame` into the device-writable part of `chain`.
fn write_frame(chain: DescriptorChain<&GuestMemory>, mem: &GuestMemory, frame: &[u8]) -> Delivery {
    let Ok(mut writer) = chain.writer(mem) else {
        return Delivery::BadChain;
    };
    let len = NET_HDR_LEN + frame.len();
    if writer.available_bytes() < len {
        return Delivery::TooSmall;
    }
    let mut header = [0u8; NET_HDR_LEN];
    header[NUM_BUFFERS_OFFSET] = 1;
    if writer.write_all(&header).is_err() || writer.write_all(frame).is_err() {
        return Delivery::BadChain;
    }
    // At most NET_HDR_LEN + MAX_FRAME_LEN.
    Delivery::Written(u32::try_from(len).unwrap_or(u32::MAX))
}

/// The frame in the device-readable part of `chain`, after the header. The header's
/// fields only matter with offloads, none of which is offered. Frames shorter than an
/// Ethernet header or longer than [`MAX_FRAME_LEN`] are dropped, as a NIC would.
fn read_frame(chain: DescriptorChain<&GuestMemory>, mem: &GuestMemory) -> Option<Vec<u8>> {
    let mut reader = chain.reader(mem).ok()?;
    let len = reader.available_bytes().checked_sub(NET_HDR_LEN)?;
    if !(MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&len) {
        return None;
    }
    let mut header = [0u8; NET_HDR_LEN];
    reader.read_exact(&mut header).ok()?;
    let mut frame = vec![0u8; len];
    reader.read_exact(&mut frame).ok()?;
    Some(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::tests::{guest_memory, used_elem, DATA_ADDR};
    use crate::virtio::MmioTransport;
    use crate::BusDevice;
    use std::collections::VecDeque;
    use virtio_bindings::virtio_config::{
        VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
        VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1,
    };
    use virtio_bindings::virtio_mmio::{
        VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_DEVICE_FEATURES, VIRTIO_MMIO_DEVICE_FEATURES_SEL,
        VIRTIO_MMIO_DRIVER_FEATURES, VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_INTERRUPT_STATUS,
        VIRTIO_MMIO_INT_VRING, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, VIRTIO_MMIO_QUEUE_AVAIL_LOW,
        VIRTIO_MMIO_QUEUE_DESC_HIGH, VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_NOTIFY,
        VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_READY, VIRTIO_MMIO_QUEUE_SEL,
        VIRTIO_MMIO_QUEUE_USED_HIGH, VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_STATUS,
    };
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    fn desc(addr: u64, len: usize, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(
            addr,
            u32::try_from(len).expect("len"),
            u16::try_from(flags).expect("flags"),
            next,
        ))
    }

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| seed.wrapping_add(u8::try_from(i % 251).expect("byte")))
            .collect()
    }

    fn n32(n: usize) -> u32 {
        u32::try_from(n).expect("fits u32")
    }

    fn device(capacity: usize) -> (Net, Arc<Link>) {
        let link = Arc::new(Link::new(capacity).expect("link"));
        (Net::new(MAC, link.clone()), link)
    }

    fn read_guest(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0; len];
        mem.read_slice(&mut data, GuestAddress(addr)).expect("read");
        data
    }

    #[test]
    fn config_space_holds_the_mac_link_up_and_the_mtu() {
        let (net, _) = device(4);
        let mut mac = [0u8; 6];
        net.read_config(0, &mut mac);
        assert_eq!(mac, MAC);
        let mut status = [0u8; 2];
        net.read_config(6, &mut status);
        assert_eq!(u16::from_le_bytes(status), 1);
        let mut mtu = [0u8; 2];
        net.read_config(10, &mut mtu);
        assert_eq!(u16::from_le_bytes(mtu), 1500);
        let mut beyond = [0xffu8; 4];
        net.read_config(11, &mut beyond);
        assert_eq!(beyond, [0x05, 0, 0, 0], "past the end reads as zero");
        assert_eq!(
            net.features(),
            1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS | 1 << VIRTIO_NET_F_MTU
        );
    }

    #[test]
    fn transmitted_frames_reach_the_link_without_their_header() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = vq.create_queue().expect("queue");
        let (mut net, link) = device(8);
        let first = frame(60, 1);
        let second = frame(MAX_FRAME_LEN, 2);
        // Chain 0: header and frame in one descriptor. Chain 1: header, then the frame
        // split over two descriptors, as a driver may lay it out (§2.7.4).
        let mut one = vec![0xaa; NET_HDR_LEN];
        one.extend(&first);
        mem.write_slice(&one, GuestAddress(DATA_ADDR))
            .expect("write");
        mem.write_slice(&[0xbb; NET_HDR_LEN], GuestAddress(DATA_ADDR + 0x1000))
            .expect("write");
        mem.write_slice(&second[..100], GuestAddress(DATA_ADDR + 0x2000))
            .expect("write");
        mem.write_slice(&second[100..], GuestAddress(DATA_ADDR + 0x3000))
            .expect("write");
        let descs = [
            desc(DATA_ADDR, one.len(), 0, 0),
            desc(DATA_ADDR + 0x1000, NET_HDR_LEN, VRING_DESC_F_NEXT, 2),
            desc(DATA_ADDR + 0x2000, 100, VRING_DESC_F_NEXT, 3),
            desc(DATA_ADDR + 0x3000, second.len() - 100, 0, 0),
        ];
        vq.add_desc_chains(&descs, 0).expect("chains");

        let used = net.process_queue(1, &mut queue, &mem).expect("transmit");

        assert!(used);
        assert_eq!(used_elem(&vq, 0), (0, 0));
        assert_eq!(used_elem(&vq, 1), (1, 0));
        let mut tx = lock(&link.tx);
        assert_eq!(tx.pop(), Some(first));
        assert_eq!(tx.pop(), Some(second));
        assert!(tx.is_empty());
        drop(tx);
        link.clear_wake();
    }

    #[test]
    fn runt_and_oversized_frames_are_dropped_but_their_buffers_used() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = vq.create_queue().expect("queue");
        let (mut net, link) = device(8);
        let descs = [
            desc(DATA_ADDR, NET_HDR_LEN + 13, 0, 0),
            desc(DATA_ADDR, NET_HDR_LEN + MAX_FRAME_LEN + 1, 0, 0),
            desc(DATA_ADDR, NET_HDR_LEN - 1, 0, 0),
        ];
        vq.add_desc_chains(&descs, 0).expect("chains");

        assert!(net.process_queue(1, &mut queue, &mem).expect("transmit"));

        assert_eq!(vq.used().idx().load(), 3);
        let tx = lock(&link.tx);
        assert!(tx.is_empty());
        assert_eq!(tx.dropped(), 3);
    }

    #[test]
    fn a_full_link_leaves_transmit_chains_in_the_ring_and_stalls() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = vq.create_queue().expect("queue");
        let (mut net, link) = device(2);
        let descs: Vec<_> = (0..3u16)
            .map(|i| desc(DATA_ADDR + 0x1000 * u64::from(i), NET_HDR_LEN + 60, 0, 0))
            .collect();
        vq.add_desc_chains(&descs, 0).expect("chains");

        assert!(net.process_queue(1, &mut queue, &mem).expect("transmit"));
        assert_eq!(vq.used().idx().load(), 2);
        let (frames, stalled) = lock(&link.tx).take_all();
        assert_eq!(frames.len(), 2);
        assert!(stalled);

        // What the thread does after taking the frames: the third chain goes through.
        assert!(net.process_queue(1, &mut queue, &mem).expect("transmit"));
        assert_eq!(vq.used().idx().load(), 3);
        assert_eq!(lock(&link.tx).len(), 1);
        assert_eq!(lock(&link.tx).dropped(), 0);
    }

    /// Whether the device asked the driver not to notify this queue (VRING_USED_F_NO_NOTIFY).
    fn notifications_off(mem: &GuestMemory, vq: &MockSplitQueue<GuestMemory>) -> bool {
        let flags: u16 = mem.read_obj(vq.used_addr()).expect("used flags");
        u16::from_le(flags) & 1 == 1
    }

    #[test]
    fn a_busy_transmit_side_turns_notifications_off_until_the_ring_is_idle() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = vq.create_queue().expect("queue");
        let (mut net, link) = device(8);
        vq.add_desc_chains(&[desc(DATA_ADDR, NET_HDR_LEN + 60, 0, 0)], 0)
            .expect("chain");

        assert!(net.process_queue(1, &mut queue, &mem).expect("transmit"));
        assert!(notifications_off(&mem, &vq), "the thread will come back");
        let (frames, rerun) = lock(&link.tx).take_all();
        assert_eq!((frames.len(), rerun), (1, true));

        // The guest queued another frame without notifying; the thread's rerun finds it.
        vq.add_desc_chains(&[desc(DATA_ADDR, NET_HDR_LEN + 60, 0, 1)], 1)
            .expect("chain");
        assert!(net.process_queue(1, &mut queue, &mem).expect("transmit"));
        let (frames, rerun) = lock(&link.tx).take_all();
        assert_eq!((frames.len(), rerun), (1, true));

        // Nothing more: notifications are back on and no rerun is asked for.
        assert!(!net.process_queue(1, &mut queue, &mem).expect("transmit"));
        assert!(!notifications_off(&mem, &vq));
        assert_eq!(lock(&link.tx).take_all(), (VecDeque::new(), false));
    }

    #[test]
    fn receive_notifications_are_wanted_only_while_frames_wait_for_buffers() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = vq.create_queue().expect("queue");
        let (mut net, link) = device(8);
        post_rx(&vq, 0, 1, NET_HDR_LEN + MAX_FRAME_LEN);

        assert!(!net.process_queue(0, &mut queue, &mem).expect("receive"));
        assert!(notifications_off(&mem, &vq), "nothing to deliver");

        lock(&link.rx).push(frame(60, 1));
        lock(&link.rx).push(frame(60, 2));
        assert!(net.process_queue(0, &mut queue, &mem).expect("receive"));
        assert!(!notifications_off(&mem, &vq), "a frame waits for a buffer");

        post_rx(&vq, 1, 1, NET_HDR_LEN + MAX_FRAME_LEN);
        assert!(net.process_queue(0, &mut queue, &mem).expect("receive"));
        assert!(notifications_off(&mem, &vq));
        assert!(lock(&link.rx).is_empty());
    }

    /// `count` writable receive buffers of `len` bytes at DATA_ADDR + 0x1000 * index.
    fn post_rx(vq: &MockSplitQueue<GuestMemory>, first: u16, count: u16, len: usize) {
        let descs: Vec<_> = (first..first + count)
            .map(|i| {
                let addr = DATA_ADDR + 0x1000 * u64::from(i);
                desc(addr, len, VRING_DESC_F_WRITE, 0)
            })
            .collect();
        vq.add_desc_chains(&descs, first).expect("chains");
    }

    fn expected_rx(frame: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0u8; NET_HDR_LEN];
        bytes[NUM_BUFFERS_OFFSET] = 1;
        bytes.extend(frame);
        bytes
    }

    #[test]
    fn received_frames_fill_buffers_behind_a_header_byte_exact() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = vq.create_queue().expect("queue");
        let (mut net, link) = device(8);
        let frames = [frame(42, 3), frame(MAX_FRAME_LEN, 4), frame(100, 5)];
        for f in &frames {
            lock(&link.rx).push(f.clone());
        }
        // Linux's small receive buffers: header + 1518 bytes.
        post_rx(&vq, 0, 2, NET_HDR_LEN + MAX_FRAME_LEN);

        assert!(net.process_queue(0, &mut queue, &mem).expect("receive"));

        for (i, f) in frames[..2].iter().enumerate() {
            let len = NET_HDR_LEN + f.len();
            assert_eq!(used_elem(&vq, i), (n32(i), n32(len)));
            let addr = DATA_ADDR + 0x1000 * i as u64;
            assert_eq!(read_guest(&mem, addr, len), expected_rx(f));
        }
        assert_eq!(
            lock(&link.rx).len(),
            1,
            "the third frame waits for a buffer"
        );
        assert!(!net.process_queue(0, &mut queue, &mem).expect("receive"));

        post_rx(&vq, 2, 1, NET_HDR_LEN + MAX_FRAME_LEN);
        assert!(net.process_queue(0, &mut queue, &mem).expect("receive"));
        assert_eq!(used_elem(&vq, 2), (2, n32(NET_HDR_LEN + 100)));
        assert_eq!(
            read_guest(&mem, DATA_ADDR + 0x2000, NET_HDR_LEN + 100),
            expected_rx(&frames[2])
        );
        assert!(lock(&link.rx).is_empty());
    }

    #[test]
    fn a_frame_too_large_for_the_buffer_is_dropped_and_the_buffer_kept() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = vq.create_queue().expect("queue");
        let (mut net, link) = device(8);
        lock(&link.rx).push(frame(200, 6));
        lock(&link.rx).push(frame(50, 7));
        post_rx(&vq, 0, 1, NET_HDR_LEN + 100);

        assert!(net.process_queue(0, &mut queue, &mem).expect("receive"));

        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(used_elem(&vq, 0), (0, n32(NET_HDR_LEN + 50)));
        assert_eq!(
            read_guest(&mem, DATA_ADDR, NET_HDR_LEN + 50),
            expected_rx(&frame(50, 7))
        );
        assert_eq!(lock(&link.rx).dropped(), 1);
    }

    #[test]
    fn the_receive_queue_is_bounded_and_draining_it_from_full_wakes_the_thread() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = vq.create_queue().expect("queue");
        let (mut net, link) = device(2);
        assert!(lock(&link.rx).push(frame(60, 1)));
        assert!(lock(&link.rx).push(frame(60, 2)));
        assert!(
            !lock(&link.rx).push(frame(60, 3)),
            "full: dropped like a NIC"
        );
        assert_eq!(lock(&link.rx).dropped(), 1);
        link.clear_wake();
        post_rx(&vq, 0, 1, NET_HDR_LEN + MAX_FRAME_LEN);

        assert!(net.process_queue(0, &mut queue, &mem).expect("receive"));

        assert_eq!(lock(&link.rx).len(), 1);
        let mut events = mio::Events::with_capacity(1);
        let mut poll = mio::Poll::new().expect("poll");
        poll.registry()
            .register(
                &mut mio::unix::SourceFd(&link.wake_fd()),
                mio::Token(0),
                mio::Interest::READABLE,
            )
            .expect("register");
        poll.poll(&mut events, Some(std::time::Duration::ZERO))
            .expect("poll");
        assert!(!events.is_empty(), "the thread was woken");
    }

    /// Drives an MMIO transport the way Linux's virtio-mmio driver does (§3.1.1).
    fn activate(transport: &mut MmioTransport, vqs: &[MockSplitQueue<GuestMemory>]) {
        let write = |t: &mut MmioTransport, reg: u32, value: u32| {
            t.write(u64::from(reg), &value.to_le_bytes());
        };
        let read = |t: &mut MmioTransport, reg: u32| {
            let mut data = [0u8; 4];
            t.read(u64::from(reg), &mut data);
            u32::from_le_bytes(data)
        };
        let mut status = VIRTIO_CONFIG_S_ACKNOWLEDGE;
        write(transport, VIRTIO_MMIO_STATUS, status);
        status |= VIRTIO_CONFIG_S_DRIVER;
        write(transport, VIRTIO_MMIO_STATUS, status);
        for sel in 0..2 {
            write(transport, VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel);
            let offered = read(transport, VIRTIO_MMIO_DEVICE_FEATURES);
            write(transport, VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
            write(transport, VIRTIO_MMIO_DRIVER_FEATURES, offered);
        }
        status |= VIRTIO_CONFIG_S_FEATURES_OK;
        write(transport, VIRTIO_MMIO_STATUS, status);
        for (index, vq) in (0..).zip(vqs) {
            write(transport, VIRTIO_MMIO_QUEUE_SEL, index);
            write(transport, VIRTIO_MMIO_QUEUE_NUM, 16);
            let rings = [
                (
                    VIRTIO_MMIO_QUEUE_DESC_LOW,
                    VIRTIO_MMIO_QUEUE_DESC_HIGH,
                    vq.desc_table_addr(),
                ),
                (
                    VIRTIO_MMIO_QUEUE_AVAIL_LOW,
                    VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
                    vq.avail_addr(),
                ),
                (
                    VIRTIO_MMIO_QUEUE_USED_LOW,
                    VIRTIO_MMIO_QUEUE_USED_HIGH,
                    vq.used_addr(),
                ),
            ];
            for (low, high, addr) in rings {
                let [lo, hi] = [addr.0 & 0xffff_ffff, addr.0 >> 32]
                    .map(|half| u32::try_from(half).expect("half"));
                write(transport, low, lo);
                write(transport, high, hi);
            }
            write(transport, VIRTIO_MMIO_QUEUE_READY, 1);
        }
        status |= VIRTIO_CONFIG_S_DRIVER_OK;
        write(transport, VIRTIO_MMIO_STATUS, status);
        assert_eq!(read(transport, VIRTIO_MMIO_STATUS), status);
    }

    #[test]
    fn behind_the_transport_used_buffers_interrupt_and_the_mac_is_readable() {
        let mem = guest_memory();
        let vqs = [0x1_0000, 0x2_0000].map(|a| MockSplitQueue::create(&mem, GuestAddress(a), 16));
        let (net, link) = device(8);
        let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let mut transport =
            MmioTransport::new(mem.clone(), Box::new(net), irq.try_clone().expect("fd"));
        assert_eq!(transport_read(&mut transport, 0x8), VIRTIO_ID_NET);
        activate(&mut transport, &vqs);
        let mut mac = [0u8; 6];
        transport.read(u64::from(VIRTIO_MMIO_CONFIG), &mut mac);
        assert_eq!(mac, MAC);
        let offered: Vec<u32> = (0..2)
            .map(|sel| {
                transport.write(
                    u64::from(VIRTIO_MMIO_DEVICE_FEATURES_SEL),
                    &u32::to_le_bytes(sel),
                );
                transport_read(&mut transport, VIRTIO_MMIO_DEVICE_FEATURES)
            })
            .collect();
        // No checksum, GSO or mergeable-buffer bits: only MAC, STATUS, MTU and VERSION_1.
        assert_eq!(
            offered,
            [1 << 5 | 1 << 16 | 1 << 3, 1 << (VIRTIO_F_VERSION_1 - 32)]
        );

        lock(&link.rx).push(frame(60, 9));
        post_rx(&vqs[0], 0, 1, NET_HDR_LEN + MAX_FRAME_LEN);
        transport.run_queue(NET_RX_QUEUE);
        assert_eq!(vqs[0].used().idx().load(), 1);
        assert_eq!(irq.read().expect("interrupt"), 1);
        assert_eq!(
            transport_read(&mut transport, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_VRING
        );

        let mut bytes = vec![0u8; NET_HDR_LEN];
        bytes.extend(frame(60, 10));
        mem.write_slice(&bytes, GuestAddress(DATA_ADDR + 0x8000))
            .expect("write");
        vqs[1]
            .add_desc_chains(&[desc(DATA_ADDR + 0x8000, bytes.len(), 0, 0)], 0)
            .expect("chain");
        transport.write(
            u64::from(VIRTIO_MMIO_QUEUE_NOTIFY),
            &NET_TX_QUEUE.to_le_bytes(),
        );
        assert_eq!(lock(&link.tx).pop(), Some(frame(60, 10)));
        assert_eq!(irq.read().expect("interrupt"), 1);
    }

    fn transport_read(transport: &mut MmioTransport, reg: u32) -> u32 {
        let mut data = [0u8; 4];
        transport.read(u64::from(reg), &mut data);
        u32::from_le_bytes(data)
    }
}
