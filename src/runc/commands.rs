//! The runc lifecycle commands: `create`, `start`, `state`, `kill`, `delete`, `ps`,
//! `features`, and the hidden `init` that `create` starts.

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;

use super::bundle::{self, NetNamespace};
use super::state::{self, Entry, RuncState, Status};
use super::{console, exec, hooks, LogFormat, RuncCli, RuncCommand, PROGRAM};
use crate::lifecycle::control::{self, ControlRequest};
use crate::lifecycle::state::{write_atomically, Runtime, Supervisor};
use crate::lifecycle::time::Timestamp;
use crate::spec::ContainerSpec;

const SIGKILL: i32 = 9;
/// How long `start` waits for the init to take its FIFO, and `delete` for a kill.
const WAIT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(5);

/// `ID` alone.
#[derive(Args, Debug)]
pub struct IdArgs {
    /// The container id.
    pub id: String,
}

/// `create`.
#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The bundle directory (default: the current directory).
    #[arg(short, long, value_name = "DIR")]
    pub bundle: Option<PathBuf>,
    /// File to write the container process's pid to.
    #[arg(long = "pid-file", value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
    /// Unix socket the terminal's master is sent to (`process.terminal`).
    #[arg(long = "console-socket", value_name = "PATH")]
    pub console_socket: Option<PathBuf>,
    /// Accepted for compatibility: the VM has no host namespaces to pivot in.
    #[arg(long = "no-pivot")]
    pub no_pivot: bool,
    /// Accepted for compatibility.
    #[arg(long = "no-new-keyring")]
    pub no_new_keyring: bool,
    /// The container id.
    pub id: String,
}

/// `kill`.
#[derive(Args, Debug)]
pub struct KillArgs {
    /// Send it to every process of the container (the VM holds them all: same effect).
    #[arg(short, long)]
    pub all: bool,
    /// The container id.
    pub id: String,
    /// Signal name or number.
    #[arg(default_value = "SIGTERM")]
    pub signal: String,
}

/// `delete`.
#[derive(Args, Debug)]
pub struct DeleteArgs {
    /// Kill a running container first.
    #[arg(short, long)]
    pub force: bool,
    /// The container id.
    pub id: String,
}

/// `ps`.
#[derive(Args, Debug)]
pub struct PsArgs {
    /// `table` or `json`.
    #[arg(short, long, default_value = "table")]
    pub format: String,
    /// The container id.
    pub id: String,
}

/// Runs the command `cli` names.
pub fn dispatch(cli: &RuncCli) -> Result<u8> {
    match &cli.command {
        RuncCommand::Create(args) => create(cli, args).map(|()| 0),
        RuncCommand::Start(args) => start(&cli.root, &args.id).map(|()| 0),
        RuncCommand::State(args) => print_state(&cli.root, &args.id).map(|()| 0),
        RuncCommand::Kill(args) => kill(&cli.root, args).map(|()| 0),
        RuncCommand::Delete(args) => delete(&cli.root, args).map(|()| 0),
        RuncCommand::Exec(args) => exec::exec(cli, args),
        RuncCommand::Ps(args) => ps(&cli.root, args).map(|()| 0),
        RuncCommand::Features => features().map(|()| 0),
        RuncCommand::Init(args) => init(&cli.root, &args.id),
        RuncCommand::ExecRelay(args) => exec::relay(&cli.root, args),
    }
}

/// Reads the bundle, records the container and starts its init, which waits for `start`.
fn create(cli: &RuncCli, args: &CreateArgs) -> Result<()> {
    let bundle = match &args.bundle {
        Some(dir) => dir.clone(),
        None => std::env::current_dir().context("no current directory")?,
    };
    let bundle = fs::canonicalize(&bundle)
        .with_context(|| format!("cannot open bundle {}", bundle.display()))?;
    let config = bundle::read_config(&bundle)?;
    let spec = bundle::container_spec(&args.id, &bundle, &config).map_err(|e| anyhow!(e))?;
    let terminal = spec.stdio.tty;
    if terminal && args.console_socket.is_none() {
        bail!("cannot allocate tty if runc will detach without setting console socket");
    }
    if !terminal && args.console_socket.is_some() {
        bail!("cannot use console socket if runc will not detach or allocate tty");
    }
    crate::boot::preflight(&spec)?;
    let dir = state::create_dir(&cli.root, &args.id)?;
    let rootfs = match &spec.root.source {
        crate::spec::RootSource::Rootfs { path } => path.clone(),
        crate::spec::RootSource::Image { .. } => PathBuf::new(),
    };
    let hooks = &config.hooks;
    let mut entry = Entry::new(
        dir,
        RuncState {
            id: args.id.clone(),
            bundle,
            rootfs,
            created: Timestamp::now(),
            init: None,
            started: false,
            annotations: config.annotations.clone(),
            poststart: hooks.poststart.clone(),
            poststop: hooks.poststop.clone(),
        },
    );
    let made = (|| {
        write_atomically(&entry.spec_path(), &serde_json::to_vec(&spec)?)
            .context("cannot write the container's spec")?;
        rustix::fs::mknodat(
            rustix::fs::CWD,
            entry.exec_fifo(),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
            0,
        )
        .context("cannot make the start FIFO")?;
        entry.save()?;
        let slave = match &args.console_socket {
            Some(socket) => {
                let (master, slave) = console::open_pty()?;
                console::send_master(socket, &master)?;
                Some(slave)
            }
            None => None,
        };
        let pid = spawn_helper(cli, &["init", &args.id], slave, &config.net_namespace())?;
        entry.state.init = Supervisor::of(pid);
        entry.save()?;
        if let Some(path) = &args.pid_file {
            write_pid_file(path, pid)?;
        }
        let report = serde_json::to_vec(&entry.report())?;
        hooks::run("prestart", &hooks.prestart, &report)?;
        hooks::run("createRuntime", &hooks.create_runtime, &report)
    })();
    if let Err(err) = made {
        if let Some(init) = &entry.state.init {
            signal_process(init.pid, SIGKILL);
        }
        let _ = entry.remove();
        return Err(err);
    }
    Ok(())
}

