//! `katalite run`: pack the root filesystem and the per-run init archive, boot the VM,
//! and turn how it ended into Docker's exit codes.

use std::io::{self, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use guest_init::{GuestStatus, RunConfig, CONFIG_PATH, INIT_PATH};
use imagebuilder::image::ImageConfig;
use imagebuilder::pack::{packed_initramfs, PackOptions};
use imagebuilder::progress::Progress;
use imagebuilder::{CpioWriter, Entry, EntryKind};
use vmm::host::KvmKind;
use vmm::{VmConfig, VmExit};

use crate::cli::RunArgs;
use crate::{embedded, image_cmds};

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

    let (rootfs, image_config) = root_filesystem(args)?;
    let config = run_config(args, &image_config)?;
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
        console_input: None,
        stopper: None,
        serial,
    })
    .context("the VM failed")?;
    exit_code(exit)
}

/// The root filesystem archive (a packed `--rootfs` directory, or the image's cached
/// packed initramfs) and the image's config (empty for a directory).
fn root_filesystem(args: &RunArgs) -> Result<(Vec<u8>, ImageConfig)> {
    if let Some(dir) = &args.rootfs {
        let archive = imagebuilder::pack_dir(dir, Vec::new())
            .with_context(|| format!("cannot pack root filesystem {}", dir.display()))?;
        return Ok((archive, ImageConfig::default()));
    }
    let Some(reference) = args.image() else {
        bail!("\"katalite run\" requires an image (or --rootfs DIR)");
    };
    let store = image_cmds::open_store()?;
    // Keeps a concurrent `rmi` from deleting layers while they are packed.
    let _hold = store.hold().context("cannot lock the image cache")?;
    let image = image_cmds::resolve(&store, reference, args.pull, &args.fetch)?;
    let opts = PackOptions {
        progress: Progress::stderr(args.fetch.quiet),
        ..PackOptions::default()
    };
    let packed = packed_initramfs(&image, store.root(), &opts)
        .with_context(|| format!("cannot pack image {reference}"))?;
    let archive = std::fs::read(&packed)
        .with_context(|| format!("cannot read packed image {}", packed.display()))?;
    Ok((archive, image.config))
}

/// What init runs: the image's defaults overridden by the command line, by Docker's rules.
fn run_config(args: &RunArgs, image: &ImageConfig) -> Result<RunConfig> {
    let argv = combine_command(image, args.entrypoint.as_deref(), args.command());
    if argv.is_empty() {
        bail!("no command specified (the image has no entrypoint or command)");
    }
    let host_env = |name: &str| std::env::var(name).ok();
    Ok(RunConfig {
        args: argv,
        env: merge_env(&image.env, &args.env, host_env),
        working_dir: args
            .workdir
            .clone()
            .unwrap_or_else(|| image.working_dir.clone()),
        hostname: args.hostname.clone(),
        user: image.user.clone(),
        ..RunConfig::default()
    })
}

/// Docker's entrypoint/cmd rules: `--entrypoint` replaces the image's entrypoint and drops
/// its cmd (an empty `--entrypoint` clears it); command-line arguments replace the cmd.
fn combine_command(
    image: &ImageConfig,
    entrypoint: Option<&str>,
    command: &[String],
) -> Vec<String> {
    let (entrypoint, default_cmd) = match entrypoint {
        Some("") => (Vec::new(), Vec::new()),
        Some(program) => (vec![program.to_string()], Vec::new()),
        None => (image.entrypoint.clone(), image.cmd.clone()),
    };
    let cmd = if command.is_empty() {
        default_cmd
    } else {
        command.to_vec()
    };
    entrypoint.into_iter().chain(cmd).collect()
}

/// The image's environment with `-e` entries applied in order: `NAME=value` sets,
/// `NAME` alone copies the host's value (and is dropped when the host has none).
fn merge_env(
    image: &[String],
    overrides: &[String],
    host: impl Fn(&str) -> Option<String>,
) -> Vec<String> {
    let mut env: Vec<String> = image.to_vec();
    for entry in overrides {
        let entry = match entry.split_once('=') {
            Some(_) => entry.clone(),
            None => match host(entry) {
                Some(value) => format!("{entry}={value}"),
                None => continue,
            },
        };
        let name = entry.split_once('=').map_or(entry.as_str(), |(n, _)| n);
        env.retain(|e| e.split_once('=').map_or(e.as_str(), |(n, _)| n) != name);
        env.push(entry);
    }
    env
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
        VmExit::Stopped => bail!("the VM was stopped"),
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

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn entrypoint_and_cmd_combine_as_in_docker() {
        let image = ImageConfig {
            entrypoint: strings(&["/entry", "-x"]),
            cmd: strings(&["default"]),
            ..ImageConfig::default()
        };
        assert_eq!(
            combine_command(&image, None, &[]),
            strings(&["/entry", "-x", "default"])
        );
        assert_eq!(
            combine_command(&image, None, &strings(&["mine"])),
            strings(&["/entry", "-x", "mine"])
        );
        assert_eq!(
            combine_command(&image, Some("/other"), &[]),
            strings(&["/other"])
        );
        assert_eq!(
            combine_command(&image, Some("/other"), &strings(&["a"])),
            strings(&["/other", "a"])
        );
        assert_eq!(
            combine_command(&image, Some(""), &strings(&["sh"])),
            strings(&["sh"])
        );
        let cmd_only = ImageConfig {
            cmd: strings(&["sh"]),
            ..ImageConfig::default()
        };
        assert_eq!(combine_command(&cmd_only, None, &[]), strings(&["sh"]));
        assert_eq!(
            combine_command(&cmd_only, None, &strings(&["ls", "/"])),
            strings(&["ls", "/"])
        );
        assert!(combine_command(&ImageConfig::default(), None, &[]).is_empty());
    }

    #[test]
    fn env_overrides_by_name_and_copies_host_values() {
        let image = strings(&["PATH=/bin", "A=1"]);
        let host = |name: &str| (name == "HOSTVAR").then(|| "h".to_string());
        let env = merge_env(
            &image,
            &strings(&["A=2", "HOSTVAR", "MISSING", "B=x=y"]),
            host,
        );
        assert_eq!(env, strings(&["PATH=/bin", "A=2", "HOSTVAR=h", "B=x=y"]));
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
