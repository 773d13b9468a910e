//! The gateway's TCP/IP stack: a smoltcp interface at 10.0.2.2 and 10.0.2.3 with AnyIP,
//! so it accepts traffic for every address routed through it, on an in-memory "device"
//! whose wire is the guest's frame queue. It answers ARP and ICMP echo itself, terminates
//! the guest's TCP connections in smoltcp sockets, and carries all UDP through one raw
//! socket (so smoltcp reassembles and fragments it) for the NAT to relay.

use std::collections::VecDeque;
use std::net::SocketAddrV4;
use std::time::Duration;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::{raw, tcp};
use smoltcp::time::Instant;
use smoltcp::wire::{
    EthernetAddress, HardwareAddress, IpCidr, IpEndpoint, IpListenEndpoint, IpProtocol, IpVersion,
};

use super::frame::{emit_udp, parse_udp, udp_packet_len};
use super::{DNS, GATEWAY, GATEWAY_MAC, PREFIX_LEN};
use crate::net::MAX_FRAME_LEN;

/// Guest frames queued for one poll; the link delivers at most its own queue's worth.
const INPUT_FRAMES: usize = 512;
/// Frames smoltcp may queue for the guest before it has to wait (its sockets keep the
/// data meanwhile, so nothing is lost).
const OUTPUT_FRAMES: usize = 128;
/// Replies to guest frames (ARP, echo replies, resets) may go past OUTPUT_FRAMES up to
/// here; beyond, as when a guest floods pings and never reads, they are dropped.
const OUTPUT_LIMIT: usize = OUTPUT_FRAMES + INPUT_FRAMES;
/// Each direction of each TCP connection buffers this much inside the gateway.
const TCP_BUFFER: usize = 64 * 1024;
/// A connection whose peer stops acknowledging what is in flight is dropped after this.
const TCP_TIMEOUT: Duration = Duration::from_secs(60);
/// Datagrams (and bytes) the raw UDP socket holds each way.
const UDP_PACKETS: usize = 128;
const UDP_BYTES: usize = 256 * 1024;
/// The most an IPv4 packet carries as UDP payload (65535 - 20 - 8).
const MAX_UDP_PAYLOAD: usize = 65_507;

/// The in-memory device smoltcp reads guest frames from and writes frames for the guest to.
struct Wire {
    input: VecDeque<Vec<u8>>,
    output: VecDeque<Vec<u8>>,
}

struct RxToken(Vec<u8>);
/// Appends a frame to the output, or drops it when the output already holds `limit`.
struct TxToken<'a> {
    output: &'a mut VecDeque<Vec<u8>>,
    limit: usize,
}

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0; len];
        let result = f(&mut frame);
        if self.output.len() < self.limit {
            self.output.push_back(frame);
        }
        result
    }
}

