//! init's two terminals: the frame channel to the host (`/dev/hvc0`, virtio console, put in
//! raw mode before a byte is written so frames pass unmangled, then announced with a
//! `Ready` frame) and the kernel console (the serial port), where init's own one-line
//! messages go.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::fd::{AsFd, IntoRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use guest_init::channel::{encode, Message};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
use nix::unistd::write;

/// The host<->init channel: the first virtio console port.
const CHANNEL: &str = "/dev/hvc0";

/// The channel could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// Opening /dev/hvc0 failed.
    #[error("cannot open {CHANNEL}")]
    Open(#[source] io::Error),
    /// Putting it in raw mode failed.
    #[error("cannot put {CHANNEL} in raw mode")]
    Raw(#[source] nix::Error),
    /// Writing the `Ready` frame failed.
    #[error("cannot write to {CHANNEL}")]
    Announce(#[source] nix::Error),
}

/// Opens the channel non-blocking and in raw mode: no echo, no line discipline, no CR/LF
/// translation, no flow-control or signal characters (termios(3), `cfmakeraw`); then
/// tells the host it may send.
pub fn open_channel() -> Result<OwnedFd, ConsoleError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(CHANNEL)
        .map_err(ConsoleError::Open)?;
    let fd = OwnedFd::from(file);
    let mut termios = tcgetattr(&fd).map_err(ConsoleError::Raw)?;
    cfmakeraw(&mut termios);
    tcsetattr(&fd, SetArg::TCSANOW, &termios).map_err(ConsoleError::Raw)?;
    let mut frame = Vec::new();
    encode(0, &Message::Ready, &mut frame);
    let mut rest = frame.as_slice();
    while !rest.is_empty() {
        match write(&fd, rest) {
            Ok(n) => rest = &rest[n..],
            Err(Errno::EAGAIN) => {
                let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLOUT)];
                poll(&mut fds, PollTimeout::NONE).map_err(ConsoleError::Announce)?;
            }
            Err(Errno::EINTR) => {}
            Err(err) => return Err(ConsoleError::Announce(err)),
        }
    }
    Ok(fd)
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
