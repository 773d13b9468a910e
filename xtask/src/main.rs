//! `cargo xtask`: the developer commands of katalite (guest build, lab, CI).

mod bench;
mod build_guest;
mod ci;
mod dist;
mod fuzz;
mod images;
mod lab;
mod registry;
mod user_cache;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "katalite developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the guest kernel (vmlinux) and the static init into target/guest/.
    BuildGuest(build_guest::Args),
    /// Boot the lab (real KVM inside QEMU software emulation) and run commands there.
    Lab(lab::Args),
    /// Run every gate and test, as CI does (installs what it needs on Debian).
    Ci(ci::Args),
    /// Build the guest and the static release katalite with it embedded.
    Dist(dist::Args),
    /// Build the fuzz targets (libFuzzer, stable Rust) and run each for a while.
    Fuzz(fuzz::Args),
    /// Build the OCI test images (busybox, multi-layer nginx) from Debian packages, cached.
    Images(images::Args),
    /// Start or stop the local test registry (docker-registry) serving the test images.
    Registry(registry::Args),
    /// Measure katalite beside QEMU microvm in the lab; writes target/bench/latest.json.
    Bench(bench::Args),
    /// For `bench`: build one image's EROFS disk image and print the time and peak RSS.
    #[command(hide = true)]
    BenchErofsBuild(bench::ErofsBuildArgs),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::BuildGuest(args) => build_guest::run(&args),
        Command::Lab(args) => lab::run(&args),
        Command::Ci(args) => ci::run(&args),
        Command::Dist(args) => dist::run(&args),
        Command::Fuzz(args) => fuzz::run(&args),
        Command::Images(args) => images::run(&args),
        Command::Registry(args) => registry::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::BenchErofsBuild(args) => bench::erofs_build(&args),
    }
}
