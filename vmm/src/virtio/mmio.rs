//! virtio-mmio transport, version 2 (virtio 1.2 §4.2.2): decodes one device's register
//! window, owns its queues and interrupt line, and runs the device when the driver notifies.
//! Everything written here comes from the guest, so bad accesses are ignored, never trusted.

use std::sync::atomic::Ordering;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_CONFIG_GENERATION, VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL, VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING, VIRTIO_MMIO_MAGIC_VALUE,
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH, VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH,
    VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_NOTIFY, VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_NUM_MAX, VIRTIO_MMIO_QUEUE_READY, VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_USED_HIGH, VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_SHM_BASE_HIGH,
    VIRTIO_MMIO_SHM_BASE_LOW, VIRTIO_MMIO_SHM_LEN_HIGH, VIRTIO_MMIO_SHM_LEN_LOW,
    VIRTIO_MMIO_STATUS, VIRTIO_MMIO_VENDOR_ID, VIRTIO_MMIO_VERSION,
};
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::VirtioDevice;
use crate::bus::BusDevice;
use crate::GuestMemory;

/// "virt" read as a little-endian u32 (§4.2.2).
const MAGIC: u32 = 0x7472_6976;
/// The non-legacy register layout.
const VERSION: u32 = 2;
/// Drivers match on DeviceID alone; there is no vendor to name.
const VENDOR_ID: u32 = 0;
/// Device status bits a driver may write (§2.1).
const DRIVER_STATUS_BITS: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_DRIVER_OK
    | VIRTIO_CONFIG_S_FAILED;
/// Each status bit and the one the driver must have set before it (§3.1.1).
const STATUS_ORDER: [(u32, u32); 3] = [
    (VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_ACKNOWLEDGE),
    (VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_DRIVER),
    (VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK),
];

/// Start of the device configuration space in the window.
const CONFIG_START: u64 = VIRTIO_MMIO_CONFIG as u64;

/// The 32-bit half `sel` of a 64-bit feature word: MMIO shows features 32 bits at a time.
fn feature_half(features: u64, sel: u32) -> u32 {
    let shift = match sel {
        0 => 0,
        1 => 32,
        _ => return 0,
    };
    u32::try_from((features >> shift) & 0xffff_ffff).unwrap_or(0)
}

/// One virtio device behind the virtio-mmio register interface.
pub struct MmioTransport {
    mem: GuestMemory,
    device: Box<dyn VirtioDevice>,
    irq: EventFd,
    queues: Vec<Queue>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    interrupt_status: u32,
}

