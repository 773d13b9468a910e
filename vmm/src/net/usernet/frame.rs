//! The guest's frames as the user-mode network first sees them, before smoltcp: what to
//! drop, what to pass on, and which TCP SYNs open a NAT connection; plus the few packets
//! written by hand (resets for refused SYNs, UDP datagrams for the raw socket).

use std::net::{Ipv4Addr, SocketAddrV4};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr,
    TcpSeqNumber, UdpPacket, UdpRepr,
};

use super::{DNS, GATEWAY, GATEWAY_MAC, GUEST};

/// What to do with a frame from the guest.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Not for us, spoofed, or a protocol we do not carry (IPv6 and the like).
    Drop,
    /// smoltcp handles it (ARP for our addresses, ICMP to them, UDP, TCP segments).
    Pass,
    /// A connection attempt, which needs a host socket before smoltcp may answer.
    Syn(Syn),
}

/// A guest's TCP SYN: who dials whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Syn {
    pub(super) guest_mac: EthernetAddress,
    pub(super) src: SocketAddrV4,
    pub(super) dst: SocketAddrV4,
    pub(super) seq: TcpSeqNumber,
}

/// The addresses the gateway answers for itself (ARP, ICMP echo).
pub(super) fn is_ours(addr: Ipv4Addr) -> bool {
    addr == GATEWAY || addr == DNS
}

/// Sorts a guest frame. Only the guest's own address may appear as a source, so a guest
/// cannot make the network answer someone else; ARP and ICMP are only answered for the
/// gateway's addresses (smoltcp would otherwise answer for any, with AnyIP on).
pub(super) fn classify(frame: &[u8]) -> Verdict {
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return Verdict::Drop;
    };
    match eth.ethertype() {
        EthernetProtocol::Arp => {
            let arp = ArpPacket::new_checked(eth.payload()).and_then(|p| ArpRepr::parse(&p));
            match arp {
                Ok(ArpRepr::EthernetIpv4 {
                    operation: ArpOperation::Request,
                    target_protocol_addr,
                    ..
                }) if !is_ours(target_protocol_addr) => Verdict::Drop,
                Ok(_) => Verdict::Pass,
                Err(_) => Verdict::Drop,
            }
        }
        EthernetProtocol::Ipv4 => classify_ipv4(eth.src_addr(), eth.payload()),
        _ => Verdict::Drop,
    }
}

fn classify_ipv4(guest_mac: EthernetAddress, packet: &[u8]) -> Verdict {
    let Ok(ip) = Ipv4Packet::new_checked(packet) else {
        return Verdict::Drop;
    };
    if ip.src_addr() != GUEST {
        return Verdict::Drop;
    }
    match ip.next_header() {
        IpProtocol::Icmp if is_ours(ip.dst_addr()) => Verdict::Pass,
        IpProtocol::Udp => Verdict::Pass,
        // A SYN is never fragmented; fragments are smoltcp's to reassemble.
        IpProtocol::Tcp if ip.more_frags() || ip.frag_offset() != 0 => Verdict::Pass,
        IpProtocol::Tcp => match TcpPacket::new_checked(ip.payload()) {
            Ok(tcp) if tcp.syn() && !tcp.ack() && !tcp.rst() => Verdict::Syn(Syn {
                guest_mac,
                src: SocketAddrV4::new(ip.src_addr(), tcp.src_port()),
                dst: SocketAddrV4::new(ip.dst_addr(), tcp.dst_port()),
                seq: tcp.seq_number(),
            }),
            Ok(_) => Verdict::Pass,
            Err(_) => Verdict::Drop,
        },
        _ => Verdict::Drop,
    }
}

/// The RST|ACK a closed port answers `syn` with (RFC 9293 §3.10.7.1): the guest's
/// connect() fails with "connection refused".
pub(super) fn reset_for(syn: &Syn) -> Vec<u8> {
    let tcp = TcpRepr {
        src_port: syn.dst.port(),
        dst_port: syn.src.port(),
        control: TcpControl::Rst,
        seq_number: TcpSeqNumber(0),
        ack_number: Some(syn.seq + 1),
        window_len: 0,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let ip = Ipv4Repr {
        src_addr: *syn.dst.ip(),
        dst_addr: *syn.src.ip(),
        next_header: IpProtocol::Tcp,
        payload_len: tcp.buffer_len(),
        hop_limit: 64,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(GATEWAY_MAC),
        dst_addr: syn.guest_mac,
        ethertype: EthernetProtocol::Ipv4,
    };
    let mut frame = vec![0u8; eth.buffer_len() + ip.buffer_len() + tcp.buffer_len()];
    let caps = ChecksumCapabilities::default();
    let mut eth_frame = EthernetFrame::new_unchecked(&mut frame[..]);
    eth.emit(&mut eth_frame);
    let mut ip_packet = Ipv4Packet::new_unchecked(eth_frame.payload_mut());
    ip.emit(&mut ip_packet, &caps);
    let mut tcp_packet = TcpPacket::new_unchecked(ip_packet.payload_mut());
    tcp.emit(
        &mut tcp_packet,
        &IpAddress::Ipv4(ip.src_addr),
        &IpAddress::Ipv4(ip.dst_addr),
        &caps,
    );
    frame
}

/// Length of the IPv4 packet carrying `payload_len` bytes of UDP.
pub(super) fn udp_packet_len(payload_len: usize) -> usize {
    20 + 8 + payload_len
}

/// Writes an IPv4 packet carrying one UDP datagram into `buffer`, which must be exactly
/// [`udp_packet_len`] long. smoltcp routes and fragments it like its own packets.
pub(super) fn emit_udp(buffer: &mut [u8], src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) {
    let udp = UdpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
    };
    let ip = Ipv4Repr {
        src_addr: *src.ip(),
        dst_addr: *dst.ip(),
        next_header: IpProtocol::Udp,
        payload_len: 8 + payload.len(),
        hop_limit: 64,
    };
    let caps = ChecksumCapabilities::default();
    let mut ip_packet = Ipv4Packet::new_unchecked(buffer);
    ip.emit(&mut ip_packet, &caps);
    udp.emit(
        &mut UdpPacket::new_unchecked(ip_packet.payload_mut()),
        &IpAddress::Ipv4(ip.src_addr),
        &IpAddress::Ipv4(ip.dst_addr),
        payload.len(),
        |out| out.copy_from_slice(payload),
        &caps,
    );
}

