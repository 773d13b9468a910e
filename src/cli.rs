//! The command-line interface of `katalite` (clap). Parsing only; no behaviour.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use imagebuilder::source::PullPolicy;

use crate::image_cmds::{FetchArgs, ImagesArgs, PullArgs, RmiArgs};

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
    /// Pull an image into the local cache.
    Pull(PullArgs),
    /// List cached images and the cache's disk usage.
    Images(ImagesArgs),
    /// Remove cached images (and the blobs no other image uses).
    Rmi(RmiArgs),
}

/// `katalite run [OPTIONS] IMAGE [COMMAND] [ARG...]`, or `--rootfs DIR [COMMAND]...`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Boot this host directory as the root filesystem instead of an image.
    #[arg(long, value_name = "DIR")]
    pub rootfs: Option<PathBuf>,

    /// When to pull the image: always, missing, never.
    #[arg(long, value_name = "POLICY", default_value = "missing")]
    pub pull: PullPolicy,

    /// Overwrite the image's entrypoint (an empty string clears it).
    #[arg(long, value_name = "COMMAND")]
    pub entrypoint: Option<String>,

    #[command(flatten)]
    pub fetch: FetchArgs,

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

    /// Working directory of the workload inside the guest (default: the image's).
    #[arg(short = 'w', long, value_name = "DIR")]
    pub workdir: Option<String>,

    /// Hostname of the guest.
    #[arg(long, default_value = "katalite")]
    pub hostname: String,

    /// Show the guest kernel's log (serial console) on stderr.
    #[arg(long)]
    pub kernel_log: bool,

    /// The image (unless --rootfs is given), then the command and its arguments
    /// (default: the image's entrypoint and command).
    #[arg(value_name = "IMAGE [COMMAND] [ARG...]", trailing_var_arg = true)]
    pub image_and_command: Vec<String>,
}

impl RunArgs {
    /// The image reference, or `None` when booting `--rootfs`.
    pub fn image(&self) -> Option<&str> {
        match self.rootfs {
            Some(_) => None,
            None => self.image_and_command.first().map(String::as_str),
        }
    }

    /// The command-line command (may be empty: the image's defaults apply).
    pub fn command(&self) -> &[String] {
        let skip = usize::from(self.rootfs.is_none()).min(self.image_and_command.len());
        &self.image_and_command[skip..]
    }
}
