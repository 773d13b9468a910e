//! virtio-console behind the virtio-mmio transport, driven by a hostile driver program
//! (see `katalite_fuzz::driver`); its extra op queues host input and delivers it, as the
//! `katalite-io` thread does.

#![no_main]

use katalite_fuzz::driver::Driver;
use libfuzzer_sys::fuzz_target;
use vmm::virtio::fuzzing::{console, CONSOLE_RX_QUEUE};
use vmm::virtio::ConsoleInput;

/// More than any input can send, so that `send` never waits for the guest.
const INPUT_CAPACITY: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let input = ConsoleInput::with_capacity(INPUT_CAPACITY);
    let mut driver = Driver::new(console(input.clone()).expect("console"));
    driver.run(data, |driver, bytes| {
        input.send(bytes).expect("input open");
        driver.transport.run_queue(CONSOLE_RX_QUEUE);
    });
});
