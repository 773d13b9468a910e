//! The command-line interface of `katalite` (clap). Parsing only; no behaviour.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// VM-isolated containers from one static binary.
#[derive(Parser, Debug)]
#[command(name = "katalite", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The katalite commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a command in a new micro-VM and return its exit code.
    Run(RunArgs),
}

/// `katalite run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Boot this host directory as the root filesystem (packed into the initramfs).
    #[arg(long, value_name = "DIR")]
    pub rootfs: PathBuf,

    /// Number of virtual CPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=32))]
    pub cpus: u8,

    /// Guest memory in MiB.
    #[arg(short = 'm', long, value_name = "MIB", default_value_t = 512,
          value_parser = clap::value_parser!(u64).range(64..=1024 * 1024))]
    pub memory: u64,

    /// Boot this uncompressed vmlinux instead of the built-in kernel (required on PVM hosts).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,

    /// Set an environment variable in the workload (NAME=value).
    #[arg(short = 'e', long = "env", value_name = "NAME=VALUE")]
    pub env: Vec<String>,

    /// Working directory of the workload inside the guest.
    #[arg(short = 'w', long, value_name = "DIR", default_value = "/")]
    pub workdir: String,

    /// Hostname of the guest.
    #[arg(long, default_value = "katalite")]
    pub hostname: String,

    /// Show the guest kernel's log (serial console) on stderr.
    #[arg(long)]
    pub kernel_log: bool,

    /// The command and its arguments.
    #[arg(required = true, last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}
