//! A process's stdio as containerd names it: FIFOs the client made (opened so that
//! neither side blocks or breaks when the other comes and goes), `file://` log files, a
//! `binary://` logging program (containerd's protocol: the program reads the process's
//! stdout and stderr on fds 3 and 4 and closes fd 5 once ready), or nothing.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio as ChildStdio};
use std::thread;

use thiserror::Error;

use crate::messages::Stdio;
use crate::runc::ProcessIo;

/// Stdio that cannot be opened.
#[derive(Debug, Error)]
pub enum StdioError {
    /// A path or URI that failed to open.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The path or URI.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// A URI scheme the shim does not know.
    #[error("unsupported stdio URI {0:?} (FIFO paths, file:// and binary:// are)")]
    Scheme(String),
}

/// The opened stdio of one process.
#[derive(Debug, Default)]
pub struct Opened {
    /// What the process (or, with a terminal, the copier) gets.
    pub io: ProcessIo,
    /// The shim's own writer on the stdin FIFO: the process sees EOF only once the client
    /// has closed its end and `CloseIO` has dropped this one.
    pub stdin_writer: Option<File>,
}

/// Opens `stdio` for the process `id` of containerd namespace `namespace`.
pub fn open(stdio: &Stdio, id: &str, namespace: &str) -> Result<Opened, StdioError> {
    let mut opened = Opened::default();
    if !stdio.stdin.is_empty() {
        let path = &stdio.stdin;
        // Non-blocking so the open does not wait for the client's writer, then blocking
        // for the process; the kept writer makes the FIFO open for the whole life.
        let reader = open_with(
            path,
            OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK),
        )?;
        set_blocking(&reader).map_err(|source| open_error(path, source))?;
        let writer = open_with(
            path,
            OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK),
        )?;
        opened.io.stdin = Some(reader);
        opened.stdin_writer = Some(writer);
    }
    if let Some(binary) = stdio.stdout.strip_prefix("binary://") {
        let (stdout, stderr) = start_logger(binary, id, namespace)?;
        opened.io.stdout = Some(stdout);
        opened.io.stderr = Some(stderr);
        return Ok(opened);
    }
    opened.io.stdout = output(&stdio.stdout)?;
    opened.io.stderr = if !stdio.stderr.is_empty() && stdio.stderr == stdio.stdout {
        match &opened.io.stdout {
            Some(stdout) => Some(
                stdout
                    .try_clone()
                    .map_err(|source| open_error(&stdio.stderr, source))?,
            ),
            None => None,
        }
    } else {
        output(&stdio.stderr)?
    };
    Ok(opened)
}

fn open_error(path: &str, source: io::Error) -> StdioError {
    StdioError::Open {
        path: path.to_owned(),
        source,
    }
}

fn open_with(path: &str, options: &OpenOptions) -> Result<File, StdioError> {
    options
        .open(path)
        .map_err(|source| open_error(path, source))
}

