//! Starting the workload: its working directory, its stdio (a pseudo-terminal pair for
//! `-t`, else pipes, stdin from /dev/null without `-i`), and the spawn itself, as a child of
//! init in its own session with the resolved user. Exec failures carry Docker's 126/127.

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::pty::openpty;
use nix::sys::signal::SigSet;
use nix::unistd::{pipe2, setgid, setgroups, setsid, setuid, Gid, Pid, Uid};

use super::session::Streams;
use super::users::ExecUser;

/// Setting up the workload failed before it could run.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// The working directory could not be created.
    #[error("cannot create the working directory {}", .0.display())]
    Workdir(PathBuf, #[source] io::Error),
    /// Pipes or the pseudo-terminal could not be created.
    #[error("cannot create the workload's stdio")]
    Stdio(#[source] nix::Error),
}

/// The workload could not be executed; `code` is Docker's status for it.
#[derive(Debug, thiserror::Error)]
#[error("exec: {program:?}: {reason}")]
pub struct ExecError {
    /// 127 when the program does not exist, 126 when it cannot be run.
    pub code: u8,
    program: String,
    reason: String,
}

/// The workload's ends of its stdio, handed to the spawn.
pub struct ChildStdio {
    stdin: Stdio,
    stdout: Stdio,
    stderr: Stdio,
    tty: bool,
}

/// What to run and as whom.
pub struct Spec<'a> {
    /// argv, `args[0]` searched in the workload's PATH when it has no slash.
    pub args: &'a [String],
    /// The complete environment.
    pub env: &'a [(String, String)],
    /// An absolute, normalised directory that exists.
    pub workdir: &'a Path,
    /// Identity to switch to before exec.
    pub user: &'a ExecUser,
}

