//! The packet-socket backend: the guest's NIC stands in for a host interface (a container
//! engine's veth) through an AF_PACKET socket bound to it. Every frame the interface
//! receives goes to the guest, every frame the guest sends leaves through the interface.
//!
//! Frames reach a packet socket as the kernel holds them: traffic from the host's own
//! stack may still be one GSO super-frame (up to 64 KiB) with its checksum left for the
//! hardware. With PACKET_VNET_HDR the kernel says so in a virtio-net header before each
//! frame; this backend then finishes the checksum and cuts TCP super-frames into
//! MSS-sized segments, as a NIC would, so the guest only ever sees wire frames.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use super::NetBackend;

/// `SOL_PACKET` option: a virtio-net header before every frame.
const PACKET_VNET_HDR: libc::c_int = 15;
/// `struct virtio_net_hdr` without the mergeable buffers' count.
const VNET_HDR_LEN: usize = 10;
const NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_ECN: u8 = 0x80;
/// A GSO frame and its header at most.
const READ_BUFFER: usize = VNET_HDR_LEN + 65_535 + 14;
const ETH_LEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const PROTO_TCP: u8 = 6;
/// Sizes of the C structs passed to the socket calls (a few bytes: no truncation).
#[allow(clippy::cast_possible_truncation)]
const INT_LEN: libc::socklen_t = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
#[allow(clippy::cast_possible_truncation)]
const SOCKADDR_LL_LEN: libc::socklen_t =
    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;

/// An AF_PACKET socket bound to one interface.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
    buffer: Vec<u8>,
    /// Segments of a super-frame not yet handed to the guest.
    pending: VecDeque<Vec<u8>>,
}

impl PacketSocket {
    /// Binds a raw packet socket to the interface with index `ifindex` (needs
    /// CAP_NET_RAW in the interface's network namespace).
    pub fn open(ifindex: u32) -> io::Result<Self> {
        let all = u16::try_from(libc::ETH_P_ALL).unwrap_or_default().to_be();
        // SAFETY: socket(2) takes plain integers; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                i32::from(all),
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let on: libc::c_int = 1;
        // SAFETY: PACKET_VNET_HDR reads one int from a pointer valid for the call.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                PACKET_VNET_HDR,
                (&on as *const libc::c_int).cast(),
                INT_LEN,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: an all-zero sockaddr_ll is a valid value of the plain C struct.
        let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        address.sll_family = u16::try_from(libc::AF_PACKET).unwrap_or_default();
        address.sll_protocol = all;
        address.sll_ifindex = i32::try_from(ifindex).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: bind reads `size_of::<sockaddr_ll>()` bytes of `address`, alive and
        // initialised for the call.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&address as *const libc::sockaddr_ll).cast(),
                SOCKADDR_LL_LEN,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            fd,
            buffer: vec![0; READ_BUFFER],
            pending: VecDeque::new(),
        })
    }

    /// Reads one frame the interface received (not one it sent): `Some(len)` of the
    /// buffer, header included; `None` when nothing is waiting.
    fn read_incoming(&mut self) -> Option<usize> {
        loop {
            // SAFETY: an all-zero sockaddr_ll is valid; recvfrom writes at most `len`
            // bytes into the buffer and at most `from_len` bytes into `from`.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut from_len = SOCKADDR_LL_LEN;
            // SAFETY: as above; both pointers are valid for the sizes given.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    self.buffer.as_mut_ptr().cast(),
                    self.buffer.len(),
                    0,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut from_len,
                )
            };
            if n < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return None;
            }
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            return usize::try_from(n).ok();
        }
    }
}

impl NetBackend for PacketSocket {
    fn ready_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The guest's frame leaves through the interface, after a zeroed header (no offload
    /// asked); a frame the interface cannot take now is dropped, as on a wire.
    fn send(&mut self, frame: &[u8]) {
        let header = [0u8; VNET_HDR_LEN];
        let parts = [
            libc::iovec {
                iov_base: header.as_ptr() as *mut libc::c_void,
                iov_len: header.len(),
            },
            libc::iovec {
                iov_base: frame.as_ptr() as *mut libc::c_void,
                iov_len: frame.len(),
            },
        ];
        // SAFETY: writev reads the two buffers, alive and unchanged for the call.
        let _ = unsafe { libc::writev(self.fd.as_raw_fd(), parts.as_ptr(), 2) };
    }

    fn poll(&mut self) -> Option<Duration> {
        None
    }

    fn recv(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(frame) = self.pending.pop_front() {
                return Some(frame);
            }
            let len = self.read_incoming()?;
            wire_frames(&self.buffer[..len], &mut self.pending);
        }
    }
}

