//! Ethernet frames a guest at 10.0.2.15 sends, written by hand with valid checksums (RFC
//! 791, 768, 793): seeds for the user-mode network and the NIC.

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const GATEWAY_MAC: [u8; 6] = [0x52, 0x55, 0x0a, 0x00, 0x02, 0x02];
const GUEST: [u8; 4] = [10, 0, 2, 15];
pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;

fn ethernet(dst: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    [&dst[..], &GUEST_MAC, &ethertype.to_be_bytes(), payload].concat()
}

/// The ones' complement sum of 16-bit words.
fn checksum(parts: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = parts.concat();
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // Folded into 16 bits just above.
    !u16::try_from(sum).unwrap_or(u16::MAX)
}

fn ipv4(dst: [u8; 4], protocol: u8, payload: &[u8]) -> Vec<u8> {
    let total = u16::try_from(20 + payload.len()).expect("small");
    let mut header = vec![0x45, 0];
    header.extend_from_slice(&total.to_be_bytes());
    header.extend_from_slice(&[0, 1, 0x40, 0, 64, protocol, 0, 0]);
    header.extend_from_slice(&GUEST);
    header.extend_from_slice(&dst);
    let sum = checksum(&[&header]);
    header[10..12].copy_from_slice(&sum.to_be_bytes());
    let packet = [header, payload.to_vec()].concat();
    ethernet(GATEWAY_MAC, 0x0800, &packet)
}

/// The TCP/UDP pseudo-header of RFC 793 §3.1.
fn pseudo(dst: [u8; 4], protocol: u8, len: usize) -> Vec<u8> {
    let len = u16::try_from(len).expect("small");
    [&GUEST[..], &dst, &[0, protocol], &len.to_be_bytes()].concat()
}

pub fn arp_request(target: [u8; 4]) -> Vec<u8> {
    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
    arp.extend_from_slice(&GUEST_MAC);
    arp.extend_from_slice(&GUEST);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&target);
    ethernet([0xff; 6], 0x0806, &arp)
}

pub fn icmp_echo(dst: [u8; 4]) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1];
    icmp.extend_from_slice(b"ping");
    let sum = checksum(&[&icmp]);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    ipv4(dst, 1, &icmp)
}

pub fn udp(dst: [u8; 4], port: u16, payload: &[u8]) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut udp = Vec::new();
    udp.extend_from_slice(&40000u16.to_be_bytes());
    udp.extend_from_slice(&port.to_be_bytes());
    udp.extend_from_slice(&u16::try_from(len).expect("small").to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let sum = checksum(&[&pseudo(dst, 17, len), &udp]);
    udp[6..8].copy_from_slice(&sum.to_be_bytes());
    ipv4(dst, 17, &udp)
}

pub fn tcp(dst: [u8; 4], port: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut tcp = Vec::new();
    tcp.extend_from_slice(&40001u16.to_be_bytes());
    tcp.extend_from_slice(&port.to_be_bytes());
    tcp.extend_from_slice(&1000u32.to_be_bytes());
    let ack = if flags & ACK != 0 { 1u32 } else { 0 };
    tcp.extend_from_slice(&ack.to_be_bytes());
    tcp.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    tcp.extend_from_slice(payload);
    let sum = checksum(&[&pseudo(dst, 6, tcp.len()), &tcp]);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    ipv4(dst, 6, &tcp)
}

/// A DNS query for example.org, type A (RFC 1035 §4.1).
pub fn dns_query() -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["example", "org"] {
        q.push(u8::try_from(label.len()).expect("short"));
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}
