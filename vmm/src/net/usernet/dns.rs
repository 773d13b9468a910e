//! DNS for the guest: 10.0.2.3 relays queries to the host's own resolvers, read from
//! /etc/resolv.conf, so the guest resolves what the host resolves (including a resolver
//! on the host's loopback, which the guest could not reach itself). A query the guest
//! repeats goes to the next resolver, which is how a dead one is skipped.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;

/// glibc reads at most this many nameservers (MAXNS).
const MAX_RESOLVERS: usize = 3;
/// Recent (guest port, query id) pairs remembered to spot a repeated query.
const RECENT_QUERIES: usize = 64;

/// The nameservers of `/etc/resolv.conf`, or the host's loopback when it names none (what
/// glibc does too).
pub fn host_resolvers() -> Vec<SocketAddr> {
    let text = std::fs::read_to_string(Path::new("/etc/resolv.conf")).unwrap_or_default();
    parse_resolv_conf(&text)
}

/// The `nameserver` entries of a resolv.conf text, port 53. Scoped IPv6 addresses
/// (`fe80::1%eth0`) are skipped: their scope means nothing to another socket.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    let mut resolvers: Vec<SocketAddr> = text
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver")).then(|| words.next())?
        })
        .filter_map(|addr| addr.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .take(MAX_RESOLVERS)
        .collect();
    if resolvers.is_empty() {
        resolvers.push(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 53));
    }
    resolvers
}

/// Chooses the host resolver for each query the guest sends to 10.0.2.3.
#[derive(Debug)]
pub(super) struct DnsRelay {
    resolvers: Vec<SocketAddr>,
    /// (guest port, query id, times seen), newest last.
    recent: VecDeque<(u16, u16, usize)>,
}

impl DnsRelay {
    /// A relay to `resolvers`; with none, queries are dropped.
    pub(super) fn new(resolvers: Vec<SocketAddr>) -> Self {
        Self {
            resolvers,
            recent: VecDeque::with_capacity(RECENT_QUERIES),
        }
    }

    /// Where to send `query`, a DNS message from the guest's `guest_port`: the first
    /// resolver, or the next one each time the same query comes again. `None` for
    /// something too short to be DNS.
    pub(super) fn target(&mut self, guest_port: u16, query: &[u8]) -> Option<SocketAddr> {
        // A DNS header is 12 bytes, the id first (RFC 1035 §4.1.1).
        if query.len() < 12 || self.resolvers.is_empty() {
            return None;
        }
        let id = u16::from_be_bytes([query[0], query[1]]);
        let attempt = match self
            .recent
            .iter_mut()
            .find(|(port, qid, _)| (*port, *qid) == (guest_port, id))
        {
            Some((_, _, seen)) => {
                *seen += 1;
                *seen - 1
            }
            None => {
                if self.recent.len() == RECENT_QUERIES {
                    self.recent.pop_front();
                }
                self.recent.push_back((guest_port, id, 1));
                0
            }
        };
        self.resolvers.get(attempt % self.resolvers.len()).copied()
    }

    /// The resolver for DNS over TCP (used after a truncated answer): the first one.
    pub(super) fn tcp_target(&self) -> Option<SocketAddr> {
        self.resolvers.first().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(id: u16) -> Vec<u8> {
        let mut q = id.to_be_bytes().to_vec();
        q.resize(29, 0);
        q
    }

    #[test]
    fn resolv_conf_nameservers_are_read_in_order_up_to_three() {
        let text = "# generated\nsearch example.org\nnameserver 10.255.255.53\n\
                    nameserver  ::1 \nnameserver fe80::1%eth0\nnameserver bogus\n\
                    options ndots:2\nnameserver 127.0.0.53\nnameserver 9.9.9.9\n";
        let resolvers = parse_resolv_conf(text);
        let expected: Vec<SocketAddr> = ["10.255.255.53:53", "[::1]:53", "127.0.0.53:53"]
            .iter()
            .map(|s| s.parse().expect("addr"))
            .collect();
        assert_eq!(resolvers, expected);
    }

    #[test]
    fn without_nameservers_the_host_loopback_is_used() {
        let resolvers = parse_resolv_conf("search lan\n");
        assert_eq!(resolvers, ["127.0.0.1:53".parse().expect("addr")]);
    }

    #[test]
    fn a_repeated_query_goes_to_the_next_resolver() {
        let a: SocketAddr = "127.0.0.1:5301".parse().expect("addr");
        let b: SocketAddr = "127.0.0.1:5302".parse().expect("addr");
        let mut relay = DnsRelay::new(vec![a, b]);

        assert_eq!(relay.target(1000, &query(7)), Some(a));
        assert_eq!(relay.target(1000, &query(8)), Some(a), "another query");
        assert_eq!(relay.target(1001, &query(7)), Some(a), "another socket");
        assert_eq!(relay.target(1000, &query(7)), Some(b), "a retry");
        assert_eq!(relay.target(1000, &query(7)), Some(a), "and round again");
        assert_eq!(relay.target(1000, &[0; 11]), None, "not DNS");
        assert_eq!(relay.tcp_target(), Some(a));
    }

    #[test]
    fn the_memory_of_recent_queries_is_bounded() {
        let a: SocketAddr = "127.0.0.1:5301".parse().expect("addr");
        let b: SocketAddr = "127.0.0.1:5302".parse().expect("addr");
        let mut relay = DnsRelay::new(vec![a, b]);
        for id in 0..1000 {
            relay.target(1, &query(id));
        }
        assert_eq!(relay.recent.len(), RECENT_QUERIES);
        assert_eq!(
            relay.target(1, &query(999)),
            Some(b),
            "recent ones are known"
        );
        assert_eq!(relay.target(1, &query(0)), Some(a), "old ones forgotten");
    }
}
