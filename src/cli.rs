//! The command-line interface of `katalite` (clap): arguments, their value syntax (Docker's,
//! for `run`) and the one-line form of parse errors. Parsing only; no behaviour.

use std::path::PathBuf;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{ArgAction, Args, Parser, Subcommand};
use imagebuilder::source::PullPolicy;

use crate::exec::client::ExecArgs;
use crate::image_cmds::{FetchArgs, ImagesArgs, PullArgs, RmiArgs};
use crate::lifecycle::commands::{
    InspectArgs, KillArgs, LogsArgs, PsArgs, RmArgs, StopArgs, SuperviseArgs, WaitArgs,
};
use crate::network::{parse_network, parse_publish, NetworkMode, PortMapping};
use crate::spec::LogDriver;
use crate::volumes::commands::VolumeArgs;
use crate::volumes::parse::{parse_mount, parse_tmpfs, parse_volume};
use crate::volumes::MountSpec;

/// VM-isolated containers from one static binary.
#[derive(Parser, Debug)]
#[command(name = "katalite", version = crate::embedded::VERSION, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The katalite commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a command in a new micro-VM and return its exit code.
    Run(Box<RunArgs>),
    /// Pull an image into the local cache.
    Pull(PullArgs),
    /// List cached images and the cache's disk usage.
    Images(ImagesArgs),
    /// Remove cached images (and the blobs no other image uses).
    Rmi(RmiArgs),
    /// Run a command in a running container.
    Exec(ExecArgs),
    /// List containers.
    Ps(PsArgs),
    /// Show a container's output.
    Logs(LogsArgs),
    /// Stop running containers: SIGTERM to the workload, then end the VM.
    Stop(StopArgs),
    /// Send a signal to running containers (KILL ends the VM at once).
    Kill(KillArgs),
    /// Remove containers.
    Rm(RmArgs),
    /// Show containers' state and configuration as JSON.
    Inspect(InspectArgs),
    /// Manage named volumes.
    Volume(VolumeArgs),
    /// Wait for containers to exit and print their exit codes.
    Wait(WaitArgs),
    /// Install the names Docker, containerd and podman start katalite by (katalite-runc).
    #[command(name = "install-runtime")]
    InstallRuntime(crate::runc::install::InstallArgs),
    /// Run a detached container's VM (started by `run -d`, not by hand).
    #[command(hide = true)]
    Supervise(SuperviseArgs),
}

/// `katalite run [OPTIONS] IMAGE [COMMAND] [ARG...]`, or `--rootfs DIR [COMMAND]...`.
///
/// `-h` is `--hostname`, as in `docker run`; help is `--help` only.
#[derive(Args, Debug)]
#[command(
    disable_help_flag = true,
    override_usage = "katalite run [OPTIONS] IMAGE [COMMAND] [ARG...]\n       \
                      katalite run [OPTIONS] --rootfs DIR [COMMAND] [ARG...]"
)]
pub struct RunArgs {
    /// Set an environment variable (NAME=VALUE), or pass the host's value (NAME).
    #[arg(short = 'e', long = "env", value_name = "NAME[=VALUE]", value_parser = parse_env)]
    pub env: Vec<String>,

    /// Read environment variables from a file (NAME=VALUE lines, # comments).
    #[arg(long, value_name = "FILE")]
    pub env_file: Vec<PathBuf>,

    /// Working directory inside the container (absolute; default: the image's).
    #[arg(short = 'w', long, value_name = "DIR", value_parser = parse_workdir)]
    pub workdir: Option<String>,

    /// User to run as: name, uid, uid:gid or name:group (default: the image's).
    #[arg(short = 'u', long, value_name = "USER[:GROUP]")]
    pub user: Option<String>,

    /// Overwrite the image's entrypoint (an empty string clears it).
    #[arg(long, value_name = "COMMAND")]
    pub entrypoint: Option<String>,

    /// Keep stdin open and forward it to the container.
    #[arg(short = 'i', long)]
    pub interactive: bool,

    /// Give the container a pseudo-terminal.
    #[arg(short = 't', long)]
    pub tty: bool,

    /// Name of the container (also its default hostname).
    #[arg(long, value_name = "NAME", value_parser = parse_name)]
    pub name: Option<String>,

    /// Hostname of the container (default: the name, else the container id).
    #[arg(short = 'h', long, value_name = "NAME")]
    pub hostname: Option<String>,

    /// Number of CPUs; fractions round up to whole virtual CPUs.
    #[arg(long, value_name = "N", default_value = "1", value_parser = parse_cpus)]
    pub cpus: u8,

