//! runc's console socket: with `process.terminal`, the runtime makes the pseudo-terminal
//! and hands its master to the caller (containerd's shim, conmon) over the Unix socket
//! `--console-socket` names, as one SCM_RIGHTS message; the container gets the slave.

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{Context, Result};
use rustix::fs::{Mode, OFlags};
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use rustix::pty::OpenptFlags;

/// A new pseudo-terminal: (master, slave).
pub fn open_pty() -> Result<(OwnedFd, OwnedFd)> {
    let master =
        rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)
            .context("cannot open a pseudo-terminal")?;
    rustix::pty::grantpt(&master).context("grantpt")?;
    rustix::pty::unlockpt(&master).context("unlockpt")?;
    let name = rustix::pty::ptsname(&master, Vec::new()).context("ptsname")?;
    let slave = rustix::fs::open(
        name.as_c_str(),
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .context("cannot open the pseudo-terminal's slave")?;
    Ok((master, slave))
}

/// Sends `master` to the listener at `socket`.
pub fn send_master(socket: &Path, master: &OwnedFd) -> Result<()> {
    let stream = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to console socket {}", socket.display()))?;
    let fds = [master.as_fd()];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    control.push(SendAncillaryMessage::ScmRights(&fds));
    // runc names the file in the message; receivers use only the descriptor.
    let name = b"/dev/ptmx";
    rustix::net::sendmsg(
        &stream,
        &[IoSlice::new(name)],
        &mut control,
        SendFlags::empty(),
    )
    .with_context(|| format!("cannot send the terminal to {}", socket.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};

    use super::*;

    #[test]
    fn the_master_reaches_the_listener_and_talks_to_the_slave() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("console.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let (master, slave) = open_pty().expect("pty");
        send_master(&path, &master).expect("send");
        let (stream, _) = listener.accept().expect("accept");
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut name = [0u8; 64];
        let got = rustix::net::recvmsg(
            &stream,
            &mut [std::io::IoSliceMut::new(&mut name)],
            &mut control,
            RecvFlags::empty(),
        )
        .expect("recvmsg");
        assert_eq!(&name[..got.bytes], b"/dev/ptmx");
        let received = control
            .drain()
            .find_map(|message| match message {
                RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
                _ => None,
            })
            .expect("a descriptor");
        let mut received = std::fs::File::from(received);
        received.write_all(b"hi\n").expect("write");
        let mut slave = std::fs::File::from(slave);
        let mut buf = [0u8; 8];
        let n = slave.read(&mut buf).expect("read");
        assert_eq!(&buf[..n], b"hi\n");
    }
}
