//! The container commands (`ps`, `logs`, `stop`, `kill`, `rm`, `inspect`, `wait`): their
//! arguments and what they do with the state entries and the supervisors' control
//! sockets. Like Docker's CLI they go on past a failing container and then exit 1.

use std::io::{self, Write};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

use super::control::{self, ControlRequest};
use super::logfile::{self, LogReader};
use super::state::{Container, Runtime};
use super::{inspect, ps, supervise};
use crate::spec::LogDriver;

/// Docker's CLI status for a failed container command.
const EXIT_FAILED: u8 = 1;
/// How often waiting commands look at the state and `logs -f` at the log.
const POLL: Duration = Duration::from_millis(100);
/// Beyond `stop -t`, how long the VM may take to go once ended (threads joined, state
/// written); generous for the nested-virtualization lab.
const STOP_GRACE: Duration = Duration::from_secs(30);
const SIGKILL: i32 = 9;

/// `katalite ps [-a] [-q]`.
#[derive(Args, Debug)]
pub struct PsArgs {
    /// Show all containers (default: running ones).
    #[arg(short, long)]
    pub all: bool,
    /// Only the ids.
    #[arg(short, long)]
    pub quiet: bool,
}

/// `katalite logs [-f] [--tail N] [-t] CONTAINER`.
#[derive(Args, Debug)]
pub struct LogsArgs {
    /// Keep printing new output until the container exits.
    #[arg(short, long)]
    pub follow: bool,
    /// Only the last N lines ("all" for every line).
    #[arg(short = 'n', long, value_name = "N", default_value = "all", value_parser = parse_tail)]
    pub tail: Tail,
    /// Prefix each line with its time.
    #[arg(short, long)]
    pub timestamps: bool,
    /// Container id, id prefix or name.
    pub container: String,
}

/// `--tail`: a number of lines, or every line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tail(Option<usize>);

fn parse_tail(text: &str) -> Result<Tail, String> {
    if text == "all" {
        return Ok(Tail(None));
    }
    text.parse()
        .map(|n| Tail(Some(n)))
        .map_err(|_| "expected a number of lines or \"all\"".into())
}

/// `katalite stop [-t SECS] CONTAINER...`.
#[derive(Args, Debug)]
pub struct StopArgs {
    /// Seconds to wait after SIGTERM before ending the VM.
    #[arg(
        short = 't',
        long = "time",
        alias = "timeout",
        value_name = "SECONDS",
        default_value_t = 10
    )]
    pub time: u64,
    /// Containers (id, id prefix or name).
    #[arg(required = true)]
    pub containers: Vec<String>,
}

/// `katalite kill [-s SIGNAL] CONTAINER...`.
#[derive(Args, Debug)]
pub struct KillArgs {
    /// Signal name or number (KILL ends the VM at once).
    #[arg(short, long, value_name = "SIGNAL", default_value = "KILL", value_parser = parse_signal)]
    pub signal: i32,
    /// Containers (id, id prefix or name).
    #[arg(required = true)]
    pub containers: Vec<String>,
}

/// `katalite rm [-f] CONTAINER...`.
#[derive(Args, Debug)]
pub struct RmArgs {
    /// Kill a running container first.
    #[arg(short, long)]
    pub force: bool,
    /// Remove the anonymous volumes of the containers too.
    #[arg(short, long)]
    pub volumes: bool,
    /// Containers (id, id prefix or name).
    #[arg(required = true)]
    pub containers: Vec<String>,
}

/// `katalite inspect CONTAINER...`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Containers (id, id prefix or name).
    #[arg(required = true)]
    pub containers: Vec<String>,
}

/// `katalite wait CONTAINER...`.
#[derive(Args, Debug)]
pub struct WaitArgs {
    /// Containers (id, id prefix or name).
    #[arg(required = true)]
    pub containers: Vec<String>,
}

/// `katalite supervise ID` (hidden; started by `run -d`).
#[derive(Args, Debug)]
pub struct SuperviseArgs {
    /// The full container id.
    pub id: String,
}

