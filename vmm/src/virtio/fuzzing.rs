//! The devices the VMM builds only while it sets up a VM, made here without KVM or worker
//! threads for the fuzz targets in `fuzz/` (feature `fuzzing`, never in a release build):
//! a target puts them behind an [`MmioTransport`](super::MmioTransport) and drives it as a
//! hostile driver. [`Rng`](super::Rng) and [`Block`](super::Block) are public already.

use std::io;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use super::{Console, ConsoleInput, Net, VirtioDevice};
use crate::host_writer::HostWriter;
use crate::net::{lock, Link, LINK_QUEUE_FRAMES};

/// The console's receiveq0 (host to guest).
pub const CONSOLE_RX_QUEUE: u32 = super::CONSOLE_RECEIVE_QUEUE;
/// The console's transmitq0 (guest to host).
pub const CONSOLE_TX_QUEUE: u32 = super::CONSOLE_TRANSMIT_QUEUE;
/// The console's queues in the order its worker runs them when woken (control transmitq,
/// control receiveq, receiveq0, transmitq0).
pub const CONSOLE_WORKER_QUEUES: [u32; 4] = super::CONSOLE_WORKER_QUEUES;
/// The NIC's receiveq1 (frames to the guest).
pub const NET_RX_QUEUE: u32 = super::NET_RX_QUEUE;
/// The NIC's transmitq1 (frames from the guest).
pub const NET_TX_QUEUE: u32 = super::NET_TX_QUEUE;

/// Bytes of guest output the console's writer holds: small, so that a fuzz input fills
/// it and reaches the device's backpressure path.
const CONSOLE_OUTPUT_CAPACITY: usize = 16 * 1024;

/// A virtio-fs device sharing `root` (a directory the caller owns and throws away), with
/// the policy every share gets.
pub fn fs(root: &Path, read_only: bool) -> io::Result<Box<dyn VirtioDevice>> {
    Ok(Box::new(super::fs::Fs::for_fuzzing(root, read_only)?))
}

/// A virtio-console device whose input comes from `input`; its output goes to one writer
/// thread per process, which discards it (a thread per device would cost more than the
/// device's work).
pub fn console(input: ConsoleInput) -> io::Result<Box<dyn VirtioDevice>> {
    static WRITER: OnceLock<HostWriter> = OnceLock::new();
    let writer = match WRITER.get() {
        Some(writer) => writer,
        None => {
            let writer = HostWriter::start(
                "fuzz-console",
                Box::new(io::sink()),
                CONSOLE_OUTPUT_CAPACITY,
                None,
            )?;
            WRITER.get_or_init(|| writer)
        }
    };
    Ok(Box::new(Console::new(writer.sender(), input)))
}

/// The network thread's end of a virtio-net device's link, which the fuzz target plays.
pub struct NetWire {
    link: Arc<Link>,
}

impl NetWire {
    /// Queues `frame` for the guest, as a backend's frame; false when the queue is full.
    pub fn to_guest(&self, frame: Vec<u8>) -> bool {
        lock(&self.link.rx).push(frame)
    }

    /// Takes every frame the guest sent; returns their sizes.
    pub fn from_guest(&self) -> Vec<usize> {
        let (frames, _rerun) = lock(&self.link.tx).take_all();
        frames.iter().map(Vec::len).collect()
    }
}

/// A virtio-net device with `mac` and the other end of its link.
pub fn net(mac: [u8; 6]) -> io::Result<(Box<dyn VirtioDevice>, NetWire)> {
    let link = Arc::new(Link::new(LINK_QUEUE_FRAMES)?);
    let device = Box::new(Net::new(mac, link.clone()));
    Ok((device, NetWire { link }))
}
