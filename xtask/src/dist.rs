//! `cargo xtask dist`: the guest, then the static release `katalite` with it embedded —
//! the one artifact a user copies to a KVM host.

use anyhow::Result;

use crate::ci::{static_release_build, workspace_root, xtask, MUSL_TARGET};

/// Options of `dist` (none yet).
#[derive(clap::Args)]
pub struct Args {}

/// Builds the guest and the release binary, and prints where it is.
pub fn run(_args: &Args) -> Result<()> {
    let root = workspace_root()?;
    xtask(&root, &["build-guest"])?;
    static_release_build(&root)?;
    println!(
        "dist: {}",
        root.join("target")
            .join(MUSL_TARGET)
            .join("release/katalite")
            .display()
    );
    Ok(())
}