/// Linux's x86 signal numbers (signal(7)), by name without `SIG`.
const SIGNALS: [(&str, i32); 31] = [
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("ILL", 4),
    ("TRAP", 5),
    ("ABRT", 6),
    ("BUS", 7),
    ("FPE", 8),
    ("KILL", 9),
    ("USR1", 10),
    ("SEGV", 11),
    ("USR2", 12),
    ("PIPE", 13),
    ("ALRM", 14),
    ("TERM", 15),
    ("STKFLT", 16),
    ("CHLD", 17),
    ("CONT", 18),
    ("STOP", 19),
    ("TSTP", 20),
    ("TTIN", 21),
    ("TTOU", 22),
    ("URG", 23),
    ("XCPU", 24),
    ("XFSZ", 25),
    ("VTALRM", 26),
    ("PROF", 27),
    ("WINCH", 28),
    ("IO", 29),
    ("PWR", 30),
    ("SYS", 31),
];

/// `-s`: `KILL`, `SIGKILL`, `kill` or `9`; numbers up to 64 (real-time signals too).
pub(crate) fn parse_signal(text: &str) -> Result<i32, String> {
    if let Ok(number) = text.parse::<i32>() {
        return if (1..=64).contains(&number) {
            Ok(number)
        } else {
            Err(format!("invalid signal: {text}"))
        };
    }
    let upper = text.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    SIGNALS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, number)| *number)
        .ok_or_else(|| format!("invalid signal: {text}"))
}

/// Runs `each` for every key, printing failures as `katalite: ...`; 1 if any failed.
fn for_each(keys: &[String], mut each: impl FnMut(&str) -> Result<()>) -> u8 {
    let mut status = 0;
    for key in keys {
        if let Err(err) = each(key) {
            eprintln!("katalite: {err:#}");
            status = EXIT_FAILED;
        }
    }
    status
}

/// Polls until `container` is no longer running (or its entry is gone: `None`), at most
/// `limit`.
fn wait_exited(container: &Container, limit: Option<Duration>) -> Result<Option<Container>> {
    let started = Instant::now();
    loop {
        if !container.dir().exists() {
            return Ok(None);
        }
        let now = match container.reload() {
            Ok(now) => now,
            // Removed between the check and the read (`--rm`).
            Err(_) if !container.dir().exists() => return Ok(None),
            Err(err) => return Err(err),
        };
        if !now.is_running() {
            return Ok(Some(now));
        }
        if limit.is_some_and(|limit| started.elapsed() > limit) {
            bail!(
                "container {} did not stop in time",
                container.display_name()
            );
        }
        std::thread::sleep(POLL);
    }
}

/// `ps`: running containers (all with `-a`), newest first.
pub fn ps(args: &PsArgs) -> Result<u8> {
    let runtime = Runtime::open()?;
    let mut all = runtime.list()?;
    all.retain(|c| args.all || c.is_running());
    all.reverse();
    let mut out = io::stdout().lock();
    if args.quiet {
        for container in &all {
            writeln!(out, "{}", container.short_id())?;
        }
    } else {
        let states: Vec<_> = all.iter().map(|c| &c.state).collect();
        out.write_all(ps::table(&states).as_bytes())?;
    }
    Ok(0)
}

/// `logs`: stdout entries to fd 1, stderr entries to fd 2; with `-f` until it exits.
pub fn logs(args: &LogsArgs) -> Result<u8> {
    let runtime = Runtime::open()?;
    let container = runtime.find(&args.container)?;
    if container.spec()?.log_driver == LogDriver::None {
        bail!("configured logging driver does not support reading (--log-driver none)");
    }
    let mut reader = LogReader::new(&container.state.log_path);
    let (mut out, mut err) = (io::stdout().lock(), io::stderr().lock());
    let mut show = |entries: &[logfile::LogEntry]| -> io::Result<()> {
        for entry in entries {
            logfile::print(entry, args.timestamps, &mut out, &mut err)?;
        }
        out.flush()
    };
    let entries = reader.read_all().context("cannot read the log")?;
    show(logfile::tail(&entries, args.tail.0))?;
    if !args.follow {
        return Ok(0);
    }
    loop {
        // Looked at before the read: once it says exited, the log is complete.
        let done = !container.dir().exists() || !container.reload()?.is_running();
        show(&reader.read_all().context("cannot read the log")?)?;
        if done {
            return Ok(0);
        }
        std::thread::sleep(POLL);
    }
}

/// `stop`: SIGTERM through init, the VM ended after `-t` seconds; waits until it exited.
/// A container that is not running is already stopped, as in Docker.
pub fn stop(args: &StopArgs) -> Result<u8> {
    let runtime = Runtime::open()?;
    Ok(for_each(&args.containers, |key| {
        let container = runtime.find(key)?;
        if container.is_running() {
            // A supervisor that just ended no longer listens; the wait below tells.
            let _ = control::request(&container.control_path(), &ControlRequest::Stop(args.time));
            wait_exited(
                &container,
                Some(Duration::from_secs(args.time) + STOP_GRACE),
            )?;
        }
        println!("{key}");
        Ok(())
    }))
}

