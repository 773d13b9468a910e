//! The PID-1 steps, in order: mount the kernel filesystems, open the host channel, read
//! the run config, mount the volumes, configure the network, write the identity files,
//! resolve the user, start the workload, relay its stdio and signals until it exits, stop
//! what is left, report the status, power off.
//! Failures of init itself are reported as `InitFailed` (the host exits 125).

mod console;
mod env;
mod etc_files;
mod exec;
mod mounts;
mod network;
mod relay;
mod report;
mod root;
mod session;
mod signals;
mod users;
mod volumes;
mod workload;

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use guest_init::{GuestStatus, RunConfig, CONFIG_PATH};
use nix::poll::PollTimeout;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use console::ConsoleError;
use etc_files::EtcError;
use exec::{Container, Execs};
use mounts::MountError;
use network::NetError;
use relay::{Relay, RelayError, WORKLOAD};
use root::RootError;
use signals::{SignalError, Signals};
use users::UserError;
use volumes::VolumeError;
use workload::WorkloadError;

/// With `-t`, how long init waits for the host's first terminal size before starting the
/// workload anyway. The host queues it before boot, so it normally arrives at once.
const INITIAL_SIZE_WAIT: Duration = Duration::from_secs(1);

/// After the workload exits and the rest is killed, how long output may stay silent
/// before init stops waiting for end of file (a process stuck in the kernel keeps a pipe).
const DRAIN_IDLE: Duration = Duration::from_secs(5);

