//! `katalite-runc`, run as containerd's runc shim runs runc: the same binary under the
//! runtime's name, with one state root per containerd namespace.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use thiserror::Error;

/// The name the katalite binary answers to as the runc-compatible runtime.
const RUNC: &str = "katalite-runc";
/// Beside runc's `/run/containerd/runc/<namespace>`.
const ROOT: &str = "/run/containerd/katalite";

/// A failed `katalite-runc` command.
#[derive(Debug, Error)]
pub enum RuncError {
    /// It could not be started.
    #[error("cannot run katalite-runc {command}: {source}")]
    Spawn {
        /// The subcommand.
        command: &'static str,
        /// Why.
        source: io::Error,
    },
    /// It failed; the message is its error.
    #[error("katalite-runc {command}: {message}")]
    Failed {
        /// The subcommand.
        command: &'static str,
        /// Its error line.
        message: String,
    },
}

/// The three descriptors a container's or exec's process gets.
#[derive(Debug, Default)]
pub struct ProcessIo {
    /// Its stdin (None: /dev/null).
    pub stdin: Option<File>,
    /// Its stdout.
    pub stdout: Option<File>,
    /// Its stderr.
    pub stderr: Option<File>,
}

fn stdio(file: Option<File>) -> Stdio {
    file.map_or_else(Stdio::null, Stdio::from)
}

/// `katalite-runc --root ROOT/NAMESPACE`.
#[derive(Debug, Clone)]
pub struct Runc {
    root: PathBuf,
}

impl Runc {
    /// The runtime for containerd namespace `namespace`.
    pub fn new(namespace: &str) -> Self {
        Self {
            root: Path::new(ROOT).join(namespace),
        }
    }

    fn command(&self, log: Option<&Path>) -> Command {
        // Ourselves, under the runtime's name.
        let mut command = Command::new("/proc/self/exe");
        command.arg0(RUNC).arg("--root").arg(&self.root);
        if let Some(log) = log {
            command.arg("--log").arg(log).args(["--log-format", "json"]);
        }
        command
    }

    /// `create --bundle B --pid-file B/init.pid [--console-socket S] ID` with `io` as the
    /// container's stdio (its errors also go to the JSON log, read back on failure);
    /// returns the spawned command so the caller can take the console while it runs.
    pub fn create(
        &self,
        id: &str,
        bundle: &Path,
        console: Option<&Path>,
        io: ProcessIo,
    ) -> Result<Child, RuncError> {
        let log = bundle.join("log.json");
        let mut command = self.command(Some(&log));
        command
            .arg("create")
            .arg("--bundle")
            .arg(bundle)
            .arg("--pid-file")
            .arg(bundle.join("init.pid"));
        if let Some(console) = console {
            command.arg("--console-socket").arg(console);
        }
        command
            .arg(id)
            .current_dir(bundle)
            .stdin(stdio(io.stdin))
            .stdout(stdio(io.stdout))
            .stderr(stdio(io.stderr));
        command.spawn().map_err(|source| RuncError::Spawn {
            command: "create",
            source,
        })
    }

    /// `exec --process FILE --detach --pid-file FILE [--console-socket S] ID`, its errors
    /// in `log`.
    pub fn exec(
        &self,
        id: &str,
        log: &Path,
        process: &Path,
        pid_file: &Path,
        console: Option<&Path>,
        io: ProcessIo,
    ) -> Result<Child, RuncError> {
        let mut command = self.command(Some(log));
        command
            .arg("exec")
            .arg("--process")
            .arg(process)
            .arg("--detach")
            .arg("--pid-file")
            .arg(pid_file);
        if let Some(console) = console {
            command.arg("--console-socket").arg(console);
        }
        // The relay katalite-runc leaves behind inherits these: they are the process's.
        command
            .arg(id)
            .stdin(stdio(io.stdin))
            .stdout(stdio(io.stdout))
            .stderr(stdio(io.stderr));
        command.spawn().map_err(|source| RuncError::Spawn {
            command: "exec",
            source,
        })
    }

    /// `start ID`.
    pub fn start(&self, id: &str) -> Result<(), RuncError> {
        self.run("start", &[id])
    }

    /// `kill [--all] ID SIGNAL`.
    pub fn kill(&self, id: &str, signal: u32, all: bool) -> Result<(), RuncError> {
        let signal = signal.to_string();
        if all {
            self.run("kill", &["--all", id, &signal])
        } else {
            self.run("kill", &[id, &signal])
        }
    }

    /// `delete --force ID`.
    pub fn delete(&self, id: &str) -> Result<(), RuncError> {
        self.run("delete", &["--force", id])
    }

    fn run(&self, command: &'static str, args: &[&str]) -> Result<(), RuncError> {
        let output = self
            .command(None)
            .arg(command)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|source| RuncError::Spawn { command, source })?;
        if output.status.success() {
            return Ok(());
        }
        Err(RuncError::Failed {
            command,
            message: error_line(&String::from_utf8_lossy(&output.stderr)),
        })
    }
}

/// The last line of katalite-runc's stderr, without its program prefix.
fn error_line(stderr: &str) -> String {
    let line = stderr
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .unwrap_or("failed");
    line.strip_prefix("katalite-runc: ")
        .unwrap_or(line)
        .to_owned()
}

/// The last error in a `--log-format json` log (`{"level":"error","msg":...}` lines).
pub fn last_logged_error(log: &Path) -> Option<String> {
    let mut text = String::new();
    File::open(log).ok()?.read_to_string(&mut text).ok()?;
    text.lines().rev().find_map(|line| {
        let value: serde_json::Value = serde_json::from_str(line).ok()?;
        value.get("msg")?.as_str().map(str::to_owned)
    })
}

/// A create or exec that ended: `Ok` or its error (from `log` if given).
pub fn finished(
    command: &'static str,
    mut child: Child,
    log: Option<&Path>,
) -> Result<(), RuncError> {
    let status = child
        .wait()
        .map_err(|source| RuncError::Spawn { command, source })?;
    if status.success() {
        return Ok(());
    }
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    let message = log
        .and_then(last_logged_error)
        .unwrap_or_else(|| error_line(&stderr));
    Err(RuncError::Failed { command, message })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_come_from_the_last_line_or_the_json_log() {
        assert_eq!(
            error_line("warning\nkatalite-runc: no such container\n\n"),
            "no such container"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("log.json");
        std::fs::write(
            &log,
            "{\"level\":\"error\",\"msg\":\"first\"}\n{\"level\":\"error\",\"msg\":\"KVM is missing\"}\n",
        )
        .expect("write");
        assert_eq!(last_logged_error(&log).as_deref(), Some("KVM is missing"));
        assert_eq!(last_logged_error(&dir.path().join("none")), None);
    }
}