/// `packet` (a virtio-net header, then a frame) as wire frames appended to `out`: the
/// checksum finished, a TCP super-frame cut into segments. What cannot be made into wire
/// frames (a header that does not fit the frame, another GSO kind) is dropped.
pub fn wire_frames(packet: &[u8], out: &mut VecDeque<Vec<u8>>) {
    let Some((header, frame)) = packet.split_at_checked(VNET_HDR_LEN) else {
        return;
    };
    let flags = header[0];
    let gso_type = header[1] & !GSO_ECN;
    let gso_size = usize::from(u16::from_le_bytes([header[4], header[5]]));
    let csum_start = usize::from(u16::from_le_bytes([header[6], header[7]]));
    let csum_offset = usize::from(u16::from_le_bytes([header[8], header[9]]));
    match gso_type {
        GSO_NONE => {
            let mut frame = frame.to_vec();
            if flags & NEEDS_CSUM != 0 && !finish_checksum(&mut frame, csum_start, csum_offset) {
                return;
            }
            out.push_back(frame);
        }
        GSO_TCPV4 | GSO_TCPV6 if gso_size > 0 => segment_tcp(frame, gso_size, out),
        _ => {}
    }
}

/// Folds the ones' complement sum from `start` to the end into the 16-bit field at
/// `start + offset`, which holds the pseudo-header's partial sum (CHECKSUM_PARTIAL).
fn finish_checksum(frame: &mut [u8], start: usize, offset: usize) -> bool {
    let field = start.saturating_add(offset);
    if start >= frame.len() || field.saturating_add(2) > frame.len() {
        return false;
    }
    let sum = !fold(sum_bytes(0, &frame[start..]));
    frame[field..field + 2].copy_from_slice(&sum.to_be_bytes());
    true
}

fn sum_bytes(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut chunks = bytes.chunks_exact(2);
    for pair in &mut chunks {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([pair[0], pair[1]])));
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [last] = chunks.remainder() {
        sum = sum.wrapping_add(u32::from(*last) << 8);
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    u16::try_from(sum).unwrap_or(u16::MAX)
}

