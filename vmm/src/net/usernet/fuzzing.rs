//! The guest-facing half of the user-mode network for the fuzz targets in `fuzz/` (feature
//! `fuzzing`): frames go through the classifier and the smoltcp stack exactly as
//! [`UserNet`](super::UserNet) sends them, but no host socket is ever opened, so a fuzzer's
//! SYNs and datagrams reach nobody.

use std::net::{Ipv4Addr, SocketAddr};

use super::dns::DnsRelay;
use super::frame::{self, Verdict};
use super::stack::Stack;
use super::DNS;

/// What the classifier made of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Dropped before the stack.
    Drop,
    /// Handed to smoltcp.
    Pass,
    /// A connection attempt (answered here with the reset a refused one gets).
    Syn,
}

/// The stack and DNS relay of one user-mode network, without the NAT behind them.
pub struct GuestSide {
    stack: Stack,
    dns: DnsRelay,
}

impl Default for GuestSide {
    fn default() -> Self {
        Self::new()
    }
}

impl GuestSide {
    /// A fresh network, relaying DNS (on paper) to two resolvers.
    pub fn new() -> Self {
        let resolvers = [
            Ipv4Addr::new(192, 0, 2, 53),
            Ipv4Addr::new(198, 51, 100, 53),
        ]
        .map(|ip| SocketAddr::from((ip, 53)))
        .to_vec();
        Self {
            stack: Stack::new(),
            dns: DnsRelay::new(resolvers),
        }
    }

    /// Takes one frame from the guest as `UserNet::send` does; a SYN gets the reset of a
    /// refused connection instead of a host socket.
    pub fn send(&mut self, guest_frame: &[u8]) -> Class {
        match frame::classify(guest_frame) {
            Verdict::Drop => Class::Drop,
            Verdict::Pass => {
                self.stack.input(guest_frame.to_vec());
                Class::Pass
            }
            Verdict::Syn(syn) => {
                self.stack.emit(frame::reset_for(&syn));
                Class::Syn
            }
        }
    }

    /// Runs the stack once, picks a resolver for every DNS query the guest sent, and
    /// returns the frames the stack has for the guest and the UDP datagrams the guest sent.
    pub fn poll(&mut self) -> (Vec<Vec<u8>>, usize) {
        self.stack.poll();
        let mut datagrams = 0;
        let dns = &mut self.dns;
        self.stack.recv_udp(|src, dst, payload| {
            datagrams += 1;
            if *dst.ip() == DNS && dst.port() == 53 {
                let _ = dns.target(src.port(), payload);
            }
        });
        let mut out = Vec::new();
        while let Some(frame) = self.stack.output() {
            out.push(frame);
        }
        (out, datagrams)
    }
}