    /// Memory of the VM: bytes, or with a unit (512m, 1g); at least 64m.
    #[arg(short = 'm', long, value_name = "BYTES", default_value = "512m",
          value_parser = parse_memory)]
    pub memory: u64,

    /// Publish a container port on the host: [HOSTIP:]HOSTPORT:CONTAINERPORT[/tcp|/udp].
    /// Without HOSTIP the port listens on 127.0.0.1 only (Docker's default is all
    /// interfaces; give 0.0.0.0 for that).
    #[arg(short = 'p', long = "publish", value_name = "[HOSTIP:]HOSTPORT:PORT[/PROTO]",
          value_parser = parse_publish)]
    pub publish: Vec<PortMapping>,

    /// Network: user (built-in NAT with DNS, no privileges needed; the host itself is not
    /// reachable unless user:allow_host_loopback=true), none (loopback only), or tap:NAME
    /// (an existing TAP device; the guest is 10.0.2.15/24 via 10.0.2.2).
    #[arg(long = "network", alias = "net", value_name = "MODE", default_value = "user",
          value_parser = parse_network)]
    pub network: NetworkMode,

    /// Remove the container's state and logs when it exits.
    #[arg(long)]
    pub rm: bool,

    /// Run in the background: print the container id once the VM boots and return.
    #[arg(short = 'd', long)]
    pub detach: bool,

    /// When to pull the image: always, missing, never.
    #[arg(long, value_name = "POLICY", default_value = "missing")]
    pub pull: PullPolicy,

    /// Mount the container's root filesystem read-only.
    #[arg(long)]
    pub read_only: bool,

    /// Security options: seccomp=unconfined runs katalite's threads without their seccomp
    /// filters (for debugging); no-new-privileges is always on.
    #[arg(long = "security-opt", value_name = "OPTION", value_parser = parse_security_opt)]
    pub security_opt: Vec<SecurityOpt>,

    /// Share a host directory or a named volume: HOST-DIR:DIR[:ro], NAME:DIR[:ro], or DIR
    /// alone for a new anonymous volume. A missing HOST-DIR is created.
    #[arg(short = 'v', long = "volume", value_name = "[SRC:]DST[:ro|rw]",
          value_parser = parse_volume)]
    pub volumes: Vec<MountSpec>,

    /// Attach a mount: type=bind|volume|tmpfs,source=SRC,target=DST[,readonly]
    /// [,tmpfs-size=SIZE][,tmpfs-mode=MODE].
    #[arg(long = "mount", value_name = "type=TYPE,...", value_parser = parse_mount)]
    pub mounts: Vec<MountSpec>,

    /// Mount a tmpfs in the container: DIR[:size=64m,mode=1777,ro,exec].
    #[arg(long, value_name = "DIR[:OPTIONS]", value_parser = parse_tmpfs)]
    pub tmpfs: Vec<MountSpec>,

    /// Where the output is kept: json-file (the container's log, for `katalite logs`) or
    /// none (only an attached terminal sees it).
    #[arg(long = "log-driver", value_name = "DRIVER", default_value = "json-file",
          value_parser = parse_log_driver)]
    pub log_driver: LogDriver,

    /// Seconds to wait after forwarding SIGTERM or SIGINT before stopping the VM.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub stop_timeout: u64,

    #[command(flatten)]
    pub fetch: FetchArgs,

    /// Boot this host directory as the root filesystem instead of an image.
    #[arg(long, value_name = "DIR")]
    pub rootfs: Option<PathBuf>,

    /// Boot this uncompressed vmlinux instead of the built-in kernel (required on PVM hosts).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,

    /// Show the guest kernel's log (serial console) on stderr.
    #[arg(long)]
    pub kernel_log: bool,

    /// Append ARG to the guest kernel's command line (e.g. `initcall_debug` to see where
    /// the boot's time goes); repeatable.
    #[arg(long, hide = true, value_name = "ARG")]
    pub kernel_arg: Vec<String>,

    /// For `cargo xtask bench`: init prints `katalite-init: probe ...` lines at boot phases.
    #[arg(long, hide = true)]
    pub boot_probe: bool,

    /// For `cargo xtask bench`: how the image reaches the guest — `disk` (its EROFS image on
    /// a read-only virtio-blk disk, the default) or `initramfs` (packed and unpacked into
    /// guest RAM, the path before EROFS), so both can be measured in one run.
    #[arg(
        long,
        hide = true,
        value_enum,
        value_name = "PATH",
        default_value = "disk"
    )]
    pub image_root: ImageRoot,

    /// For `cargo xtask bench`: write the initramfs this run would boot to FILE, then exit 0
    /// without booting (so another VMM can boot the very same bytes).
    #[arg(long, hide = true, value_name = "FILE")]
    pub write_initramfs: Option<PathBuf>,

    /// Print help.
    #[arg(long, action = ArgAction::Help)]
    help: Option<bool>,

    /// The image (unless --rootfs is given), then the command and its arguments
    /// (default: the image's entrypoint and command).
    #[arg(value_name = "ARG", trailing_var_arg = true)]
    pub image_and_command: Vec<String>,
}

