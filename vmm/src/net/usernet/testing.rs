//! Test helpers for the user-mode network: guest frames built by hand with smoltcp's wire
//! types, a decoder for what the gateway sends back, and a second smoltcp stack playing
//! the guest for tests that need a whole TCP peer.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, HardwareAddress, Icmpv4Packet, Icmpv4Repr, IpAddress, IpCidr, IpProtocol,
    Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
};

use super::frame::{emit_udp, parse_udp, udp_packet_len};
pub(super) use super::GUEST_MAC;
use super::{UserNet, GATEWAY, GATEWAY_MAC, GUEST, PREFIX_LEN};
use crate::net::NetBackend;

fn ethernet(ethertype: EthernetProtocol, dst: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let repr = EthernetRepr {
        src_addr: EthernetAddress(GUEST_MAC),
        dst_addr: EthernetAddress(dst),
        ethertype,
    };
    let mut frame = vec![0; repr.buffer_len() + payload.len()];
    let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
    repr.emit(&mut eth);
    eth.payload_mut().copy_from_slice(payload);
    frame
}

/// The guest asking who has `target`.
pub(super) fn arp_request(target: Ipv4Addr) -> Vec<u8> {
    let repr = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: EthernetAddress(GUEST_MAC),
        source_protocol_addr: GUEST,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target,
    };
    let mut packet = vec![0; repr.buffer_len()];
    repr.emit(&mut ArpPacket::new_unchecked(&mut packet[..]));
    ethernet(EthernetProtocol::Arp, [0xff; 6], &packet)
}

/// An IPv4 frame from `src` to `dst` (via the gateway's MAC) carrying `payload`.
pub(super) fn ipv4_frame(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: IpProtocol,
    payload: &[u8],
) -> Vec<u8> {
    let repr = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: protocol,
        payload_len: payload.len(),
        hop_limit: 64,
    };
    let mut packet = vec![0; repr.buffer_len() + payload.len()];
    let mut ip = Ipv4Packet::new_unchecked(&mut packet[..]);
    repr.emit(&mut ip, &ChecksumCapabilities::default());
    ip.payload_mut().copy_from_slice(payload);
    ethernet(EthernetProtocol::Ipv4, GATEWAY_MAC, &packet)
}

/// A TCP segment from `src` to `dst`.
pub(super) fn tcp_segment(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    control: TcpControl,
    seq: i32,
    ack: Option<i32>,
    payload: &[u8],
) -> Vec<u8> {
    let repr = TcpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
        control,
        seq_number: TcpSeqNumber(seq),
        ack_number: ack.map(TcpSeqNumber),
        window_len: 64240,
        window_scale: None,
        max_seg_size: (control == TcpControl::Syn).then_some(1460),
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload,
    };
    let mut segment = vec![0; repr.buffer_len()];
    repr.emit(
        &mut TcpPacket::new_unchecked(&mut segment[..]),
        &IpAddress::Ipv4(*src.ip()),
        &IpAddress::Ipv4(*dst.ip()),
        &ChecksumCapabilities::default(),
    );
    ipv4_frame(*src.ip(), *dst.ip(), IpProtocol::Tcp, &segment)
}

/// A UDP datagram from `src` to `dst`.
pub(super) fn udp_frame(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let mut packet = vec![0; udp_packet_len(payload.len())];
    emit_udp(&mut packet, src, dst, payload);
    ethernet(EthernetProtocol::Ipv4, GATEWAY_MAC, &packet)
}

/// A UDP datagram from `src` to `dst` split into IPv4 fragments of `chunk` payload bytes
/// (a multiple of 8), as a guest sends one larger than its MTU.
pub(super) fn udp_fragments(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: &[u8],
    chunk: usize,
) -> Vec<Vec<u8>> {
    let mut whole = vec![0; udp_packet_len(payload.len())];
    emit_udp(&mut whole, src, dst, payload);
    let datagram = &whole[20..];
    let count = datagram.len().div_ceil(chunk);
    datagram
        .chunks(chunk)
        .enumerate()
        .map(|(i, part)| {
            let mut frame = ipv4_frame(*src.ip(), *dst.ip(), IpProtocol::Udp, part);
            let mut ip = Ipv4Packet::new_unchecked(&mut frame[14..]);
            ip.set_ident(0x4b54);
            ip.set_more_frags(i + 1 < count);
            ip.set_frag_offset(u16::try_from(i * chunk).expect("offset"));
            ip.fill_checksum();
            frame
        })
        .collect()
}

