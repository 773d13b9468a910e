//! The guest's NIC as a VM assembles it: a virtio-net device on a fresh link, the
//! ioeventfds through which KVM hands the guest's queue notifications straight to the
//! `katalite-net` thread (no exit to the VMM), and the pump that runs the backend once the
//! device sits behind its transport.

use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use kvm_ioctls::{IoEventAddress, VmFd};
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Link, NetConfig, NetPump, LINK_QUEUE_FRAMES};
use crate::virtio::{MmioTransport, Net, NET_RX_QUEUE, NET_TX_QUEUE};

/// The device for `config`, whose virtio-mmio window starts at `window`, and the pump to
/// start once the device is placed behind a transport.
pub(crate) fn build(vm: &VmFd, window: u64, config: NetConfig) -> io::Result<(Box<Net>, NetPump)> {
    let link = Arc::new(Link::new(LINK_QUEUE_FRAMES)?);
    let notify = notify_eventfds(vm, window)?;
    let device = Box::new(Net::new(config.mac, link.clone()));
    Ok((device, NetPump::new(link, config.backend, notify)))
}

/// What the pump calls to run one of the device's queues: lock its transport and run it
/// as if the driver had notified it.
pub(crate) fn run_queue(transport: Arc<Mutex<MmioTransport>>) -> impl FnMut(u32) + Send {
    move |queue| {
        transport
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .run_queue(queue);
    }
}

/// One eventfd per queue, signalled by KVM when the guest writes that queue's index to
/// QueueNotify: a 32-bit write (virtio 1.2 §4.2.3.3), matched on its value.
fn notify_eventfds(vm: &VmFd, window: u64) -> io::Result<Vec<(EventFd, u32)>> {
    let notify = IoEventAddress::Mmio(window + u64::from(VIRTIO_MMIO_QUEUE_NOTIFY));
    [NET_RX_QUEUE, NET_TX_QUEUE]
        .into_iter()
        .map(|queue| {
            let evt = EventFd::new(EFD_NONBLOCK)?;
            vm.register_ioevent(&evt, &notify, queue)?;
            Ok((evt, queue))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_ioctls::Kvm;

    #[test]
    fn each_queue_gets_its_own_notify_ioeventfd() {
        // Like the tiny-guest tests: only where this host has a /dev/kvm.
        let Ok(kvm) = Kvm::new() else {
            return;
        };
        let vm = kvm.create_vm().expect("vm");

        let notify = notify_eventfds(&vm, 0xd000_2000).expect("ioeventfds");

        let queues: Vec<u32> = notify.iter().map(|(_, queue)| *queue).collect();
        assert_eq!(queues, [NET_RX_QUEUE, NET_TX_QUEUE]);
        // The same address and value twice is refused: the datamatch tells them apart.
        assert!(notify_eventfds(&vm, 0xd000_2000).is_err());
        assert!(notify_eventfds(&vm, 0xd000_3000).is_ok());
    }
}