/// The working directory as an absolute path with `.` and `..` resolved lexically, never
/// above `/` (Docker resolves it inside the container root the same way); empty means `/`.
pub fn normalise_workdir(dir: &str) -> PathBuf {
    let mut path = PathBuf::from("/");
    for component in Path::new(dir).components() {
        match component {
            Component::Normal(name) => path.push(name),
            Component::ParentDir => {
                path.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    path
}

/// Creates the working directory (and parents, mode 0755, owned by root as with Docker)
/// when it is missing.
pub fn create_workdir(dir: &Path) -> Result<(), WorkloadError> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(|e| WorkloadError::Workdir(dir.to_path_buf(), e))
}

/// Creates the workload's stdio: with `tty` a pseudo-terminal (its master relayed both
/// ways), else a pipe each for stdout and stderr and, with `open_stdin`, for stdin.
pub fn stdio(tty: bool, open_stdin: bool) -> Result<(ChildStdio, Streams), WorkloadError> {
    if tty {
        let pty = openpty(None, None).map_err(WorkloadError::Stdio)?;
        cloexec(&pty.master)?;
        cloexec(&pty.slave)?;
        nonblocking(&pty.master)?;
        let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| WorkloadError::Stdio(errno(e)));
        let child = ChildStdio {
            stdin: Stdio::from(dup(&pty.slave)?),
            stdout: Stdio::from(dup(&pty.slave)?),
            stderr: Stdio::from(pty.slave),
            tty: true,
        };
        let streams = Streams {
            stdin: Some(dup(&pty.master)?),
            stdout: pty.master,
            stderr: None,
            tty: true,
        };
        return Ok((child, streams));
    }
    let (stdout_read, stdout_write) = output_pipe()?;
    let (stderr_read, stderr_write) = output_pipe()?;
    let (stdin_child, stdin_ours) = if open_stdin {
        let (read, write) = pipe()?;
        nonblocking(&write)?;
        (Stdio::from(read), Some(write))
    } else {
        (Stdio::null(), None)
    };
    nonblocking(&stdout_read)?;
    nonblocking(&stderr_read)?;
    let child = ChildStdio {
        stdin: stdin_child,
        stdout: Stdio::from(stdout_write),
        stderr: Stdio::from(stderr_write),
        tty: false,
    };
    let streams = Streams {
        stdout: stdout_read,
        stderr: Some(stderr_read),
        stdin: stdin_ours,
        tty: false,
    };
    Ok((child, streams))
}

/// Starts the workload. Its stdio ends are consumed (closed in init once the child has
/// them, so end of file reaches the relay when the workload's side closes).
pub fn spawn(spec: &Spec<'_>, stdio: ChildStdio) -> Result<Pid, ExecError> {
    let program = spec.args.first().map(String::as_str).unwrap_or_default();
    let mut command = Command::new(program);
    command
        .args(spec.args.iter().skip(1))
        .env_clear()
        .envs(spec.env.iter().map(|(n, v)| (n, v)))
        .current_dir(spec.workdir)
        .stdin(stdio.stdin)
        .stdout(stdio.stdout)
        .stderr(stdio.stderr);
    let tty = stdio.tty;
    let groups: Vec<Gid> = spec.user.groups.iter().map(|&g| Gid::from_raw(g)).collect();
    let (uid, gid) = (Uid::from_raw(spec.user.uid), Gid::from_raw(spec.user.gid));
    let child_setup = move || -> io::Result<()> {
        // std keeps init's signal mask across exec; the workload starts with none blocked.
        SigSet::empty().thread_set_mask()?;
        setsid()?;
        if tty {
            // SAFETY: TIOCSCTTY takes an int argument (0: do not steal); fd 0 is the pty
            // slave std just installed, and this session leader has no controlling tty.
            if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // Groups first: after setuid to a non-root user they can no longer be changed.
        setgroups(&groups)?;
        setgid(gid)?;
        setuid(uid)?;
        Ok(())
    };
    // SAFETY: the closure runs in the forked child before exec and only makes system calls
    // (sigprocmask, setsid, ioctl, setgroups, setgid, setuid) on data prepared beforehand;
    // it allocates nothing and init is single-threaded, so no lock can be held.
    unsafe {
        command.pre_exec(child_setup);
    }
    match command.spawn() {
        Ok(child) => Ok(Pid::from_raw(i32::try_from(child.id()).unwrap_or(-1))),
        Err(err) => Err(exec_error(program, &err)),
    }
}

/// Docker's status and message for a failed exec: 127 when the program does not exist
/// (searched in PATH or named by path), 126 for anything else that prevents running it.
fn exec_error(program: &str, err: &io::Error) -> ExecError {
    let (code, reason) = if err.kind() == io::ErrorKind::NotFound {
        let reason = if program.contains('/') {
            format!("stat {program}: no such file or directory")
        } else {
            "executable file not found in $PATH".to_string()
        };
        (127, reason)
    } else {
        (126, err.to_string())
    };
    ExecError {
        code,
        program: program.to_string(),
        reason,
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), WorkloadError> {
    pipe2(OFlag::O_CLOEXEC).map_err(WorkloadError::Stdio)
}

/// Bytes an output pipe holds before the process writing it blocks. Linux's default is
/// 64 KiB: a program streaming output in 4 KiB writes then hands init 16 writes per wake-up;
/// at 1 MiB (root's default pipe-max-size) init reads whole frames and the channel sees few,
/// large writes. The kernel allocates the pages only as the pipe fills.
const OUTPUT_PIPE_BYTES: libc::c_int = 1 << 20;

/// A pipe for the process's stdout or stderr, enlarged where the kernel allows (a smaller
/// pipe only costs speed, so a refusal is ignored).
fn output_pipe() -> Result<(OwnedFd, OwnedFd), WorkloadError> {
    let (read, write) = pipe()?;
    let _ = fcntl(&read, FcntlArg::F_SETPIPE_SZ(OUTPUT_PIPE_BYTES));
    Ok((read, write))
}

fn nonblocking(fd: &OwnedFd) -> Result<(), WorkloadError> {
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(WorkloadError::Stdio)?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags))
        .map(drop)
        .map_err(WorkloadError::Stdio)
}

/// openpty(3) opens both ends without O_CLOEXEC; init has no other thread to race with.
fn cloexec(fd: &OwnedFd) -> Result<(), WorkloadError> {
    fcntl(fd, FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))
        .map(drop)
        .map_err(WorkloadError::Stdio)
}

