//! `cargo xtask lab`: real KVM inside QEMU software emulation.

/// Options of `lab`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs a lab command.
pub fn run(_args: &Args) -> anyhow::Result<()> {
    anyhow::bail!("lab is not implemented yet")
}
