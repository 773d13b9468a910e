//! The host<->guest contract of katalite, plus (behind the `init` feature) the PID-1
//! program that reads it. The host writes one [`RunConfig`] into the initramfs; init reads
//! it, runs the workload, and reports the exit status through the status port.

pub mod channel;
pub mod contract;

/// What `katalite-init --version` prints. katalite's build script finds this text in the
/// init it embeds, so `katalite --version` names the init's version from the binary itself;
/// the newline is part of it because string constants sit back to back in the binary.
pub const INIT_VERSION: &str = concat!("katalite-init version ", env!("CARGO_PKG_VERSION"), "\n");

pub use contract::{
    is_disk_name, is_valid_tag, ExecConfig, GuestStatus, Ipv6Config, MountConfig, MountConfigError,
    MountKind, NetworkConfig, RunConfig, TmpfsMount, VirtioFsMount, CONFIG_PATH, INIT_PATH,
    MAX_TAG_LEN, STATUS_PORT,
};
