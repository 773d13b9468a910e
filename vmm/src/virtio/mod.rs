//! virtio-mmio transport (virtio spec 1.2 §4.2) and the virtio devices behind it.
//! The transport decodes registers and owns the queues; a device only knows its ID, features,
//! config space and how to consume a notified queue, so new devices never touch MMIO.

pub(crate) mod block;
mod console;
mod console_control;
mod console_input;
pub(crate) mod fs;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod mmio;
mod net;
mod rng;
pub(crate) mod worker;

pub use block::worker::DiskSetupError;
pub use block::{Block, BlockHashError, BlockHashes, CorruptionHook, DiskConfig, DiskError};
pub use console::Console;
pub(crate) use console::{
    RECEIVE_QUEUE as CONSOLE_RECEIVE_QUEUE, TRANSMIT_QUEUE as CONSOLE_TRANSMIT_QUEUE,
    WORKER_QUEUES as CONSOLE_WORKER_QUEUES,
};
pub use console_control::PORT_NAME as CONSOLE_PORT_NAME;
pub(crate) use console_input::InputPump;
pub use console_input::{ConsoleInput, InputError};
pub use fs::{is_valid_tag, FsShareConfig, ShareSetupError, MAX_TAG_LEN};
pub use mmio::MmioTransport;
pub(crate) use net::{Net, NET_RX_QUEUE, NET_TX_QUEUE};
pub use rng::Rng;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};

use crate::GuestMemory;

/// Errors a device reports while consuming a queue; the transport answers them by setting
/// DEVICE_NEEDS_RESET (virtio 1.2 §2.1.2).
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The driver's rings could not be read or written (bad index, address outside memory).
    #[error("virtqueue access failed")]
    Queue(#[from] virtio_queue::Error),
    /// The host's entropy source failed.
    #[error("host entropy source failed")]
    Entropy(#[source] getrandom::Error),
}

/// A virtio device as the transport sees it.
pub trait VirtioDevice: Send {
    /// Virtio device ID (virtio 1.2 §5), which the guest driver binds to.
    fn device_type(&self) -> u32;

    /// Maximum size of each queue, in queue-index order; the length is the number of queues.
    /// Sizes must be powers of two (§2.7); a queue with an invalid size is never offered.
    fn queue_max_sizes(&self) -> &[u16];

    /// Device-specific feature bits; the transport adds VIRTIO_F_VERSION_1 itself.
    fn features(&self) -> u64 {
        0
    }

    /// Reads `data.len()` bytes of the device configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device configuration space; devices without writable fields ignore it.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    /// Handles the driver's notification of queue `index` (always below the number of
    /// queues): consumes what the driver made available and returns whether any buffer was
    /// put in the used ring, in which case the transport interrupts the driver once.
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<bool, DeviceError>;
}

/// Hands each available chain of `queue` to `handle`, puts it in the used ring with the
/// length `handle` returns (bytes the device wrote into it, §2.7.8), and reports whether
/// any chain was used.
///
/// At most one queue's worth of chains is taken per call: those were made available before
/// the notification we are serving, and any later chain comes with its own notification,
/// so a driver refilling the ring from another vCPU cannot keep this one here forever.
fn drain_queue<'m, F>(
    queue: &mut Queue,
    mem: &'m GuestMemory,
    mut handle: F,
) -> Result<bool, DeviceError>
where
    F: FnMut(DescriptorChain<&'m GuestMemory>) -> Result<u32, DeviceError>,
{
    let mut used = false;
    for _ in 0..queue.size() {
        let Some(chain) = queue.iter(mem)?.next() else {
            break;
        };
        let head = chain.head_index();
        let len = handle(chain)?;
        queue.add_used(mem, head, len)?;
        used = true;
    }
    Ok(used)
}

/// Reads `data.len()` bytes of a device's config space `config` at `offset`; bytes past
/// its end read as zero (fields of features the device does not offer).
fn read_config_space(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

/// [`drain_queue`] for devices whose chains cost host I/O: `handle` returns the used
/// length and the chain's cost (bytes moved), and once `budget` is spent the run stops
/// with `more` set, so the device's worker comes back after unlocking the transport (the
/// guest's interrupt handler needs it meanwhile).
fn drain_queue_budgeted<'m, F>(
    queue: &mut Queue,
    mem: &'m GuestMemory,
    budget: u64,
    more: &std::sync::atomic::AtomicBool,
    mut handle: F,
) -> Result<bool, DeviceError>
where
    F: FnMut(DescriptorChain<&'m GuestMemory>) -> (u32, u64),
{
    let mut used = false;
    let mut work = 0u64;
    for _ in 0..queue.size() {
        if work >= budget {
            more.store(true, std::sync::atomic::Ordering::Release);
            break;
        }
        let Some(chain) = queue.iter(mem)?.next() else {
            break;
        };
        let head = chain.head_index();
        let (len, cost) = handle(chain);
        work = work.saturating_add(cost);
        queue.add_used(mem, head, len)?;
        used = true;
    }
    Ok(used)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    /// Where tests put buffer contents, clear of the mock rings at the bottom of memory.
    pub(crate) const DATA_ADDR: u64 = 0x10_0000;

    /// 4 MiB of guest memory starting at 0.
    pub(crate) fn guest_memory() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("guest memory")
    }

    /// The (head index, length) the device put at position `index` of the used ring.
    pub(crate) fn used_elem(vq: &MockSplitQueue<GuestMemory>, index: usize) -> (u32, u32) {
        let elem = vq.used().ring().ref_at(index).expect("used element").load();
        (elem.id(), elem.len())
    }

    #[test]
    fn drain_takes_every_chain_and_records_lengths() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = vq.create_queue().expect("queue");
        let descs: Vec<_> = (0..3u16)
            .map(|i| RawDescriptor::from(Descriptor::new(DATA_ADDR, 8, 0, i)))
            .collect();
        vq.add_desc_chains(&descs, 0).expect("chains");
        let mut seen = Vec::new();

        let used = drain_queue(&mut queue, &mem, |chain| {
            seen.push(chain.head_index());
            Ok(u32::from(chain.head_index()) + 10)
        });

        assert!(used.expect("drain"));
        assert_eq!(seen, [0, 1, 2]);
        assert_eq!(used_elem(&vq, 2), (2, 12));
        assert!(!drain_queue(&mut queue, &mem, |_| Ok(0)).expect("drain"));
    }

    #[test]
    fn drain_rejects_an_avail_index_beyond_the_queue() {
        let mem = guest_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = vq.create_queue().expect("queue");
        vq.avail().idx().store(17);

        let result = drain_queue(&mut queue, &mem, |_| Ok(0));

        assert!(matches!(result, Err(DeviceError::Queue(_))));
    }
}