/// How an image's root filesystem reaches the guest (`--image-root`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ImageRoot {
    /// The image's EROFS disk image, attached read-only.
    Disk,
    /// The image packed as an initramfs.
    Initramfs,
}

impl RunArgs {
    /// The image reference, or `None` when booting `--rootfs`.
    pub fn image(&self) -> Option<&str> {
        match self.rootfs {
            Some(_) => None,
            None => self.image_and_command.first().map(String::as_str),
        }
    }

    /// The command-line command (may be empty: the image's defaults apply).
    pub fn command(&self) -> &[String] {
        let skip = usize::from(self.rootfs.is_none()).min(self.image_and_command.len());
        &self.image_and_command[skip..]
    }
}

/// A parse error as the one line `katalite: <this>` that `docker` would print (not clap's
/// usage dump): `unknown flag: --x`, or clap's own first line.
pub fn one_line(err: &clap::Error) -> String {
    if err.kind() == ErrorKind::UnknownArgument {
        if let Some(ContextValue::String(arg)) = err.get(ContextKind::InvalidArg) {
            if arg.starts_with('-') {
                return format!("unknown flag: {arg}");
            }
        }
    }
    let rendered = err.render().to_string();
    let first = rendered.lines().next().unwrap_or_default();
    first.strip_prefix("error: ").unwrap_or(first).to_string()
}

/// `-e`: Docker refuses an entry without a name (`=x`).
fn parse_env(text: &str) -> Result<String, String> {
    let name = text.split_once('=').map_or(text, |(name, _)| name);
    if name.is_empty() {
        Err("no variable name".into())
    } else {
        Ok(text.to_string())
    }
}

/// `-w`: Docker requires an absolute path.
fn parse_workdir(text: &str) -> Result<String, String> {
    if text.starts_with('/') {
        Ok(text.to_string())
    } else {
        Err("the working directory must be an absolute path".into())
    }
}

/// `--name`: Docker's `[a-zA-Z0-9][a-zA-Z0-9_.-]+`.
fn parse_name(text: &str) -> Result<String, String> {
    let mut chars = text.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest: Vec<char> = chars.collect();
    let rest_ok = !rest.is_empty()
        && rest
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if first_ok && rest_ok {
        Ok(text.to_string())
    } else {
        Err("only [a-zA-Z0-9][a-zA-Z0-9_.-]+ is allowed".into())
    }
}

/// `--cpus`: a positive decimal like Docker's (`1.5`), rounded up to whole vCPUs.
fn parse_cpus(text: &str) -> Result<u8, String> {
    let (whole, fraction) = split_decimal(text).ok_or("not a number")?;
    let rounded = whole.saturating_add(u128::from(fraction.0 > 0));
    match u8::try_from(rounded) {
        Ok(cpus) if (1..=vmm::MAX_VCPUS).contains(&cpus) => Ok(cpus),
        _ => Err(format!(
            "must be more than 0 and at most {}",
            vmm::MAX_VCPUS
        )),
    }
}

/// `-m`: Docker's memory syntax (`RAMInBytes`: a decimal, an optional space, then
/// `k`/`m`/`g`/`t`/`p` with optional `i` and `b`, powers of 1024), returned in MiB rounded up.
fn parse_memory(text: &str) -> Result<u64, String> {
    const MIB: u128 = 1 << 20;
    let digits = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let (whole, (fraction, scale)) = split_decimal(number).ok_or("not a size")?;
    let unit = unit.strip_prefix(' ').unwrap_or(unit).to_ascii_lowercase();
    let mut rest = unit.as_str();
    let mut multiplier: u128 = 1;
    if let Some(prefix) = rest.chars().next() {
        if let Some(power) = "kmgtp".find(prefix) {
            multiplier = 1 << (10 * (power + 1));
            rest = &rest[1..];
        }
    }
    let rest = rest.strip_prefix('i').unwrap_or(rest);
    if !matches!(rest, "" | "b") {
        return Err("unknown unit (use b, k, m, g, t or p)".into());
    }
    let bytes = whole
        .checked_mul(multiplier)
        .and_then(|b| b.checked_add(fraction.checked_mul(multiplier)? / scale))
        .ok_or("too large")?;
    let mib = bytes.div_ceil(MIB);
    let min = u128::from(vmm::MIN_MEMORY_MIB);
    let max = u128::from(vmm::MAX_MEMORY_MIB);
    if bytes < min * MIB {
        return Err(format!("below the minimum of {min}m"));
    }
    if mib > max {
        return Err(format!("above the maximum of {max}m"));
    }
    u64::try_from(mib).map_err(|_| "too large".into())
}

