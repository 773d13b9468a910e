//! The boot behind `katalite run`: pack the root filesystem and the per-run init archive and
//! boot the VM attached to a [`Session`] (the terminal, or a detached container's log).
//! Foreground and detached runs both reach it through the container lifecycle
//! (`lifecycle::supervise`); only the bench's `--write-initramfs` takes the images without
//! booting.

use std::borrow::Cow;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use guest_init::{MountConfig, RunConfig, CONFIG_PATH, INIT_PATH};
use imagebuilder::image::ImageConfig;
use imagebuilder::{CpioWriter, Entry, EntryKind};
use vmm::host::KvmKind;
use vmm::{DiskConfig, FsShareConfig, VmConfig};

use crate::attach::{self, Session};
use crate::cli::RunArgs;
use crate::guest_root::{self, GuestRoot, RootDisk, ROOT_DISK};
use crate::volumes::{self, ResolvedMount};
use crate::{embedded, network};

/// The virtio-fs tag of a `--rootfs` directory.
const ROOT_SHARE: &str = "katalite-root";

/// Kernel arguments of every katalite guest: our init, and no spurious-IRQ accounting (the
/// console's used-buffer interrupts often find nothing left to do, which is expected).
const GUEST_CMDLINE: &str = "noirqdebug rdinit=/.katalite/init";
/// Console verbosity: only errors normally, the full timestamped log with `--kernel-log`.
const QUIET_CMDLINE: &str = "quiet loglevel=3";
const VERBOSE_CMDLINE: &str = "printk.time=1 loglevel=7";

/// Boots the workload of `args` with its resolved `mounts` attached to `session` and
/// returns its exit code.
pub fn boot(args: &RunArgs, mounts: &[ResolvedMount], session: Session<'_>) -> Result<u8> {
    let env_files = read_env_files(&args.env_file)?;
    let kvm = vmm::host::check_kvm().context("cannot use KVM")?;
    let kernel = load_kernel(args.kernel.as_deref(), kvm)?;
    let (mut shares, guest_mounts) = volumes::plan(mounts)?;
    let (root, run_archive, command) = boot_images(args, env_files, &session.id, guest_mounts)?;
    let network = network::attach(&args.network, &args.publish)?;

    let (serial, verbosity): (Box<dyn Write + Send>, _) = if args.kernel_log {
        (
            Box::new(crate::guest_text::EscapedLines::new(io::stderr())),
            VERBOSE_CMDLINE,
        )
    } else {
        (Box::new(ConsoleErrors::default()), QUIET_CMDLINE)
    };
    let mut cmdline = format!("{GUEST_CMDLINE} {verbosity}");
    for arg in &args.kernel_arg {
        cmdline.push(' ');
        cmdline.push_str(arg);
    }
    let (rootfs, disks) = match root {
        GuestRoot::Archive(archive) => (Some(archive), Vec::new()),
        GuestRoot::Disk(disk) => (None, vec![root_disk_config(disk)]),
        GuestRoot::Share(dir) => {
            shares.push(FsShareConfig {
                tag: ROOT_SHARE.into(),
                root: dir,
                read_only: args.read_only,
            });
            (None, Vec::new())
        }
    };
    let initramfs = rootfs.into_iter().chain([run_archive.into()]).collect();
    let vm = VmConfig {
        vcpus: args.cpus,
        memory_mib: args.memory,
        kernel: &kernel,
        initramfs,
        cmdline: &cmdline,
        console: Box::new(io::sink()),
        console_input: None,
        stopper: None,
        serial,
        network,
        disks,
        shares,
        loaded: Some(Box::new(embedded::release_pages)),
    };
    attach::run_attached(args, &command, vm, session)
}

/// The root filesystem and the per-run archive with init and its config (the kernel
/// unpacks it after the root's archive, if the root is one). `id` is the container id
/// (its first 12 digits are the default hostname); `mounts` are init's. Also returns the
/// workload's argv.
pub fn boot_images(
    args: &RunArgs,
    env_files: Vec<String>,
    id: &str,
    mounts: Vec<MountConfig>,
) -> Result<(GuestRoot, Vec<u8>, Vec<String>)> {
    let init = embedded::init()
        .context(
            "this katalite was built without its guest init: run `cargo xtask build-guest`, then rebuild",
        )?
        .context("cannot decompress the embedded guest init")?;
    let (root, image_config) = guest_root::prepare(args)?;
    let short_id = &id[..id.len().min(12)];
    let mut config = run_config(args, &image_config, env_files, short_id)?;
    config.mounts = mounts;
    match root {
        GuestRoot::Disk(_) => config.root_disk = Some(ROOT_DISK.to_string()),
        GuestRoot::Share(_) => config.root_share = Some(ROOT_SHARE.to_string()),
        GuestRoot::Archive(_) => {}
    }
    let run_archive = run_archive(&init, &config).context("cannot build the init archive")?;
    Ok((root, run_archive, config.args))
}

