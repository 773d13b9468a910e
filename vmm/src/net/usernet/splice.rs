//! One TCP connection carried across the gateway: a smoltcp socket facing the guest spliced
//! to a non-blocking host socket, bytes moved straight between the two buffers. Each half
//! closes on its own (a FIN on one side becomes a shutdown on the other), and a reset on
//! either side becomes a reset on the other.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::time::Duration;

use mio::event::Event;
use mio::net::TcpStream;
use smoltcp::socket::tcp::{self, State};

/// Whether a connection still needs its entry.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Progress {
    Open,
    /// Both sides are done; the socket and entry can go.
    Finished,
}

/// The host half of a spliced connection and what has happened to each direction.
#[derive(Debug)]
pub(super) struct Splice {
    /// `None` once the host side is closed.
    host: Option<TcpStream>,
    /// Edge-triggered readiness, cleared when the host socket says it would block.
    readable: bool,
    writable: bool,
    /// The host peer sent FIN; the guest side was asked to close after what is queued.
    host_eof: bool,
    /// The guest sent FIN and everything before it reached the host; the host socket's
    /// write half is shut down.
    guest_eof: bool,
    /// The guest side was synchronized at some point (a guest that refuses a published
    /// connection never gets there).
    was_open: bool,
}

impl Splice {
    /// Splices `host`, a connected (or connecting) socket.
    pub(super) fn new(host: TcpStream) -> Self {
        Self {
            host: Some(host),
            readable: true,
            writable: true,
            host_eof: false,
            guest_eof: false,
            was_open: false,
        }
    }

    /// Records host readiness. Errors and hang-ups surface through the next read/write.
    pub(super) fn on_event(&mut self, event: &Event) {
        let failed = event.is_error() || event.is_read_closed() || event.is_write_closed();
        self.readable |= event.is_readable() || failed;
        self.writable |= event.is_writable() || failed;
    }

    /// Moves what can move between `socket` and the host, propagates closes and resets,
    /// and says whether the connection is over.
    pub(super) fn pump(&mut self, socket: &mut tcp::Socket) -> Progress {
        if matches!(
            socket.state(),
            State::Established
                | State::FinWait1
                | State::FinWait2
                | State::CloseWait
                | State::Closing
                | State::LastAck
                | State::TimeWait
        ) {
            self.was_open = true;
        }
        if self.host.is_some() && self.move_bytes(socket).is_err() {
            // The host peer reset or failed: reset the guest side too.
            socket.abort();
            self.host = None;
        }
        if socket.state() == State::Closed && self.host.is_some() {
            if !(self.host_eof && self.guest_eof) {
                // Reset by the guest, refused by it, or timed out: the host peer sees a
                // reset rather than a clean end it could mistake for complete data.
                self.reset_host();
            }
            self.host = None;
        }
        if self.host_eof && self.guest_eof {
            self.host = None;
        }
        let guest_done = match socket.state() {
            // Nothing can be lost by not lingering in TIME-WAIT on a link with no
            // reordering: a stray FIN would only be answered with a reset.
            State::TimeWait => true,
            // Closed with a reset still to send keeps its endpoint until it is sent.
            State::Closed => socket.remote_endpoint().is_none(),
            _ => false,
        };
        match self.host.is_none() && guest_done {
            true => Progress::Finished,
            false => Progress::Open,
        }
    }

    fn move_bytes(&mut self, socket: &mut tcp::Socket) -> io::Result<()> {
        let Some(host) = self.host.as_mut() else {
            return Ok(());
        };
        while self.writable && socket.can_recv() {
            let written = socket.recv(|data| match host.write(data) {
                Ok(n) => (n, Ok(n)),
                Err(err) => (0, Err(err)),
            });
            match written {
                Ok(Ok(0)) => self.writable = false,
                Ok(Ok(_)) => {}
                Ok(Err(err)) => would_block(err, &mut self.writable)?,
                Err(_) => break,
            }
        }
        if self.was_open && !self.guest_eof && !socket.may_recv() {
            // The guest's FIN, after all its data: end the host's stream the same way.
            // A host socket already reset says so on the next read.
            let _ = host.shutdown(Shutdown::Write);
            self.guest_eof = true;
        }
        while self.readable && !self.host_eof && socket.can_send() {
            let read = socket.send(|space| match host.read(space) {
                Ok(n) => (n, Ok(n)),
                Err(err) => (0, Err(err)),
            });
            match read {
                Ok(Ok(0)) => {
                    self.host_eof = true;
                    // smoltcp sends its FIN after the data already queued.
                    socket.close();
                }
                Ok(Ok(_)) => {}
                Ok(Err(err)) => would_block(err, &mut self.readable)?,
                Err(_) => break,
            }
        }
        Ok(())
    }

    /// Closes the host socket so its peer gets a RST (SO_LINGER with a zero timeout).
    fn reset_host(&mut self) {
        if let Some(host) = self.host.take() {
            let _ = socket2::SockRef::from(&host).set_linger(Some(Duration::ZERO));
        }
    }
}

/// Clears `ready` on EAGAIN, ignores EINTR, and returns any other error.
fn would_block(err: io::Error, ready: &mut bool) -> io::Result<()> {
    match err.kind() {
        io::ErrorKind::WouldBlock => {
            *ready = false;
            Ok(())
        }
        io::ErrorKind::Interrupted => Ok(()),
        _ => Err(err),
    }
}
