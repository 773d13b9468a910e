//! The gateway's UDP flows. A guest datagram to a new (source port, destination) opens a
//! connected host socket, and what comes back on it returns to that port, from the address
//! the guest wrote to; DNS to 10.0.2.3 flows to a host resolver the same way. Clients of a
//! published UDP port each get a gateway-side port for the guest to answer. Flows expire
//! when idle, and past the table's limit the least recently used flow makes room.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Interest, Registry};

use super::publish::{Listeners, PortCursor};
use super::stack::Stack;
use super::{token, Kind, DNS, GATEWAY, GUEST};

/// A DNS exchange is one query and its answers.
const DNS_IDLE: Duration = Duration::from_secs(10);
/// Other flows, as Linux's conntrack treats unreplied and short UDP streams.
const FLOW_IDLE: Duration = Duration::from_secs(60);
/// Receive buffer: any datagram fits whole (larger than IPv4 can carry to the guest, so
/// those are seen whole and dropped rather than truncated).
const RECV_BUFFER: usize = 65_536;
/// Datagrams taken from one host socket per poll, so one busy flow cannot starve others.
const BURST: usize = 64;

enum Route {
    /// The guest's flow out: a connected host socket.
    Outbound {
        socket: UdpSocket,
        guest_port: u16,
        /// The destination as the guest wrote it; answers come from there.
        seen_as: SocketAddrV4,
        readable: bool,
    },
    /// A client of published UDP listener `listener`, seen by the guest from
    /// 10.0.2.2:`local_port`.
    Published {
        listener: usize,
        client: SocketAddr,
        local_port: u16,
    },
}

struct Flow {
    route: Route,
    last_used: Instant,
    idle_limit: Duration,
}

/// Every UDP flow of one user-mode network.
pub(super) struct UdpNat {
    flows: HashMap<usize, Flow>,
    outbound: HashMap<(u16, SocketAddrV4, SocketAddr), usize>,
    published: HashMap<(usize, SocketAddr), usize>,
    by_local_port: HashMap<u16, usize>,
    next_id: usize,
    ports: PortCursor,
    limit: usize,
    buffer: Vec<u8>,
    /// Datagrams are waiting on the host side for room in the stack.
    backlog: bool,
}

impl UdpNat {
    /// A table of at most `limit` flows (at least one).
    pub(super) fn new(limit: usize) -> Self {
        Self {
            flows: HashMap::new(),
            outbound: HashMap::new(),
            published: HashMap::new(),
            by_local_port: HashMap::new(),
            next_id: 0,
            ports: PortCursor::default(),
            limit: limit.max(1),
            buffer: vec![0; RECV_BUFFER],
            backlog: false,
        }
    }

    /// Flows in the table.
    pub(super) fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether host datagrams wait for room in the stack.
    pub(super) fn backlog(&self) -> bool {
        self.backlog
    }

    /// A datagram from the guest's `guest_port` to `dst`; `target` is where `dst` is on
    /// the host's side (`None`: nowhere, the datagram is dropped).
    pub(super) fn guest_datagram(
        &mut self,
        guest_port: u16,
        dst: SocketAddrV4,
        payload: &[u8],
        target: Option<SocketAddr>,
        registry: &Registry,
        listeners: &Listeners,
    ) {
        let now = Instant::now();
        if *dst.ip() == GATEWAY {
            if let Some(flow) = self
                .by_local_port
                .get(&dst.port())
                .and_then(|id| self.flows.get_mut(id))
            {
                if let Route::Published {
                    listener, client, ..
                } = flow.route
                {
                    flow.last_used = now;
                    listeners.send_to(listener, client, payload);
                }
                return;
            }
        }
        let Some(target) = target else {
            return;
        };
        let key = (guest_port, dst, target);
        let id = match self.outbound.get(&key) {
            Some(&id) => id,
            None => match self.open_outbound(guest_port, dst, target, registry) {
                Ok(id) => id,
                Err(_) => return,
            },
        };
        if let Some(flow) = self.flows.get_mut(&id) {
            flow.last_used = now;
            if let Route::Outbound { socket, .. } = &flow.route {
                // A full host socket buffer or an unreachable peer drops it, as UDP may.
                let _ = socket.send(payload);
            }
        }
    }