/// The endpoints and payload of a (reassembled) IPv4 UDP packet, if well formed with a
/// valid checksum.
pub(super) fn parse_udp(packet: &[u8]) -> Option<(SocketAddrV4, SocketAddrV4, &[u8])> {
    let ip = Ipv4Packet::new_checked(packet).ok()?;
    let udp = UdpPacket::new_checked(ip.payload()).ok()?;
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let caps = ChecksumCapabilities::default();
    let repr = UdpRepr::parse(&udp, &src.into(), &dst.into(), &caps).ok()?;
    Some((
        SocketAddrV4::new(src, repr.src_port),
        SocketAddrV4::new(dst, repr.dst_port),
        udp.payload(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::usernet::testing::{arp_request, ipv4_frame, tcp_segment, GUEST_MAC};

    #[test]
    fn arp_is_answered_only_for_the_gateway_addresses() {
        assert_eq!(classify(&arp_request(GATEWAY)), Verdict::Pass);
        assert_eq!(classify(&arp_request(DNS)), Verdict::Pass);
        assert_eq!(
            classify(&arp_request(Ipv4Addr::new(10, 0, 2, 7))),
            Verdict::Drop
        );
    }

    #[test]
    fn syns_are_picked_out_and_spoofed_sources_dropped() {
        let dst = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 80);
        let src = SocketAddrV4::new(GUEST, 40000);
        let syn = tcp_segment(src, dst, TcpControl::Syn, 77, None, b"");
        assert_eq!(
            classify(&syn),
            Verdict::Syn(Syn {
                guest_mac: EthernetAddress(GUEST_MAC),
                src,
                dst,
                seq: TcpSeqNumber(77)
            })
        );
        let ack = tcp_segment(src, dst, TcpControl::None, 78, Some(1), b"x");
        assert_eq!(classify(&ack), Verdict::Pass);
        let spoofed = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 9), 40000);
        let syn = tcp_segment(spoofed, dst, TcpControl::Syn, 1, None, b"");
        assert_eq!(classify(&syn), Verdict::Drop);
        assert_eq!(classify(&[0u8; 10]), Verdict::Drop);
    }

    #[test]
    fn icmp_is_passed_only_to_our_addresses() {
        let to = |dst| ipv4_frame(GUEST, dst, IpProtocol::Icmp, &[8, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(classify(&to(GATEWAY)), Verdict::Pass);
        assert_eq!(classify(&to(Ipv4Addr::new(8, 8, 8, 8))), Verdict::Drop);
        let gre = ipv4_frame(GUEST, GATEWAY, IpProtocol::Unknown(47), &[0; 8]);
        assert_eq!(classify(&gre), Verdict::Drop);
    }

    #[test]
    fn the_reset_acknowledges_the_syn_and_swaps_the_endpoints() {
        let syn = Syn {
            guest_mac: EthernetAddress(GUEST_MAC),
            src: SocketAddrV4::new(GUEST, 40000),
            dst: SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 80),
            seq: TcpSeqNumber(1000),
        };
        let frame = reset_for(&syn);
        let eth = EthernetFrame::new_checked(&frame[..]).expect("ethernet");
        assert_eq!(eth.dst_addr(), EthernetAddress(GUEST_MAC));
        let ip = Ipv4Packet::new_checked(eth.payload()).expect("ipv4");
        assert!(ip.verify_checksum());
        assert_eq!((ip.src_addr(), ip.dst_addr()), (*syn.dst.ip(), GUEST));
        let tcp = TcpPacket::new_checked(ip.payload()).expect("tcp");
        assert!(tcp.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into()));
        assert!(tcp.rst() && tcp.ack() && !tcp.syn());
        assert_eq!(tcp.ack_number(), TcpSeqNumber(1001));
        assert_eq!((tcp.src_port(), tcp.dst_port()), (80, 40000));
    }

    #[test]
    fn udp_packets_round_trip_and_bad_checksums_are_refused() {
        let src = SocketAddrV4::new(DNS, 53);
        let dst = SocketAddrV4::new(GUEST, 5353);
        let mut packet = vec![0u8; udp_packet_len(5)];
        emit_udp(&mut packet, src, dst, b"hello");
        assert_eq!(parse_udp(&packet), Some((src, dst, &b"hello"[..])));
        let last = packet.len() - 1;
        packet[last] ^= 0xff;
        assert_eq!(parse_udp(&packet), None);
    }
}