impl MmioTransport {
    /// Puts `device` behind a register window; `irq` is written to interrupt the guest
    /// (the VMM registers it as a KVM irqfd).
    pub fn new(mem: GuestMemory, device: Box<dyn VirtioDevice>, irq: EventFd) -> Self {
        // A size the virtqueue rules reject leaves the queue with QueueNumMax 0, which
        // drivers read as "not available" (§4.2.2).
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).unwrap_or_default())
            .collect();
        Self {
            mem,
            device,
            irq,
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            interrupt_status: 0,
        }
    }

    fn device_features(&self) -> u64 {
        self.device.features() | 1 << VIRTIO_F_VERSION_1
    }

    /// The driver finished initialisation and nothing has gone wrong since.
    fn is_active(&self) -> bool {
        let stop = VIRTIO_CONFIG_S_NEEDS_RESET | VIRTIO_CONFIG_S_FAILED;
        self.status & (VIRTIO_CONFIG_S_DRIVER_OK | stop) == VIRTIO_CONFIG_S_DRIVER_OK
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(usize::try_from(self.queue_sel).ok()?)
    }

    /// The selected queue, if the driver may configure it now: after FEATURES_OK and before
    /// DRIVER_OK (§3.1.1 step 7), and only while it is not ready (§4.2.3.2), except for
    /// QueueReady itself.
    fn queue_for_setup(&mut self, ready_register: bool) -> Option<&mut Queue> {
        let phase =
            VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED;
        if self.status & phase != VIRTIO_CONFIG_S_FEATURES_OK {
            return None;
        }
        let queue = self.queues.get_mut(usize::try_from(self.queue_sel).ok()?)?;
        (queue.max_size() > 0 && (ready_register || !queue.ready())).then_some(queue)
    }

    fn read_register(&self, offset: u32) -> u32 {
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => {
                feature_half(self.device_features(), self.device_features_sel)
            }
            VIRTIO_MMIO_QUEUE_NUM_MAX => {
                self.selected_queue().map_or(0, |q| u32::from(q.max_size()))
            }
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().is_some_and(|q| q.ready()).into(),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            // No shared memory regions: a length of -1 says the selected one does not exist.
            VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            // The configuration space never changes under the driver.
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(value),
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM => {
                if let (Some(queue), Ok(size)) = (self.queue_for_setup(false), u16::try_from(value))
                {
                    // An invalid size is ignored; is_valid() catches what remains at DRIVER_OK.
                    let _ = queue.try_set_size(size);
                }
            }
            VIRTIO_MMIO_QUEUE_READY => {
                if let (Some(queue), 0..=1) = (self.queue_for_setup(true), value) {
                    queue.set_ready(value == 1);
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW => {
                self.setup_address(|q| q.set_desc_table_address(Some(value), None))
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                self.setup_address(|q| q.set_desc_table_address(None, Some(value)))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => {
                self.setup_address(|q| q.set_avail_ring_address(Some(value), None))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                self.setup_address(|q| q.set_avail_ring_address(None, Some(value)))
            }
            VIRTIO_MMIO_QUEUE_USED_LOW => {
                self.setup_address(|q| q.set_used_ring_address(Some(value), None))
            }
            VIRTIO_MMIO_QUEUE_USED_HIGH => {
                self.setup_address(|q| q.set_used_ring_address(None, Some(value)))
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(value),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !value,
            VIRTIO_MMIO_STATUS => self.write_status(value),
            // Read-only registers, SHMSel (no regions) and unknown offsets.
            _ => {}
        }
    }

    // Misaligned ring addresses are ignored inside virtio-queue (§2.7 alignment rules).
    fn setup_address(&mut self, set: impl FnOnce(&mut Queue)) {
        if let Some(queue) = self.queue_for_setup(false) {
            set(queue);
        }
    }

    /// Feature negotiation happens between DRIVER and FEATURES_OK (§3.1.1 steps 4-5).
    fn write_driver_features(&mut self, value: u32) {
        let phase = VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_FAILED;
        if self.status & phase != VIRTIO_CONFIG_S_DRIVER {
            return;
        }
        let value = u64::from(value);
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value,
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | value << 32,
            _ => {}
        }
    }

    /// The driver may only accept offered features, and must accept VIRTIO_F_VERSION_1
    /// to use this non-legacy interface (§6.1).
    fn features_acceptable(&self) -> bool {
        let offered = self.device_features();
        self.driver_features & !offered == 0 && self.driver_features & 1 << VIRTIO_F_VERSION_1 != 0
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // DEVICE_NEEDS_RESET is the device's bit; drivers write back what they read.
        let requested = value & !VIRTIO_CONFIG_S_NEEDS_RESET;
        let current = self.status & !VIRTIO_CONFIG_S_NEEDS_RESET;
        // Only a reset clears bits (§2.1.1); unknown bits make the write meaningless.
        if requested & current != current || requested & !DRIVER_STATUS_BITS != 0 {
            return;
        }
        if requested & VIRTIO_CONFIG_S_FAILED != 0 {
            self.status |= VIRTIO_CONFIG_S_FAILED;
            return;
        }
        if STATUS_ORDER
            .iter()
            .any(|&(bit, before)| requested & bit != 0 && requested & before == 0)
        {
            return;
        }
        let added = requested & !current;
        let mut accepted = requested;
        // A rejected feature set is reported by not keeping FEATURES_OK (§3.1.1 step 6).
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 && !self.features_acceptable() {
            accepted &= !(VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
        }
        self.status = accepted | (self.status & VIRTIO_CONFIG_S_NEEDS_RESET);
        if accepted & added & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && !self.queues.iter().all(|q| q.is_valid(&self.mem))
        {
            self.set_needs_reset();
        }
    }

    /// Returns the device to its initial state (§2.4): status, interrupts and every queue.
    fn reset(&mut self) {
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.queues.iter_mut().for_each(Queue::reset);
    }

    fn set_needs_reset(&mut self) {
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        // §2.1.2: once DRIVER_OK is set, the driver hears about it as a config change.
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.signal(VIRTIO_MMIO_INT_CONFIG);
        }
    }

    /// Runs the device on queue `index` as if the driver had notified it: how host-side
    /// events (console input) reach the guest while no vCPU exits. Ignored, like a
    /// notification, until the driver is ready.
    pub fn run_queue(&mut self, index: u32) {
        self.notify(index);
    }

    /// QueueNotify (§4.2.3.3): the value is the queue index. The device runs right here, on
    /// the notifying vCPU's thread.
    fn notify(&mut self, value: u32) {
        if !self.is_active() {
            return;
        }
        let Some(index) = usize::try_from(value)
            .ok()
            .filter(|&i| i < self.queues.len())
        else {
            return;
        };
        let queue = &mut self.queues[index];
        match self.device.process_queue(index, queue, &self.mem) {
            Ok(true) => {
                if driver_wants_interrupt(queue, &self.mem) {
                    self.signal(VIRTIO_MMIO_INT_VRING);
                }
            }
            Ok(false) => {}
            Err(_) => self.set_needs_reset(),
        }
    }

    fn signal(&mut self, cause: u32) {
        self.interrupt_status |= cause;
        // Only fails if the counter would overflow, i.e. the irqfd consumer is gone; the
        // cause stays latched in InterruptStatus either way.
        let _ = self.irq.write(1);
    }
}

/// Whether the driver asked to be interrupted about used buffers: virtio-queue handles
/// VIRTIO_F_EVENT_IDX and orders our used-ring writes first; the VRING_AVAIL_F_NO_INTERRUPT
/// flag is checked here (§2.7.7.2).
fn driver_wants_interrupt(queue: &mut Queue, mem: &GuestMemory) -> bool {
    if !queue.needs_notification(mem).unwrap_or(true) {
        return false;
    }
    let flags = mem
        .load::<u16>(GuestAddress(queue.avail_ring()), Ordering::Acquire)
        .map_or(0, u16::from_le);
    u32::from(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match control_register(offset, data.len()) {
            Some(reg) => data.copy_from_slice(&self.read_register(reg).to_le_bytes()),
            None if offset >= CONFIG_START => self.device.read_config(offset - CONFIG_START, data),
            None => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (
            control_register(offset, data.len()),
            <[u8; 4]>::try_from(data),
        ) {
            (Some(reg), Ok(bytes)) => self.write_register(reg, u32::from_le_bytes(bytes)),
            _ if offset >= CONFIG_START => self.device.write_config(offset - CONFIG_START, data),
            _ => {}
        }
    }
}

/// The control register at `offset`, if the access is one the driver may make: 32 bits
/// wide and aligned (§4.2.2.2). Other accesses below the config space are ignored.
fn control_register(offset: u64, len: usize) -> Option<u32> {
    let reg = u32::try_from(offset)
        .ok()
        .filter(|&r| r < VIRTIO_MMIO_CONFIG)?;
    (len == 4 && reg % 4 == 0).then_some(reg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::tests::{guest_memory, used_elem, DATA_ADDR};
    use crate::virtio::{Console, ConsoleInput, DeviceError, InputPump, Rng};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    const FAKE_ID: u32 = 42;
    const FAKE_FEATURE: u32 = 1 << 3;
    const INIT_STATUS: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
        | VIRTIO_CONFIG_S_DRIVER
        | VIRTIO_CONFIG_S_FEATURES_OK
        | VIRTIO_CONFIG_S_DRIVER_OK;

    /// Records which queues it was asked to process and answers as told.
    struct Fake {
        notified: Arc<Mutex<Vec<usize>>>,
        fail: bool,
    }

    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            FAKE_ID
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn features(&self) -> u64 {
            u64::from(FAKE_FEATURE)
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, byte) in data.iter_mut().enumerate() {
                *byte = u8::try_from(offset).expect("small offset") + u8::try_from(i).expect("i");
            }
        }
        fn process_queue(
            &mut self,
            index: usize,
            _queue: &mut Queue,
            _mem: &GuestMemory,
        ) -> Result<bool, DeviceError> {
            self.notified.lock().expect("lock").push(index);
            match self.fail {
                true => Err(DeviceError::Queue(virtio_queue::Error::QueueNotReady)),
                false => Ok(true),
            }
        }
    }

    struct Harness {
        transport: MmioTransport,
        irq: EventFd,
        notified: Arc<Mutex<Vec<usize>>>,
    }

    impl Harness {
        fn new(mem: &GuestMemory, fail: bool) -> Self {
            let notified = Arc::new(Mutex::new(Vec::new()));
            let device = Fake {
                notified: notified.clone(),
                fail,
            };
            Self::with_device(mem, Box::new(device), notified)
        }

        fn with_device(
            mem: &GuestMemory,
            device: Box<dyn VirtioDevice>,
            notified: Arc<Mutex<Vec<usize>>>,
        ) -> Self {
            let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
            let transport = MmioTransport::new(mem.clone(), device, irq.try_clone().expect("fd"));
            Self {
                transport,
                irq,
                notified,
            }
        }

        fn read(&mut self, reg: u32) -> u32 {
            let mut data = [0xffu8; 4];
            self.transport.read(u64::from(reg), &mut data);
            u32::from_le_bytes(data)
        }

        fn write(&mut self, reg: u32, value: u32) {
            self.transport.write(u64::from(reg), &value.to_le_bytes());
        }

        fn add_status(&mut self, bit: u32) {
            let status = self.read(VIRTIO_MMIO_STATUS);
            self.write(VIRTIO_MMIO_STATUS, status | bit);
        }

        /// ACKNOWLEDGE, DRIVER, then accepts `features` and sets FEATURES_OK (§3.1.1).
        fn negotiate(&mut self, features: u64) {
            self.add_status(VIRTIO_CONFIG_S_ACKNOWLEDGE);
            self.add_status(VIRTIO_CONFIG_S_DRIVER);
            for sel in 0..2 {
                self.write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
                self.write(VIRTIO_MMIO_DRIVER_FEATURES, feature_half(features, sel));
            }
            self.add_status(VIRTIO_CONFIG_S_FEATURES_OK);
        }

        /// Points queue `index` at the rings of `vq` and marks it ready (§4.2.3.2).
        fn setup_queue(&mut self, index: u32, vq: &MockSplitQueue<GuestMemory>) {
            self.write(VIRTIO_MMIO_QUEUE_SEL, index);
            assert_eq!(self.read(VIRTIO_MMIO_QUEUE_READY), 0);
            assert!(self.read(VIRTIO_MMIO_QUEUE_NUM_MAX) >= 16);
            self.write(VIRTIO_MMIO_QUEUE_NUM, 16);
            let rings = [
                (VIRTIO_MMIO_QUEUE_DESC_LOW, vq.desc_table_addr()),
                (VIRTIO_MMIO_QUEUE_AVAIL_LOW, vq.avail_addr()),
                (VIRTIO_MMIO_QUEUE_USED_LOW, vq.used_addr()),
            ];
            for (low, addr) in rings {
                self.write(low, feature_half(addr.0, 0));
                self.write(low + 4, feature_half(addr.0, 1));
            }
            self.write(VIRTIO_MMIO_QUEUE_READY, 1);
        }

        /// The whole driver initialisation, with one mock queue per device queue.
        fn init(&mut self, vqs: &[MockSplitQueue<GuestMemory>]) {
            self.negotiate(1 << VIRTIO_F_VERSION_1);
            for (index, vq) in (0..).zip(vqs) {
                self.setup_queue(index, vq);
            }
            self.add_status(VIRTIO_CONFIG_S_DRIVER_OK);
        }

        fn interrupts(&self) -> u64 {
            self.irq.read().unwrap_or(0)
        }

        fn notified(&self) -> Vec<usize> {
            self.notified.lock().expect("lock").clone()
        }
    }

    fn mock_queues(mem: &GuestMemory) -> [MockSplitQueue<'_, GuestMemory>; 2] {
        [0x1_0000, 0x2_0000].map(|start| MockSplitQueue::create(mem, GuestAddress(start), 16))
    }

    #[test]
    fn identifies_as_a_version_2_device() {
        let mem = guest_memory();
        let mut h = Harness::new(&mem, false);

        assert_eq!(h.read(VIRTIO_MMIO_MAGIC_VALUE).to_le_bytes(), *b"virt");
        assert_eq!(h.read(VIRTIO_MMIO_VERSION), 2);
        assert_eq!(h.read(VIRTIO_MMIO_DEVICE_ID), FAKE_ID);
        assert_eq!(h.read(VIRTIO_MMIO_VENDOR_ID), 0);
        assert_eq!(h.read(VIRTIO_MMIO_STATUS), 0);
        assert_eq!(h.read(VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
        let features: Vec<u32> = (0..3)
            .map(|sel| {
                h.write(VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel);
                h.read(VIRTIO_MMIO_DEVICE_FEATURES)
            })
            .collect();
        // VIRTIO_F_VERSION_1 is bit 32: bit 0 of the high word.
        assert_eq!(features, [FAKE_FEATURE, 1, 0]);
    }

    #[test]
    fn driver_initialisation_activates_and_notify_runs_the_device() {
        let mem = guest_memory();
        let vqs = mock_queues(&mem);
        let mut h = Harness::new(&mem, false);
        h.write(VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        assert!(
            h.notified().is_empty(),
            "notify before DRIVER_OK must be ignored"
        );

        h.init(&vqs);

        assert_eq!(h.read(VIRTIO_MMIO_STATUS), INIT_STATUS);
        h.write(VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        h.write(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        h.write(VIRTIO_MMIO_QUEUE_NOTIFY, 2);
        assert_eq!(h.notified(), [1, 0]);
        assert_eq!(h.read(VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
        assert_eq!(h.interrupts(), 2);
    }

    #[test]
    fn interrupt_ack_clears_only_the_written_bits() {
        let mem = guest_memory();
        let vqs = mock_queues(&mem);
        let mut h = Harness::new(&mem, false);
        h.init(&vqs);
        h.write(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        h.transport.signal(VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(h.read(VIRTIO_MMIO_INTERRUPT_STATUS), 3);

        h.write(VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(h.read(VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
        h.write(VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(h.read(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn no_interrupt_flag_suppresses_the_used_buffer_interrupt() {
        let mem = guest_memory();
        let vqs = mock_queues(&mem);
        let mut h = Harness::new(&mem, false);
        h.init(&vqs);
        let flag = u16::try_from(VRING_AVAIL_F_NO_INTERRUPT).expect("flag");
        mem.store(flag.to_le(), vqs[0].avail_addr(), Ordering::Release)
            .expect("flags");

        h.write(VIRTIO_MMIO_QUEUE_NOTIFY, 0);

        assert_eq!(h.notified(), [0]);
        assert_eq!(h.read(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        assert_eq!(h.interrupts(), 0);
    }

    #[test]
    fn features_without_version_1_or_not_offered_are_refused() {
        let mem = guest_memory();
        let mut h = Harness::new(&mem, false);
        h.negotiate(u64::from(FAKE_FEATURE));
        let status = h.read(VIRTIO_MMIO_STATUS);
        assert_eq!(status & VIRTIO_CONFIG_S_FEATURES_OK, 0);

        h.write(VIRTIO_MMIO_STATUS, 0);
        h.negotiate(1 << VIRTIO_F_VERSION_1 | 1 << 5);
        assert_eq!(h.read(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);

        h.write(VIRTIO_MMIO_STATUS, 0);
        h.negotiate(1 << VIRTIO_F_VERSION_1 | u64::from(FAKE_FEATURE));
        assert_ne!(h.read(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        assert_eq!(
            h.transport.driver_features,
            1 << VIRTIO_F_VERSION_1 | u64::from(FAKE_FEATURE)
        );
    }

    #[test]
    fn status_bits_out_of_order_or_cleared_are_ignored() {
        let mem = guest_memory();
        let mut h = Harness::new(&mem, false);
        h.write(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_DRIVER);
        assert_eq!(h.read(VIRTIO_MMIO_STATUS), 0);
        h.add_status(VIRTIO_CONFIG_S_ACKNOWLEDGE);
        h.add_status(VIRTIO_CONFIG_S_DRIVER_OK);
        assert_eq!(h.read(VIRTIO_MMIO_STATUS), VIRTIO_CONFIG_S_ACKNOWLEDGE);
        h.add_status(VIRTIO_CONFIG_S_DRIVER);
        h.write(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        assert_eq!(
            h.read(VIRTIO_MMIO_STATUS),
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
        );
        h.add_status(VIRTIO_CONFIG_S_FAILED);
        assert_ne!(h.read(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FAILED, 0);
    }

    #[test]
    fn driver_ok_with_an_unusable_queue_needs_reset() {
        let mem = guest_memory();
        let vqs = mock_queues(&mem);
        let mut h = Harness::new(&mem, false);
        h.negotiate(1 << VIRTIO_F_VERSION_1);
        h.setup_queue(0, &vqs[0]);
        // Queue 1 is configured but never made ready.
        h.add_status(VIRTIO_CONFIG_S_DRIVER_OK);

        assert_eq!(
            h.read(VIRTIO_MMIO_STATUS),
            INIT_STATUS | VIRTIO_CONFIG_S_NEEDS_RESET
        );
        assert_eq!(h.read(VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
        h.write(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert!(h.notified().is_empty());
    }

    #[test]
    fn rings_outside_guest_memory_are_not_activated() {
        let mem = guest_memory();
        let vqs = mock_queues(&mem);
        let mut h = Harness::new(&mem, false);
        h.negotiate(1 << VIRTIO_F_VERSION_1);
        h.setup_queue(0, &vqs[0]);
        h.setup_queue(1, &vqs[1]);
        h.write(VIRTIO_MMIO_QUEUE_READY, 0);
        h.write(VIRTIO_MMIO_QUEUE_USED_HIGH, 0x10);
        h.write(VIRTIO_MMIO_QUEUE_READY, 1);
        h.add_status(VIRTIO_CONFIG_S_DRIVER_OK);

        assert_ne!(h.read(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    }

    #[test]
    fn device_error_sets_needs_reset_and_reset_recovers() {
        let mem = guest_memory();
        let vqs = mock_queues(&mem);
        let mut h = Harness::new(&mem, true);
        h.init(&vqs);

        h.write(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_ne!(h.read(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert_eq!(h.read(VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(h.interrupts(), 1);
        h.write(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(h.notified(), [0], "a device needing reset is not run again");

        h.write(VIRTIO_MMIO_STATUS, 0);
        assert_eq!(h.read(VIRTIO_MMIO_STATUS), 0);
        assert_eq!(h.read(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        h.write(VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(h.read(VIRTIO_MMIO_QUEUE_READY), 0);
        h.init(&vqs);
        assert_eq!(h.read(VIRTIO_MMIO_STATUS), INIT_STATUS);
    }

    #[test]
    fn queue_registers_follow_the_selector_and_the_phase() {
        let mem = guest_memory();
        let vqs = mock_queues(&mem);
        let mut h = Harness::new(&mem, false);
        h.write(VIRTIO_MMIO_QUEUE_SEL, 0);
        h.write(VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(
            h.read(VIRTIO_MMIO_QUEUE_READY),
            0,
            "queue setup before FEATURES_OK"
        );

        h.negotiate(1 << VIRTIO_F_VERSION_1);
        h.write(VIRTIO_MMIO_QUEUE_SEL, 7);
        assert_eq!(h.read(VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
        h.write(VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(h.read(VIRTIO_MMIO_QUEUE_READY), 0);
        h.write(VIRTIO_MMIO_QUEUE_SEL, 0);
        h.write(VIRTIO_MMIO_QUEUE_NUM, 3);
        assert_eq!(h.transport.queues[0].size(), 16, "not a power of two");
        h.write(VIRTIO_MMIO_QUEUE_NUM, 8);
        assert_eq!(h.transport.queues[0].size(), 8);
        h.setup_queue(0, &vqs[0]);
        h.write(VIRTIO_MMIO_QUEUE_NUM, 4);
        assert_eq!(h.transport.queues[0].size(), 16, "size change while ready");
        h.setup_queue(1, &vqs[1]);
        h.add_status(VIRTIO_CONFIG_S_DRIVER_OK);
        h.write(VIRTIO_MMIO_QUEUE_READY, 0);
        assert_eq!(
            h.read(VIRTIO_MMIO_QUEUE_READY),
            1,
            "queue change after DRIVER_OK"
        );
    }

    #[test]
    fn odd_sized_or_misaligned_register_accesses_are_ignored() {
        let mem = guest_memory();
        let mut h = Harness::new(&mem, false);
        let mut short = [0xffu8; 2];
        h.transport.read(0, &mut short);
        assert_eq!(short, [0, 0]);
        let mut misaligned = [0xffu8; 4];
        h.transport.read(2, &mut misaligned);
        assert_eq!(misaligned, [0; 4]);
        h.transport.write(u64::from(VIRTIO_MMIO_STATUS), &[1]);
        h.transport
            .write(u64::from(VIRTIO_MMIO_STATUS) + 1, &[1, 0, 0, 0]);
        h.transport
            .write(u64::from(VIRTIO_MMIO_STATUS), &[1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(h.read(VIRTIO_MMIO_STATUS), 0);
        assert_eq!(h.read(0xf0), 0);
    }

    #[test]
    fn config_space_is_forwarded_to_the_device() {
        let mem = guest_memory();
        let mut h = Harness::new(&mem, false);
        let mut data = [0u8; 2];
        h.transport.read(CONFIG_START + 5, &mut data);
        assert_eq!(data, [5, 6]);
        let mut byte = [0u8; 1];
        h.transport.read(CONFIG_START + 0x20, &mut byte);
        assert_eq!(byte, [0x20]);
    }

    #[test]
    fn rng_behind_the_transport_fills_a_buffer_and_interrupts() {
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let mut h = Harness::with_device(&mem, Box::new(Rng::new()), Arc::default());
        assert_eq!(h.read(VIRTIO_MMIO_DEVICE_ID), 4);
        h.init(std::slice::from_ref(&vq));
        assert_eq!(h.read(VIRTIO_MMIO_STATUS), INIT_STATUS);
        let flags = u16::try_from(VRING_DESC_F_WRITE).expect("flag");
        let buffer = RawDescriptor::from(Descriptor::new(DATA_ADDR, 32, flags, 0));
        vq.add_desc_chains(&[buffer], 0).expect("chain");

        h.write(VIRTIO_MMIO_QUEUE_NOTIFY, 0);

        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(used_elem(&vq, 0), (0, 32));
        assert_eq!(h.read(VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
        assert_eq!(h.interrupts(), 1);
    }

    /// Bytes of each console receive buffer in the test below: odd, so input splits.
    const RX_LEN: u32 = 7;
    /// The receive queue's used ring in that test. The mock's own used ring overlaps the
    /// second half of its avail ring, which this test wraps around many times.
    const RX_USED: u64 = 0x3_0000;

    /// What a driver does to hand receive buffer `index` to the device: a writable
    /// descriptor, put at avail position `pos`, then the avail index moved past it.
    fn post_rx(mem: &GuestMemory, vq: &MockSplitQueue<GuestMemory>, pos: u16, index: u16) {
        let flags = u16::try_from(VRING_DESC_F_WRITE).expect("flag");
        let addr = DATA_ADDR + 0x100 * u64::from(index);
        vq.desc_table()
            .store(
                index,
                RawDescriptor::from(Descriptor::new(addr, RX_LEN, flags, 0)),
            )
            .expect("descriptor");
        let avail = vq.avail_addr().0;
        let slot = GuestAddress(avail + 4 + 2 * u64::from(pos % 16));
        mem.write_obj(index.to_le(), slot).expect("avail slot");
        let idx = pos.wrapping_add(1).to_le();
        mem.store(idx, GuestAddress(avail + 2), Ordering::Release)
            .expect("avail idx");
    }

    fn rx_used_idx(mem: &GuestMemory) -> u16 {
        let idx: u16 = mem
            .load(GuestAddress(RX_USED + 2), Ordering::Acquire)
            .expect("used idx");
        u16::from_le(idx)
    }

    /// The (id, len) at used position `pos` of the receive queue.
    fn rx_used_elem(mem: &GuestMemory, pos: u16) -> (u32, u32) {
        let elem = RX_USED + 4 + 8 * u64::from(pos % 16);
        let id: u32 = mem.read_obj(GuestAddress(elem)).expect("id");
        let len: u32 = mem.read_obj(GuestAddress(elem + 4)).expect("len");
        (u32::from_le(id), u32::from_le(len))
    }

    fn notify(transport: &Mutex<MmioTransport>, queue: u32) {
        let value = queue.to_le_bytes();
        transport
            .lock()
            .expect("lock")
            .write(u64::from(VIRTIO_MMIO_QUEUE_NOTIFY), &value);
    }

    #[test]
    fn console_input_reaches_a_guest_that_does_not_exit_and_one_that_notifies() {
        let mem = guest_memory();
        let vqs = mock_queues(&mem);
        let rx = &vqs[0];
        let input = ConsoleInput::with_capacity(64);
        let writer = crate::host_writer::HostWriter::start(
            "test-console",
            Box::new(std::io::sink()),
            1 << 20,
            None,
        )
        .expect("writer");
        let console = Console::new(writer.sender(), input.clone());
        let mut h = Harness::with_device(&mem, Box::new(console), Arc::default());
        h.negotiate(1 << VIRTIO_F_VERSION_1);
        h.setup_queue(0, rx);
        h.write(VIRTIO_MMIO_QUEUE_READY, 0);
        h.write(VIRTIO_MMIO_QUEUE_USED_LOW, feature_half(RX_USED, 0));
        h.write(VIRTIO_MMIO_QUEUE_READY, 1);
        h.setup_queue(1, &vqs[1]);
        // The control queues; init opening the port is a PORT_OPEN message on the
        // control transmitq (id 0, event 6, value 1).
        let control =
            [0x4_0000, 0x5_0000].map(|start| MockSplitQueue::create(&mem, GuestAddress(start), 16));
        h.setup_queue(2, &control[0]);
        h.setup_queue(3, &control[1]);
        h.add_status(VIRTIO_CONFIG_S_DRIVER_OK);
        assert_eq!(h.read(VIRTIO_MMIO_STATUS), INIT_STATUS);
        let open = GuestAddress(DATA_ADDR + 0x8000);
        mem.write_slice(&[0, 0, 0, 0, 6, 0, 1, 0], open)
            .expect("message");
        control[1]
            .add_desc_chains(&[RawDescriptor::from(Descriptor::new(open.0, 8, 0, 0))], 0)
            .expect("chain");
        h.write(VIRTIO_MMIO_QUEUE_NOTIFY, 3);
        assert_eq!(h.interrupts(), 1, "the control buffer came back");
        let Harness { transport, irq, .. } = h;
        let transport = Arc::new(Mutex::new(transport));
        let mut pump = InputPump::new(input.clone());
        let device = transport.clone();
        pump.start(move || device.lock().expect("lock").run_queue(0))
            .expect("start");
        for index in 0..16 {
            post_rx(&mem, rx, index, index);
        }
        notify(&transport, 0);
        assert_eq!(rx_used_idx(&mem), 0, "nothing to deliver yet");
        let deadline = Instant::now() + Duration::from_secs(10);

        // The guest is busy elsewhere and never notifies: the io thread delivers.
        input.send(b"ping").expect("send");
        while rx_used_idx(&mem) == 0 {
            assert!(Instant::now() < deadline, "the io thread did not deliver");
            std::thread::yield_now();
        }
        assert_eq!(rx_used_elem(&mem, 0), (0, 4));
        // The io thread publishes the used entry, then signals: wait for the signal too.
        let signalled = loop {
            match irq.read() {
                Ok(count) => break count,
                Err(_) => {
                    assert!(Instant::now() < deadline, "no interrupt after the delivery");
                    std::thread::yield_now();
                }
            }
        };
        assert_eq!(signalled, 1);

        // A sender far ahead of the guest (the cap is 64 bytes) while the guest reposts
        // buffers and notifies, as Linux does: every byte arrives once, in order.
        let data: Vec<u8> = (0..20_000u32)
            .map(|i| u8::try_from(i % 251).expect("byte"))
            .collect();
        let sender = {
            let (input, data) = (input.clone(), data.clone());
            std::thread::spawn(move || data.chunks(37).try_for_each(|chunk| input.send(chunk)))
        };
        let mut received = b"ping".to_vec();
        let (mut seen, mut next_pos) = (1u16, 17u16);
        post_rx(&mem, rx, 16, 0);
        let expected = data.len() + 4;
        while received.len() < expected {
            assert!(
                Instant::now() < deadline,
                "stuck at {} bytes",
                received.len()
            );
            let used = rx_used_idx(&mem);
            if used == seen {
                std::thread::yield_now();
                continue;
            }
            while seen != used {
                let (id, len) = rx_used_elem(&mem, seen);
                assert!(len <= RX_LEN);
                let mut bytes = vec![0; usize::try_from(len).expect("len")];
                let addr = GuestAddress(DATA_ADDR + 0x100 * u64::from(id));
                mem.read_slice(&mut bytes, addr).expect("read");
                received.extend(bytes);
                post_rx(&mem, rx, next_pos, u16::try_from(id).expect("id"));
                next_pos = next_pos.wrapping_add(1);
                seen = seen.wrapping_add(1);
            }
            notify(&transport, 0);
        }

        sender.join().expect("join").expect("send");
        assert_eq!(&received[..4], b"ping");
        assert_eq!(received[4..], data[..]);
        assert!(irq.read().expect("interrupts") >= 1);
        drop(pump);
        assert_eq!(input.send(b"x"), Err(crate::virtio::InputError::Ended));
    }
}
