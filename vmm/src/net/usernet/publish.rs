//! Published ports, like `docker run -p`: host listeners whose connections (TCP) or
//! datagram flows (UDP) the gateway carries to a port of the guest, arriving there from
//! 10.0.2.2. The listeners live as long as the network and close with it.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;

use mio::net::{TcpListener, TcpStream, UdpSocket};
use mio::{Interest, Registry};

use super::{token, Kind};

/// Transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// TCP: each accepted connection becomes a connection to the guest.
    Tcp,
    /// UDP: each client address becomes a flow to the guest.
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// Gateway-side ports for published connections and flows into the guest.
const PUBLISH_PORTS: std::ops::RangeInclusive<u16> = 49152..=65535;

/// Hands out the gateway-side source port of each published connection (or flow) round
/// robin from [`PUBLISH_PORTS`], so a port is reused as late as possible.
#[derive(Debug)]
pub(super) struct PortCursor {
    next: u16,
}

impl Default for PortCursor {
    fn default() -> Self {
        Self {
            next: *PUBLISH_PORTS.start(),
        }
    }
}

impl PortCursor {
    /// The next port for which `in_use` is false, `None` when all are taken.
    pub(super) fn next_free(&mut self, in_use: impl Fn(u16) -> bool) -> Option<u16> {
        let span = usize::from(PUBLISH_PORTS.end() - PUBLISH_PORTS.start()) + 1;
        for _ in 0..span {
            let port = self.next;
            self.next = match port {
                p if p == *PUBLISH_PORTS.end() => *PUBLISH_PORTS.start(),
                p => p + 1,
            };
            if !in_use(port) {
                return Some(port);
            }
        }
        None
    }
}

struct TcpPublish {
    listener: TcpListener,
    guest_port: u16,
    /// Accepting stopped on an error (out of descriptors) rather than on EAGAIN.
    retry: bool,
}

/// A published UDP port: the socket clients talk to, and where their datagrams go.
pub(super) struct UdpPublish {
    pub(super) socket: UdpSocket,
    pub(super) guest_port: u16,
    /// Edge-triggered readiness, cleared when the socket would block.
    pub(super) readable: bool,
}

/// Every published port of one network.
#[derive(Default)]
pub(super) struct Listeners {
    tcp: HashMap<usize, TcpPublish>,
    udp: HashMap<usize, UdpPublish>,
    next_id: usize,
}

impl Listeners {
    /// Binds `host` (port 0 picks one) and forwards it to `guest_port`; returns the bound
    /// address.
    pub(super) fn add(
        &mut self,
        registry: &Registry,
        host: SocketAddr,
        guest_port: u16,
        protocol: Protocol,
    ) -> io::Result<SocketAddr> {
        self.next_id += 1;
        let id = self.next_id;
        match protocol {
            Protocol::Tcp => {
                let mut listener = TcpListener::bind(host)?;
                let token = token(Kind::TcpListener, id);
                registry.register(&mut listener, token, Interest::READABLE)?;
                let bound = listener.local_addr()?;
                let publish = TcpPublish {
                    listener,
                    guest_port,
                    retry: false,
                };
                self.tcp.insert(id, publish);
                Ok(bound)
            }
            Protocol::Udp => {
                let mut socket = UdpSocket::bind(host)?;
                let token = token(Kind::UdpListener, id);
                registry.register(&mut socket, token, Interest::READABLE)?;
                let bound = socket.local_addr()?;
                let publish = UdpPublish {
                    socket,
                    guest_port,
                    readable: true,
                };
                self.udp.insert(id, publish);
                Ok(bound)
            }
        }
    }

    /// Accepts every waiting client of TCP listener `id` (or of all listeners that hit an
    /// error last time, with `id` None) and hands each to `adopt` with its guest port.
    pub(super) fn accept(&mut self, id: Option<usize>, mut adopt: impl FnMut(TcpStream, u16)) {
        for (&key, publish) in &mut self.tcp {
            if id.map_or(!publish.retry, |id| id != key) {
                continue;
            }
            publish.retry = false;
            loop {
                match publish.listener.accept() {
                    Ok((stream, _)) => adopt(stream, publish.guest_port),
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    // Out of descriptors or memory: the client stays queued in the kernel
                    // and is tried again shortly.
                    Err(_) => {
                        publish.retry = true;
                        break;
                    }
                }
            }
        }
    }

    /// Whether some listener must be retried (see [`accept`](Self::accept)).
    pub(super) fn needs_retry(&self) -> bool {
        self.tcp.values().any(|publish| publish.retry)
    }

    /// Marks UDP listener `id` readable.
    pub(super) fn on_udp_event(&mut self, id: usize) {
        if let Some(publish) = self.udp.get_mut(&id) {
            publish.readable = true;
        }
    }

    /// The published UDP ports, by id.
    pub(super) fn udp_mut(&mut self) -> impl Iterator<Item = (usize, &mut UdpPublish)> {
        self.udp.iter_mut().map(|(&id, publish)| (id, publish))
    }

    /// Sends a guest's answer to `client` from UDP listener `id`; UDP may drop it.
    pub(super) fn send_to(&self, id: usize, client: SocketAddr, payload: &[u8]) {
        if let Some(publish) = self.udp.get(&id) {
            let _ = publish.socket.send_to(payload, client);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_go_round_robin_skip_those_in_use_and_run_out() {
        let mut cursor = PortCursor::default();
        assert_eq!(cursor.next_free(|_| false), Some(49152));
        assert_eq!(cursor.next_free(|port| port == 49153), Some(49154));
        cursor.next = 65535;
        assert_eq!(cursor.next_free(|_| false), Some(65535));
        assert_eq!(cursor.next_free(|_| false), Some(49152), "wraps around");
        assert_eq!(cursor.next_free(|_| true), None);
    }
}
