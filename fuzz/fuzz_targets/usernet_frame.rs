//! Guest Ethernet frames into the user-mode network: the classifier that decides what is
//! dropped, passed to smoltcp or treated as a connection attempt, then the stack itself and
//! the DNS relay's choice of resolver, all without host sockets. The input is a sequence of
//! frames, each preceded by its length (u16 LE).

#![no_main]

use katalite_fuzz::input::Input;
use libfuzzer_sys::fuzz_target;
use vmm::net::usernet::fuzzing::{Class, GuestSide};
use vmm::net::MAX_FRAME_LEN;

fuzz_target!(|data: &[u8]| {
    let mut net = GuestSide::new();
    let mut input = Input::new(data);
    while let Some(frame) = input.bytes() {
        // The NIC never hands on more than one MTU-sized frame.
        let frame = &frame[..frame.len().min(MAX_FRAME_LEN)];
        if net.send(frame) == Class::Syn {
            // A SYN is answered right away, without waiting for the stack.
            let (out, _) = net.poll();
            assert!(!out.is_empty(), "a refused SYN got no reset");
        }
    }
    let (out, _) = net.poll();
    for frame in out {
        assert!(
            frame.len() <= MAX_FRAME_LEN,
            "a {}-byte frame for the guest",
            frame.len()
        );
    }
});
