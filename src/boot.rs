//! The engine's boot: a [`ContainerSpec`] becomes a VM. Packs the root filesystem and the
//! per-run init archive (the spec's process over the image's defaults, by Docker's rules)
//! and boots the VM attached to a [`Session`] (the terminal, or a detached container's
//! log). Front ends boot through the container lifecycle (`lifecycle::supervise`), for
//! foreground and detached runs alike; only the bench's `--write-initramfs` takes the
//! images without booting.

use std::borrow::Cow;
use std::io::{self, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use guest_init::{MountConfig, NetworkConfig, RunConfig, CONFIG_PATH, INIT_PATH};
use imagebuilder::image::ImageConfig;
use imagebuilder::{CpioWriter, Entry, EntryKind};
use vmm::host::KvmKind;
use vmm::{DiskConfig, FsShareConfig, VmConfig};

use crate::attach::{self, Session};
use crate::guest_root::{self, GuestRoot, RootDisk, ROOT_DISK};
use crate::spec::ContainerSpec;
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

/// Boots the workload of `spec` with its resolved `mounts` attached to `session` and
/// returns its exit code.
pub fn boot(spec: &ContainerSpec, mounts: &[ResolvedMount], session: Session<'_>) -> Result<u8> {
    let kvm = vmm::host::check_kvm().context("cannot use KVM")?;
    let kernel = load_kernel(spec.guest.kernel.as_deref(), kvm)?;
    let (mut shares, guest_mounts) = volumes::plan(mounts)?;
    let network = network::attach(&spec.network.mode, &spec.network.publish)?;
    let (root, run_archive, command) = boot_images(spec, &session.id, guest_mounts, network.plan)?;

    let (serial, verbosity): (Box<dyn Write + Send>, _) = if spec.guest.kernel_log {
        (
            Box::new(crate::guest_text::EscapedLines::new(io::stderr())),
            VERBOSE_CMDLINE,
        )
    } else {
        (Box::new(ConsoleErrors::default()), QUIET_CMDLINE)
    };
    let mut cmdline = format!("{GUEST_CMDLINE} {verbosity}");
    for arg in &spec.guest.kernel_args {
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
                read_only: spec.root.read_only,
            });
            (None, Vec::new())
        }
    };
    let initramfs = rootfs.into_iter().chain([run_archive.into()]).collect();
    let kernel_cache = kernel_cache(&kernel);
    let vm = VmConfig {
        vcpus: spec.resources.cpus,
        memory_mib: spec.resources.memory_mib,
        kernel: &kernel,
        kernel_cache: kernel_cache.as_deref(),
        initramfs,
        cmdline: &cmdline,
        console: Box::new(io::sink()),
        console_input: None,
        stopper: None,
        serial,
        network: network.net,
        disks,
        shares,
        loaded: Some(Box::new(embedded::release_pages)),
    };
    attach::run_attached(spec, &command, vm, session)
}