/// Starts this binary as `katalite-runc [--root, --log] ARGS` in a session of its own,
/// with the caller's stdio or, given one, a terminal's slave as its controlling terminal
/// and stdio, in the network namespace `netns`. The engine's subreaper inherits it once
/// the caller exits.
///
/// A container's process never stays in the host's network namespace when the bundle
/// asks for another: dockerd's prestart hook configures whatever namespace that process
/// is in, which must not be the host's.
pub fn spawn_helper(
    cli: &RuncCli,
    args: &[&str],
    slave: Option<OwnedFd>,
    netns: &NetNamespace,
) -> Result<i32> {
    let mut command = Command::new("/proc/self/exe");
    command.arg0(PROGRAM).arg("--root").arg(&cli.root);
    if let Some(log) = &cli.log {
        let format = match cli.log_format {
            LogFormat::Json => "json",
            LogFormat::Text => "text",
        };
        command.arg("--log").arg(log).args(["--log-format", format]);
    }
    command.args(args);
    let with_terminal = slave.is_some();
    let new_netns = *netns == NetNamespace::New;
    let join = match netns {
        NetNamespace::Join(path) => Some(
            fs::File::open(path)
                .with_context(|| format!("cannot open network namespace {}", path.display()))?,
        ),
        _ => None,
    };
    let join_fd = join.as_ref().map(|file| file.as_raw_fd());
    if let Some(slave) = slave {
        let out = slave.try_clone().context("dup terminal")?;
        let err = slave.try_clone().context("dup terminal")?;
        command
            .stdin(Stdio::from(slave))
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
    }
    // SAFETY: between fork and exec the child calls only setsid and ioctl, both
    // async-signal-safe, and touches no memory shared with other threads.
    unsafe {
        command.pre_exec(move || {
            rustix::process::setsid()?;
            // SAFETY: unshare and setns take plain integers; `join_fd` stays open in the
            // parent (and so in this child) until after the spawn.
            if new_netns && libc::unshare(libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(fd) = join_fd {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if with_terminal {
                // SAFETY: fd 0 is the terminal's slave, open until exec and after.
                let stdin = rustix::fd::BorrowedFd::borrow_raw(0);
                rustix::process::ioctl_tiocsctty(stdin)?;
            }
            Ok(())
        });
    }
    let child = command
        .spawn()
        .context("cannot start the container process")?;
    i32::try_from(child.id()).context("pid out of range")
}

/// Writes `pid` (no newline, as runc) to `path`, atomically.
pub fn write_pid_file(path: &Path, pid: i32) -> Result<()> {
    write_atomically(path, pid.to_string().as_bytes())
        .with_context(|| format!("cannot write pid file {}", path.display()))
}

/// The init: waits for `start` on the FIFO, then boots the container attached to its
/// stdio; its exit status is the workload's.
fn init(root: &Path, id: &str) -> Result<u8> {
    let entry = Entry::load(root, id)?;
    let spec: ContainerSpec = serde_json::from_slice(
        &fs::read(entry.spec_path()).context("cannot read the container's spec")?,
    )
    .context("invalid container spec")?;
    // Blocks until `start` opens the other end.
    let mut fifo = OpenOptions::new()
        .write(true)
        .open(entry.exec_fifo())
        .context("cannot open the start FIFO")?;
    fifo.write_all(b"0").context("cannot signal the start")?;
    drop(fifo);
    crate::lifecycle::supervise::foreground(&spec)
}

/// Lets the init boot the VM; poststart hooks follow (their failures are warnings, as
/// the runtime spec says).
fn start(root: &Path, id: &str) -> Result<()> {
    let mut entry = Entry::load(root, id)?;
    match entry.status() {
        Status::Created => {}
        Status::Running => bail!("cannot start an already running container"),
        Status::Stopped => bail!("cannot start a container that has stopped"),
    }
    let mut fifo = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(entry.exec_fifo())
        .context("cannot open the start FIFO")?;
    let deadline = Instant::now() + WAIT;
    let mut byte = [0u8; 1];
    loop {
        match fifo.read(&mut byte) {
            Ok(1) => break,
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) => return Err(err).context("cannot read the start FIFO"),
        }
        if entry.live_pid() == 0 {
            bail!("the container process ended before it started");
        }
        if Instant::now() >= deadline {
            bail!("the container process did not take the start signal");
        }
        thread::sleep(POLL);
    }
    let _ = fs::remove_file(entry.exec_fifo());
    entry.state.started = true;
    entry.save()?;
    let report = serde_json::to_vec(&entry.report())?;
    if let Err(err) = hooks::run("poststart", &entry.state.poststart, &report) {
        eprintln!("{PROGRAM}: warning: {err:#}");
    }
    Ok(())
}

fn print_state(root: &Path, id: &str) -> Result<()> {
    let entry = Entry::load(root, id)?;
    println!("{}", serde_json::to_string_pretty(&entry.report())?);
    Ok(())
}

/// The signal reaches the workload in the VM through the supervisor once it is booted
/// (KILL ends the VM); a created container's waiting init gets it itself.
fn kill(root: &Path, args: &KillArgs) -> Result<()> {
    let signal = crate::lifecycle::commands::parse_signal(&args.signal).map_err(|e| anyhow!(e))?;
    let entry = Entry::load(root, &args.id)?;
    let pid = entry.live_pid();
    if pid == 0 {
        bail!("container not running");
    }
    if entry.status() == Status::Running {
        if let Some(container) = katalite_container(&args.id) {
            if control::request(&container.control_path(), &ControlRequest::Signal(signal)).is_ok()
            {
                return Ok(());
            }
        }
    }
    if !signal_process(pid, signal) {
        bail!("cannot send signal {signal} to the container process");
    }
    Ok(())
}

/// katalite's own entry of the running container (its name is the engine's id).
fn katalite_container(id: &str) -> Option<crate::lifecycle::state::Container> {
    let container = Runtime::open().ok()?.find(id).ok()?;
    (container.state.name == id && container.is_running()).then_some(container)
}

fn delete(root: &Path, args: &DeleteArgs) -> Result<()> {
    let entry = match Entry::load(root, &args.id) {
        Ok(entry) => entry,
        // containerd deletes with --force what may already be gone.
        Err(_) if args.force && state::check_id(&args.id).is_ok() => return Ok(()),
        Err(err) => return Err(err),
    };
    match entry.status() {
        Status::Running if !args.force => bail!(
            "cannot delete container {} that is not stopped: running",
            args.id
        ),
        Status::Running | Status::Created => {
            signal_process(entry.live_pid(), SIGKILL);
            let deadline = Instant::now() + WAIT;
            while entry.live_pid() != 0 {
                if Instant::now() >= deadline {
                    bail!("container process {} did not end", entry.live_pid());
                }
                thread::sleep(POLL);
            }
        }
        Status::Stopped => {}
    }
    // An init killed before it could clean up leaves katalite's entry behind.
    if let Ok(container) = Runtime::open().and_then(|runtime| runtime.find(&args.id)) {
        if container.state.name == args.id && !container.is_running() {
            let _ = container.remove();
        }
    }
    let report = serde_json::to_vec(&entry.report())?;
    if let Err(err) = hooks::run("poststop", &entry.state.poststop, &report) {
        eprintln!("{PROGRAM}: warning: {err:#}");
    }
    entry.remove()
}

/// The container's host processes: its init (the VM runs inside it).
fn ps(root: &Path, args: &PsArgs) -> Result<()> {
    let entry = Entry::load(root, &args.id)?;
    let pids: Vec<i32> = Some(entry.live_pid())
        .filter(|&pid| pid != 0)
        .into_iter()
        .collect();
    match args.format.as_str() {
        "json" => println!("{}", serde_json::to_string(&pids)?),
        "table" => {
            println!("PID");
            for pid in pids {
                println!("{pid}");
            }
        }
        other => bail!("invalid format option: {other}"),
    }
    Ok(())
}

/// `kill(pid, signal)`; false if it could not be delivered.
fn signal_process(pid: i32, signal: i32) -> bool {
    // SAFETY: kill(2) takes plain integers.
    pid > 0 && unsafe { libc::kill(pid, signal) } == 0
}

/// What this runtime supports, in runtime-spec's features.md format.
fn features() -> Result<()> {
    let value = serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": state::OCI_VERSION,
        "hooks": ["prestart", "createRuntime", "poststart", "poststop"],
        "mountOptions": ["bind", "rbind", "ro", "rw", "noexec", "size", "mode"],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "user", "uts"],
            "capabilities": [],
            "cgroup": {"v1": false, "v2": false, "systemd": false, "systemdUser": false},
            "seccomp": {"enabled": false},
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false}
        },
        "annotations": {
            "io.github.katalite.isolation": "vm"
        }
    });
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pid_file_holds_the_bare_pid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("init.pid");
        write_pid_file(&path, 4242).expect("write");
        assert_eq!(fs::read_to_string(&path).expect("read"), "4242");
    }

    #[test]
    fn signals_reach_only_live_processes() {
        assert!(!signal_process(0, 0));
        assert!(signal_process(
            i32::try_from(std::process::id()).expect("pid"),
            0
        ));
    }
}