/// The VMM's view of the image's disk: read-only, every block verified. A block that fails
/// verification is an I/O error in the guest and one line here (in `katalite.log` for a
/// detached container, whose stderr goes there).
fn root_disk_config(disk: RootDisk) -> DiskConfig {
    let path = disk.path.display().to_string();
    // The guest retries failed reads: each bad block is reported once.
    let reported = std::sync::Mutex::new(std::collections::BTreeSet::new());
    DiskConfig {
        file: disk.file,
        read_only: true,
        block_hashes: Some(disk.block_hashes),
        id: "katalite-image".into(),
        on_corrupt: std::sync::Arc::new(move |block| {
            let mut reported = reported.lock().unwrap_or_else(|e| e.into_inner());
            if reported.len() < MAX_REPORTED_BLOCKS && reported.insert(block) {
                eprintln!(
                    "katalite: block {block} of disk image {path} failed verification; the \
                     guest got an I/O error (remove the image with `katalite rmi` and pull it \
                     again)"
                );
            }
        }),
    }
}

/// Corrupt blocks named on stderr per run; a wholly damaged image need not flood the log.
const MAX_REPORTED_BLOCKS: usize = 16;

/// The archives laid out as the VMM places them in guest memory (vmm's x86 `boot.rs`):
/// each one zero-padded to a multiple of 4 bytes, as the kernel's unpacker expects
/// between concatenated archives (Documentation/driver-api/early-userspace/buffer-format.rst).
pub fn padded_concat(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for part in parts {
        out.extend_from_slice(part);
        out.resize(out.len().next_multiple_of(4), 0);
    }
    out
}

/// A random 12-hex-digit id for a run that keeps no state (`--write-initramfs`).
pub fn container_id() -> Result<String> {
    let mut bytes = [0u8; 6];
    getrandom::fill(&mut bytes).context("cannot generate a container id")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// What init runs: the image's defaults overridden by the command line, by Docker's rules.
/// `env_files` are the `--env-file` entries, which `-e` overrides.
fn run_config(
    args: &RunArgs,
    image: &ImageConfig,
    env_files: Vec<String>,
    id: &str,
) -> Result<RunConfig> {
    let argv = combine_command(image, args.entrypoint.as_deref(), args.command());
    if argv.is_empty() {
        bail!("no command specified (the image has no entrypoint or command)");
    }
    let host_env = |name: &str| std::env::var(name).ok();
    let overrides: Vec<String> = env_files.into_iter().chain(args.env.clone()).collect();
    let hostname = args.hostname.as_ref().or(args.name.as_ref());
    Ok(RunConfig {
        args: argv,
        env: merge_env(&image.env, &overrides, host_env),
        working_dir: args
            .workdir
            .clone()
            .unwrap_or_else(|| image.working_dir.clone()),
        hostname: hostname.cloned().unwrap_or_else(|| id.to_string()),
        // `-u ""` leaves the image's user, as in Docker.
        user: match &args.user {
            Some(user) if !user.is_empty() => user.clone(),
            _ => image.user.clone(),
        },
        tty: args.tty,
        open_stdin: args.interactive,
        read_only: args.read_only,
        boot_probe: args.boot_probe,
        network: network::guest_plan(&args.network),
        root_disk: None,
        root_share: None,
        mounts: Vec::new(),
    })
}

/// The entries of every `--env-file`, in order.
pub fn read_env_files(paths: &[PathBuf]) -> Result<Vec<String>> {
    let mut env = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read env file {}", path.display()))?;
        let entries = parse_env_file(&text, |name| std::env::var(name).ok())
            .with_context(|| format!("invalid env file {}", path.display()))?;
        env.extend(entries);
    }
    Ok(env)
}

/// Docker's env-file format: `NAME=VALUE` lines (the value verbatim), `NAME` alone for the
/// host's value (skipped when unset), blank lines and `#` comments skipped, leading
/// whitespace ignored, a name containing whitespace refused.
fn parse_env_file(text: &str, host: impl Fn(&str) -> Option<String>) -> Result<Vec<String>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut env = Vec::new();
    for line in text.lines().map(str::trim_start) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, value) = match line.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (line, None),
        };
        if name.contains([' ', '\t']) {
            bail!("variable '{name}' contains whitespaces");
        }
        if name.is_empty() {
            bail!("no variable name on line '{line}'");
        }
        match value {
            Some(value) => env.push(format!("{name}={value}")),
            None => env.extend(host(name).map(|value| format!("{name}={value}"))),
        }
    }
    Ok(env)
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