/// `kill`: the signal to the workload; KILL ends the VM (and waits for that).
pub fn kill(args: &KillArgs) -> Result<u8> {
    let runtime = Runtime::open()?;
    Ok(for_each(&args.containers, |key| {
        let container = runtime.find(key)?;
        if !container.is_running() {
            bail!("container {key} is not running");
        }
        control::request(
            &container.control_path(),
            &ControlRequest::Signal(args.signal),
        )?;
        if args.signal == SIGKILL {
            wait_exited(&container, Some(STOP_GRACE))?;
        }
        println!("{key}");
        Ok(())
    }))
}

/// `rm`: removes stopped containers; `-f` kills running ones first.
pub fn rm(args: &RmArgs) -> Result<u8> {
    let runtime = Runtime::open()?;
    Ok(for_each(&args.containers, |key| {
        let container = runtime.find(key)?;
        if container.is_running() {
            if !args.force {
                bail!(
                    "cannot remove container {key}: container is running: stop the container \
                     before removing or force remove"
                );
            }
            let _ = control::request(&container.control_path(), &ControlRequest::Signal(SIGKILL));
            wait_exited(&container, Some(STOP_GRACE))?;
        }
        container.remove()?;
        if args.volumes {
            crate::volumes::remove_anonymous(&container.state.mounts);
        }
        println!("{key}");
        Ok(())
    }))
}

/// `inspect`: a JSON array of the containers found; missing ones are errors.
pub fn inspect(args: &InspectArgs) -> Result<u8> {
    let runtime = Runtime::open()?;
    let mut found = Vec::new();
    let status = for_each(&args.containers, |key| {
        let container = runtime.find(key)?;
        // An entry without a readable spec (made by an older katalite) still shows its state.
        let spec = container.spec().ok();
        found.push(inspect::inspect(&container.state, spec.as_ref()));
        Ok(())
    });
    let mut out = io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &found)?;
    writeln!(out)?;
    Ok(status)
}

/// `wait`: blocks until each container exits and prints its exit code.
pub fn wait(args: &WaitArgs) -> Result<u8> {
    let runtime = Runtime::open()?;
    Ok(for_each(&args.containers, |key| {
        let container = runtime.find(key)?;
        let Some(exited) = wait_exited(&container, None)? else {
            bail!("container {key} was removed before its exit code was read");
        };
        println!("{}", exited.state.exit_code.unwrap_or_default());
        Ok(())
    }))
}

/// `supervise`: see [`supervise::supervise`].
pub fn supervise(args: &SuperviseArgs) -> Result<u8> {
    supervise::supervise(&args.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_by_name_or_number() {
        for (text, number) in [
            ("KILL", 9),
            ("SIGKILL", 9),
            ("kill", 9),
            ("9", 9),
            ("TERM", 15),
            ("sigterm", 15),
            ("15", 15),
            ("HUP", 1),
            ("USR1", 10),
            ("WINCH", 28),
            ("64", 64),
        ] {
            assert_eq!(parse_signal(text), Ok(number), "{text}");
        }
        for bad in ["", "0", "65", "-1", "SIG", "NOPE", "SIGSIGKILL"] {
            assert!(parse_signal(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tail_is_a_count_or_all() {
        assert_eq!(parse_tail("all"), Ok(Tail(None)));
        assert_eq!(parse_tail("3"), Ok(Tail(Some(3))));
        assert_eq!(parse_tail("0"), Ok(Tail(Some(0))));
        assert!(parse_tail("-1").is_err() && parse_tail("x").is_err());
    }

    #[test]
    fn failures_continue_and_exit_one() {
        let keys = ["a".to_string(), "b".to_string(), "c".to_string()];
        let mut seen = Vec::new();
        let status = for_each(&keys, |key| {
            seen.push(key.to_string());
            if key == "b" {
                bail!("no such container: b");
            }
            Ok(())
        });
        assert_eq!(status, EXIT_FAILED);
        assert_eq!(seen, ["a", "b", "c"]);
        assert_eq!(for_each(&keys[..1], |_| Ok(())), 0);
    }
}
