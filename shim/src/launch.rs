//! The shim's three lives: `start` (make the socket, leave the daemon serving it, print its
//! address), the daemon itself, and `delete` (clean up after a task whose daemon is gone).

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread;

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::flags::Flags;
use crate::messages::{delete_response, Exit, Timestamp};
use crate::runc::Runc;
use crate::service::Service;
use crate::{mounts, PROGRAM};

/// Where containerd 1.6 shims keep their sockets.
const SOCKET_DIR: &str = "/run/containerd/s";
/// The daemon's listening socket, as containerd's shims pass it.
const LISTENER_FD: i32 = 3;
/// What `delete` reports for a task whose daemon is gone: killed (128 + SIGKILL).
const KILLED: u32 = 137;

/// Why a shim command failed.
#[derive(Debug, Error)]
pub enum Error {
    /// Not `start`, `delete` or none.
    #[error("unknown action {0:?}")]
    Action(String),
    /// A system call or file failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: io::Error,
    },
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// containerd's socket for this task: `SOCKET_DIR/hex(sha256(address/namespace/id))`.
pub fn socket_path(flags: &Flags) -> PathBuf {
    let name = Path::new(&flags.address)
        .join(&flags.namespace)
        .join(&flags.id);
    let digest = Sha256::digest(name.as_os_str().as_encoded_bytes());
    Path::new(SOCKET_DIR).join(hex::encode(digest))
}

/// `start`: runs in the bundle; everything it prints on stdout or stderr is taken as the
/// address, and containerd waits until every copy of those pipes is closed.
pub fn start(flags: &Flags) -> Result<(), Error> {
    // The runtime options containerd sends on stdin: nothing katalite acts on.
    let _ = io::stdin().take(1 << 20).read_to_end(&mut Vec::new());
    let path = socket_path(flags);
    let address = format!("unix://{}", path.display());
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(SOCKET_DIR)
        .map_err(io_error(format!("cannot create {SOCKET_DIR}")))?;
    if path.exists() {
        if UnixStream::connect(&path).is_ok() {
            // A live shim already serves this task: containerd talks to it.
            print_address(&address)?;
            return Ok(());
        }
        fs::remove_file(&path)
            .map_err(io_error(format!("cannot remove stale {}", path.display())))?;
    }
    let listener = UnixListener::bind(&path)
        .map_err(io_error(format!("cannot listen on {}", path.display())))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
        .map_err(io_error("cannot restrict the socket"))?;
    // Read back by containerd when it restarts; written first, so no daemon is ever left
    // running that containerd cannot find.
    let written = std::env::current_dir()
        .map_err(io_error("no current directory"))
        .and_then(|bundle| write_atomically(&bundle.join("address"), address.as_bytes()));
    if let Err(err) = written.and_then(|()| spawn_daemon(flags, &listener)) {
        let _ = fs::remove_file(&path);
        return Err(err);
    }
    print_address(&address)
}