fn set_blocking(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor `file` owns.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// stdout or stderr: a FIFO read and written (the open never blocks, a client that goes
/// away never turns writes into EPIPE), a file appended to, or nothing.
fn output(target: &str) -> Result<Option<File>, StdioError> {
    if target.is_empty() {
        return Ok(None);
    }
    let path = match target.split_once("://") {
        None => target,
        Some(("file", path)) => {
            return open_with(
                path,
                OpenOptions::new().append(true).create(true).mode(0o640),
            )
            .map(Some);
        }
        Some(_) => return Err(StdioError::Scheme(target.to_owned())),
    };
    let fifo = std::fs::metadata(path).is_ok_and(|meta| meta.file_type().is_fifo());
    let file = if fifo {
        open_with(path, OpenOptions::new().read(true).write(true))?
    } else {
        open_with(
            path,
            OpenOptions::new().append(true).create(true).mode(0o640),
        )?
    };
    Ok(Some(file))
}

/// Starts `binary://PATH?k=v` with the pipes' read ends on fds 3 and 4 and a ready pipe
/// on fd 5; returns the write ends once it has closed fd 5.
fn start_logger(uri: &str, id: &str, namespace: &str) -> Result<(File, File), StdioError> {
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    let mut args = Vec::new();
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        args.push(key.to_owned());
        if !value.is_empty() {
            args.push(value.to_owned());
        }
    }
    let failed = |source: io::Error| open_error(uri, source);
    let (out_read, out_write) = pipe().map_err(failed)?;
    let (err_read, err_write) = pipe().map_err(failed)?;
    let (ready_read, ready_write) = pipe().map_err(failed)?;
    let fds = [
        out_read.as_raw_fd(),
        err_read.as_raw_fd(),
        ready_write.as_raw_fd(),
    ];
    let mut command = Command::new(path);
    command
        .args(&args)
        .envs(HashMap::from([
            ("CONTAINER_ID", id),
            ("CONTAINER_NAMESPACE", namespace),
        ]))
        .stdin(ChildStdio::null())
        .stdout(ChildStdio::null())
        .stderr(ChildStdio::null());
    // SAFETY: only fcntl and dup2 (async-signal-safe) between fork and exec.
    unsafe {
        command.pre_exec(move || {
            // Out of 3..5 first, so no dup2 overwrites a source not yet moved.
            let mut high = [0; 3];
            for (slot, fd) in high.iter_mut().zip(fds) {
                *slot = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
                if *slot < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            for (target, fd) in (3..).zip(high) {
                if libc::dup2(fd, target) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(failed)?;
    drop((out_read, err_read, ready_write));
    // Ready when fd 5 closes (EOF) or the program writes to it.
    let _ = File::from(ready_read).read(&mut [0u8; 1]);
    // The program outlives the process it logs; whoever exits first, it is reaped here.
    let _ = thread::Builder::new()
        .stack_size(64 << 10)
        .spawn(move || child.wait());
    Ok((File::from(out_write), File::from(err_write)))
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn fifos_files_and_binaries_open_without_blocking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("out");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from(0o600),
            0,
        )
        .expect("mkfifo");
        let log = dir.path().join("log.txt");
        let stdio = Stdio {
            stdin: fifo.display().to_string(),
            stdout: fifo.display().to_string(),
            stderr: format!("file://{}", log.display()),
            terminal: false,
        };
        let mut opened = open(&stdio, "c1", "default").expect("open");
        opened
            .io
            .stderr
            .as_mut()
            .expect("stderr")
            .write_all(b"err\n")
            .expect("write");
        assert_eq!(std::fs::read(&log).expect("log"), b"err\n");
        assert!(opened.stdin_writer.is_some());
        let none = open(&Stdio::default(), "c1", "default").expect("null");
        assert!(none.io.stdin.is_none() && none.io.stdout.is_none() && none.io.stderr.is_none());
        assert!(matches!(
            open(
                &Stdio {
                    stdout: "tcp://x".into(),
                    ..Stdio::default()
                },
                "c",
                "n"
            ),
            Err(StdioError::Scheme(_))
        ));
    }

    #[test]
    fn a_logging_binary_gets_the_output_on_fd_3() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("logger");
        let sink = dir.path().join("sink");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nexec 5>&-\necho \"$CONTAINER_ID $1 $2\" > {0}; cat <&3 >> {0}\n",
                sink.display()
            ),
        )
        .expect("script");
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        let uri = format!("binary://{}?tag=x", script.display());
        let opened = open(
            &Stdio {
                stdout: uri,
                ..Stdio::default()
            },
            "c9",
            "default",
        )
        .expect("open");
        opened
            .io
            .stdout
            .expect("stdout")
            .write_all(b"hello\n")
            .expect("write");
        drop(opened.io.stderr);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::fs::read_to_string(&sink).unwrap_or_default() != "c9 tag x\nhello\n" {
            assert!(
                std::time::Instant::now() < deadline,
                "logger output: {:?}",
                std::fs::read_to_string(&sink)
            );
            thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