/// A failure of init itself.
#[derive(Debug, thiserror::Error)]
enum InitError {
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error(transparent)]
    Root(#[from] RootError),
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Console(#[from] ConsoleError),
    #[error(transparent)]
    Signals(#[from] SignalError),
    #[error(transparent)]
    Etc(#[from] EtcError),
    #[error(transparent)]
    Network(#[from] NetError),
    #[error(transparent)]
    User(#[from] UserError),
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    #[error(transparent)]
    Relay(#[from] RelayError),
    #[error("cannot read {CONFIG_PATH}")]
    ReadConfig(#[source] io::Error),
    #[error("invalid {CONFIG_PATH}")]
    ParseConfig(#[source] serde_json::Error),
    #[error("the run config has no command")]
    NoCommand,
    #[error("cannot read {0}")]
    ImageFile(&'static str, #[source] io::Error),
}

/// Runs init and never returns.
pub fn main() {
    let status = run().unwrap_or_else(|err| {
        console::log(&chain(&err));
        GuestStatus::InitFailed
    });
    report::finish(status)
}

fn run() -> Result<GuestStatus, InitError> {
    // The config says where the root is, so it is read first, from the initramfs; a failure
    // to read it is reported once a console exists.
    let config = read_config();
    let root_disk = config.as_ref().ok().and_then(|c| c.root_disk.as_deref());
    let root_share = config.as_ref().ok().and_then(|c| c.root_share.as_deref());
    if let Some(disk) = root_disk {
        root::mount_early_dev()?;
        console::ensure_std_fds();
        let read_only = config.as_ref().is_ok_and(|c| c.read_only);
        root::enter(disk, read_only)?;
    } else if let Some(tag) = root_share {
        root::mount_early_dev()?;
        console::ensure_std_fds();
        root::enter_share(tag)?;
    }
    let switched = root_disk.is_some() || root_share.is_some();
    mounts::mount_kernel_filesystems(!switched)?;
    console::ensure_std_fds();
    let signals = Signals::install()?;
    let channel = console::open_channel()?;
    let config = config?;
    if config.boot_probe {
        console::log("probe init");
    }
    // Docker's order: volumes first, so the working directory and the files init writes
    // may land inside them.
    volumes::mount_all(&config.mounts)?;

    let hostname = etc_files::choose_hostname(&config.hostname)?;
    etc_files::set_hostname(&hostname)?;
    network::configure(config.network.as_ref())?;
    etc_files::write_all(Path::new("/"), &hostname, config.network.as_ref())?;
    mounts::ensure_tmp()?;
    let user = users::resolve(
        &config.user,
        read_image_file("/etc/passwd")?.as_deref(),
        read_image_file("/etc/group")?.as_deref(),
    )?;
    let workdir = workload::normalise_workdir(&config.working_dir);
    workload::create_workdir(&workdir)?;
    if config.read_only {
        mounts::remount_root_read_only()?;
    }
    let env = env::assemble(&config.env, &hostname, &user.home, config.tty);

    let (child_stdio, streams) = workload::stdio(config.tty, config.open_stdin)?;
    let mut relay = Relay::new(channel, streams);
    if config.tty {
        await_initial_size(&mut relay, &signals)?;
    }
    let spec = workload::Spec {
        args: &config.args,
        env: &env,
        workdir: &workdir,
        user: &user,
    };
    if config.boot_probe {
        console::log("probe workload");
    }
    let pid = match workload::spawn(&spec, child_stdio) {
        Ok(pid) => pid,
        Err(err) => {
            console::log(&err.to_string());
            return Ok(GuestStatus::Exited(err.code));
        }
    };
    let mut execs = Execs::new(Container {
        env: config.env,
        hostname,
        user: config.user,
        workdir,
    });
    let code = supervise(&mut relay, &signals, pid, &mut execs)?;
    Ok(GuestStatus::Exited(code))
}

/// Reads the run config, then removes init's directory so the workload sees only the image.
fn read_config() -> Result<RunConfig, InitError> {
    let text = std::fs::read(CONFIG_PATH).map_err(InitError::ReadConfig)?;
    let config: RunConfig = serde_json::from_slice(&text).map_err(InitError::ParseConfig)?;
    if config.args.is_empty() {
        return Err(InitError::NoCommand);
    }
    if let Some(dir) = Path::new(CONFIG_PATH).parent() {
        // Unlinking the running init is fine; a leftover directory is only cosmetic.
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(config)
}

/// The text of one of the image's files, `None` when it has none.
fn read_image_file(path: &'static str) -> Result<Option<String>, InitError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(InitError::ImageFile(path, err)),
    }
}

/// Relays until the host's first terminal size is applied, so a workload asking for its
/// size at once (`stty size`) sees the real one; gives up after [`INITIAL_SIZE_WAIT`].
fn await_initial_size(relay: &mut Relay, signals: &Signals) -> Result<(), InitError> {
    let deadline = Instant::now() + INITIAL_SIZE_WAIT;
    while !relay.resized() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let turn = relay.turn(signals.fd(), timeout(left))?;
        log_problems(relay);
        if turn.extra_ready {
            // No workload yet: nothing to forward to or reap.
            signals.drain()?;
        }
    }
    Ok(())
}

/// Relays stdio and signals and runs exec sessions until the workload exits, then kills
/// every other process (exec sessions too), drains the output to end of file, and flushes
/// it to the host. Returns Docker's status.
fn supervise(
    relay: &mut Relay,
    signals: &Signals,
    workload: Pid,
    execs: &mut Execs,
) -> Result<u8, InitError> {
    let status = loop {
        let turn = relay.turn(signals.fd(), PollTimeout::NONE)?;
        log_problems(relay);
        execs.start_requested(relay);
        for (stream, number) in relay.take_signals() {
            // Docker signals the main process only, with or without a terminal.
            match Signal::try_from(number) {
                Ok(signal) if stream == WORKLOAD => {
                    let _ = kill(workload, signal);
                }
                _ => execs.signal(stream, number),
            }
        }
        if turn.extra_ready {
            for signal in signals.drain()? {
                let _ = kill(workload, signal);
            }
            let mut status = None;
            for (pid, code) in signals::reap() {
                if pid == workload {
                    status = Some(code);
                } else {
                    execs.reaped(relay, pid, code);
                }
            }
            if let Some(status) = status {
                break status;
            }
        }
    };

    // Like the end of a container's PID namespace: the rest dies with the workload. The
    // pipes then reach end of file once what the processes wrote has been read.
    relay.close_input();
    signals::kill_all();
    let mut last_progress = Instant::now();
    while relay.outputs_open() || !relay.flushed() {
        let left = DRAIN_IDLE.saturating_sub(last_progress.elapsed());
        if left.is_zero() {
            if !relay.outputs_open() {
                break;
            }
            relay.abandon_outputs();
            last_progress = Instant::now();
            continue;
        }
        let turn = relay.turn(signals.fd(), timeout(left))?;
        log_problems(relay);
        if turn.progressed {
            last_progress = Instant::now();
        }
        if turn.extra_ready {
            signals.drain()?;
            signals::reap();
        }
    }
    signals::kill_all_and_reap();
    // On /dev/hvc0, written bytes may still sit in the hvc driver's buffer; the VMM must
    // have them all before the status write ends the VM. A generic port is no tty
    // (ENOTTY): what init wrote is already in the device's transmit queue, which the VMM
    // drains after the status write.
    let _ = nix::sys::termios::tcdrain(relay.channel());
    Ok(status)
}

fn timeout(duration: Duration) -> PollTimeout {
    // Round up so a sub-millisecond remainder does not become a busy poll.
    let millis = duration.as_millis().saturating_add(1);
    PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX)
}

fn log_problems(relay: &mut Relay) {
    for problem in relay.take_problems() {
        console::log(&chain(&problem));
    }
}

/// An error and its sources on one line: `what: why: root cause`.
fn chain(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

/// Serialises the tests that create or reap processes: reaping takes any child of the
/// test binary, including another test's.
#[cfg(test)]
static CHILDREN: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_print_with_their_causes_on_one_line() {
        let err = InitError::ImageFile(
            "/etc/passwd",
            io::Error::new(io::ErrorKind::PermissionDenied, "denied"),
        );
        assert_eq!(chain(&err), "cannot read /etc/passwd: denied");
        let err = InitError::from(UserError::UnknownUser("bob".into()));
        assert_eq!(
            chain(&err),
            "unable to find user bob: no matching entries in passwd file"
        );
    }

    #[test]
    fn poll_timeouts_round_up() {
        assert_eq!(i32::from(timeout(Duration::from_micros(10))), 1);
        assert_eq!(i32::from(timeout(Duration::from_millis(5))), 6);
        assert_eq!(timeout(Duration::from_secs(u64::MAX)), PollTimeout::MAX);
    }
}