/// Picks the kernel: `--kernel` (an uncompressed vmlinux ELF, read into memory), else the
/// built-in packed one, borrowed where it lies in the binary and decompressed by the VMM
/// straight into guest memory. The built-in one cannot boot on PVM.
fn load_kernel(path: Option<&Path>, kvm: KvmKind) -> Result<Cow<'static, [u8]>> {
    if let Some(path) = path {
        return std::fs::read(path)
            .map(Cow::Owned)
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
    Ok(Cow::Borrowed(kernel))
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

/// Serial sink when the kernel log is hidden: passes through only lines init writes about
/// its own failures (prefixed `katalite-init:`), so they still reach the user, escaped and
/// marked as the guest's.
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
                    let line = crate::guest_text::escape(&self.line);
                    writeln!(
                        io::stderr().lock(),
                        "{}{line}",
                        crate::guest_text::GUEST_MARK
                    )?;
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
    fn env_files_read_as_docker_reads_them() {
        let host = |name: &str| (name == "HOSTVAR").then(|| "from host".to_string());
        let text = "\u{feff}# a comment\n\nA=1\n  B= spaced value \nHOSTVAR\nUNSET\r\nC=x=y\n\t#x\nEMPTY=\n";
        let env = parse_env_file(text, host).expect("valid");
        assert_eq!(
            env,
            strings(&[
                "A=1",
                "B= spaced value ",
                "HOSTVAR=from host",
                "C=x=y",
                "EMPTY="
            ])
        );
    }

    #[test]
    fn env_file_names_must_be_clean() {
        let none = |_: &str| None;
        let err = parse_env_file("MY VAR=1\n", none).expect_err("space in name");
        assert_eq!(err.to_string(), "variable 'MY VAR' contains whitespaces");
        let err = parse_env_file("=1\n", none).expect_err("no name");
        assert_eq!(err.to_string(), "no variable name on line '=1'");
        assert!(parse_env_file("TRAILING \n", none).is_err());
    }

    fn args(argv: &[&str]) -> RunArgs {
        use clap::Parser;
        let cli = crate::cli::Cli::try_parse_from(["katalite", "run"].iter().chain(argv))
            .expect("valid arguments");
        match cli.command {
            crate::cli::Command::Run(run) => *run,
            _ => panic!("not a run"),
        }
    }

    #[test]
    fn the_command_line_overrides_the_image_config() {
        let image = ImageConfig {
            cmd: strings(&["sh"]),
            env: strings(&["PATH=/bin", "A=image", "F=image"]),
            working_dir: "/image".into(),
            user: "nobody".into(),
            ..ImageConfig::default()
        };
        let run = args(&[
            "-e",
            "A=cli",
            "-w",
            "/cli",
            "-u",
            "1000:1000",
            "-it",
            "--read-only",
            "img",
        ]);
        let config =
            run_config(&run, &image, strings(&["F=file", "A=file"]), "0123456789ab").expect("ok");
        assert_eq!(config.env, strings(&["PATH=/bin", "F=file", "A=cli"]));
        assert_eq!(config.working_dir, "/cli");
        assert_eq!(config.user, "1000:1000");
        assert!(config.tty && config.open_stdin && config.read_only);
        assert_eq!(config.hostname, "0123456789ab");

        let config = run_config(&args(&["img"]), &image, Vec::new(), "id").expect("ok");
        assert_eq!(
            (config.user.as_str(), config.working_dir.as_str()),
            ("nobody", "/image")
        );
        assert!(!config.tty && !config.open_stdin && !config.read_only && !config.boot_probe);
        let config = run_config(&args(&["--boot-probe", "img"]), &image, Vec::new(), "id");
        assert!(config.expect("ok").boot_probe);
        let config = run_config(&args(&["-u", "", "img"]), &image, Vec::new(), "id").expect("ok");
        assert_eq!(config.user, "nobody");
    }

    #[test]
    fn hostname_is_the_flag_then_the_name_then_the_id() {
        let image = ImageConfig {
            cmd: strings(&["sh"]),
            ..ImageConfig::default()
        };
        let hostname = |argv: &[&str]| {
            run_config(&args(argv), &image, Vec::new(), "c0ffee123456")
                .expect("ok")
                .hostname
        };
        assert_eq!(hostname(&["-h", "box", "--name", "web", "img"]), "box");
        assert_eq!(hostname(&["--name", "web", "img"]), "web");
        assert_eq!(hostname(&["img"]), "c0ffee123456");
    }

    #[test]
    fn container_ids_are_random_12_hex() {
        let a = container_id().expect("id");
        let b = container_id().expect("id");
        assert_eq!(a.len(), 12);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(a, b);
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
    fn written_initramfs_pads_each_archive_to_4_bytes() {
        assert_eq!(padded_concat(&[b"abcde", b"fg"]), b"abcde\0\0\0fg\0\0");
        assert_eq!(padded_concat(&[b"abcd", b""]), b"abcd");
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