impl Device for Wire {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken, TxToken<'_>)> {
        let frame = self.input.pop_front()?;
        let reply = TxToken {
            output: &mut self.output,
            limit: OUTPUT_LIMIT,
        };
        Some((RxToken(frame), reply))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        (self.output.len() < OUTPUT_FRAMES).then_some(TxToken {
            output: &mut self.output,
            limit: OUTPUT_FRAMES,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME_LEN - 4;
        caps
    }
}

/// The smoltcp side of the user-mode network.
pub(super) struct Stack {
    iface: Interface,
    sockets: SocketSet<'static>,
    wire: Wire,
    udp: SocketHandle,
    epoch: std::time::Instant,
}

impl Stack {
    pub(super) fn new() -> Self {
        let mut wire = Wire {
            input: VecDeque::new(),
            output: VecDeque::new(),
        };
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(GATEWAY_MAC)));
        // Seeds TCP initial sequence numbers; a fixed seed only makes them guessable.
        config.random_seed = getrandom::u64().unwrap_or(0x6b61_7461_6c69_7465);
        let epoch = std::time::Instant::now();
        let mut iface = Interface::new(config, &mut wire, Instant::ZERO);
        iface.update_ip_addrs(|addrs| {
            for addr in [GATEWAY, DNS] {
                // Two addresses fit smoltcp's default table of two.
                let _ = addrs.push(IpCidr::new(addr.into(), PREFIX_LEN));
            }
        });
        // AnyIP accepts packets for any destination routed via one of our own addresses:
        // with a default route through the gateway, that is every destination.
        let _ = iface.routes_mut().add_default_ipv4_route(GATEWAY);
        iface.set_any_ip(true);
        let mut sockets = SocketSet::new(Vec::new());
        let buffer = || {
            raw::PacketBuffer::new(
                vec![raw::PacketMetadata::EMPTY; UDP_PACKETS],
                vec![0; UDP_BYTES],
            )
        };
        let udp = sockets.add(raw::Socket::new(
            Some(IpVersion::Ipv4),
            Some(IpProtocol::Udp),
            buffer(),
            buffer(),
        ));
        Self {
            iface,
            sockets,
            wire,
            udp,
            epoch,
        }
    }

    fn now(&self) -> Instant {
        let micros = self.epoch.elapsed().as_micros();
        Instant::from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
    }

    /// Queues a guest frame for the next [`poll`](Self::poll); dropped past INPUT_FRAMES.
    pub(super) fn input(&mut self, frame: Vec<u8>) {
        if self.wire.input.len() < INPUT_FRAMES {
            self.wire.input.push_back(frame);
        }
    }

    /// Processes one guest frame now, ahead of the queued ones: a held SYN, right after
    /// the socket that is to accept it started listening.
    pub(super) fn ingest(&mut self, frame: Vec<u8>) {
        self.wire.input.push_front(frame);
        let now = self.now();
        self.iface
            .poll_ingress_single(now, &mut self.wire, &mut self.sockets);
    }

    /// Runs smoltcp: queued guest frames in, whatever its sockets have to send out.
    pub(super) fn poll(&mut self) {
        let now = self.now();
        self.iface.poll(now, &mut self.wire, &mut self.sockets);
    }

    /// When smoltcp next needs [`poll`](Self::poll) for its timers.
    pub(super) fn poll_delay(&mut self) -> Option<Duration> {
        let now = self.now();
        self.iface
            .poll_delay(now, &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()))
    }

    /// The next frame for the guest.
    pub(super) fn output(&mut self) -> Option<Vec<u8>> {
        self.wire.output.pop_front()
    }

    /// Sends a hand-made frame (a reset) to the guest, like a reply: dropped past the
    /// output's limit.
    pub(super) fn emit(&mut self, frame: Vec<u8>) {
        if self.wire.output.len() < OUTPUT_LIMIT {
            self.wire.output.push_back(frame);
        }
    }

    /// A new TCP socket with this network's buffers and timers, not yet open.
    pub(super) fn add_tcp(&mut self) -> SocketHandle {
        let buffer = || tcp::SocketBuffer::new(vec![0; TCP_BUFFER]);
        let mut socket = tcp::Socket::new(buffer(), buffer());
        // The host side does its own coalescing; holding small writes back here would
        // only add latency to request/response traffic.
        socket.set_nagle_enabled(false);
        socket.set_timeout(Some(TCP_TIMEOUT.into()));
        self.sockets.add(socket)
    }

    pub(super) fn tcp(&mut self, handle: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(handle)
    }

    /// Starts listening for the one SYN about to be ingested for `local`.
    pub(super) fn listen(&mut self, handle: SocketHandle, local: SocketAddrV4) -> bool {
        let endpoint = IpListenEndpoint {
            addr: Some((*local.ip()).into()),
            port: local.port(),
        };
        self.tcp(handle).listen(endpoint).is_ok()
    }

    /// Opens a connection from `local` (a gateway address) to `remote` in the guest.
    pub(super) fn connect(
        &mut self,
        handle: SocketHandle,
        local: SocketAddrV4,
        remote: SocketAddrV4,
    ) -> bool {
        let remote = IpEndpoint::new((*remote.ip()).into(), remote.port());
        let local = IpListenEndpoint {
            addr: Some((*local.ip()).into()),
            port: local.port(),
        };
        let socket = self.sockets.get_mut::<tcp::Socket>(handle);
        socket.connect(self.iface.context(), remote, local).is_ok()
    }

    pub(super) fn remove(&mut self, handle: SocketHandle) {
        self.sockets.remove(handle);
    }

    /// Whether a datagram can be queued for the guest now.
    pub(super) fn can_send_udp(&mut self) -> bool {
        self.sockets.get_mut::<raw::Socket>(self.udp).can_send()
    }

    /// Queues a UDP datagram for the guest; dropped when it cannot be queued or is too
    /// large for IPv4, as UDP may be.
    pub(super) fn send_udp(&mut self, src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) {
        if payload.len() > MAX_UDP_PAYLOAD {
            return;
        }
        let socket = self.sockets.get_mut::<raw::Socket>(self.udp);
        if let Ok(buffer) = socket.send(udp_packet_len(payload.len())) {
            emit_udp(buffer, src, dst, payload);
        }
    }

    /// Hands every datagram the guest sent to `deliver(source, destination, payload)`.
    pub(super) fn recv_udp(&mut self, mut deliver: impl FnMut(SocketAddrV4, SocketAddrV4, &[u8])) {
        let socket = self.sockets.get_mut::<raw::Socket>(self.udp);
        while let Ok(packet) = socket.recv() {
            if let Some((src, dst, payload)) = parse_udp(packet) {
                deliver(src, dst, payload);
            }
        }
    }
}
