//! `katalite run`: the command line's checks, the bench's `--write-initramfs`, then the
//! container lifecycle (`lifecycle::supervise`), which boots through `boot`.

use std::io::Read;

use anyhow::{bail, Context, Result};
use vmm::InitramfsPart;

use crate::boot::{boot_images, container_id, padded_concat, read_env_files};
use crate::cli::RunArgs;
use crate::guest_root::GuestRoot;
use crate::lifecycle::supervise;
use crate::{terminal, volumes};

/// Docker's CLI status for a usage problem it finds itself (`the input device is not a TTY`).
const EXIT_CLI_ERROR: u8 = 1;

/// Runs the workload and returns the exit code `katalite` should exit with.
pub fn run(args: &RunArgs) -> Result<u8> {
    if args.detach {
        return supervise::launch(args);
    }
    if args.tty && args.interactive && !terminal::stdin_is_terminal() {
        eprintln!("katalite: the input device is not a TTY");
        return Ok(EXIT_CLI_ERROR);
    }
    if let Some(path) = &args.write_initramfs {
        if volumes::specs(args).next().is_some() {
            bail!("--write-initramfs cannot be combined with -v, --mount or --tmpfs");
        }
        let env_files = read_env_files(&args.env_file)?;
        let (root, run_archive, _) = boot_images(args, env_files, &container_id()?, Vec::new())?;
        let GuestRoot::Archive(rootfs) = root else {
            bail!("--write-initramfs needs an initramfs root");
        };
        let rootfs = match rootfs {
            InitramfsPart::Bytes(bytes) => bytes,
            InitramfsPart::File(mut file) => {
                let mut bytes = Vec::new();
                file.read_to_end(&mut bytes)
                    .context("cannot read the packed image")?;
                bytes
            }
        };
        std::fs::write(path, padded_concat(&[&rootfs, &run_archive]))
            .with_context(|| format!("cannot write {}", path.display()))?;
        return Ok(0);
    }
    supervise::foreground(args)
}
