//! The VM of one run attached to its [`Session`]: frames to the terminal or the container
//! log, signals (and with `-i` stdin, with `-t` the terminal size) to the guest, the
//! control socket served, and how the VM ended turned into Docker's exit codes.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use guest_init::channel::Message;
use guest_init::GuestStatus;
use vmm::{ConsoleInput, VmConfig, VmExit, VmStopper};

use crate::exec::{self, Router};
use crate::lifecycle::control::{ControlServer, Target};
use crate::lifecycle::log_thread::{SharedLog, Tee};
use crate::lifecycle::logfile::{JsonLog, Stream};
use crate::spec::{ContainerSpec, StdioSpec};
use crate::stdio::{self, Demux, Event, Fault, ToGuest};
use crate::{confine, signals, terminal};

/// Docker's status for a container it killed (128 + SIGKILL).
const EXIT_KILLED: u8 = 137;
/// What a shell reports for a pipeline member whose reader went away (128 + SIGPIPE).
const EXIT_BROKEN_PIPE: u8 = 141;

/// Where the workload's output goes (no log with `--log-driver none`). The log's thread
/// starts with the run's other threads and its last entry is written before the run
/// returns.
pub enum Output {
    /// To fd 1 and fd 2, and a copy into the log (a foreground run).
    Terminal(Option<JsonLog>),
    /// Only into the log (a detached run: nobody is attached).
    Log(Option<JsonLog>),
}

impl Output {
    /// Starts the log's thread: whether the output is shown, and the log to finish at
    /// the end.
    fn start(self) -> io::Result<(bool, Option<SharedLog>)> {
        let (shown, log) = match self {
            Self::Terminal(log) => (true, log),
            Self::Log(log) => (false, log),
        };
        Ok((shown, log.map(SharedLog::start).transpose()?))
    }
}

/// [`Session::on_start`]'s hook.
pub type OnStart<'a> = Box<dyn FnOnce(&[String]) -> Result<()> + 'a>;

/// One run's attachment and its lifecycle hooks.
pub struct Session<'a> {
    /// The container id.
    pub id: String,
    /// Where output goes.
    pub output: Output,
    /// Where to serve control requests (`stop`, `kill`, `exec`).
    pub control: Option<PathBuf>,
    /// Called right before the VM starts with the workload's full argv (entrypoint and
    /// command as resolved against the image); an error aborts the run before boot.
    pub on_start: OnStart<'a>,
    /// Called once, when init reports Ready.
    pub on_ready: Box<dyn FnOnce() + Send>,
}

/// Why katalite itself ended the VM, recorded before the stop so the exit code can say.
#[derive(Debug)]
enum StopCause {
    /// A second SIGTERM/SIGINT, or the stop timeout after the first.
    Killed,
    /// The host's stdout or stderr reader went away.
    BrokenPipe,
    /// The guest broke the channel protocol.
    Malformed(anyhow::Error),
}

/// Ends the VM for a [`StopCause`]; the first cause is kept.
#[derive(Clone, Default)]
struct Ending {
    stopper: VmStopper,
    cause: Arc<Mutex<Option<StopCause>>>,
}

impl Ending {
    fn stop(&self, cause: StopCause) {
        self.cause
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(cause);
        self.stopper.stop();
    }

