//! The built-in user-mode network (`--network user`): a gateway inside the katalite process,
//! like QEMU's slirp, needing no privileges. The guest is 10.0.2.15/24 behind gateway
//! 10.0.2.2 with DNS at 10.0.2.3; its TCP and UDP leave through ordinary host sockets
//! (10.0.2.2 itself reaches the host's loopback), and published host ports lead in.

mod dns;
mod frame;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod publish;
mod splice;
mod stack;
mod tcp_nat;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;
mod udp_nat;

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token};

pub use dns::{host_resolvers, parse_resolv_conf};
pub use publish::Protocol;

use super::NetBackend;
use dns::DnsRelay;
use frame::Verdict;
use publish::Listeners;
use stack::Stack;
use tcp_nat::TcpNat;
use udp_nat::UdpNat;

/// The gateway: the host as the guest sees it (and the guest's default route).
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The DNS relay.
pub const DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// The guest's address.
pub const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The network's prefix length (10.0.2.0/24).
pub const PREFIX_LEN: u8 = 24;
/// The gateway's MAC address (QEMU's slirp uses the same).
pub const GATEWAY_MAC: [u8; 6] = [0x52, 0x55, 0x0a, 0x00, 0x02, 0x02];
/// A MAC address for the guest's NIC (QEMU's default).
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// How often idle UDP flows are looked for while there are any.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// How soon a listener that ran out of descriptors is tried again.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// What a user-mode network allows.
#[derive(Debug, Clone)]
pub struct UserNetConfig {
    /// Where queries to 10.0.2.3 go, in order of preference (see [`host_resolvers`]).
    pub resolvers: Vec<SocketAddr>,
    /// Whether the guest may reach the host itself: 10.0.2.2 as the host's loopback (as
    /// with QEMU's slirp), the host's own addresses and link-local 169.254.0.0/16 (cloud
    /// metadata). Off by default, like podman's `allow_host_loopback`: local-only services
    /// (databases, the Docker API, kubelet) are not a container's to reach.
    pub host_loopback: bool,
    /// Most TCP connections at once (pending, open and closing), each holding a host
    /// descriptor and up to 128 KiB of buffers; SYNs past it are reset.
    pub max_connections: usize,
    /// Most UDP flows at once, each holding a host descriptor; the least recently used
    /// makes room for a new one.
    pub max_udp_flows: usize,
}

impl UserNetConfig {
    /// The defaults, relaying DNS to `resolvers`: the host not reachable, 1024 TCP
    /// connections (128 MiB of buffers at most), 256 UDP flows.
    pub fn new(resolvers: Vec<SocketAddr>) -> Self {
        Self {
            resolvers,
            host_loopback: false,
            max_connections: 1024,
            max_udp_flows: 256,
        }
    }
}

/// Errors of the user-mode network.
#[derive(Debug, thiserror::Error)]
pub enum UserNetError {
    /// The event loop (epoll) could not be created.
    #[error("cannot create the network's event loop")]
    Poll(#[source] io::Error),
    /// A published port could not be bound.
    #[error("cannot publish {protocol} port {addr}")]
    Publish {
        /// The host address asked for.
        addr: SocketAddr,
        /// Its protocol.
        protocol: Protocol,
        /// Why not (in use, not a local address, no permission).
        #[source]
        source: io::Error,
    },
}

/// What a mio token points at; the kind lives in the token's low two bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tcp = 0,
    Udp = 1,
    TcpListener = 2,
    UdpListener = 3,
}

fn token(kind: Kind, id: usize) -> Token {
    Token(id << 2 | kind as usize)
}

fn untoken(token: Token) -> (Kind, usize) {
    let kind = match token.0 & 3 {
        0 => Kind::Tcp,
        1 => Kind::Udp,
        2 => Kind::TcpListener,
        _ => Kind::UdpListener,
    };
    (kind, token.0 >> 2)
}

/// The user-mode network, a [`NetBackend`]. Publish ports before handing it to the VM;
/// dropping it (the VM does when it ends) closes every socket and listener.
pub struct UserNet {
    poll: Poll,
    events: Events,
    stack: Stack,
    tcp: TcpNat,
    udp: UdpNat,
    listeners: Listeners,
    dns: DnsRelay,
    host_loopback: bool,
    next_sweep: Instant,
}

/// Whether `ip` is one of this host's own addresses: a socket can bind to exactly those
/// (without IP_FREEBIND). Asked per new connection or flow, so addresses added to the host
/// later count too.
fn is_host_address(ip: Ipv4Addr) -> bool {
    std::net::UdpSocket::bind((ip, 0)).is_ok()
}

impl UserNet {
    /// A network with nothing published yet.
    pub fn new(config: UserNetConfig) -> Result<Self, UserNetError> {
        Ok(Self {
            poll: Poll::new().map_err(UserNetError::Poll)?,
            events: Events::with_capacity(256),
            stack: Stack::new(),
            tcp: TcpNat::new(config.max_connections),
            udp: UdpNat::new(config.max_udp_flows),
            listeners: Listeners::default(),
            dns: DnsRelay::new(config.resolvers),
            host_loopback: config.host_loopback,
            next_sweep: Instant::now() + SWEEP_INTERVAL,
        })
    }

