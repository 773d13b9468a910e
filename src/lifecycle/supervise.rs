//! One container's life with no daemon, from a [`ContainerSpec`] (whichever front end made
//! it). The entry is made with the spec persisted beside its state; then this process boots
//! and records the end itself (foreground), or (`-d`) starts a supervisor — this same
//! executable, in a session of its own — and returns once the supervisor reports that init
//! is up. The supervisor boots from the persisted spec, runs the VM, logs its output and
//! serves the control socket until it ends.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};

use super::logfile::JsonLog;
use super::state::{Container, NewContainer, Runtime, Status};
use crate::attach::{Output, Session};
use crate::spec::{ContainerSpec, LogDriver};
use crate::{boot, volumes};

/// What the supervisor writes on its stdout (a pipe to the launcher) once init is up.
const BOOTED: &str = "booted";
/// The supervisor's own messages after boot (init's failures, katalite's errors).
const SUPERVISOR_LOG: &str = "katalite.log";
/// `docker run`'s status when the runtime fails.
const EXIT_KATALITE_FAILED: u8 = 125;
/// The status recorded when katalite itself failed after the VM started.
const EXIT_RUNTIME_FAILED: i32 = 125;

/// A foreground `katalite run`: the entry is made before boot, marked running with this
/// process as its supervisor, and records the end (or goes, with `--rm`).
pub fn foreground(spec: &ContainerSpec) -> Result<u8> {
    let container = create(spec)?;
    let log = match open_log(spec, &container) {
        Ok(log) => log,
        Err(err) => {
            discard(&container);
            return Err(err).context("cannot open the container log");
        }
    };
    execute(spec, container, Output::Terminal(log), Box::new(|| {}))
}

/// `katalite run -d`: makes the entry, starts the supervisor and prints the id once the
/// VM is up. Whatever fails before that leaves no entry and exits 125.
pub fn launch(spec: &ContainerSpec) -> Result<u8> {
    let container = create(spec)?;
    match start_supervisor(&container) {
        Ok(true) => {
            println!("{}", container.state.id);
            Ok(0)
        }
        Ok(false) => {
            discard_unstarted(&container);
            Ok(EXIT_KATALITE_FAILED)
        }
        Err(err) => {
            discard_unstarted(&container);
            Err(err)
        }
    }
}

/// Makes the entry of a new container, its mounts resolved first (volumes made; the
/// volume store stays locked until the entry records them). Anonymous volumes made for an
/// entry that could not be made are removed again.
fn create(spec: &ContainerSpec) -> Result<Container> {
    let runtime = Runtime::open()?;
    let resolved = volumes::resolve(&spec.mounts)?;
    let new = NewContainer {
        mounts: resolved.mounts.clone(),
        ..new_container(spec)
    };
    runtime
        .create(new)
        .inspect_err(|_| volumes::remove_anonymous(&resolved.mounts))
}

/// Removes an entry and the anonymous volumes made for it.
fn discard(container: &Container) {
    let _ = container.remove();
    volumes::remove_anonymous(&container.state.mounts);
}

/// Removes the entry of a `run -d` that failed, unless its VM runs after all.
fn discard_unstarted(container: &Container) {
    match container.reload() {
        Ok(now) if now.is_running() => {}
        _ => discard(container),
    }
}

/// Spawns `katalite supervise ID` in a new session (so the launching shell's hangup or
/// Ctrl-C does not reach it) with stdin on /dev/null, stdout a pipe back to us and stderr
/// shared until boot, so its errors before boot reach the user. True once it says booted.
fn start_supervisor(container: &Container) -> Result<bool> {
    let exe = std::env::current_exe().context("cannot find the katalite executable")?;
    let mut command = Command::new(exe);
    command
        .args(["supervise", &container.state.id])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // SAFETY: the closure runs in the forked child before exec and only calls setsid(2),
    // which is async-signal-safe and touches no memory shared with the parent.
    unsafe {
        command.pre_exec(|| rustix::process::setsid().map(drop).map_err(io::Error::from));
    }
    let mut child = command.spawn().context("cannot start the supervisor")?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("the supervisor has no stdout pipe"))?;
    let mut line = String::new();
    // A read error is the same as end of file: the supervisor is gone.
    let _ = BufReader::new(stdout).read_line(&mut line);
    if line.trim_end() == BOOTED {
        return Ok(true);
    }
    let status = child.wait().context("cannot wait for the supervisor")?;
    // 125 means it printed its own error already.
    if status.code() != Some(i32::from(EXIT_KATALITE_FAILED)) {
        eprintln!("katalite: the supervisor ended before the VM booted ({status})");
    }
    Ok(false)
}

/// The hidden `katalite supervise ID`: boots the entry's VM from its persisted spec, its
/// output into the log.
pub fn supervise(id: &str) -> Result<u8> {
    let runtime = Runtime::open()?;
    let (container, spec) = startable(&runtime, id)?;
    let log = open_log(&spec, &container).context("cannot open the container log")?;
    let on_ready = detach_stdio(container.dir().join(SUPERVISOR_LOG));
    execute(&spec, container, Output::Log(log), on_ready)
}

/// The entry `id` names and its spec, if it has not started yet (a second supervisor for
/// one container would boot a second VM).
fn startable(runtime: &Runtime, id: &str) -> Result<(Container, ContainerSpec)> {
    let container = runtime.find(id)?;
    if container.state.status != Status::Created {
        bail!("container {id} was started already");
    }
    let spec = container.spec()?;
    Ok((container, spec))
}