/// Reassembles the IPv4 fragments of one UDP datagram from the gateway's frames, if
/// they are all there: its source, destination and payload.
pub(super) fn reassemble_udp(frames: &[Vec<u8>]) -> Option<(SocketAddrV4, SocketAddrV4, Vec<u8>)> {
    let mut parts: Vec<(usize, bool, Vec<u8>)> = Vec::new();
    let mut addrs = None;
    for frame in frames {
        let eth = EthernetFrame::new_checked(&frame[..]).ok()?;
        let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
        assert!(ip.verify_checksum(), "fragment checksum");
        addrs = Some((ip.src_addr(), ip.dst_addr()));
        let offset = usize::from(ip.frag_offset());
        parts.push((offset, ip.more_frags(), ip.payload().to_vec()));
    }
    parts.sort_by_key(|part| part.0);
    let mut datagram = Vec::new();
    for (offset, _, data) in &parts {
        (*offset == datagram.len()).then_some(())?;
        datagram.extend(data);
    }
    (!parts.last()?.1).then_some(())?;
    let (src, dst) = addrs?;
    let repr = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Udp,
        payload_len: datagram.len(),
        hop_limit: 64,
    };
    let mut packet = vec![0; 20 + datagram.len()];
    repr.emit(
        &mut Ipv4Packet::new_unchecked(&mut packet[..]),
        &ChecksumCapabilities::default(),
    );
    packet[20..].copy_from_slice(&datagram);
    let (src, dst, payload) = parse_udp(&packet)?;
    Some((src, dst, payload.to_vec()))
}

/// An ICMP echo request from the guest to `dst`.
pub(super) fn icmp_echo(dst: Ipv4Addr, ident: u16, seq_no: u16, data: &[u8]) -> Vec<u8> {
    let repr = Icmpv4Repr::EchoRequest {
        ident,
        seq_no,
        data,
    };
    let mut packet = vec![0; repr.buffer_len()];
    repr.emit(
        &mut Icmpv4Packet::new_unchecked(&mut packet[..]),
        &ChecksumCapabilities::default(),
    );
    ipv4_frame(GUEST, dst, IpProtocol::Icmp, &packet)
}

/// A frame from the gateway, decoded (checksums verified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Seen {
    ArpReply {
        sender: Ipv4Addr,
        mac: [u8; 6],
    },
    ArpRequest {
        target: Ipv4Addr,
    },
    EchoReply {
        src: Ipv4Addr,
        ident: u16,
        seq_no: u16,
        data: Vec<u8>,
    },
    Tcp {
        src: SocketAddrV4,
        dst: SocketAddrV4,
        syn: bool,
        ack: Option<i32>,
        fin: bool,
        rst: bool,
        seq: i32,
        payload: Vec<u8>,
    },
    Udp {
        src: SocketAddrV4,
        dst: SocketAddrV4,
        payload: Vec<u8>,
    },
    Other,
}

/// Decodes a frame the gateway sent to the guest.
pub(super) fn decode(frame: &[u8]) -> Seen {
    let eth = EthernetFrame::new_checked(frame).expect("ethernet");
    assert_eq!(eth.src_addr(), EthernetAddress(GATEWAY_MAC));
    match eth.ethertype() {
        EthernetProtocol::Arp => {
            let packet = ArpPacket::new_checked(eth.payload()).expect("arp");
            match ArpRepr::parse(&packet).expect("arp repr") {
                ArpRepr::EthernetIpv4 {
                    operation: ArpOperation::Reply,
                    source_hardware_addr,
                    source_protocol_addr,
                    ..
                } => Seen::ArpReply {
                    sender: source_protocol_addr,
                    mac: source_hardware_addr.0,
                },
                ArpRepr::EthernetIpv4 {
                    target_protocol_addr,
                    ..
                } => Seen::ArpRequest {
                    target: target_protocol_addr,
                },
                _ => Seen::Other,
            }
        }
        EthernetProtocol::Ipv4 => decode_ipv4(eth.payload()),
        _ => Seen::Other,
    }
}

fn decode_ipv4(packet: &[u8]) -> Seen {
    let ip = Ipv4Packet::new_checked(packet).expect("ipv4");
    assert!(ip.verify_checksum(), "ipv4 checksum");
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    match ip.next_header() {
        IpProtocol::Icmp => {
            let icmp = Icmpv4Packet::new_checked(ip.payload()).expect("icmp");
            match Icmpv4Repr::parse(&icmp, &ChecksumCapabilities::default()).expect("icmp") {
                Icmpv4Repr::EchoReply {
                    ident,
                    seq_no,
                    data,
                } => Seen::EchoReply {
                    src,
                    ident,
                    seq_no,
                    data: data.to_vec(),
                },
                _ => Seen::Other,
            }
        }
        IpProtocol::Tcp => {
            let tcp = TcpPacket::new_checked(ip.payload()).expect("tcp");
            assert!(
                tcp.verify_checksum(&src.into(), &dst.into()),
                "tcp checksum"
            );
            Seen::Tcp {
                src: SocketAddrV4::new(src, tcp.src_port()),
                dst: SocketAddrV4::new(dst, tcp.dst_port()),
                syn: tcp.syn(),
                ack: tcp.ack().then_some(tcp.ack_number().0),
                fin: tcp.fin(),
                rst: tcp.rst(),
                seq: tcp.seq_number().0,
                payload: tcp.payload().to_vec(),
            }
        }
        IpProtocol::Udp => {
            let (src, dst, payload) = parse_udp(packet).expect("udp");
            Seen::Udp {
                src,
                dst,
                payload: payload.to_vec(),
            }
        }
        _ => Seen::Other,
    }
}