    fn take(&self) -> Option<StopCause> {
        self.cause
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

/// Boots `vm` attached to `session`: frames to its output, signals (and with `-i` stdin,
/// with `-t` the terminal size) to the guest, the host terminal raw with `-it` in the
/// foreground, the control socket served while the VM runs.
pub fn run_attached(
    spec: &ContainerSpec,
    command: &[String],
    mut vm: VmConfig<'_>,
    session: Session<'_>,
) -> Result<u8> {
    // Before the run's first thread: every thread confines itself as it starts.
    let mode = if spec.seccomp_unconfined {
        confine::Mode::Unconfined
    } else {
        confine::Mode::Enforce
    };
    confine::prepare(mode).context("cannot prepare the seccomp filters")?;
    let input = ConsoleInput::new();
    let to_guest = ToGuest::new(input.clone());
    let ending = Ending::default();
    let router = Router::default();
    let on_event = {
        let (to_guest, ending) = (to_guest.clone(), ending.clone());
        let mut on_ready = Some(session.on_ready);
        move |event| match event {
            Event::Ready => {
                to_guest.open();
                if let Some(on_ready) = on_ready.take() {
                    on_ready();
                }
            }
            Event::Fault(Fault::Malformed(err)) => ending.stop(StopCause::Malformed(err)),
            Event::Fault(Fault::BrokenPipe) => ending.stop(StopCause::BrokenPipe),
        }
    };
    // Init waits for the first size before starting a terminal workload; 0x0 is what
    // Docker's terminal gets without a host terminal.
    let first_size = spec.stdio.tty.then(|| {
        let (rows, cols) = terminal::size().unwrap_or((0, 0));
        Message::Resize { rows, cols }
    });
    let kill = {
        let ending = ending.clone();
        move || {
            terminal::restore();
            ending.stop(StopCause::Killed);
        }
    };
    let timeout = Duration::from_secs(spec.stop_timeout_secs);
    let send = {
        let to_guest = to_guest.clone();
        move |message: Message| to_guest.send(&message)
    };
    let forwarder = signals::Forwarder::start(spec.stdio.tty, timeout, first_size, send, kill)
        .context("cannot catch signals")?;
    let attached = matches!(session.output, Output::Terminal(_));
    let socket = session.control.as_ref();
    let started = serve_control(socket, &to_guest, &ending, &router).and_then(|control| {
        let on_start = session.on_start;
        let begin = || -> Result<Option<terminal::RawMode>> {
            let raw = if attached {
                attach_host_input(spec.stdio, &to_guest)?
            } else {
                None
            };
            on_start(command)?;
            Ok(raw)
        };
        match begin() {
            Ok(raw) => Ok((control, raw)),
            Err(err) => {
                if let Some(control) = control {
                    control.stop();
                }
                Err(err)
            }
        }
    });
    let (control, raw) = match started {
        Ok(started) => started,
        Err(err) => {
            to_guest.close();
            forwarder.stop();
            return Err(err);
        }
    };

    let (shown, log) = match session.output.start() {
        Ok(started) => started,
        Err(err) => {
            to_guest.close();
            forwarder.stop();
            if let Some(control) = control {
                control.stop();
            }
            return Err(err).context("cannot start the container log");
        }
    };
    vm.console = match (shown, &log) {
        (true, log) => Box::new(
            Demux::new(
                Tee::new(io::stdout(), log.as_ref().map(|l| l.stream(Stream::Stdout))),
                Tee::new(io::stderr(), log.as_ref().map(|l| l.stream(Stream::Stderr))),
                on_event,
            )
            .routing(router.clone()),
        ),
        (false, Some(log)) => Box::new(
            Demux::new(
                log.stream(Stream::Stdout),
                log.stream(Stream::Stderr),
                on_event,
            )
            .routing(router.clone()),
        ),
        // Detached with no log: nobody ever sees the output (Docker's `-d --log-driver
        // none`), but it is still read, so the workload never blocks on it.
        (false, None) => {
            Box::new(Demux::new(io::sink(), io::sink(), on_event).routing(router.clone()))
        }
    };
    vm.console_input = Some(input);
    vm.stopper = Some(ending.stopper.clone());
    let exit = vmm::run(vm);
    // The log is complete before the run's end is recorded (or its entry removed).
    if let Some(log) = &log {
        log.finish();
    }
    // The terminal first, so every message after this prints normally.
    drop(raw);
    to_guest.close();
    router.close();
    if let Some(control) = control {
        control.stop();
    }
    forwarder.stop();
    exit_code(exit.context("the VM failed")?, ending.take())
}

/// Serves `stop`/`kill`/`exec` requests on `socket`: signals go to the workload through
/// init, SIGKILL and an expired stop end the VM (exit 137), exec sessions get a stream
/// routed by `router`.
fn serve_control(
    socket: Option<&PathBuf>,
    to_guest: &ToGuest,
    ending: &Ending,
    router: &Router,
) -> Result<Option<ControlServer>> {
    let Some(socket) = socket else {
        return Ok(None);
    };
    let target = Target {
        signal: {
            let to_guest = to_guest.clone();
            Arc::new(move |signal| to_guest.send(&Message::Signal(signal)))
        },
        kill: {
            let ending = ending.clone();
            Arc::new(move || ending.stop(StopCause::Killed))
        },
        exec: {
            let server = exec::Server::new(router.clone(), to_guest.clone());
            Some(Box::new(move |client, request| {
                server.accept(client, request)
            }))
        },
    };
    let server = ControlServer::start(socket, target)
        .with_context(|| format!("cannot serve {}", socket.display()))?;
    Ok(Some(server))
}

/// With `-i`, starts feeding the host's stdin to the guest, in raw mode when `-t` too.
fn attach_host_input(stdio: StdioSpec, to_guest: &ToGuest) -> Result<Option<terminal::RawMode>> {
    if !stdio.interactive {
        return Ok(None);
    }
    let raw = if stdio.tty {
        let raw =
            terminal::RawMode::enter(io::stdin()).context("cannot put the terminal in raw mode")?;
        Some(raw)
    } else {
        None
    };
    stdio::pump_stdin(to_guest.clone()).context("cannot start the stdin thread")?;
    Ok(raw)
}

/// Maps how the VM ended (and why katalite stopped it, if it did) to the exit code, or an
/// error (exit 125) for anything that is not a workload status.
fn exit_code(exit: VmExit, cause: Option<StopCause>) -> Result<u8> {
    // Output already lost to a broken protocol makes any status untrustworthy.
    if let Some(StopCause::Malformed(err)) = cause {
        return Err(err.context("the guest sent a malformed frame"));
    }
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
        } => bail!(
            "the guest kernel panicked: {}",
            crate::guest_text::escape(line.as_bytes())
        ),
        VmExit::Reset {
            triple_fault: true, ..
        } => bail!("the guest crashed (triple fault)"),
        VmExit::Reset { .. } => bail!("the guest rebooted without reporting an exit status"),
        VmExit::Stopped => match cause {
            Some(StopCause::Killed) => Ok(EXIT_KILLED),
            Some(StopCause::BrokenPipe) => Ok(EXIT_BROKEN_PIPE),
            _ => bail!("the VM was stopped"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_statuses_become_exit_codes() {
        assert_eq!(
            exit_code(VmExit::Status(GuestStatus::Exited(42).to_word()), None).ok(),
            Some(42)
        );
        assert_eq!(
            exit_code(VmExit::Status(GuestStatus::Exited(0).to_word()), None).ok(),
            Some(0)
        );
    }

    #[test]
    fn guest_failures_are_errors_not_statuses() {
        assert!(exit_code(VmExit::Status(GuestStatus::InitFailed.to_word()), None).is_err());
        assert!(exit_code(VmExit::Status(0xdead_beef), None).is_err());
        let panic = VmExit::Reset {
            triple_fault: false,
            panic: Some("Kernel panic - not syncing: x".into()),
        };
        let message = format!(
            "{:#}",
            exit_code(panic, None).expect_err("panic is an error")
        );
        assert!(message.contains("panicked"), "{message}");
        assert!(exit_code(
            VmExit::Reset {
                triple_fault: true,
                panic: None
            },
            None
        )
        .is_err());
        assert!(exit_code(VmExit::Stopped, None).is_err());
    }

    #[test]
    fn katalites_own_stops_map_to_docker_codes() {
        assert_eq!(
            exit_code(VmExit::Stopped, Some(StopCause::Killed)).ok(),
            Some(137)
        );
        assert_eq!(
            exit_code(VmExit::Stopped, Some(StopCause::BrokenPipe)).ok(),
            Some(141)
        );
        // The guest finished before the stop landed: its status stands.
        let exited = VmExit::Status(GuestStatus::Exited(7).to_word());
        assert_eq!(exit_code(exited, Some(StopCause::Killed)).ok(), Some(7));
        let malformed = || StopCause::Malformed(anyhow::anyhow!("unknown channel frame kind 99"));
        for exit in [
            VmExit::Stopped,
            VmExit::Status(GuestStatus::Exited(0).to_word()),
        ] {
            let err = exit_code(exit, Some(malformed())).expect_err("malformed is an error");
            assert_eq!(
                format!("{err:#}"),
                "the guest sent a malformed frame: unknown channel frame kind 99"
            );
        }
    }

    #[test]
    fn the_first_stop_cause_is_kept() {
        let ending = Ending::default();
        ending.stop(StopCause::BrokenPipe);
        ending.stop(StopCause::Killed);
        assert!(matches!(ending.take(), Some(StopCause::BrokenPipe)));
        assert!(ending.take().is_none());
    }
}
