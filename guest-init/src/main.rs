//! katalite-init: PID 1 in the guest.

fn main() {}
