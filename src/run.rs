//! `katalite run`, the command-line front end: its flags (clap's [`RunArgs`]) become one
//! [`ContainerSpec`] here, once, and everything after that (the container lifecycle,
//! `boot`) sees only the spec.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use vmm::InitramfsPart;

use crate::boot;
use crate::cli::{ImageRoot, RunArgs};
use crate::guest_root::GuestRoot;
use crate::image_cmds::FetchArgs;
use crate::lifecycle::supervise;
use crate::spec::{
    ContainerSpec, FetchOptions, GuestSpec, NetworkSpec, ProcessSpec, Resources, RootDelivery,
    RootSource, RootSpec, StdioSpec,
};
use crate::terminal;
use crate::volumes::{MountSpec, SpecSource};

/// Docker's CLI status for a usage problem it finds itself (`the input device is not a TTY`).
const EXIT_CLI_ERROR: u8 = 1;

/// Runs the workload and returns the exit code `katalite` should exit with.
pub fn run(args: &RunArgs) -> Result<u8> {
    if !args.detach && args.tty && args.interactive && !terminal::stdin_is_terminal() {
        eprintln!("katalite: the input device is not a TTY");
        return Ok(EXIT_CLI_ERROR);
    }
    let spec = container_spec(args, |name| std::env::var(name).ok())?;
    if spec.detach {
        return supervise::launch(&spec);
    }
    if let Some(path) = &args.write_initramfs {
        return write_initramfs(&spec, path).map(|()| 0);
    }
    supervise::foreground(&spec)
}

/// The spec `args` describe: defaults applied, `--env-file`s read, `-e NAME` given the
/// host's value (`host_env`), relative host paths made absolute.
pub fn container_spec(
    args: &RunArgs,
    host_env: impl Fn(&str) -> Option<String>,
) -> Result<ContainerSpec> {
    let source = match &args.rootfs {
        Some(dir) => RootSource::Rootfs {
            path: absolute(dir)?,
        },
        None => match args.image() {
            Some(reference) => RootSource::Image {
                reference: reference.to_string(),
                pull: args.pull,
                fetch: fetch_options(&args.fetch)?,
            },
            None => bail!("\"katalite run\" requires an image (or --rootfs DIR)"),
        },
    };
    // `--write-initramfs` hands the bench an initramfs, whatever `--image-root` says.
    let delivery = match (&args.write_initramfs, args.image_root) {
        (None, ImageRoot::Disk) => RootDelivery::Disk,
        _ => RootDelivery::Initramfs,
    };
    let mut env = Vec::new();
    for path in &args.env_file {
        env.extend(read_env_file(path, &host_env)?);
    }
    env.extend(with_host_values(&args.env, &host_env));
    let mounts = args.volumes.iter().chain(&args.mounts).chain(&args.tmpfs);
    Ok(ContainerSpec {
        name: args.name.clone(),
        root: RootSpec {
            source,
            read_only: args.read_only,
            delivery,
        },
        process: ProcessSpec {
            // An empty `--entrypoint` clears the image's.
            entrypoint: args
                .entrypoint
                .as_ref()
                .map(|program| match program.as_str() {
                    "" => Vec::new(),
                    _ => vec![program.clone()],
                }),
            command: args.command().to_vec(),
            env,
            working_dir: args.workdir.clone(),
            user: args.user.clone(),
            hostname: args.hostname.clone().or_else(|| args.name.clone()),
        },
        resources: Resources {
            cpus: args.cpus,
            memory_mib: args.memory,
        },
        mounts: mounts.map(absolute_mount).collect::<Result<_>>()?,
        network: NetworkSpec {
            mode: args.network.clone(),
            publish: args.publish.clone(),
        },
        stdio: StdioSpec {
            tty: args.tty,
            interactive: args.interactive,
        },
        auto_remove: args.rm,
        detach: args.detach,
        stop_timeout_secs: args.stop_timeout,
        guest: GuestSpec {
            kernel: args.kernel.as_deref().map(absolute).transpose()?,
            kernel_log: args.kernel_log,
            kernel_args: args.kernel_arg.clone(),
            boot_probe: args.boot_probe,
        },
        seccomp_unconfined: args.seccomp_unconfined(),
        log_driver: args.log_driver,
    })
}

/// The fetch flags with their files made absolute.
fn fetch_options(fetch: &FetchArgs) -> Result<FetchOptions> {
    let mut options = fetch.options();
    if let Some(path) = &options.registries_config {
        options.registries_config = Some(absolute(path)?);
    }
    options.ca = options
        .ca
        .iter()
        .map(|path| absolute(path))
        .collect::<Result<_>>()?;
    Ok(options)
}

/// A mount with a bind source made absolute (it is made canonical, and created for `-v`,
/// when the container's entry is made).
fn absolute_mount(mount: &MountSpec) -> Result<MountSpec> {
    let mut mount = mount.clone();
    if let SpecSource::Bind { path, .. } = &mut mount.source {
        *path = absolute(path)?;
    }
    Ok(mount)
}

/// `path` against the current directory, symlinks left alone.
fn absolute(path: &Path) -> Result<PathBuf> {
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    Ok(std::env::current_dir()
        .context("cannot find the current directory")?
        .join(path))
}

/// `-e` entries: `NAME=value` as given, `NAME` alone with the host's value (dropped when
/// the host has none, so the image's value stays).
fn with_host_values(entries: &[String], host: impl Fn(&str) -> Option<String>) -> Vec<String> {
    entries
        .iter()
        .filter_map(|entry| match entry.split_once('=') {
            Some(_) => Some(entry.clone()),
            None => host(entry).map(|value| format!("{entry}={value}")),
        })
        .collect()
}

/// The entries of one `--env-file`.
fn read_env_file(path: &Path, host: impl Fn(&str) -> Option<String>) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read env file {}", path.display()))?;
    parse_env_file(&text, host).with_context(|| format!("invalid env file {}", path.display()))
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

/// The bench's `--write-initramfs FILE`: the initramfs this run would boot, written
/// instead of booted (so another VMM can boot the very same bytes). No container entry.
fn write_initramfs(spec: &ContainerSpec, path: &Path) -> Result<()> {
    if !spec.mounts.is_empty() {
        bail!("--write-initramfs cannot be combined with -v, --mount or --tmpfs");
    }
    let (root, run_archive, _) = boot::boot_images(
        spec,
        &container_id()?,
        Vec::new(),
        crate::network::guest_plan(&spec.network.mode),
    )?;
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
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The archives laid out as the VMM places them in guest memory (vmm's x86 `boot.rs`):
/// each one zero-padded to a multiple of 4 bytes, as the kernel's unpacker expects
/// between concatenated archives (Documentation/driver-api/early-userspace/buffer-format.rst).
fn padded_concat(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for part in parts {
        out.extend_from_slice(part);
        out.resize(out.len().next_multiple_of(4), 0);
    }
    out
}

/// A random 12-hex-digit id for a run that keeps no state (`--write-initramfs`).
fn container_id() -> Result<String> {
    let mut bytes = [0u8; 6];
    getrandom::fill(&mut bytes).context("cannot generate a container id")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests;
