//! The gateway's TCP connection table. A guest SYN is held while a host socket connects to
//! the destination; only once that succeeds does a smoltcp socket accept the SYN, so a
//! refused or unreachable destination reaches the guest as a reset, as on a real network.
//! Published ports add connections from the other end. The table is bounded: past its
//! limit a SYN is reset and an accepted host connection is closed with a reset.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::net::TcpStream;
use mio::{Interest, Registry};
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::State;

use super::frame::{reset_for, Syn};
use super::publish::PortCursor;
use super::splice::{Progress, Splice};
use super::stack::Stack;
use super::{token, Kind, GATEWAY, GUEST};

/// How long a host connect may take before the guest's SYN is answered with a reset.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// A guest connection waiting for its host socket to connect.
struct Connecting {
    host: TcpStream,
    syn: Syn,
    frame: Vec<u8>,
    deadline: Instant,
}

/// A connection with a smoltcp socket.
struct Open {
    handle: SocketHandle,
    splice: Splice,
    /// The gateway-side port of a published connection, released with it.
    local_port: Option<u16>,
}

enum Entry {
    Connecting(Connecting),
    Open(Open),
}

/// Every TCP connection of one user-mode network.
pub(super) struct TcpNat {
    entries: HashMap<usize, Entry>,
    /// Guest-initiated connections by (guest endpoint, destination), to recognize a
    /// retransmitted SYN.
    outbound: HashMap<(SocketAddrV4, SocketAddrV4), usize>,
    local_ports: HashSet<u16>,
    next_id: usize,
    ports: PortCursor,
    limit: usize,
}

impl TcpNat {
    /// A table of at most `limit` connections.
    pub(super) fn new(limit: usize) -> Self {
        Self {
            entries: HashMap::new(),
            outbound: HashMap::new(),
            local_ports: HashSet::new(),
            next_id: 0,
            ports: PortCursor::default(),
            limit,
        }
    }

