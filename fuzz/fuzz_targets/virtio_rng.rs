//! virtio-rng behind the virtio-mmio transport, driven by a hostile driver program (see
//! `katalite_fuzz::driver`): register accesses in any order, rings and descriptors
//! pointing anywhere.

#![no_main]

use katalite_fuzz::driver::Driver;
use libfuzzer_sys::fuzz_target;
use vmm::virtio::Rng;

fuzz_target!(|data: &[u8]| {
    let mut driver = Driver::new(Box::new(Rng::new()));
    driver.run(data, |_, _| {});
});