/// The root filesystem and the per-run archive with init and its config (the kernel
/// unpacks it after the root's archive, if the root is one). `id` is the container id
/// (its first 12 digits are the default hostname); `mounts` are init's. Also returns the
/// workload's argv.
pub fn boot_images(
    spec: &ContainerSpec,
    id: &str,
    mounts: Vec<MountConfig>,
    network: Option<NetworkConfig>,
) -> Result<(GuestRoot, Vec<u8>, Vec<String>)> {
    let init = embedded::init()
        .context(
            "this katalite was built without its guest init: run `cargo xtask build-guest`, then rebuild",
        )?
        .context("cannot decompress the embedded guest init")?;
    let (root, image_config) = guest_root::prepare(spec)?;
    let short_id = &id[..id.len().min(12)];
    let mut config = run_config(spec, &image_config, short_id)?;
    config.mounts = mounts;
    config.network = network;
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

/// What init runs: the image's defaults overridden by the spec's process, by Docker's
/// rules. `id` is the default hostname.
fn run_config(spec: &ContainerSpec, image: &ImageConfig, id: &str) -> Result<RunConfig> {
    let process = &spec.process;
    let argv = combine_command(image, process.entrypoint.as_deref(), &process.command);
    if argv.is_empty() {
        bail!("no command specified (the image has no entrypoint or command)");
    }
    Ok(RunConfig {
        args: argv,
        env: merge_env(&image.env, &process.env),
        working_dir: process
            .working_dir
            .clone()
            .unwrap_or_else(|| image.working_dir.clone()),
        hostname: process.hostname.clone().unwrap_or_else(|| id.to_string()),
        // `-u ""` leaves the image's user, as in Docker.
        user: match &process.user {
            Some(user) if !user.is_empty() => user.clone(),
            _ => image.user.clone(),
        },
        tty: spec.stdio.tty,
        open_stdin: spec.stdio.interactive,
        read_only: spec.root.read_only,
        boot_probe: spec.guest.boot_probe,
        network: network::guest_plan(&spec.network.mode),
        root_disk: None,
        root_share: None,
        mounts: Vec::new(),
    })
}

/// Docker's entrypoint/cmd rules: an entrypoint replaces the image's and drops its cmd
/// (an empty one clears it); a command replaces the cmd.
fn combine_command(
    image: &ImageConfig,
    entrypoint: Option<&[String]>,
    command: &[String],
) -> Vec<String> {
    let (entrypoint, default_cmd) = match entrypoint {
        Some(entrypoint) => (entrypoint.to_vec(), Vec::new()),
        None => (image.entrypoint.clone(), image.cmd.clone()),
    };
    let cmd = if command.is_empty() {
        default_cmd
    } else {
        command.to_vec()
    };
    entrypoint.into_iter().chain(cmd).collect()
}

/// The image's environment with the spec's `NAME=value` entries applied in order: each
/// replaces the image's (or an earlier entry's) value of that name.
fn merge_env(image: &[String], overrides: &[String]) -> Vec<String> {
    let name = |entry: &str| entry.split_once('=').map_or(entry, |(n, _)| n).to_string();
    let mut env: Vec<String> = image.to_vec();
    for entry in overrides {
        let key = name(entry);
        env.retain(|e| name(e) != key);
        env.push(entry.clone());
    }
    env
}

/// What a boot of `spec` would find missing on this host (no usable /dev/kvm, a built-in
/// kernel that cannot boot here), checked before anything is made for it.
pub fn preflight(spec: &ContainerSpec) -> Result<()> {
    let kvm = vmm::host::check_kvm().context("cannot use KVM")?;
    if spec.guest.kernel.is_none() {
        load_kernel(None, kvm)?;
    }
    Ok(())
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

/// Where a packed kernel's segments are kept unpacked, to be mapped into guest memory
/// instead of decompressed at every boot (`vmm::packed_kernel::load_mapped`): the image
/// cache's `kernel/` directory, one file per source vmlinux. `None` for an ELF kernel
/// (`--kernel`) or when there is no cache directory.
fn kernel_cache(kernel: &[u8]) -> Option<std::path::PathBuf> {
    let (header, _) = vmm::packed_kernel::Header::parse(kernel).ok()?;
    let root = imagebuilder::store::Store::default_root().ok()?;
    let name: String = header
        .source_sha256
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Some(root.join("kernel").join(format!("{name}.segments")))
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
    use crate::spec::{GuestSpec, ProcessSpec, RootSpec, StdioSpec};

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn spec(process: ProcessSpec) -> ContainerSpec {
        ContainerSpec {
            process,
            ..ContainerSpec::default()
        }
    }

    #[test]
    fn the_spec_overrides_the_image_config() {
        let image = ImageConfig {
            cmd: strings(&["sh"]),
            env: strings(&["PATH=/bin", "A=image", "F=image"]),
            working_dir: "/image".into(),
            user: "nobody".into(),
            ..ImageConfig::default()
        };
        let run = ContainerSpec {
            process: ProcessSpec {
                env: strings(&["F=file", "A=file", "A=cli"]),
                working_dir: Some("/cli".into()),
                user: Some("1000:1000".into()),
                ..ProcessSpec::default()
            },
            stdio: StdioSpec {
                tty: true,
                interactive: true,
            },
            root: RootSpec {
                read_only: true,
                ..RootSpec::default()
            },
            ..ContainerSpec::default()
        };
        let config = run_config(&run, &image, "0123456789ab").expect("ok");
        assert_eq!(config.env, strings(&["PATH=/bin", "F=file", "A=cli"]));
        assert_eq!(config.working_dir, "/cli");
        assert_eq!(config.user, "1000:1000");
        assert!(config.tty && config.open_stdin && config.read_only);
        assert_eq!(config.hostname, "0123456789ab");
        assert_eq!(config.args, strings(&["sh"]));

        let config = run_config(&ContainerSpec::default(), &image, "id").expect("ok");
        assert_eq!(
            (config.user.as_str(), config.working_dir.as_str()),
            ("nobody", "/image")
        );
        assert!(!config.tty && !config.open_stdin && !config.read_only && !config.boot_probe);
        let probing = ContainerSpec {
            guest: GuestSpec {
                boot_probe: true,
                ..GuestSpec::default()
            },
            ..ContainerSpec::default()
        };
        assert!(run_config(&probing, &image, "id").expect("ok").boot_probe);
        let empty_user = spec(ProcessSpec {
            user: Some(String::new()),
            ..ProcessSpec::default()
        });
        let config = run_config(&empty_user, &image, "id").expect("ok");
        assert_eq!(config.user, "nobody");
        let named = spec(ProcessSpec {
            hostname: Some("box".into()),
            ..ProcessSpec::default()
        });
        assert_eq!(
            run_config(&named, &image, "id").expect("ok").hostname,
            "box"
        );
        let nothing = run_config(&ContainerSpec::default(), &ImageConfig::default(), "id");
        assert!(nothing.is_err(), "no command at all");
    }

    #[test]
    fn entrypoint_and_cmd_combine_as_in_docker() {
        let image = ImageConfig {
            entrypoint: strings(&["/entry", "-x"]),
            cmd: strings(&["default"]),
            ..ImageConfig::default()
        };
        let other = strings(&["/other"]);
        assert_eq!(
            combine_command(&image, None, &[]),
            strings(&["/entry", "-x", "default"])
        );
        assert_eq!(
            combine_command(&image, None, &strings(&["mine"])),
            strings(&["/entry", "-x", "mine"])
        );
        assert_eq!(
            combine_command(&image, Some(&other), &[]),
            strings(&["/other"])
        );
        assert_eq!(
            combine_command(&image, Some(&other), &strings(&["a"])),
            strings(&["/other", "a"])
        );
        assert_eq!(
            combine_command(&image, Some(&[]), &strings(&["sh"])),
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
    fn env_overrides_by_name_in_order() {
        let image = strings(&["PATH=/bin", "A=1"]);
        let env = merge_env(&image, &strings(&["A=2", "HOSTVAR=h", "B=x=y", "A=3"]));
        assert_eq!(env, strings(&["PATH=/bin", "HOSTVAR=h", "B=x=y", "A=3"]));
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