    /// Connections in the table.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    fn new_id(&mut self) -> usize {
        self.next_id += 1;
        self.next_id
    }

    /// A guest SYN. `target` is where the destination is on the host's side (`None`: it
    /// is not reachable through the gateway).
    pub(super) fn on_syn(
        &mut self,
        syn: Syn,
        frame: &[u8],
        target: Option<SocketAddr>,
        stack: &mut Stack,
        registry: &Registry,
    ) {
        if let Some(id) = self.outbound.get(&(syn.src, syn.dst)) {
            // A retransmission: dropped while connecting, smoltcp's once it listens.
            if let Some(Entry::Open(_)) = self.entries.get(id) {
                stack.input(frame.to_vec());
            }
            return;
        }
        let host = match target {
            Some(target) if self.entries.len() < self.limit => TcpStream::connect(target),
            _ => return stack.emit(reset_for(&syn)),
        };
        let id = self.new_id();
        let registered = host.and_then(|mut host| {
            let interest = Interest::READABLE | Interest::WRITABLE;
            registry.register(&mut host, token(Kind::Tcp, id), interest)?;
            Ok(host)
        });
        // Failing at once (no route, out of descriptors) is a refusal too.
        let Ok(host) = registered else {
            return stack.emit(reset_for(&syn));
        };
        let pending = Connecting {
            host,
            syn,
            frame: frame.to_vec(),
            deadline: Instant::now() + CONNECT_TIMEOUT,
        };
        self.entries.insert(id, Entry::Connecting(pending));
        self.outbound.insert((syn.src, syn.dst), id);
    }

    /// A host socket became ready.
    pub(super) fn on_event(&mut self, id: usize, event: &Event, stack: &mut Stack) {
        match self.entries.get_mut(&id) {
            Some(Entry::Open(open)) => open.splice.on_event(event),
            Some(Entry::Connecting(pending)) => match connect_result(&pending.host) {
                Some(true) => self.accept_syn(id, stack),
                Some(false) => self.refuse(id, stack),
                None => {}
            },
            None => {}
        }
    }

    /// The host side connected: a socket listens on the destination, takes the held SYN
    /// and answers it.
    fn accept_syn(&mut self, id: usize, stack: &mut Stack) {
        let Some(Entry::Connecting(pending)) = self.entries.remove(&id) else {
            return;
        };
        let handle = stack.add_tcp();
        if stack.listen(handle, pending.syn.dst) {
            stack.ingest(pending.frame);
        }
        if stack.tcp(handle).state() != State::SynReceived {
            // The SYN did not take (malformed beyond the header): refuse the connection.
            stack.remove(handle);
            self.outbound.remove(&(pending.syn.src, pending.syn.dst));
            return stack.emit(reset_for(&pending.syn));
        }
        let open = Open {
            handle,
            splice: Splice::new(pending.host),
            local_port: None,
        };
        self.entries.insert(id, Entry::Open(open));
    }

    fn refuse(&mut self, id: usize, stack: &mut Stack) {
        if let Some(Entry::Connecting(pending)) = self.entries.remove(&id) {
            self.outbound.remove(&(pending.syn.src, pending.syn.dst));
            stack.emit(reset_for(&pending.syn));
        }
    }

    /// A host client connected to a port published to `guest_port`: open a connection to
    /// the guest from the gateway. Past the limit the client is reset.
    pub(super) fn adopt(
        &mut self,
        mut host: TcpStream,
        guest_port: u16,
        stack: &mut Stack,
        registry: &Registry,
    ) {
        let in_use = &self.local_ports;
        let port = self.ports.next_free(|port| in_use.contains(&port));
        let id = self.new_id();
        let interest = Interest::READABLE | Interest::WRITABLE;
        let ready = self.entries.len() < self.limit
            && port.is_some()
            && registry
                .register(&mut host, token(Kind::Tcp, id), interest)
                .is_ok();
        let (true, Some(port)) = (ready, port) else {
            let _ = socket2::SockRef::from(&host).set_linger(Some(Duration::ZERO));
            return;
        };
        let handle = stack.add_tcp();
        let local = SocketAddrV4::new(GATEWAY, port);
        if !stack.connect(handle, local, SocketAddrV4::new(GUEST, guest_port)) {
            stack.remove(handle);
            let _ = socket2::SockRef::from(&host).set_linger(Some(Duration::ZERO));
            return;
        }
        self.local_ports.insert(port);
        let open = Open {
            handle,
            splice: Splice::new(host),
            local_port: Some(port),
        };
        self.entries.insert(id, Entry::Open(open));
    }

    /// Moves bytes on every open connection and drops the finished ones; resets guest
    /// connections whose host connect took too long.
    pub(super) fn pump(&mut self, stack: &mut Stack) {
        let now = Instant::now();
        let mut finished = Vec::new();
        let mut expired = Vec::new();
        for (&id, entry) in &mut self.entries {
            match entry {
                Entry::Open(open) => {
                    if open.splice.pump(stack.tcp(open.handle)) == Progress::Finished {
                        finished.push(id);
                    }
                }
                Entry::Connecting(pending) if pending.deadline <= now => expired.push(id),
                Entry::Connecting(_) => {}
            }
        }
        for id in expired {
            self.refuse(id, stack);
        }
        for id in finished {
            if let Some(Entry::Open(open)) = self.entries.remove(&id) {
                stack.remove(open.handle);
                if let Some(port) = open.local_port {
                    self.local_ports.remove(&port);
                }
            }
        }
        self.outbound.retain(|_, id| self.entries.contains_key(id));
    }

    /// When the next connect deadline falls, if any connection is still connecting.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.entries
            .values()
            .filter_map(|entry| match entry {
                Entry::Connecting(pending) => Some(pending.deadline),
                Entry::Open(_) => None,
            })
            .min()
    }
}

/// Whether a non-blocking connect finished: `Some(true)` connected, `Some(false)` failed,
/// `None` still in progress (a spurious wake-up).
fn connect_result(host: &TcpStream) -> Option<bool> {
    match host.take_error() {
        Ok(Some(_)) | Err(_) => return Some(false),
        Ok(None) => {}
    }
    match host.peer_addr() {
        Ok(_) => Some(true),
        Err(err) if err.kind() == std::io::ErrorKind::NotConnected => None,
        Err(_) => Some(false),
    }
}
