//! What an engine's interface hands the packet backend (a virtio-net header from the
//! kernel, then a frame from the network) made into wire frames for the guest: checksums
//! finished, TCP super-frames segmented. Any input: no panic, and no frame for the guest
//! larger than what came in.

#![no_main]

use std::collections::VecDeque;

use libfuzzer_sys::fuzz_target;
use vmm::net::wire_frames;

fuzz_target!(|data: &[u8]| {
    let mut out = VecDeque::new();
    wire_frames(data, &mut out);
    for frame in out {
        assert!(
            frame.len() <= data.len(),
            "a {}-byte frame from {} bytes",
            frame.len(),
            data.len()
        );
    }
});