/// Polls `net` and decodes its output until `want` picks a frame or 10 s pass; frames
/// `want` passes over are returned too, in order.
pub(super) fn wait_for<T>(
    net: &mut UserNet,
    mut want: impl FnMut(&Seen) -> Option<T>,
) -> (T, Vec<Seen>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut skipped = Vec::new();
    loop {
        net.poll();
        while let Some(frame) = net.recv() {
            let seen = decode(&frame);
            if let Some(found) = want(&seen) {
                return (found, skipped);
            }
            skipped.push(seen);
        }
        assert!(Instant::now() < deadline, "gave up; saw {skipped:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Everything `net` sends within `window`.
pub(super) fn drain_for(net: &mut UserNet, window: Duration) -> Vec<Seen> {
    let deadline = Instant::now() + window;
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        net.poll();
        while let Some(frame) = net.recv() {
            seen.push(decode(&frame));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    seen
}

/// The wire between the guest stack and the gateway.
#[derive(Default)]
struct Wire {
    to_gateway: VecDeque<Vec<u8>>,
    to_guest: VecDeque<Vec<u8>>,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0; len];
        let result = f(&mut frame);
        self.0.push_back(frame);
        result
    }
}

impl Device for Wire {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(Rx, Tx<'_>)> {
        let frame = self.to_guest.pop_front()?;
        Some((Rx(frame), Tx(&mut self.to_gateway)))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.to_gateway))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        caps
    }
}

/// A guest made of smoltcp: 10.0.2.15/24 with its default route via the gateway.
pub(super) struct Guest {
    iface: Interface,
    pub(super) sockets: SocketSet<'static>,
    wire: Wire,
    epoch: Instant,
}

impl Guest {
    pub(super) fn new() -> Self {
        let mut wire = Wire::default();
        let config = Config::new(HardwareAddress::Ethernet(EthernetAddress(GUEST_MAC)));
        let mut iface = Interface::new(config, &mut wire, smoltcp::time::Instant::ZERO);
        iface.update_ip_addrs(|addrs| {
            addrs
                .push(IpCidr::new(GUEST.into(), PREFIX_LEN))
                .expect("address");
        });
        iface
            .routes_mut()
            .add_default_ipv4_route(GATEWAY)
            .expect("route");
        Self {
            iface,
            sockets: SocketSet::new(Vec::new()),
            wire,
            epoch: Instant::now(),
        }
    }

    /// A TCP socket with 256 KiB buffers.
    pub(super) fn tcp_socket(&mut self) -> SocketHandle {
        let buffer = || tcp::SocketBuffer::new(vec![0; 256 * 1024]);
        self.sockets.add(tcp::Socket::new(buffer(), buffer()))
    }

    pub(super) fn tcp(&mut self, handle: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut(handle)
    }

    /// Connects `handle` from local port `port` to `remote`.
    pub(super) fn connect(&mut self, handle: SocketHandle, remote: SocketAddrV4, port: u16) {
        let remote = (IpAddress::Ipv4(*remote.ip()), remote.port());
        let socket = self.sockets.get_mut::<tcp::Socket>(handle);
        socket
            .connect(self.iface.context(), remote, port)
            .expect("connect");
    }

    /// One round: the guest's frames to the gateway, the gateway's work, its frames back.
    pub(super) fn step(&mut self, net: &mut UserNet) {
        let micros = i64::try_from(self.epoch.elapsed().as_micros()).expect("time");
        let now = smoltcp::time::Instant::from_micros(micros);
        self.iface.poll(now, &mut self.wire, &mut self.sockets);
        while let Some(frame) = self.wire.to_gateway.pop_front() {
            net.send(&frame);
        }
        net.poll();
        while let Some(frame) = net.recv() {
            self.wire.to_guest.push_back(frame);
        }
        self.iface.poll(now, &mut self.wire, &mut self.sockets);
    }

    /// Steps until `done` holds, sleeping a little between idle rounds; panics after
    /// `limit`.
    pub(super) fn run_until(
        &mut self,
        net: &mut UserNet,
        limit: Duration,
        mut done: impl FnMut(&mut Self) -> bool,
    ) {
        let deadline = Instant::now() + limit;
        while !done(self) {
            assert!(Instant::now() < deadline, "the guest gave up waiting");
            self.step(net);
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}
