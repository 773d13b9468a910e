//! `exec`: a process in a running container, run by the VM's init like `katalite exec`.
//! The engine waits on a relay process (its pid in `--pid-file`) that speaks the exec
//! session with the container's supervisor, with the engine's stdio (or the terminal sent
//! over `--console-socket`), and exits with the process's status.

use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;
use guest_init::ExecConfig;

use super::bundle::{self, NetNamespace, Process};
use super::commands::{spawn_helper, write_pid_file};
use super::console;
use super::state::{Entry, Status};
use super::RuncCli;
use crate::lifecycle::state::Runtime;

/// `exec`.
#[derive(Args, Debug)]
pub struct ExecArgs {
    /// The process as OCI JSON (`process` of config.json); the other options are ignored.
    #[arg(short, long, value_name = "FILE")]
    pub process: Option<PathBuf>,
    /// Return once the process runs; its relay's pid goes to --pid-file.
    #[arg(short, long)]
    pub detach: bool,
    /// File to write the relay's pid to.
    #[arg(long = "pid-file", value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
    /// Unix socket the terminal's master is sent to.
    #[arg(long = "console-socket", value_name = "PATH")]
    pub console_socket: Option<PathBuf>,
    /// Give the process a terminal (without --process).
    #[arg(short, long)]
    pub tty: bool,
    /// Working directory (without --process).
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
    /// NAME=value (without --process).
    #[arg(short, long, value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// uid[:gid] (without --process).
    #[arg(short, long, value_name = "UID[:GID]")]
    pub user: Option<String>,
    /// The container id.
    pub id: String,
    /// The command (without --process).
    #[arg(trailing_var_arg = true)]
    pub command: Vec<String>,
}

/// The hidden `exec-relay ID FILE`.
#[derive(Args, Debug)]
pub struct RelayArgs {
    /// The container id.
    pub id: String,
    /// The session's [`ExecConfig`] as JSON; removed once read.
    pub config: PathBuf,
}

/// Starts the relay; without `--detach`, waits for it and returns its status.
pub fn exec(cli: &RuncCli, args: &ExecArgs) -> Result<u8> {
    let entry = Entry::load(&cli.root, &args.id)?;
    if entry.status() != Status::Running {
        bail!("cannot exec in a stopped or not started container");
    }
    let config = match &args.process {
        Some(path) => exec_config(&bundle::read_json::<Process>(path)?),
        None => {
            if args.command.is_empty() {
                bail!("exec: no command and no --process");
            }
            ExecConfig {
                args: args.command.clone(),
                env: args.env.clone(),
                working_dir: args.cwd.clone().unwrap_or_default(),
                user: args.user.clone().unwrap_or_default(),
                tty: args.tty,
                open_stdin: true,
                console_size: None,
            }
        }
    };
    if config.tty && args.console_socket.is_none() && args.detach {
        bail!("cannot allocate tty if runc will detach without setting console socket");
    }
    let path = write_session(entry.dir(), &config)?;
    let slave = match &args.console_socket {
        Some(socket) if config.tty => {
            let (master, slave) = console::open_pty()?;
            console::send_master(socket, &master)?;
            Some(slave)
        }
        _ => None,
    };
    let path_text = path.to_string_lossy().into_owned();
    let pid = match spawn_helper(
        cli,
        &["exec-relay", &args.id, &path_text],
        slave,
        &NetNamespace::Host,
    ) {
        Ok(pid) => pid,
        Err(err) => {
            let _ = fs::remove_file(&path);
            return Err(err);
        }
    };
    if let Some(pid_file) = &args.pid_file {
        write_pid_file(pid_file, pid)?;
    }
    if args.detach {
        return Ok(0);
    }
    wait_status(pid)
}

/// An OCI process as an exec session: its environment is complete, its user numeric.
fn exec_config(process: &Process) -> ExecConfig {
    ExecConfig {
        args: process.args.clone(),
        env: process.env.clone(),
        working_dir: process.cwd.clone(),
        user: process.user_spec(),
        tty: process.terminal,
        // The engine hands over stdin as it wants it (a FIFO, or /dev/null).
        open_stdin: true,
        console_size: None,
    }
}

/// Writes `config` for the relay to a private file in the container's directory.
fn write_session(dir: &Path, config: &ExecConfig) -> Result<PathBuf> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let path = dir.join(format!("exec-{}-{nanos}.json", std::process::id()));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    serde_json::to_writer(&mut file, config).context("cannot write the exec session")?;
    Ok(path)
}

/// The relay: the exec session with the container's supervisor, on this process's stdio.
pub fn relay(root: &Path, args: &RelayArgs) -> Result<u8> {
    let expected = Entry::load(root, &args.id)?.dir().to_path_buf();
    if args.config.parent() != Some(expected.as_path()) {
        bail!("exec session file outside the container's directory");
    }
    let config: ExecConfig = bundle::read_json(&args.config)?;
    let _ = fs::remove_file(&args.config);
    let container = Runtime::open()?.find(&args.id)?;
    if container.state.name != args.id || !container.is_running() {
        bail!("container {} is not running", args.id);
    }
    let (connection, reader) = crate::exec::client::open(&container.control_path(), &config, true)?;
    crate::exec::client::attach(config.tty, config.open_stdin, connection, reader)
}

/// Waits for child `pid` and returns its exit status as a shell reports it.
fn wait_status(pid: i32) -> Result<u8> {
    let pid = rustix::process::Pid::from_raw(pid).context("invalid pid")?;
    let status = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty())
        .context("cannot wait for the exec relay")?
        .map(|(_, status)| status);
    let Some(status) = status else {
        bail!("the exec relay vanished");
    };
    if let Some(code) = status.exit_status() {
        return Ok(u8::try_from(code & 0xff).unwrap_or(u8::MAX));
    }
    let signal = status.terminating_signal().unwrap_or(0);
    Ok(u8::try_from(128 + (signal & 0x7f)).unwrap_or(u8::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_oci_process_becomes_an_exec_session() {
        let process: Process = serde_json::from_str(
            r#"{"terminal":true,"user":{"uid":1000,"gid":100},"args":["sh","-c","id"],
                "env":["PATH=/bin","TERM=xterm"],"cwd":"/tmp","capabilities":{}}"#,
        )
        .expect("process");
        let config = exec_config(&process);
        assert_eq!(config.args, ["sh", "-c", "id"]);
        assert_eq!(config.env, ["PATH=/bin", "TERM=xterm"]);
        assert_eq!(config.working_dir, "/tmp");
        assert_eq!(config.user, "1000:100");
        assert!(config.tty && config.open_stdin);
    }

    #[test]
    fn the_session_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let config = exec_config(&Process::default());
        let path = write_session(dir.path(), &config).expect("write");
        let mode = fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let back: ExecConfig = bundle::read_json(&path).expect("read");
        assert_eq!(back.args, config.args);
    }
}
