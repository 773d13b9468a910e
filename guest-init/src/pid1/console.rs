//! init's two terminals: the frame channel to the host and the kernel console (the serial
//! port), where init's own one-line messages go.
//!
//! The channel is katalite's virtio-console port, a generic port named
//! [`PORT_NAME`](guest_init::channel::PORT_NAME) (`/dev/vport<dev>p0`, a char device:
//! each `write()` queues up to 32 KiB for the host without waiting for it). A VM whose
//! port is a console port instead (QEMU's `virtconsole`, in the bench) gives `/dev/hvc0`,
//! a tty that is put in raw mode before a byte is written so frames pass unmangled. Either
//! way the channel is announced with a `Ready` frame.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::fd::{AsFd, IntoRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use guest_init::channel::{encode, Message, PORT_NAME};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
use nix::unistd::write;

/// Where the kernel lists virtio-console ports (drivers/char/virtio_console.c's class),
/// each with its `name` once the host has sent one.
const PORTS: &str = "/sys/class/virtio-ports";
/// The fallback channel: the first virtio console port used as a hvc console.
const HVC: &str = "/dev/hvc0";
/// How long init waits for the channel to appear and for the host to connect. The
/// kernel sets a generic port up from a workqueue after probing the device, so the port
/// may come a little after init starts; the host answers at once.
const CHANNEL_WAIT: Duration = Duration::from_secs(10);
/// Pause between looks while the channel is not there yet.
const RETRY: Duration = Duration::from_millis(1);

/// The channel could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// Neither the named port nor /dev/hvc0 appeared in time.
    #[error("no host channel: neither a virtio port named {PORT_NAME} nor {HVC} appeared")]
    Missing,
    /// Opening the channel failed.
    #[error("cannot open {0}")]
    Open(PathBuf, #[source] io::Error),
    /// Putting /dev/hvc0 in raw mode failed.
    #[error("cannot put {HVC} in raw mode")]
    Raw(#[source] nix::Error),
    /// Writing the `Ready` frame failed.
    #[error("cannot write to the host channel")]
    Announce(#[source] nix::Error),
    /// The host never connected to the port (its writes would block forever).
    #[error("the host never opened the channel")]
    NotConnected,
}

/// Opens the channel non-blocking (waiting for it to appear), then tells the host it may
/// send.
pub fn open_channel() -> Result<OwnedFd, ConsoleError> {
    let deadline = Instant::now() + CHANNEL_WAIT;
    let fd = loop {
        if let Some(fd) = open_port()? {
            break fd;
        }
        if let Some(fd) = open_hvc()? {
            break fd;
        }
        if Instant::now() >= deadline {
            return Err(ConsoleError::Missing);
        }
        std::thread::sleep(RETRY);
    };
    let mut frame = Vec::new();
    encode(0, &Message::Ready, &mut frame);
    announce(&fd, &frame, deadline)?;
    Ok(fd)
}

/// The generic port named [`PORT_NAME`], opened; `None` while there is none (or the
/// port is a console port, which only opens as a hvc).
fn open_port() -> Result<Option<OwnedFd>, ConsoleError> {
    let Some(device) = find_port(Path::new(PORTS)) else {
        return Ok(None);
    };
    let path = Path::new("/dev").join(device);
    match open(&path) {
        Ok(fd) => Ok(Some(fd)),
        // ENOENT: not in devtmpfs yet; ENXIO: a console port (`port_fops_open`).
        Err(err) if matches!(err.raw_os_error(), Some(libc::ENOENT | libc::ENXIO)) => Ok(None),
        Err(err) => Err(ConsoleError::Open(path, err)),
    }
}

/// The device name (`vport1p0`) of the port in `class` whose `name` is [`PORT_NAME`].
fn find_port(class: &Path) -> Option<String> {
    std::fs::read_dir(class).ok()?.flatten().find_map(|entry| {
        let name = std::fs::read(entry.path().join("name")).ok()?;
        let named = name.strip_suffix(b"\n").unwrap_or(&name) == PORT_NAME.as_bytes();
        named.then(|| entry.file_name().into_string().ok())?
    })
}

/// /dev/hvc0 opened in raw mode: no echo, no line discipline, no CR/LF translation, no
/// flow-control or signal characters (termios(3), `cfmakeraw`); `None` while no console
/// port backs it.
fn open_hvc() -> Result<Option<OwnedFd>, ConsoleError> {
    let fd = match open(Path::new(HVC)) {
        Ok(fd) => fd,
        // The hvc driver's nodes exist from its first console; one without a port
        // behind it fails with ENODEV.
        Err(err)
            if matches!(
                err.raw_os_error(),
                Some(libc::ENOENT | libc::ENODEV | libc::ENXIO)
            ) =>
        {
            return Ok(None)
        }
        Err(err) => return Err(ConsoleError::Open(HVC.into(), err)),
    };
    let mut termios = tcgetattr(&fd).map_err(ConsoleError::Raw)?;
    cfmakeraw(&mut termios);
    tcsetattr(&fd, SetArg::TCSANOW, &termios).map_err(ConsoleError::Raw)?;
    Ok(Some(fd))
}

/// Opens `path` for reading and writing, non-blocking, never as a controlling terminal
/// (and closed on exec, as std does, so the workload does not inherit it).
fn open(path: &Path) -> io::Result<OwnedFd> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(path)?;
    Ok(OwnedFd::from(file))
}

/// Writes `frame` whole before `deadline`. A generic port takes no write until the host
/// has connected (PORT_OPEN); until then poll reports POLLHUP rather than waiting, so
/// init sleeps between tries.
fn announce(fd: &OwnedFd, frame: &[u8], deadline: Instant) -> Result<(), ConsoleError> {
    let mut rest = frame;
    while !rest.is_empty() {
        match write(fd, rest) {
            Ok(n) => rest = &rest[n..],
            Err(Errno::EAGAIN) => {
                if Instant::now() >= deadline {
                    return Err(ConsoleError::NotConnected);
                }
                let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLOUT)];
                poll(&mut fds, PollTimeout::from(10u8)).map_err(ConsoleError::Announce)?;
                let writable = fds[0]
                    .revents()
                    .is_some_and(|r| r.contains(PollFlags::POLLOUT));
                if !writable {
                    std::thread::sleep(RETRY);
                }
            }
            Err(Errno::EINTR) => {}
            Err(err) => return Err(ConsoleError::Announce(err)),
        }
    }
    Ok(())
}

