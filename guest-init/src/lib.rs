//! The host<->guest contract of katalite, plus (behind the `init` feature) the PID-1
//! program that reads it. The host writes one [`RunConfig`] into the initramfs; init reads
//! it, runs the workload, and reports the exit status through the status port.

pub mod channel;
pub mod contract;

pub use contract::{
    ExecConfig, GuestStatus, NetworkConfig, RunConfig, CONFIG_PATH, INIT_PATH, STATUS_PORT,
};