fn errno(err: io::Error) -> nix::Error {
    err.raw_os_error()
        .map_or(nix::Error::EIO, nix::Error::from_raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workdirs_are_absolute_and_stay_inside_the_root() {
        for (given, expected) in [
            ("", "/"),
            ("/", "/"),
            ("/app", "/app"),
            ("app/src", "/app/src"),
            ("/a/./b//c/", "/a/b/c"),
            ("/a/b/../c", "/a/c"),
            ("/../../etc", "/etc"),
            ("../..", "/"),
        ] {
            assert_eq!(normalise_workdir(given), Path::new(expected), "{given:?}");
        }
    }

    #[test]
    fn exec_failures_map_to_dockers_codes() {
        let missing = io::Error::from_raw_os_error(libc::ENOENT);
        let error = exec_error("nosuch", &missing);
        assert_eq!(error.code, 127);
        assert_eq!(
            error.to_string(),
            "exec: \"nosuch\": executable file not found in $PATH"
        );
        let error = exec_error("/bin/nosuch", &missing);
        assert_eq!(error.code, 127);
        assert!(error.to_string().contains("stat /bin/nosuch: no such file"));
        let denied = io::Error::from_raw_os_error(libc::EACCES);
        assert_eq!(exec_error("/etc/passwd", &denied).code, 126);
        let format = io::Error::from_raw_os_error(libc::ENOEXEC);
        assert_eq!(exec_error("/script", &format).code, 126);
    }

    /// Everything the workload writes to `fd` until end of file (or EIO for a terminal).
    fn read_all(fd: OwnedFd) -> String {
        let flags = fcntl(&fd, FcntlArg::F_GETFL).expect("flags");
        let flags = OFlag::from_bits_truncate(flags) - OFlag::O_NONBLOCK;
        fcntl(&fd, FcntlArg::F_SETFL(flags)).expect("blocking");
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut fs::File::from(fd), &mut text);
        text
    }

    fn root() -> ExecUser {
        ExecUser {
            uid: 0,
            gid: 0,
            groups: vec![0, 10],
            home: "/root".into(),
        }
    }

    fn run(args: &[&str], tty: bool) -> (Streams, Pid) {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let dir = std::env::temp_dir();
        let env = [
            ("FOO".to_string(), "bar baz".to_string()),
            (
                "PATH".to_string(),
                super::super::env::DEFAULT_PATH.to_string(),
            ),
        ];
        let spec = Spec {
            args: &args,
            env: &env,
            workdir: &dir,
            user: &root(),
        };
        let (child, streams) = stdio(tty, true).expect("stdio");
        let pid = spawn(&spec, child).expect("spawned");
        (streams, pid)
    }

    fn exit_status(pid: Pid) -> nix::sys::wait::WaitStatus {
        nix::sys::wait::waitpid(pid, None).expect("waitpid")
    }

    #[test]
    fn spawns_with_env_workdir_groups_and_separate_pipes() {
        let _children = crate::pid1::CHILDREN.lock();
        // Init blocks signals for its signalfd; the workload must not inherit that.
        let mut blocked = SigSet::empty();
        blocked.add(nix::sys::signal::SIGTERM);
        let old = blocked.thread_swap_mask(nix::sys::signal::SigmaskHow::SIG_BLOCK);
        let script = "echo \"$FOO\" \"$(pwd)\" \"$(id -G)\"; \
                      grep SigBlk /proc/self/status; echo oops >&2; read line; echo got $line; exit 3";
        let (streams, pid) = run(&["sh", "-c", script], false);
        old.expect("mask").thread_set_mask().expect("restore mask");
        let stdin = streams.stdin.expect("stdin pipe");
        assert_eq!(nix::unistd::write(&stdin, b"hi\n"), Ok(3));
        drop(stdin);
        let out = read_all(streams.stdout);
        let err = read_all(streams.stderr.expect("stderr pipe"));
        let dir = std::env::temp_dir();
        assert_eq!(
            out,
            format!(
                "bar baz {} 0 10\nSigBlk:\t0000000000000000\ngot hi\n",
                dir.display()
            )
        );
        assert_eq!(err, "oops\n");
        assert_eq!(exit_status(pid), nix::sys::wait::WaitStatus::Exited(pid, 3));
    }

    #[test]
    fn a_terminal_is_the_controlling_tty_of_the_workload() {
        let _children = crate::pid1::CHILDREN.lock();
        let script = "tty; exec 3</dev/tty && echo controlling; echo err >&2";
        let (streams, pid) = run(&["sh", "-c", script], true);
        assert!(streams.stderr.is_none() && streams.tty);
        let out = read_all(streams.stdout);
        // The line discipline's ONLCR turns each \n into \r\n.
        assert!(out.starts_with("/dev/pts/"), "{out:?}");
        assert!(out.ends_with("\r\ncontrolling\r\nerr\r\n"), "{out:?}");
        assert_eq!(exit_status(pid), nix::sys::wait::WaitStatus::Exited(pid, 0));
    }

    #[test]
    fn programs_that_cannot_run_fail_the_spawn_with_126_or_127() {
        let _children = crate::pid1::CHILDREN.lock();
        let dir = std::env::temp_dir();
        let env = [("PATH".to_string(), "/usr/bin:/bin".to_string())];
        for (program, code) in [("no-such-program", 127), ("/no/such", 127), ("/", 126)] {
            let args = [program.to_string()];
            let spec = Spec {
                args: &args,
                env: &env,
                workdir: &dir,
                user: &root(),
            };
            let (child, _streams) = stdio(false, false).expect("stdio");
            let err = spawn(&spec, child).expect_err("cannot run");
            assert_eq!(err.code, code, "{program}: {err}");
        }
    }

    #[test]
    fn workdir_creation_makes_missing_parents() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("a/b/c");
        create_workdir(&dir).expect("created");
        assert!(dir.is_dir());
        create_workdir(&dir).expect("existing is fine");
        let file = root.path().join("file");
        fs::write(&file, "").expect("file");
        assert!(create_workdir(&file).is_err());
    }
}
