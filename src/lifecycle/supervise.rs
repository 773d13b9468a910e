//! One container's life with no daemon. `run` makes the state entry, boots and records the
//! end itself (foreground), or (`-d`) starts a supervisor — this same executable, in a
//! session of its own — and returns once the supervisor reports that init is up. The
//! supervisor runs the VM, logs its output and serves the control socket until it ends.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;

use super::logfile::JsonLog;
use super::state::{Container, NewContainer, Runtime, Status};
use crate::attach::{Output, Session};
use crate::cli::{Cli, Command as CliCommand, RunArgs};
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
pub fn foreground(args: &RunArgs) -> Result<u8> {
    let container = create(args)?;
    let log = match JsonLog::open(&container.state.log_path) {
        Ok(log) => log.shared(),
        Err(err) => {
            discard(&container);
            return Err(err).context("cannot open the container log");
        }
    };
    execute(args, container, Output::Terminal(log), Box::new(|| {}))
}

/// `katalite run -d`: makes the entry, starts the supervisor and prints the id once the
/// VM is up. Whatever fails before that leaves no entry and exits 125.
pub fn launch(args: &RunArgs) -> Result<u8> {
    let container = create(args)?;
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
fn create(args: &RunArgs) -> Result<Container> {
    let argv = run_argv()?;
    let runtime = Runtime::open()?;
    let resolved = volumes::resolve(args)?;
    let new = NewContainer {
        mounts: resolved.mounts.clone(),
        ..new_container(args, argv)
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

/// The hidden `katalite supervise ID`: boots the entry's VM from its recorded `run`
/// arguments, its output into the log.
pub fn supervise(id: &str) -> Result<u8> {
    let runtime = Runtime::open()?;
    let container = runtime.find(id)?;
    if container.state.status != Status::Created {
        bail!("container {id} was started already");
    }
    let args = parse_run_args(&container.state.run_args)?;
    let log = JsonLog::open(&container.state.log_path)
        .context("cannot open the container log")?
        .shared();
    let on_ready = detach_stdio(container.dir().join(SUPERVISOR_LOG));
    execute(&args, container, Output::Log(log), on_ready)
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
    args: &RunArgs,
    mut container: Container,
    output: Output,
    on_ready: Box<dyn FnOnce() + Send>,
) -> Result<u8> {
    let mut started = false;
    let mounts = container.state.mounts.clone();
    let result = boot::boot(
        args,
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

/// The fields of a new entry for `args`; `run_args` are the arguments after `run`.
fn new_container(args: &RunArgs, run_args: Vec<String>) -> NewContainer {
    let image = match &args.rootfs {
        Some(dir) => dir.display().to_string(),
        None => args.image().unwrap_or_default().to_string(),
    };
    NewContainer {
        name: args.name.clone().unwrap_or_default(),
        image,
        command: args.command().to_vec(),
        ports: args.publish.iter().map(ToString::to_string).collect(),
        run_args,
        auto_remove: args.rm,
        mounts: Vec::new(),
    }
}

/// This process's arguments after `katalite run`.
fn run_argv() -> Result<Vec<String>> {
    let mut argv = std::env::args_os().skip(1);
    if argv.next().is_none_or(|command| command != "run") {
        bail!("containers are made by `katalite run`");
    }
    argv.map(|arg| {
        arg.into_string()
            .map_err(|arg| anyhow!("argument {arg:?} is not UTF-8"))
    })
    .collect()
}

/// `run_args` parsed as `katalite run` would.
pub fn parse_run_args(run_args: &[String]) -> Result<RunArgs> {
    let argv = ["katalite", "run"]
        .into_iter()
        .map(String::from)
        .chain(run_args.iter().cloned());
    let cli = Cli::try_parse_from(argv).context("invalid recorded run arguments")?;
    match cli.command {
        CliCommand::Run(args) => Ok(*args),
        _ => bail!("the recorded arguments are not a run"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn recorded_arguments_parse_back_into_the_run() {
        let run_args = strings(&[
            "-d", "--name", "web", "--rm", "busybox", "sh", "-c", "echo up",
        ]);
        let args = parse_run_args(&run_args).expect("parse");
        assert!(args.detach && args.rm);
        let new = new_container(&args, run_args.clone());
        assert_eq!(new.name, "web");
        assert_eq!(new.image, "busybox");
        assert_eq!(new.command, strings(&["sh", "-c", "echo up"]));
        assert!(new.auto_remove && new.ports.is_empty());
        assert_eq!(new.run_args, run_args);
        let rootfs = parse_run_args(&strings(&["--rootfs", "/r", "true"])).expect("parse");
        let new = new_container(&rootfs, Vec::new());
        assert_eq!((new.image.as_str(), new.name.as_str()), ("/r", ""));
        assert!(parse_run_args(&strings(&["--bogus"])).is_err());
    }
}