/// Once init is up: stderr goes to the supervisor's log, the launcher hears "booted" and
/// the pipe closes, and the working directory no longer pins the launcher's.
fn detach_stdio(log: PathBuf) -> Box<dyn FnOnce() + Send> {
    Box::new(move || {
        let _ = std::env::set_current_dir("/");
        let opened = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log);
        if let Ok(log) = opened {
            let _ = rustix::stdio::dup2_stderr(&log);
        }
        let mut stdout = io::stdout().lock();
        let _ = writeln!(stdout, "{BOOTED}").and_then(|()| stdout.flush());
        if let Ok(null) = File::options().write(true).open("/dev/null") {
            let _ = rustix::stdio::dup2_stdout(&null);
        }
    })
}

/// Boots `container` and records its life: running right before the VM starts, exited
/// with its code after (125 when katalite failed), the entry gone when the run failed
/// before boot or with `--rm`.
fn execute(
    spec: &ContainerSpec,
    mut container: Container,
    output: Output,
    on_ready: Box<dyn FnOnce() + Send>,
) -> Result<u8> {
    let mut started = false;
    let mounts = container.state.mounts.clone();
    let result = boot::boot(
        spec,
        &mounts,
        Session {
            id: container.state.id.clone(),
            output,
            control: Some(container.control_path()),
            on_start: Box::new(|command| {
                // What ps shows: the image's defaults resolved, not only what was typed.
                container.state.command = command.to_vec();
                container.mark_running()?;
                started = true;
                Ok(())
            }),
            on_ready,
        },
    );
    let recorded = match &result {
        _ if !started || container.state.auto_remove => {
            // Docker's --rm takes the anonymous volumes along; so does an entry that never
            // started, which nothing could remove later.
            volumes::remove_anonymous(&mounts);
            container.remove()
        }
        Ok(code) => container.mark_exited(i32::from(*code)),
        Err(_) => container.mark_exited(EXIT_RUNTIME_FAILED),
    };
    if let Err(err) = recorded {
        eprintln!("katalite: cannot record the container's end: {err:#}");
    }
    result
}

/// The container's log, unless `--log-driver none` keeps none.
fn open_log(spec: &ContainerSpec, container: &Container) -> io::Result<Option<JsonLog>> {
    match spec.log_driver {
        LogDriver::JsonFile => JsonLog::open(&container.state.log_path).map(Some),
        LogDriver::None => Ok(None),
    }
}

/// The fields of a new entry for `spec` (its mounts are resolved separately).
fn new_container(spec: &ContainerSpec) -> NewContainer {
    NewContainer {
        name: spec.name.clone().unwrap_or_default(),
        image: spec.image_display(),
        command: spec.process.command.clone(),
        ports: spec
            .network
            .publish
            .iter()
            .map(ToString::to_string)
            .collect(),
        auto_remove: spec.auto_remove,
        mounts: Vec::new(),
        spec: spec.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{ProcessSpec, RootSource, RootSpec};

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    fn spec() -> ContainerSpec {
        ContainerSpec {
            name: Some("web".into()),
            root: RootSpec {
                source: RootSource::Rootfs {
                    path: "/srv/root".into(),
                },
                ..RootSpec::default()
            },
            process: ProcessSpec {
                command: strings(&["sh", "-c", "echo up"]),
                env: strings(&["A=1"]),
                ..ProcessSpec::default()
            },
            auto_remove: true,
            detach: true,
            ..ContainerSpec::default()
        }
    }

    #[test]
    fn a_new_entry_shows_the_spec() {
        let new = new_container(&spec());
        assert_eq!(new.name, "web");
        assert_eq!(new.image, "/srv/root");
        assert_eq!(new.command, strings(&["sh", "-c", "echo up"]));
        assert!(new.auto_remove && new.ports.is_empty());
        assert_eq!(new.spec, spec());
        let unnamed = new_container(&ContainerSpec::default());
        assert_eq!((unnamed.image.as_str(), unnamed.name.as_str()), ("", ""));
    }

    #[test]
    fn the_supervisor_boots_from_the_persisted_spec() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let euid = rustix::process::geteuid().as_raw();
        let runtime = Runtime::at(tmp.path().join("rt"), euid).expect("runtime");
        let made = runtime.create(new_container(&spec())).expect("create");
        let id = made.state.id.clone();
        assert!(made.dir().join("spec.json").is_file());

        let (container, read) = startable(&runtime, &id).expect("startable");
        assert_eq!(read, spec());
        assert_eq!(container.state.id, id);
        // By name too, as `supervise` may be given either.
        assert_eq!(startable(&runtime, "web").expect("by name").1, spec());

        let mut started = container;
        started.mark_running().expect("running");
        let err = startable(&runtime, &id).expect_err("started already");
        assert!(err.to_string().contains("started already"), "{err}");
    }

    #[test]
    fn a_damaged_spec_stops_the_supervisor() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let euid = rustix::process::geteuid().as_raw();
        let runtime = Runtime::at(tmp.path().join("rt"), euid).expect("runtime");
        let made = runtime.create(new_container(&spec())).expect("create");
        std::fs::write(made.dir().join("spec.json"), b"{\"resources\": 7}").expect("write");
        let err = startable(&runtime, &made.state.id).expect_err("invalid spec");
        assert!(
            format!("{err:#}").contains("invalid container spec"),
            "{err:#}"
        );
    }
}