/// Gives init a stdin, stdout and stderr when the kernel could not (the image has no
/// /dev/console, so PID 1 starts without them): the console, else /dev/null. Without this
/// the next files opened would land on 0-2 and be mistaken for standard streams.
pub fn ensure_std_fds() {
    for fd in 0..3 {
        // SAFETY: F_GETFD reads no memory; on a closed descriptor it only reports EBADF.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0 {
            continue;
        }
        let opened = ["/dev/console", "/dev/null"].iter().find_map(|path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NOCTTY)
                .open(path)
                .ok()
        });
        // The lowest free descriptor is `fd` itself; it stays open for the life of init.
        if let Some(file) = opened {
            let _ = file.into_raw_fd();
        }
    }
}

/// Writes one `katalite-init: ...` line to the kernel console; the host shows these.
pub fn log(message: &str) {
    if let Ok(mut console) = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/console")
    {
        let _ = writeln!(console, "katalite-init: {message}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::fcntl::OFlag;
    use nix::unistd::{pipe2, read};

    #[test]
    fn the_port_is_found_by_its_name() {
        let class = tempfile::tempdir().expect("dir");
        let port = |dir: &str, name: Option<&str>| {
            let path = class.path().join(dir);
            std::fs::create_dir(&path).expect("port dir");
            if let Some(name) = name {
                std::fs::write(path.join("name"), name).expect("name");
            }
        };
        assert_eq!(find_port(&class.path().join("missing")), None);
        port("vport0p0", None);
        port("vport1p0", Some("org.qemu.guest_agent.0\n"));
        assert_eq!(find_port(class.path()), None);
        port("vport2p0", Some("katalite.channel\n"));
        assert_eq!(find_port(class.path()).as_deref(), Some("vport2p0"));
    }

    #[test]
    fn a_port_that_takes_the_frame_at_once_is_announced() {
        let (reader, writer) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).expect("pipe");
        let deadline = Instant::now() + Duration::from_secs(5);
        announce(&writer, b"frame", deadline).expect("announce");
        let mut buf = [0u8; 8];
        assert_eq!(read(&reader, &mut buf), Ok(5));
        assert_eq!(&buf[..5], b"frame");
    }

    #[test]
    fn a_host_that_never_connects_ends_the_wait() {
        let (_reader, writer) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).expect("pipe");
        // Fill the pipe so every write says EAGAIN, as an unconnected port does.
        while write(&writer, &[0u8; 4096]).is_ok() {}
        let deadline = Instant::now() + Duration::from_millis(30);
        let err = announce(&writer, b"frame", deadline).expect_err("times out");
        assert!(matches!(err, ConsoleError::NotConnected));
    }
}