/// Splits `D+` or `D+.D+` into the whole part and (fraction digits, 10^their count).
fn split_decimal(text: &str) -> Option<(u128, (u128, u128))> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !all_digits(whole) || !all_digits(fraction) {
        return None;
    }
    if text.contains('.') && fraction.is_empty() {
        return None;
    }
    // More digits than matter for bytes or CPUs would only overflow.
    let fraction = &fraction[..fraction.len().min(18)];
    let scale = 10u128.checked_pow(u32::try_from(fraction.len()).ok()?)?;
    Some((whole.parse().ok()?, (fraction.parse().unwrap_or(0), scale)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(["katalite", "run"].iter().chain(args))
    }

    fn run_args(args: &[&str]) -> RunArgs {
        match parse(args).expect("valid arguments").command {
            Command::Run(run) => *run,
            other => panic!("not a run: {other:?}"),
        }
    }

    #[test]
    fn memory_takes_dockers_units() {
        assert_eq!(parse_memory("512m"), Ok(512));
        assert_eq!(parse_memory("1g"), Ok(1024));
        assert_eq!(parse_memory("256M"), Ok(256));
        assert_eq!(parse_memory("1.5g"), Ok(1536));
        assert_eq!(parse_memory("128MiB"), Ok(128));
        assert_eq!(parse_memory("128 mb"), Ok(128));
        assert_eq!(parse_memory("65536k"), Ok(64));
        assert_eq!(parse_memory("67108864"), Ok(64));
        // Bytes that are not whole MiB round up.
        assert_eq!(parse_memory("67108865"), Ok(65));
        assert_eq!(parse_memory("1t"), Ok(1 << 20));
    }

    #[test]
    fn memory_rejects_bad_sizes() {
        assert!(parse_memory("63m").is_err_and(|e| e.contains("minimum of 64m")));
        assert!(parse_memory("256").is_err(), "256 bytes is too little");
        assert!(parse_memory("2t").is_err_and(|e| e.contains("maximum")));
        for bad in ["", "m", "12x", "1.g", ".5g", "1..2g", "-1g", "1gg", "1 g b"] {
            assert!(parse_memory(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(parse_memory("99999999999999999999999999999999999999p").is_err());
    }

    #[test]
    fn cpus_round_fractions_up() {
        assert_eq!(parse_cpus("1"), Ok(1));
        assert_eq!(parse_cpus("1.5"), Ok(2));
        assert_eq!(parse_cpus("0.01"), Ok(1));
        assert_eq!(parse_cpus("2.0"), Ok(2));
        assert_eq!(parse_cpus("32"), Ok(32));
        for bad in ["0", "0.0", "32.5", "33", "-1", "x", "", "1.", "300"] {
            assert!(parse_cpus(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn names_follow_dockers_pattern() {
        for good in ["web", "a1", "my_app.v2-3", "0x"] {
            assert_eq!(parse_name(good).as_deref(), Ok(good));
        }
        for bad in ["a", "", "-web", "_x", ".x", "we b", "wéb", "a/b"] {
            assert!(parse_name(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn env_and_workdir_values_are_checked() {
        assert!(parse_env("=x").is_err() && parse_env("").is_err());
        assert_eq!(parse_env("A=").as_deref(), Ok("A="));
        assert_eq!(parse_env("HOME").as_deref(), Ok("HOME"));
        assert!(parse_workdir("tmp").is_err());
        assert_eq!(parse_workdir("/tmp").as_deref(), Ok("/tmp"));
    }

    #[test]
    fn docker_style_flags_parse() {
        let args = run_args(&[
            "-it",
            "--rm",
            "-e",
            "A=1",
            "-e",
            "B",
            "--env-file",
            "f",
            "-w",
            "/srv",
            "-u",
            "1000:1000",
            "--name",
            "web",
            "-h",
            "box",
            "--cpus",
            "1.5",
            "-m",
            "1g",
            "--read-only",
            "-q",
            "--stop-timeout",
            "3",
            "--pull",
            "never",
            "busybox",
            "sh",
            "-c",
            "exit 3",
        ]);
        assert!(args.interactive && args.tty && args.rm && args.read_only && args.fetch.quiet);
        assert_eq!(args.env, ["A=1", "B"]);
        assert_eq!(args.env_file, [PathBuf::from("f")]);
        assert_eq!(args.workdir.as_deref(), Some("/srv"));
        assert_eq!(args.user.as_deref(), Some("1000:1000"));
        assert_eq!(args.name.as_deref(), Some("web"));
        assert_eq!(args.hostname.as_deref(), Some("box"));
        assert_eq!((args.cpus, args.memory, args.stop_timeout), (2, 1024, 3));
        assert_eq!(args.image(), Some("busybox"));
        assert_eq!(args.command(), ["sh", "-c", "exit 3"]);
    }

    #[test]
    fn the_log_driver_is_json_file_none_or_refused() {
        assert_eq!(run_args(&["busybox"]).log_driver, LogDriver::JsonFile);
        let none = run_args(&["--log-driver", "none", "busybox"]);
        assert_eq!(none.log_driver, LogDriver::None);
        let err = parse_log_driver("syslog").expect_err("syslog is not a driver here");
        assert!(err.contains("json-file and none"), "{err}");
    }

    #[test]
    fn defaults_are_one_cpu_and_512m() {
        let args = run_args(&["busybox"]);
        assert_eq!((args.cpus, args.memory, args.stop_timeout), (1, 512, 10));
        assert!(args.hostname.is_none() && !args.tty && !args.interactive);
        assert!(args.command().is_empty());
    }

    #[test]
    fn flags_after_the_image_belong_to_the_command() {
        let args = run_args(&["--rootfs", "/r", "ls", "-h", "--help"]);
        assert_eq!(args.image(), None);
        assert_eq!(args.command(), ["ls", "-h", "--help"]);
    }

    #[test]
    fn help_is_long_only() {
        let err = parse(&["--help"]).expect_err("help");
        assert_eq!(err.kind(), ErrorKind::DisplayHelp);
        assert!(!err.use_stderr());
        assert!(run_args(&["-h", "x", "img"]).hostname.is_some());
    }

    #[test]
    fn errors_are_one_line() {
        let err = parse(&["--bogus", "busybox"]).expect_err("unknown flag");
        assert_eq!(one_line(&err), "unknown flag: --bogus");
        let err = parse(&["-m", "12x", "busybox"]).expect_err("bad memory");
        let line = one_line(&err);
        assert!(!line.contains('\n') && line.contains("--memory"), "{line}");
        assert!(line.contains("unknown unit"), "{line}");
        let err = parse(&["--name", "-x", "busybox"]).expect_err("bad name");
        assert!(!one_line(&err).contains('\n'));
        let err = parse(&["--cpus"]).expect_err("missing value");
        assert!(!one_line(&err).is_empty() && !one_line(&err).contains('\n'));
    }
}

/// A `--security-opt` katalite understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecurityOpt {
    /// `seccomp=unconfined`.
    SeccompUnconfined,
    /// `no-new-privileges[:true]` (always the case).
    NoNewPrivileges,
}

impl RunArgs {
    /// Whether `--security-opt seccomp=unconfined` was given.
    pub fn seccomp_unconfined(&self) -> bool {
        self.security_opt.contains(&SecurityOpt::SeccompUnconfined)
    }
}

fn parse_log_driver(value: &str) -> Result<LogDriver, String> {
    match value {
        "json-file" => Ok(LogDriver::JsonFile),
        "none" => Ok(LogDriver::None),
        other => Err(format!(
            "unsupported log driver {other:?}: katalite has json-file and none"
        )),
    }
}

fn parse_security_opt(value: &str) -> Result<SecurityOpt, String> {
    match value {
        "seccomp=unconfined" | "seccomp:unconfined" => Ok(SecurityOpt::SeccompUnconfined),
        "no-new-privileges" | "no-new-privileges:true" | "no-new-privileges=true" => {
            Ok(SecurityOpt::NoNewPrivileges)
        }
        other if other.starts_with("seccomp") => Err(format!(
            "{other}: only seccomp=unconfined is supported (katalite's own filters are built in)"
        )),
        other => Err(format!("{other}: unsupported security option")),
    }
}