    fn open_outbound(
        &mut self,
        guest_port: u16,
        dst: SocketAddrV4,
        target: SocketAddr,
        registry: &Registry,
    ) -> io::Result<usize> {
        self.make_room();
        let any: SocketAddr = match target {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let mut socket = UdpSocket::bind(any)?;
        socket.connect(target)?;
        self.next_id += 1;
        let id = self.next_id;
        registry.register(&mut socket, token(Kind::Udp, id), Interest::READABLE)?;
        let idle_limit = if *dst.ip() == DNS {
            DNS_IDLE
        } else {
            FLOW_IDLE
        };
        let route = Route::Outbound {
            socket,
            guest_port,
            seen_as: dst,
            readable: false,
        };
        self.insert(id, route, idle_limit);
        self.outbound.insert((guest_port, dst, target), id);
        Ok(id)
    }

    fn insert(&mut self, id: usize, route: Route, idle_limit: Duration) {
        let flow = Flow {
            route,
            last_used: Instant::now(),
            idle_limit,
        };
        self.flows.insert(id, flow);
    }

    /// Evicts the least recently used flow when the table is full.
    fn make_room(&mut self) {
        if self.flows.len() < self.limit {
            return;
        }
        let oldest = self
            .flows
            .iter()
            .min_by_key(|(_, flow)| flow.last_used)
            .map(|(&id, _)| id);
        if let Some(id) = oldest {
            self.remove(id);
        }
    }

    fn remove(&mut self, id: usize) {
        match self.flows.remove(&id).map(|flow| flow.route) {
            Some(Route::Outbound { .. }) => self.outbound.retain(|_, v| *v != id),
            Some(Route::Published {
                listener,
                client,
                local_port,
            }) => {
                self.published.remove(&(listener, client));
                self.by_local_port.remove(&local_port);
            }
            None => {}
        }
    }

    /// Host socket of flow `id` became readable.
    pub(super) fn on_event(&mut self, id: usize) {
        if let Some(Flow {
            route: Route::Outbound { readable, .. },
            ..
        }) = self.flows.get_mut(&id)
        {
            *readable = true;
        }
    }

    /// Moves host datagrams into the stack while it has room: answers on outbound flows,
    /// and client datagrams on published ports.
    pub(super) fn pump(&mut self, stack: &mut Stack, listeners: &mut Listeners) {
        self.backlog = false;
        let now = Instant::now();
        for flow in self.flows.values_mut() {
            let Route::Outbound {
                socket,
                guest_port,
                seen_as,
                readable,
            } = &mut flow.route
            else {
                continue;
            };
            for _ in 0..BURST {
                if !*readable {
                    break;
                }
                if !stack.can_send_udp() {
                    self.backlog = true;
                    break;
                }
                match socket.recv(&mut self.buffer) {
                    Ok(len) => {
                        flow.last_used = now;
                        let to = SocketAddrV4::new(GUEST, *guest_port);
                        stack.send_udp(*seen_as, to, &self.buffer[..len]);
                    }
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => *readable = false,
                    // ICMP errors (ECONNREFUSED) are reported once; keep reading.
                    Err(_) => {}
                }
            }
            // More may be waiting after a burst: come back soon rather than on an edge.
            self.backlog |= *readable;
        }
        for (listener, publish) in listeners.udp_mut() {
            for _ in 0..BURST {
                if !publish.readable {
                    break;
                }
                if !stack.can_send_udp() {
                    self.backlog = true;
                    break;
                }
                match publish.socket.recv_from(&mut self.buffer) {
                    Ok((len, client)) => {
                        self.client_datagram(listener, client, publish.guest_port, len, stack)
                    }
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => publish.readable = false,
                    Err(_) => {}
                }
            }
            self.backlog |= publish.readable;
        }
    }

    /// Forwards the datagram in the buffer from `client` of published `listener`.
    fn client_datagram(
        &mut self,
        listener: usize,
        client: SocketAddr,
        guest_port: u16,
        len: usize,
        stack: &mut Stack,
    ) {
        let id = match self.published.get(&(listener, client)) {
            Some(&id) => id,
            None => {
                self.make_room();
                let in_use = &self.by_local_port;
                let Some(local_port) = self.ports.next_free(|port| in_use.contains_key(&port))
                else {
                    return;
                };
                self.next_id += 1;
                let id = self.next_id;
                let route = Route::Published {
                    listener,
                    client,
                    local_port,
                };
                self.insert(id, route, FLOW_IDLE);
                self.published.insert((listener, client), id);
                self.by_local_port.insert(local_port, id);
                id
            }
        };
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        flow.last_used = Instant::now();
        if let Route::Published { local_port, .. } = flow.route {
            let from = SocketAddrV4::new(GATEWAY, local_port);
            let to = SocketAddrV4::new(GUEST, guest_port);
            stack.send_udp(from, to, &self.buffer[..len]);
        }
    }

    /// Drops flows idle past their limit, closing their host sockets.
    pub(super) fn expire(&mut self) {
        let now = Instant::now();
        let idle: Vec<usize> = self
            .flows
            .iter()
            .filter(|(_, flow)| now.duration_since(flow.last_used) >= flow.idle_limit)
            .map(|(&id, _)| id)
            .collect();
        for id in idle {
            self.remove(id);
        }
    }
}
