//! Guest networking behind the virtio-net device: the [`NetBackend`] seam between the device
//! and a network, the `katalite-net` thread that runs a backend, and the two backends: the
//! built-in user-mode network ([`usernet::UserNet`], no privileges needed) and an existing
//! TAP device ([`Tap`], for root users who want line rate).

mod link;
pub(crate) mod nic;
mod packet;
mod pump;
mod tap;
pub mod usernet;

use std::os::fd::RawFd;
use std::time::Duration;

pub(crate) use link::{lock, FrameQueue, Link, LINK_QUEUE_FRAMES};
/// The packet backend's frame rework, for the `packet_frames` fuzz target.
#[cfg(feature = "fuzzing")]
pub use packet::wire_frames;
pub use packet::PacketSocket;
pub(crate) use pump::NetPump;
pub use tap::{Tap, TapError};

/// Largest Ethernet frame either direction carries: the 1500-byte MTU the device announces
/// (VIRTIO_NET_F_MTU), the 14-byte header and room for one 802.1Q tag.
pub const MAX_FRAME_LEN: usize = 1518;

/// A network the guest's NIC is plugged into. The `katalite-net` thread owns it for the
/// VM's life and drops it when the VM ends, which must release everything it holds.
///
/// The thread waits on [`ready_fd`](Self::ready_fd) (edge-triggered) and on its own wake
/// eventfd; after every wake-up, whatever caused it, it hands over the guest's frames
/// ([`send`](Self::send)), calls [`poll`](Self::poll), then takes frames for the guest with
/// [`recv`](Self::recv) while the device has room for them. A backend therefore never
/// needs a second edge for work it has left pending.
pub trait NetBackend: Send {
    /// A descriptor that becomes readable when the backend has work.
    fn ready_fd(&self) -> RawFd;

    /// Takes one Ethernet frame the guest sent (without the virtio-net header).
    fn send(&mut self, frame: &[u8]);

    /// Does the work that is due (host readiness, timers) and returns how long the thread
    /// may sleep before the next call when nothing becomes ready (`None`: indefinitely).
    fn poll(&mut self) -> Option<Duration>;

    /// The next Ethernet frame for the guest, if one is waiting. Only called while the
    /// device can take it, so a backend that holds frames back holds them bounded.
    fn recv(&mut self) -> Option<Vec<u8>>;
}

/// The guest's network interface: a virtio-net device with this MAC on this backend.
pub struct NetConfig {
    /// The guest NIC's MAC address (VIRTIO_NET_F_MAC).
    pub mac: [u8; 6],
    /// Where its frames go.
    pub backend: Box<dyn NetBackend>,
}
