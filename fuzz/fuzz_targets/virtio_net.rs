//! virtio-net behind the virtio-mmio transport, driven by a hostile driver program (see
//! `katalite_fuzz::driver`). The fuzz target plays the network thread: its extra op hands
//! the guest a frame (or, empty, takes what the guest sent) and runs the queue as the
//! thread does.

#![no_main]

use katalite_fuzz::driver::Driver;
use libfuzzer_sys::fuzz_target;
use vmm::virtio::fuzzing::{net, NET_RX_QUEUE, NET_TX_QUEUE};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

fuzz_target!(|data: &[u8]| {
    let (device, wire) = net(MAC).expect("net device");
    let mut driver = Driver::new(device);
    driver.run(data, |driver, frame| {
        if frame.is_empty() {
            let _ = wire.from_guest();
            driver.transport.run_queue(NET_TX_QUEUE);
        } else {
            wire.to_guest(frame.to_vec());
            driver.transport.run_queue(NET_RX_QUEUE);
        }
    });
    for len in wire.from_guest() {
        // Frames reach the network without the virtio-net header and never above MTU.
        assert!(
            len <= vmm::net::MAX_FRAME_LEN,
            "a {len}-byte frame left the NIC"
        );
    }
});
