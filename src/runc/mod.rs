//! `katalite-runc`: the runc-compatible command line, the front end dockerd, containerd's
//! runc shim (go-runc) and podman (conmon) drive when katalite is their OCI runtime. The
//! same binary answers to it when started under that name (`katalite install-runtime`
//! makes the link).
//!
//! Each container is a VM: `create` reads the bundle into one [`ContainerSpec`] and
//! starts the process the engine waits on (its pid in `--pid-file`, its exit status the
//! container's), which boots the VM once `start` opens its FIFO, with the engine's stdio
//! (or the terminal sent over `--console-socket`) as the workload's. Errors go to stderr
//! and, as JSON lines with `--log-format json`, to the `--log` file the engines read.
//!
//! [`ContainerSpec`]: crate::spec::ContainerSpec

mod bundle;
mod commands;
mod console;
mod exec;
mod hooks;
pub mod install;
mod state;

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::lifecycle::time::Timestamp;

/// The name the engines know the runtime by.
pub const PROGRAM: &str = "katalite-runc";
/// runc's status for a failed command.
const EXIT_FAILED: u8 = 1;

/// `katalite-runc [GLOBAL OPTIONS] COMMAND`
#[derive(Parser, Debug)]
#[command(
    name = PROGRAM,
    version = version(),
    about = "katalite's runc-compatible OCI runtime: each container is a KVM virtual machine"
)]
pub struct RuncCli {
    /// Directory for the containers' state.
    #[arg(long, value_name = "DIR", default_value = state::DEFAULT_ROOT)]
    pub root: PathBuf,
    /// File errors are appended to.
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// `text` or `json` lines in the log file.
    #[arg(long = "log-format", value_name = "FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    /// Accepted for compatibility: a VM has no host cgroup to manage.
    #[arg(long = "systemd-cgroup")]
    pub systemd_cgroup: bool,
    /// Accepted for compatibility.
    #[arg(long)]
    pub debug: bool,
    /// Accepted for compatibility (`true`, `false` or `auto`).
    #[arg(long, value_name = "VALUE")]
    pub rootless: Option<String>,
    /// The command.
    #[command(subcommand)]
    pub command: RuncCommand,
}

/// Log line formats.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// `time="..." level=error msg="..."`
    Text,
    /// `{"level":"error","msg":"...","time":"..."}`
    Json,
}

/// The runc commands katalite implements.
#[derive(Subcommand, Debug)]
pub enum RuncCommand {
    /// Create a container from an OCI bundle; its process waits for `start`.
    Create(commands::CreateArgs),
    /// Start a created container's process.
    Start(commands::IdArgs),
    /// Print a container's state as JSON.
    State(commands::IdArgs),
    /// Send a signal to a container's process.
    Kill(commands::KillArgs),
    /// Delete a container (stopped, or any with --force).
    Delete(commands::DeleteArgs),
    /// Run a process in a running container.
    Exec(exec::ExecArgs),
    /// List a container's host processes.
    Ps(commands::PsArgs),
    /// Print what this runtime supports (runtime-spec features.md) as JSON.
    Features,
    /// The process the engine waits on (started by `create`).
    #[command(hide = true)]
    Init(commands::IdArgs),
    /// The process an `exec` runs as (started by `exec`).
    #[command(hide = true, name = "exec-relay")]
    ExecRelay(exec::RelayArgs),
}

fn version() -> &'static str {
    concat!(env!("CARGO_PKG_VERSION"), "\nspec: 1.1.0")
}

/// Runs `katalite-runc` with `args` (argv[0] included).
pub fn main(args: Vec<OsString>) -> ExitCode {
    let cli = match RuncCli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => {
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!("{PROGRAM}: {}", crate::cli::one_line(&err));
            return ExitCode::from(EXIT_FAILED);
        }
    };
    match commands::dispatch(&cli) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            let message = format!("{err:#}");
            log_error(&cli, &message);
            eprintln!("{PROGRAM}: {message}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// Appends `message` to the `--log` file, in its format; a log that cannot be written
/// only loses the line (stderr still has it).
fn log_error(cli: &RuncCli, message: &str) {
    let Some(path) = &cli.log else {
        return;
    };
    let line = log_line(cli.log_format, message, Timestamp::now());
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path);
    if let Ok(mut file) = file {
        let _ = file.write_all(line.as_bytes());
    }
}

/// One error line as runc (logrus) writes it.
fn log_line(format: LogFormat, message: &str, time: Timestamp) -> String {
    let time = time.to_rfc3339();
    match format {
        LogFormat::Json => {
            let line = serde_json::json!({"level": "error", "msg": message, "time": time});
            format!("{line}\n")
        }
        LogFormat::Text => format!("time={time:?} level=error msg={message:?}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<RuncCli, clap::Error> {
        RuncCli::try_parse_from(std::iter::once(PROGRAM).chain(args.iter().copied()))
    }

    #[test]
    fn takes_what_go_runc_sends() {
        let cli = parse(&[
            "--root",
            "/run/containerd/runc/default",
            "--log",
            "/run/c/log.json",
            "--log-format",
            "json",
            "--systemd-cgroup",
            "create",
            "--bundle",
            "/b",
            "--pid-file",
            "/b/init.pid",
            "--console-socket",
            "/tmp/pty.sock",
            "c1",
        ])
        .expect("create");
        assert_eq!(cli.log_format, LogFormat::Json);
        let RuncCommand::Create(create) = cli.command else {
            panic!("not create");
        };
        assert_eq!(create.id, "c1");
        assert_eq!(
            create.console_socket.as_deref(),
            Some("/tmp/pty.sock".as_ref())
        );
        let cli = parse(&["kill", "--all", "c1", "KILL"]).expect("kill");
        assert!(matches!(cli.command, RuncCommand::Kill(k) if k.all && k.signal == "KILL"));
        let cli = parse(&["kill", "c1"]).expect("kill");
        assert!(matches!(cli.command, RuncCommand::Kill(k) if k.signal == "SIGTERM"));
        let cli = parse(&["delete", "--force", "c1"]).expect("delete");
        assert!(matches!(cli.command, RuncCommand::Delete(d) if d.force));
        let cli = parse(&["ps", "--format", "json", "c1"]).expect("ps");
        assert!(matches!(cli.command, RuncCommand::Ps(_)));
        let cli = parse(&[
            "exec",
            "--process",
            "/p.json",
            "--detach",
            "--pid-file",
            "/e.pid",
            "c1",
        ])
        .expect("exec");
        assert!(matches!(cli.command, RuncCommand::Exec(e) if e.detach));
        assert!(parse(&["create", "c1", "--bogus"]).is_err());
    }

    #[test]
    fn error_lines_are_logrus_json_or_text() {
        let time = Timestamp::parse("2026-12-07T01:02:03.5Z").expect("time");
        let json = log_line(LogFormat::Json, "no \"such\" container", time);
        let value: serde_json::Value = serde_json::from_str(&json).expect("json");
        assert_eq!(value["level"], "error");
        assert_eq!(value["msg"], "no \"such\" container");
        assert_eq!(value["time"], "2026-12-07T01:02:03.500000000Z");
        let text = log_line(LogFormat::Text, "boom", time);
        assert_eq!(
            text,
            "time=\"2026-12-07T01:02:03.500000000Z\" level=error msg=\"boom\"\n"
        );
    }
}
