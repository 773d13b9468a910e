//! virtio-console behind the virtio-mmio transport, driven by a hostile driver program
//! (see `katalite_fuzz::driver`) on its four queues (receiveq0, transmitq0 and the control
//! queues of VIRTIO_CONSOLE_F_MULTIPORT); its extra op queues host input and then runs
//! every queue in the worker's order, as the `katalite-cons` thread does when woken (so
//! control replies and input held for a closed port reach the guest).

#![no_main]

use katalite_fuzz::driver::Driver;
use libfuzzer_sys::fuzz_target;
use vmm::virtio::fuzzing::{console, CONSOLE_WORKER_QUEUES};
use vmm::virtio::ConsoleInput;

/// More than any input can send, so that `send` never waits for the guest.
const INPUT_CAPACITY: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let input = ConsoleInput::with_capacity(INPUT_CAPACITY);
    let mut driver = Driver::new(console(input.clone()).expect("console"));
    driver.run(data, |driver, bytes| {
        input.send(bytes).expect("input open");
        for queue in CONSOLE_WORKER_QUEUES {
            driver.transport.run_queue(queue);
        }
    });
});