/// Cuts a TCP super-frame (IPv4 or IPv6 without extension headers) into frames of at most
/// `mss` payload bytes: sequence numbers advanced, IPv4 ids counted up, FIN and PSH on
/// the last segment only, every length and checksum recomputed.
fn segment_tcp(frame: &[u8], mss: usize, out: &mut VecDeque<Vec<u8>>) {
    if frame.len() < ETH_LEN {
        return;
    }
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let ip = ETH_LEN;
    let (ip_len, v4) = match ethertype {
        ETHERTYPE_IPV4 if frame.len() > ip => (usize::from(frame[ip] & 0x0f) * 4, true),
        ETHERTYPE_IPV6 => (40, false),
        _ => return,
    };
    let tcp = ip + ip_len;
    if frame.len() < tcp + 20 || ip_len < 20 {
        return;
    }
    let proto = if v4 { frame[ip + 9] } else { frame[ip + 6] };
    if proto != PROTO_TCP {
        return;
    }
    let tcp_len = usize::from(frame[tcp + 12] >> 4) * 4;
    let payload_at = tcp + tcp_len;
    if tcp_len < 20 || frame.len() < payload_at {
        return;
    }
    let headers = &frame[..payload_at];
    let payload = &frame[payload_at..];
    let seq = u32::from_be_bytes([
        frame[tcp + 4],
        frame[tcp + 5],
        frame[tcp + 6],
        frame[tcp + 7],
    ]);
    let id = u16::from_be_bytes([frame[ip + 4], frame[ip + 5]]);
    let chunks = payload.chunks(mss).count();
    for (index, chunk) in payload.chunks(mss).enumerate() {
        let mut segment = Vec::with_capacity(payload_at + chunk.len());
        segment.extend_from_slice(headers);
        segment.extend_from_slice(chunk);
        let offset = u32::try_from(index * mss).unwrap_or(u32::MAX);
        segment[tcp + 4..tcp + 8].copy_from_slice(&seq.wrapping_add(offset).to_be_bytes());
        const FIN_PSH: u8 = 0x01 | 0x08;
        const CWR: u8 = 0x80;
        if index + 1 < chunks {
            segment[tcp + 13] &= !FIN_PSH;
        }
        if index > 0 {
            segment[tcp + 13] &= !CWR;
        }
        let l4_len = segment.len() - tcp;
        if v4 {
            let total = u16::try_from(segment.len() - ip).unwrap_or(u16::MAX);
            segment[ip + 2..ip + 4].copy_from_slice(&total.to_be_bytes());
            let this_id = id.wrapping_add(u16::try_from(index).unwrap_or(0));
            segment[ip + 4..ip + 6].copy_from_slice(&this_id.to_be_bytes());
            segment[ip + 10..ip + 12].fill(0);
            let header_sum = !fold(sum_bytes(0, &segment[ip..tcp]));
            segment[ip + 10..ip + 12].copy_from_slice(&header_sum.to_be_bytes());
        } else {
            let length = u16::try_from(segment.len() - tcp).unwrap_or(u16::MAX);
            segment[ip + 4..ip + 6].copy_from_slice(&length.to_be_bytes());
        }
        // The pseudo-header: addresses, protocol, TCP length.
        let addresses = if v4 {
            &segment[ip + 12..ip + 20]
        } else {
            &segment[ip + 8..ip + 40]
        };
        let mut sum = sum_bytes(0, addresses);
        sum = sum.wrapping_add(u32::from(PROTO_TCP));
        sum = sum.wrapping_add(u32::try_from(l4_len).unwrap_or(0));
        segment[tcp + 16..tcp + 18].fill(0);
        let tcp_sum = !fold(sum_bytes(sum, &segment[tcp..]));
        segment[tcp + 16..tcp + 18].copy_from_slice(&tcp_sum.to_be_bytes());
        out.push_back(segment);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ethernet + IPv4 + TCP frame with `payload`, checksums left zero.
    fn tcp4(payload: &[u8], flags: u8) -> Vec<u8> {
        let mut frame = vec![0u8; ETH_LEN];
        frame[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[4..6].copy_from_slice(&7u16.to_be_bytes());
        ip[8] = 64;
        ip[9] = PROTO_TCP;
        ip[12..16].copy_from_slice(&[172, 17, 0, 1]);
        ip[16..20].copy_from_slice(&[172, 17, 0, 2]);
        frame.extend_from_slice(&ip);
        let mut tcp = [0u8; 20];
        tcp[4..8].copy_from_slice(&1000u32.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = flags;
        frame.extend_from_slice(&tcp);
        frame.extend_from_slice(payload);
        frame
    }

    fn header(flags: u8, gso_type: u8, gso_size: u16, start: u16, offset: u16) -> Vec<u8> {
        let mut h = vec![flags, gso_type, 0, 0];
        h.extend_from_slice(&gso_size.to_le_bytes());
        h.extend_from_slice(&start.to_le_bytes());
        h.extend_from_slice(&offset.to_le_bytes());
        h
    }

    /// A TCP/IPv4 segment's checksums verify to zero.
    fn checksums_hold(frame: &[u8]) -> bool {
        let ip = &frame[ETH_LEN..ETH_LEN + 20];
        let tcp = &frame[ETH_LEN + 20..];
        let mut pseudo = sum_bytes(0, &ip[12..20]);
        pseudo += u32::from(PROTO_TCP) + u32::try_from(tcp.len()).expect("len");
        fold(sum_bytes(0, ip)) == 0xffff && fold(sum_bytes(pseudo, tcp)) == 0xffff
    }

    #[test]
    fn a_tcp_super_frame_becomes_mss_sized_segments() {
        let payload: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let mut packet = header(NEEDS_CSUM, GSO_TCPV4, 1448, 34, 16);
        packet.extend(tcp4(&payload, 0x18 | 0x01)); // PSH, ACK, FIN
        let mut out = VecDeque::new();
        wire_frames(&packet, &mut out);
        let sizes: Vec<usize> = out.iter().map(|f| f.len() - 54).collect();
        assert_eq!(sizes, [1448, 1448, 104]);
        let mut joined = Vec::new();
        for (index, segment) in out.iter().enumerate() {
            assert!(checksums_hold(segment), "segment {index}");
            let seq = u32::from_be_bytes(segment[38..42].try_into().expect("seq"));
            assert_eq!(seq, 1000 + 1448 * u32::try_from(index).expect("index"));
            let id = u16::from_be_bytes([segment[18], segment[19]]);
            assert_eq!(usize::from(id), 7 + index);
            let last = index == 2;
            assert_eq!(segment[47] & 0x09 != 0, last, "FIN/PSH on the last only");
            assert_eq!(segment[47] & 0x10, 0x10, "ACK kept");
            joined.extend_from_slice(&segment[54..]);
        }
        assert_eq!(joined, payload);
    }

    #[test]
    fn a_partial_checksum_is_finished_and_junk_is_dropped() {
        let mut frame = tcp4(b"hello", 0x18);
        // The stack leaves the pseudo-header's sum in the field.
        let mut pseudo = sum_bytes(0, &frame[26..34]);
        pseudo += u32::from(PROTO_TCP) + 25;
        frame[50..52].copy_from_slice(&fold(pseudo).to_be_bytes());
        // The IPv4 header checksum is the stack's own (complete).
        let ip_sum = !fold(sum_bytes(0, &frame[14..34]));
        frame[24..26].copy_from_slice(&ip_sum.to_be_bytes());
        let mut packet = header(NEEDS_CSUM, GSO_NONE, 0, 34, 16);
        packet.extend(&frame);
        let mut out = VecDeque::new();
        wire_frames(&packet, &mut out);
        assert_eq!(out.len(), 1);
        assert!(checksums_hold(&out[0]));
        for junk in [
            vec![0u8; 5],
            [header(NEEDS_CSUM, GSO_NONE, 0, 200, 16), frame.clone()].concat(),
            [header(0, 3, 1000, 34, 6), frame.clone()].concat(),
            [header(0, GSO_TCPV4, 1000, 0, 0), vec![0u8; 20]].concat(),
        ] {
            let mut out = VecDeque::new();
            wire_frames(&junk, &mut out);
            assert!(out.is_empty(), "{junk:?}");
        }
    }
}
