//! `cargo xtask build-guest`: the guest kernel and init.

/// Options of `build-guest`.
#[derive(clap::Args)]
pub struct Args {}

/// Builds the guest artifacts.
pub fn run(_args: &Args) -> anyhow::Result<()> {
    anyhow::bail!("build-guest is not implemented yet")
}