    /// Forwards `host_ip:host_port` (port 0: any free one) to the guest's `guest_port`,
    /// like `docker run -p`; returns the address bound. Connections arrive in the guest
    /// from 10.0.2.2; one the guest refuses is reset for the host client.
    pub fn publish(
        &mut self,
        host_ip: IpAddr,
        host_port: u16,
        guest_port: u16,
        protocol: Protocol,
    ) -> Result<SocketAddr, UserNetError> {
        let addr = SocketAddr::new(host_ip, host_port);
        self.listeners
            .add(self.poll.registry(), addr, guest_port, protocol)
            .map_err(|source| UserNetError::Publish {
                addr,
                protocol,
                source,
            })
    }

    /// Where a destination the guest dials is on the host's side: 10.0.2.2 is the host's
    /// loopback (if allowed), 10.0.2.3 the first resolver (DNS over TCP), the rest of the
    /// guest's subnet, loopback and non-unicast addresses lead nowhere, nor do the host's
    /// own addresses and link-local ones unless the host is allowed, and everything else
    /// is itself.
    fn host_target(&self, dst: SocketAddrV4) -> Option<SocketAddr> {
        let ip = *dst.ip();
        let port = dst.port();
        if port == 0 {
            return None;
        }
        if ip == GATEWAY {
            return self
                .host_loopback
                .then_some(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
        }
        if ip == DNS {
            return (port == 53).then(|| self.dns.tcp_target()).flatten();
        }
        let subnet = u32::from(GUEST) >> (32 - PREFIX_LEN);
        let unreachable = u32::from(ip) >> (32 - PREFIX_LEN) == subnet
            || ip.is_loopback()
            || ip.is_unspecified()
            || ip.is_broadcast()
            || ip.is_multicast()
            || (!self.host_loopback && (ip.is_link_local() || is_host_address(ip)));
        (!unreachable).then_some(SocketAddr::V4(dst))
    }

    fn dispatch_events(&mut self) {
        // Readiness only; the work happens in the pumps that follow.
        if self
            .poll
            .poll(&mut self.events, Some(Duration::ZERO))
            .is_err()
        {
            return;
        }
        let registry = self.poll.registry();
        for event in &self.events {
            match untoken(event.token()) {
                (Kind::Tcp, id) => self.tcp.on_event(id, event, &mut self.stack),
                (Kind::Udp, id) => self.udp.on_event(id),
                (Kind::TcpListener, id) => {
                    let (tcp, stack) = (&mut self.tcp, &mut self.stack);
                    self.listeners.accept(Some(id), |host, guest_port| {
                        tcp.adopt(host, guest_port, stack, registry)
                    });
                }
                (Kind::UdpListener, id) => self.listeners.on_udp_event(id),
            }
        }
        if self.listeners.needs_retry() {
            let (tcp, stack) = (&mut self.tcp, &mut self.stack);
            self.listeners.accept(None, |host, guest_port| {
                tcp.adopt(host, guest_port, stack, registry)
            });
        }
    }

    /// Hands the guest's datagrams to the UDP flows (DNS to the relay).
    fn udp_from_guest(&mut self) {
        let mut datagrams = Vec::new();
        self.stack
            .recv_udp(|src, dst, payload| datagrams.push((src, dst, payload.to_vec())));
        for (src, dst, payload) in datagrams {
            let target = match *dst.ip() {
                DNS if dst.port() == 53 => self.dns.target(src.port(), &payload),
                _ => self.host_target(dst),
            };
            let registry = self.poll.registry();
            self.udp
                .guest_datagram(src.port(), dst, &payload, target, registry, &self.listeners);
        }
    }
}

impl NetBackend for UserNet {
    fn ready_fd(&self) -> RawFd {
        self.poll.as_raw_fd()
    }

    fn send(&mut self, frame: &[u8]) {
        match frame::classify(frame) {
            Verdict::Drop => {}
            Verdict::Pass => self.stack.input(frame.to_vec()),
            Verdict::Syn(syn) => {
                let target = self.host_target(syn.dst);
                let registry = self.poll.registry();
                self.tcp
                    .on_syn(syn, frame, target, &mut self.stack, registry);
            }
        }
    }

    fn poll(&mut self) -> Option<Duration> {
        self.dispatch_events();
        self.stack.poll();
        self.udp_from_guest();
        self.tcp.pump(&mut self.stack);
        self.udp.pump(&mut self.stack, &mut self.listeners);
        // Out again: what the host sockets just gave, and acknowledgements.
        self.stack.poll();
        let now = Instant::now();
        if now >= self.next_sweep {
            self.udp.expire();
            self.next_sweep = now + SWEEP_INTERVAL;
        }

        let mut delay = self.stack.poll_delay();
        let mut wake_by = |d: Duration| delay = Some(delay.map_or(d, |old| old.min(d)));
        if self.udp.backlog() {
            wake_by(Duration::ZERO);
        }
        if self.listeners.needs_retry() {
            wake_by(ACCEPT_RETRY);
        }
        if self.udp.len() > 0 {
            wake_by(self.next_sweep.saturating_duration_since(now));
        }
        if let Some(deadline) = self.tcp.next_deadline() {
            wake_by(deadline.saturating_duration_since(now));
        }
        delay
    }

    fn recv(&mut self) -> Option<Vec<u8>> {
        self.stack.output()
    }
}