fn print_address(address: &str) -> Result<(), Error> {
    let mut stdout = io::stdout();
    stdout
        .write_all(address.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(io_error("cannot print the address"))
}

fn spawn_daemon(flags: &Flags, listener: &UnixListener) -> Result<(), Error> {
    let mut command = Command::new("/proc/self/exe");
    command
        .arg0(PROGRAM)
        .args([
            "-namespace",
            &flags.namespace,
            "-id",
            &flags.id,
            "-address",
            &flags.address,
        ])
        .args(flags.debug.then_some("-debug"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let fd = listener.as_raw_fd();
    // SAFETY: the closure makes only async-signal-safe system calls (setsid, dup2, fcntl)
    // between fork and exec.
    unsafe {
        command.pre_exec(move || {
            // Its own session: containerd's signals to its group and its exit leave it.
            libc::setsid();
            if fd == LISTENER_FD {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(fd, LISTENER_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // The daemon is reaped by init once this process exits.
    command
        .spawn()
        .map(drop)
        .map_err(io_error("cannot start the shim daemon"))
}

fn write_atomically(path: &Path, data: &[u8]) -> Result<(), Error> {
    let tmp = path.with_extension("tmp-katalite");
    fs::write(&tmp, data)
        .and_then(|()| fs::rename(&tmp, path))
        .map_err(|source| {
            let _ = fs::remove_file(&tmp);
            Error::Io {
                what: format!("cannot write {}", path.display()),
                source,
            }
        })
}

/// `delete`: stops what is left of the task and prints `DeleteResponse` (raw protobuf).
pub fn delete(flags: &Flags) -> Result<(), Error> {
    let bundle = match &flags.bundle {
        Some(bundle) => bundle.clone(),
        None => std::env::current_dir().map_err(io_error("no current directory"))?,
    };
    let runc = Runc::new(&flags.namespace);
    if let Err(err) = runc.delete(&flags.id) {
        // Already gone is the usual case: the daemon deleted it.
        let _ = writeln!(io::stderr(), "{err}");
    }
    if let Err(err) = mounts::unmount_all(&bundle.join("rootfs")) {
        let _ = writeln!(io::stderr(), "{err}");
    }
    let pid = fs::read_to_string(bundle.join("init.pid"))
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0);
    let exit = Exit {
        status: KILLED,
        at: Timestamp::now(),
    };
    let mut stdout = io::stdout();
    stdout
        .write_all(&delete_response(pid, exit))
        .and_then(|()| stdout.flush())
        .map_err(io_error("cannot write the response"))
}

/// The daemon: serves the task API on the socket `start` made until `Shutdown`.
pub fn serve(flags: &Flags) -> Result<(), Error> {
    // SAFETY: prctl with integer arguments; signal() with SIG_IGN installs no handler code.
    unsafe {
        // Orphans of katalite-runc (the VM processes, exec relays) become ours to wait for.
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1);
        // Writes to a gone containerd (or its log FIFO) must fail, not kill the shim.
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    redirect_stderr_to_log();
    let path = flags.socket.clone().unwrap_or_else(|| socket_path(flags));
    let listener = match &flags.socket {
        Some(path) => UnixListener::bind(path)
            .map_err(io_error(format!("cannot listen on {}", path.display())))?,
        // SAFETY: `start` passes the listening socket as fd 3, which nothing else owns.
        None => unsafe { UnixListener::from_raw_fd(LISTENER_FD) },
    };
    // SAFETY: fcntl on a descriptor this process owns.
    unsafe {
        libc::fcntl(listener.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC);
    }
    let service = Arc::new(Service::new(flags, path));
    let euid = rustix::process::geteuid();
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(stream) => stream,
            // Out of descriptors: wait for some to be closed rather than spin.
            Err(err) if matches!(err.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            // No listening socket (fd 3 was not one): nothing to serve, ever.
            Err(err) => return Err(io_error("cannot accept connections")(err)),
        };
        // containerd's only handshake: the peer runs as the shim's user.
        let same_user =
            rustix::net::sockopt::socket_peercred(&stream).is_ok_and(|cred| cred.uid == euid);
        if !same_user {
            continue;
        }
        let handler = Arc::clone(&service);
        let _ = thread::Builder::new().stack_size(256 << 10).spawn(move || {
            let _ = crate::ttrpc::serve(stream, handler);
        });
    }
    Ok(())
}

/// containerd reads the bundle's `log` FIFO into its own log; stderr goes there.
fn redirect_stderr_to_log() {
    let opened = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("log");
    if let Ok(log) = opened {
        // SAFETY: dup2 onto fd 2 of a descriptor this function owns.
        unsafe {
            libc::dup2(log.as_raw_fd(), 2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_is_named_as_containerd_names_it() {
        let flags = Flags {
            address: "/run/containerd/containerd.sock".into(),
            namespace: "default".into(),
            id: "mycontainer".into(),
            ..Flags::default()
        };
        let digest = Sha256::digest(b"/run/containerd/containerd.sock/default/mycontainer");
        assert_eq!(
            socket_path(&flags),
            Path::new(SOCKET_DIR).join(hex::encode(digest))
        );
        assert!(format!("unix://{}", socket_path(&flags).display()).len() < 106);
    }
}
