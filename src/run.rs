//! `katalite run`: pack the root filesystem and the per-run init archive, boot the VM,
//! and turn how it ended into Docker's exit codes.

use std::io::{self, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use guest_init::{GuestStatus, RunConfig, CONFIG_PATH, INIT_PATH};
use imagebuilder::{CpioWriter, Entry, EntryKind};
use vmm::host::KvmKind;
use vmm::{VmConfig, VmExit};

use crate::cli::RunArgs;
use crate::embedded;

/// Kernel arguments of every katalite guest: our init, and no spurious-IRQ accounting (the
/// console's used-buffer interrupts often find nothing left to do, which is expected).
const GUEST_CMDLINE: &str = "noirqdebug rdinit=/.katalite/init";
/// Console verbosity: only errors normally, the full timestamped log with `--kernel-log`.
const QUIET_CMDLINE: &str = "quiet loglevel=3";
const VERBOSE_CMDLINE: &str = "printk.time=1 loglevel=7";

/// Runs the workload and returns the exit code `katalite` should exit with.
pub fn run(args: &RunArgs) -> Result<u8> {
    let kvm = vmm::host::check_kvm().context("cannot use KVM")?;
    let kernel = load_kernel(args.kernel.as_deref(), kvm)?;
    let init = embedded::init().context(
        "this katalite was built without its guest init: run `cargo xtask build-guest`, then rebuild",
    )?;

    let rootfs = imagebuilder::pack_dir(&args.rootfs, Vec::new())
        .with_context(|| format!("cannot pack root filesystem {}", args.rootfs.display()))?;
    let config = RunConfig {
        args: args.command.clone(),
        env: args.env.clone(),
        working_dir: args.workdir.clone(),
        hostname: args.hostname.clone(),
        ..RunConfig::default()
    };
    let run_archive = run_archive(init, &config).context("cannot build the init archive")?;

    let (serial, verbosity): (Box<dyn Write + Send>, _) = if args.kernel_log {
        (Box::new(io::stderr()), VERBOSE_CMDLINE)
    } else {
        (Box::new(ConsoleErrors::default()), QUIET_CMDLINE)
    };
    let cmdline = format!("{GUEST_CMDLINE} {verbosity}");
    let exit = vmm::run(VmConfig {
        vcpus: args.cpus,
        memory_mib: args.memory,
        kernel: &kernel,
        initramfs: &[&rootfs, &run_archive],
        cmdline: &cmdline,
        console: Box::new(io::stdout()),
        serial,
    })
    .context("the VM failed")?;
    exit_code(exit)
}

/// Picks the kernel: `--kernel`, else the built-in one, which cannot boot on PVM.
fn load_kernel(path: Option<&Path>, kvm: KvmKind) -> Result<Vec<u8>> {
    if let Some(path) = path {
        return std::fs::read(path)
            .with_context(|| format!("cannot read kernel {}", path.display()));
    }
    if kvm == KvmKind::Pvm {
        bail!(
            "this host's KVM is PVM (kvm_pvm), which boots only PVM-enabled guest kernels; the \
             built-in kernel cannot boot here. Build one from a PVM kernel tree with `cargo xtask \
             build-guest --kernel-source DIR --config-fragment pvm.config` (CONFIG_PVM_GUEST=y) \
             and pass it with --kernel PATH"
        );
    }
    let kernel = embedded::kernel().context(
        "this katalite was built without a kernel: run `cargo xtask build-guest` and rebuild, or pass --kernel PATH",
    )?;
    Ok(kernel.to_vec())
}

/// The small uncompressed archive appended after the root filesystem: our init and the
/// run config, under `/.katalite` so nothing of the image is replaced.
fn run_archive(init: &[u8], config: &RunConfig) -> Result<Vec<u8>> {
    let json = serde_json::to_vec(config)?;
    let dir = INIT_PATH
        .trim_start_matches('/')
        .rsplit_once('/')
        .map_or("", |(d, _)| d);
    let mut writer = CpioWriter::new(Vec::new());
    writer.add(&Entry::new(dir, EntryKind::Directory, 0o700))?;
    let init_entry = Entry::new(
        &INIT_PATH[1..],
        EntryKind::File {
            size: init.len() as u64,
        },
        0o700,
    );
    writer.add_file(&init_entry, &mut &init[..])?;
    let config_entry = Entry::new(
        &CONFIG_PATH[1..],
        EntryKind::File {
            size: json.len() as u64,
        },
        0o600,
    );
    writer.add_file(&config_entry, &mut &json[..])?;
    Ok(writer.finish()?)
}

/// Maps how the VM ended to the exit code, or an error (exit 125) for anything that is not
/// a workload status.
fn exit_code(exit: VmExit) -> Result<u8> {
    match exit {
        VmExit::Status(word) => match GuestStatus::from_word(word) {
            Some(GuestStatus::Exited(code)) => Ok(code),
            Some(GuestStatus::InitFailed) => {
                bail!("the guest's init failed (its message is above)")
            }
            None => bail!("the guest reported an invalid status {word:#x}"),
        },
        VmExit::Reset {
            panic: Some(line), ..
        } => bail!("the guest kernel panicked: {line}"),
        VmExit::Reset {
            triple_fault: true, ..
        } => bail!("the guest crashed (triple fault)"),
        VmExit::Reset { .. } => bail!("the guest rebooted without reporting an exit status"),
    }
}

/// Serial sink when the kernel log is hidden: passes through only lines init writes about
/// its own failures (prefixed `katalite-init:`), so they still reach the user.
#[derive(Default)]
struct ConsoleErrors {
    line: Vec<u8>,
}

/// Longest serial line kept while looking for init's messages.
const MAX_LINE: usize = 4096;

impl Write for ConsoleErrors {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &byte in buf {
            if byte == b'\n' {
                if self.line.starts_with(b"katalite-init:") {
                    let mut stderr = io::stderr().lock();
                    stderr.write_all(&self.line)?;
                    stderr.write_all(b"\n")?;
                }
                self.line.clear();
            } else if self.line.len() < MAX_LINE && byte != b'\r' {
                self.line.push(byte);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_statuses_become_exit_codes() {
        assert_eq!(
            exit_code(VmExit::Status(GuestStatus::Exited(42).to_word())).ok(),
            Some(42)
        );
        assert_eq!(
            exit_code(VmExit::Status(GuestStatus::Exited(0).to_word())).ok(),
            Some(0)
        );
    }

    #[test]
    fn guest_failures_are_errors_not_statuses() {
        assert!(exit_code(VmExit::Status(GuestStatus::InitFailed.to_word())).is_err());
        assert!(exit_code(VmExit::Status(0xdead_beef)).is_err());
        let panic = VmExit::Reset {
            triple_fault: false,
            panic: Some("Kernel panic - not syncing: x".into()),
        };
        let message = format!("{:#}", exit_code(panic).expect_err("panic is an error"));
        assert!(message.contains("panicked"), "{message}");
        assert!(exit_code(VmExit::Reset {
            triple_fault: true,
            panic: None
        })
        .is_err());
    }

    #[test]
    fn run_archive_holds_init_and_config() {
        let config = RunConfig {
            args: vec!["true".into()],
            ..RunConfig::default()
        };
        let archive = run_archive(b"\x7fELF", &config).expect("archive");
        let text = String::from_utf8_lossy(&archive);
        assert!(text.contains(".katalite/init") && text.contains(".katalite/config.json"));
        assert!(text.contains("\"Args\":[\"true\"]"));
    }
}
