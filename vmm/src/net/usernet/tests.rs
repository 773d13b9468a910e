//! The user-mode network driven from the guest's side, by hand-built frames where the
//! wire matters and by a smoltcp guest where a whole TCP peer is needed, against servers
//! on 127.0.0.1 only (10.0.2.2 is the host's loopback, as with QEMU's slirp).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::thread;

use smoltcp::socket::tcp;
use smoltcp::wire::TcpControl;

use super::testing::*;
use super::*;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn user_net(configure: impl FnOnce(&mut UserNetConfig)) -> UserNet {
    let mut config = UserNetConfig::new(Vec::new());
    // Most stories talk to servers on the host's loopback.
    config.host_loopback = true;
    configure(&mut config);
    UserNet::new(config).expect("user net")
}

/// What Linux does first: ARP for the gateway, which also tells it the guest's MAC.
fn hello(net: &mut UserNet) {
    net.send(&arp_request(GATEWAY));
    wait_for(net, |seen| {
        matches!(seen, Seen::ArpReply { .. }).then_some(())
    });
}

fn byte(n: usize) -> u8 {
    u8::try_from(n).expect("below 256")
}

fn local_port(listener: &TcpListener) -> u16 {
    listener.local_addr().expect("addr").port()
}

/// The gateway's SYN-ACK to `guest` from `from`: its sequence number.
fn syn_ack(net: &mut UserNet, guest: SocketAddrV4, from: SocketAddrV4, ack: i32) -> i32 {
    wait_for(net, |seen| match seen {
        Seen::Tcp {
            src,
            dst,
            syn: true,
            ack: Some(a),
            seq,
            ..
        } if (*src, *dst, *a) == (from, guest, ack) => Some(*seq),
        _ => None,
    })
    .0
}

/// Reads exactly `len` bytes from a non-blocking host socket while running the network.
fn read_host(net: &mut UserNet, host: &mut TcpStream, len: usize) -> Vec<u8> {
    host.set_nonblocking(true).expect("nonblocking");
    let mut data = vec![0; len];
    let mut got = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while got < len {
        assert!(
            std::time::Instant::now() < deadline,
            "host read {got} of {len}"
        );
        net.poll();
        while net.recv().is_some() {}
        match host.read(&mut data[got..]) {
            Ok(0) => panic!("early eof after {got}"),
            Ok(n) => got += n,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(1))
            }
            Err(err) => panic!("host read: {err}"),
        }
    }
    data
}

#[test]
fn arp_is_answered_for_the_gateway_and_dns_only() {
    let mut net = user_net(|_| {});
    for addr in [GATEWAY, DNS] {
        net.send(&arp_request(addr));
        let (reply, _) = wait_for(&mut net, |seen| match seen {
            Seen::ArpReply { sender, mac } => Some((*sender, *mac)),
            _ => None,
        });
        assert_eq!(reply, (addr, GATEWAY_MAC));
    }
    net.send(&arp_request(Ipv4Addr::new(10, 0, 2, 99)));
    assert_eq!(drain_for(&mut net, Duration::from_millis(50)), []);
}

#[test]
fn the_gateway_answers_ping_and_other_addresses_stay_silent() {
    let mut net = user_net(|_| {});
    hello(&mut net);
    net.send(&icmp_echo(GATEWAY, 7, 1, b"katalite"));
    let (reply, _) = wait_for(&mut net, |seen| {
        matches!(seen, Seen::EchoReply { .. }).then(|| seen.clone())
    });
    assert_eq!(
        reply,
        Seen::EchoReply {
            src: GATEWAY,
            ident: 7,
            seq_no: 1,
            data: b"katalite".to_vec()
        }
    );
    net.send(&icmp_echo(Ipv4Addr::new(192, 0, 2, 1), 7, 2, b"x"));
    assert_eq!(drain_for(&mut net, Duration::from_millis(50)), []);
}

#[test]
fn a_guest_flooding_pings_without_reading_holds_a_bounded_backlog() {
    let mut net = user_net(|_| {});
    hello(&mut net);
    for seq in 0..5000u16 {
        net.send(&icmp_echo(GATEWAY, 1, seq, b"flood"));
        if seq % 100 == 0 {
            net.poll();
        }
    }
    net.poll();
    let mut queued = 0;
    while net.recv().is_some() {
        queued += 1;
    }
    assert!((100..=640).contains(&queued), "{queued} replies held");
}

#[test]
fn a_guest_syn_to_the_gateway_reaches_a_host_loopback_server_and_bytes_flow_both_ways() {
    let listener = TcpListener::bind((LOCALHOST, 0)).expect("listen");
    let mut net = user_net(|_| {});
    hello(&mut net);
    let guest = SocketAddrV4::new(GUEST, 40000);
    let gateway = SocketAddrV4::new(GATEWAY, local_port(&listener));

    net.send(&tcp_segment(
        guest,
        gateway,
        TcpControl::Syn,
        1000,
        None,
        b"",
    ));
    let isn = syn_ack(&mut net, guest, gateway, 1001);
    let (mut host, _) = listener.accept().expect("the host side connected");
    let segment = |control, seq, ack, payload: &[u8]| {
        tcp_segment(guest, gateway, control, seq, Some(ack), payload)
    };
    net.send(&segment(TcpControl::None, 1001, isn + 1, b""));
    net.send(&segment(TcpControl::Psh, 1001, isn + 1, b"hello"));
    assert_eq!(read_host(&mut net, &mut host, 5), b"hello");

    host.write_all(b"world").expect("host write");
    let data = |net: &mut UserNet, want: &'static [u8]| {
        wait_for(net, |seen| match seen {
            Seen::Tcp { payload, seq, .. } if payload == want => Some(*seq),
            _ => None,
        })
        .0
    };
    assert_eq!(data(&mut net, b"world"), isn + 1);
    net.send(&segment(TcpControl::None, 1006, isn + 6, b""));

    // Half-close: the guest's FIN ends the host's read side, the host still writes.
    net.send(&segment(TcpControl::Fin, 1006, isn + 6, b""));
    host.set_nonblocking(false).expect("blocking");
    host.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut eof = [0u8; 1];
    let reader = thread::spawn(move || {
        let n = host.read(&mut eof).expect("read");
        (n, host)
    });
    let (n, mut host) = loop {
        net.poll();
        if reader.is_finished() {
            break reader.join().expect("reader");
        }
        thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(n, 0, "the guest's FIN is the host's EOF");
    host.write_all(b"late")
        .expect("write after the guest's FIN");
    assert_eq!(data(&mut net, b"late"), isn + 6);
    net.send(&segment(TcpControl::None, 1007, isn + 10, b""));
    drop(host);
    let (fin_seq, _) = wait_for(&mut net, |seen| match seen {
        Seen::Tcp { fin: true, seq, .. } => Some(*seq),
        _ => None,
    });
    net.send(&segment(TcpControl::None, 1007, fin_seq + 1, b""));
    drain_for(&mut net, Duration::from_millis(20));
    assert_eq!(net.tcp.len(), 0, "both halves closed: the entry is gone");
}

#[test]
fn a_syn_to_a_closed_port_or_an_unreachable_address_is_reset() {
    let closed = TcpListener::bind((LOCALHOST, 0)).expect("listen");
    let port = local_port(&closed);
    drop(closed);
    let mut net = user_net(|_| {});
    hello(&mut net);
    let guest = SocketAddrV4::new(GUEST, 40001);
    for dst in [
        SocketAddrV4::new(GATEWAY, port),
        SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 77), 80),
        SocketAddrV4::new(DNS, 80),
    ] {
        net.send(&tcp_segment(guest, dst, TcpControl::Syn, 5000, None, b""));
        let (from, _) = wait_for(&mut net, |seen| match seen {
            Seen::Tcp {
                src,
                rst: true,
                ack: Some(5001),
                ..
            } => Some(*src),
            _ => None,
        });
        assert_eq!(from, dst);
    }
    assert_eq!(net.tcp.len(), 0);
}

#[test]
fn past_the_connection_limit_syns_and_published_clients_are_reset() {
    let listener = TcpListener::bind((LOCALHOST, 0)).expect("listen");
    let mut net = user_net(|config| config.max_connections = 2);
    let published = net
        .publish(LOCALHOST, 0, 80, Protocol::Tcp)
        .expect("publish");
    hello(&mut net);
    let gateway = SocketAddrV4::new(GATEWAY, local_port(&listener));
    for port in [41000, 41001] {
        let guest = SocketAddrV4::new(GUEST, port);
        net.send(&tcp_segment(guest, gateway, TcpControl::Syn, 9, None, b""));
        syn_ack(&mut net, guest, gateway, 10);
    }
    let third = SocketAddrV4::new(GUEST, 41002);
    net.send(&tcp_segment(third, gateway, TcpControl::Syn, 9, None, b""));
    let (to, _) = wait_for(&mut net, |seen| match seen {
        Seen::Tcp { rst: true, dst, .. } => Some(*dst),
        _ => None,
    });
    assert_eq!(to, third);
    assert_eq!(net.tcp.len(), 2);

    let client = thread::spawn(move || {
        let mut stream = TcpStream::connect(published).expect("the kernel accepts");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        stream.read(&mut [0u8; 1]).map_err(|err| err.kind())
    });
    while !client.is_finished() {
        net.poll();
        thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        client.join().expect("client"),
        Err(io::ErrorKind::ConnectionReset)
    );
    assert_eq!(net.tcp.len(), 2);
}

#[test]
fn udp_round_trips_to_a_host_loopback_echo_server() {
    let echo = UdpSocket::bind((LOCALHOST, 0)).expect("bind");
    let port = echo.local_addr().expect("addr").port();
    let server = thread::spawn(move || {
        let mut buf = [0u8; 64];
        let (len, from) = echo.recv_from(&mut buf).expect("recv");
        echo.send_to(&buf[..len], from).expect("send");
    });
    let mut net = user_net(|_| {});
    hello(&mut net);
    let guest = SocketAddrV4::new(GUEST, 5000);
    let gateway = SocketAddrV4::new(GATEWAY, port);

    net.send(&udp_frame(guest, gateway, b"ping"));
    let (reply, _) = wait_for(&mut net, |seen| {
        matches!(seen, Seen::Udp { .. }).then(|| seen.clone())
    });

    assert_eq!(
        reply,
        Seen::Udp {
            src: gateway,
            dst: guest,
            payload: b"ping".to_vec()
        }
    );
    server.join().expect("server");
    assert_eq!(net.udp.len(), 1);
}

#[test]
fn datagrams_larger_than_the_mtu_are_reassembled_and_fragmented() {
    let echo = UdpSocket::bind((LOCALHOST, 0)).expect("bind");
    let port = echo.local_addr().expect("addr").port();
    let server = thread::spawn(move || {
        let mut buf = [0u8; 8192];
        let (len, from) = echo.recv_from(&mut buf).expect("recv");
        echo.send_to(&buf[..len], from).expect("send");
        len
    });
    let mut net = user_net(|_| {});
    hello(&mut net);
    let guest = SocketAddrV4::new(GUEST, 5001);
    let gateway = SocketAddrV4::new(GATEWAY, port);
    let payload: Vec<u8> = (0..4000).map(|i| byte(i % 249)).collect();

    for fragment in udp_fragments(guest, gateway, &payload, 1480) {
        net.send(&fragment);
    }
    let mut frames = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let reply = loop {
        assert!(std::time::Instant::now() < deadline, "no reassembled reply");
        net.poll();
        while let Some(frame) = net.recv() {
            assert!(frame.len() <= 1514, "fragments fit the MTU");
            frames.push(frame);
        }
        if let Some(reply) = reassemble_udp(&frames) {
            break reply;
        }
        thread::sleep(Duration::from_millis(1));
    };

    assert_eq!(
        server.join().expect("server"),
        4000,
        "the host got it whole"
    );
    assert!(frames.len() >= 3);
    assert_eq!(reply, (gateway, guest, payload));
}

/// A resolver on 127.0.0.1 that answers every query with the query, QR set, plus "answer".
fn fake_resolver() -> (SocketAddr, thread::JoinHandle<()>) {
    let socket = UdpSocket::bind((LOCALHOST, 0)).expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let addr = socket.local_addr().expect("addr");
    let server = thread::spawn(move || {
        let mut buf = [0u8; 512];
        if let Ok((len, from)) = socket.recv_from(&mut buf) {
            let mut answer = buf[..len].to_vec();
            answer[2] |= 0x80;
            answer.extend(b"answer");
            socket.send_to(&answer, from).expect("send");
        }
    });
    (addr, server)
}

fn dns_query(id: u16) -> Vec<u8> {
    let mut query = id.to_be_bytes().to_vec();
    query.extend([1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    query.extend(b"\x07example\x03org\x00\x00\x01\x00\x01");
    query
}

#[test]
fn dns_to_10_0_2_3_is_relayed_to_the_resolver_and_a_retry_to_the_next() {
    // The first resolver never answers; the guest's retry goes to the second.
    let silent = UdpSocket::bind((LOCALHOST, 0)).expect("bind");
    let (resolver, server) = fake_resolver();
    let silent_addr = silent.local_addr().expect("addr");
    let mut net = user_net(|config| config.resolvers = vec![silent_addr, resolver]);
    hello(&mut net);
    let guest = SocketAddrV4::new(GUEST, 5353);
    let dns = SocketAddrV4::new(DNS, 53);
    let query = dns_query(0x1234);

    net.send(&udp_frame(guest, dns, &query));
    assert_eq!(drain_for(&mut net, Duration::from_millis(100)), []);
    let mut got = [0u8; 64];
    assert_eq!(
        silent.recv(&mut got).expect("the first resolver got it"),
        query.len()
    );

    net.send(&udp_frame(guest, dns, &query));
    let (payload, _) = wait_for(&mut net, |seen| match seen {
        Seen::Udp { src, dst, payload } if (*src, *dst) == (dns, guest) => Some(payload.clone()),
        _ => None,
    });

    let mut expected = query.clone();
    expected[2] |= 0x80;
    expected.extend(b"answer");
    assert_eq!(payload, expected);
    server.join().expect("resolver");
}

#[test]
fn a_published_udp_port_reaches_the_guest_and_its_answer_the_client() {
    let mut net = user_net(|_| {});
    let published = net
        .publish(LOCALHOST, 0, 7, Protocol::Udp)
        .expect("publish");
    hello(&mut net);
    let client = UdpSocket::bind((LOCALHOST, 0)).expect("bind");
    client.send_to(b"hi", published).expect("send");

    let (from, _) = wait_for(&mut net, |seen| match seen {
        Seen::Udp { src, dst, payload } if *dst == SocketAddrV4::new(GUEST, 7) => {
            assert_eq!(payload, b"hi");
            Some(*src)
        }
        _ => None,
    });
    assert_eq!(*from.ip(), GATEWAY);

    net.send(&udp_frame(SocketAddrV4::new(GUEST, 7), from, b"HI"));
    net.poll();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut buf = [0u8; 8];
    let (len, sender) = client.recv_from(&mut buf).expect("the guest's answer");
    assert_eq!((&buf[..len], sender), (&b"HI"[..], published));
}

#[test]
fn a_published_tcp_port_reaches_a_guest_listener_with_half_close_and_a_large_reply() {
    const REPLY: usize = 1 << 20;
    let mut net = user_net(|_| {});
    let published = net
        .publish(LOCALHOST, 0, 80, Protocol::Tcp)
        .expect("publish");
    let mut guest = Guest::new();
    let server = guest.tcp_socket();
    guest.tcp(server).listen(80).expect("listen");
    let client = thread::spawn(move || {
        let mut stream = TcpStream::connect(published).expect("connect");
        stream.write_all(b"GET / HTTP/1.0\r\n\r\n").expect("write");
        stream.shutdown(Shutdown::Write).expect("half-close");
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).expect("read");
        reply
    });

    let mut request = Vec::new();
    guest.run_until(&mut net, Duration::from_secs(20), |guest| {
        let socket = guest.tcp(server);
        while let Ok(n) = socket.recv(|data| (data.len(), data.len())) {
            if n == 0 {
                break;
            }
            request.resize(request.len() + n, b'?');
        }
        !socket.may_recv() && socket.state() == tcp::State::CloseWait
    });
    assert_eq!(
        request.len(),
        18,
        "the whole request, then the client's FIN"
    );
    let body: Vec<u8> = (0..REPLY).map(|i| byte(i % 253)).collect();
    let mut sent = 0;
    guest.run_until(&mut net, Duration::from_secs(60), |guest| {
        let socket = guest.tcp(server);
        if sent < body.len() {
            sent += socket.send_slice(&body[sent..]).unwrap_or(0);
            if sent == body.len() {
                socket.close();
            }
        }
        client.is_finished()
    });

    let reply = client.join().expect("client");
    assert_eq!(reply.len(), REPLY);
    assert!(reply == body, "byte-exact");
    let peer = guest.tcp(server).remote_endpoint();
    assert!(peer.is_none() || peer.is_some_and(|e| e.addr == GATEWAY.into()));
}

#[test]
fn a_published_port_with_nothing_listening_in_the_guest_resets_the_client() {
    let mut net = user_net(|_| {});
    let published = net
        .publish(LOCALHOST, 0, 81, Protocol::Tcp)
        .expect("publish");
    let mut guest = Guest::new();
    let client = thread::spawn(move || {
        let mut stream = TcpStream::connect(published).expect("the kernel accepts");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        stream.read(&mut [0u8; 1]).map_err(|err| err.kind())
    });
    guest.run_until(&mut net, Duration::from_secs(15), |_| client.is_finished());
    assert_eq!(
        client.join().expect("client"),
        Err(io::ErrorKind::ConnectionReset)
    );
    guest.step(&mut net);
    assert_eq!(net.tcp.len(), 0);
}

#[test]
fn many_guest_connections_out_carry_their_bytes_and_leave_no_entries() {
    const CONNECTIONS: u16 = 16;
    const BYTES: usize = 64 * 1024;
    let listener = TcpListener::bind((LOCALHOST, 0)).expect("listen");
    let gateway = SocketAddrV4::new(GATEWAY, local_port(&listener));
    // An echo server: every connection gets its bytes back, then EOF after the client's.
    let server = thread::spawn(move || {
        let workers: Vec<_> = (0..CONNECTIONS)
            .map(|_| {
                let (mut stream, _) = listener.accept().expect("accept");
                thread::spawn(move || {
                    let mut data = Vec::new();
                    stream.read_to_end(&mut data).expect("read");
                    stream.write_all(&data).expect("write");
                })
            })
            .collect();
        workers.into_iter().for_each(|w| w.join().expect("worker"));
    });
    let mut net = user_net(|_| {});
    let mut guest = Guest::new();
    let sockets: Vec<_> = (0..CONNECTIONS)
        .map(|i| {
            let handle = guest.tcp_socket();
            guest.connect(handle, gateway, 42000 + i);
            handle
        })
        .collect();
    let payload = |i: usize| -> Vec<u8> { (0..BYTES).map(|b| byte((b + i) % 251)).collect() };
    let mut sent = vec![0usize; sockets.len()];
    let mut received = vec![Vec::new(); sockets.len()];

    guest.run_until(&mut net, Duration::from_secs(60), |guest| {
        let mut done = true;
        for (i, &handle) in sockets.iter().enumerate() {
            let socket = guest.tcp(handle);
            let data = payload(i);
            if sent[i] < BYTES && socket.can_send() {
                sent[i] += socket.send_slice(&data[sent[i]..]).expect("send");
                if sent[i] == BYTES {
                    socket.close();
                }
            }
            while socket.can_recv() {
                socket
                    .recv(|chunk| {
                        received[i].extend_from_slice(chunk);
                        (chunk.len(), ())
                    })
                    .expect("recv");
            }
            done &= received[i].len() == BYTES && !socket.may_recv();
        }
        done
    });

    for (i, data) in received.iter().enumerate() {
        assert!(*data == payload(i), "connection {i} byte-exact");
    }
    server.join().expect("server");
    guest.run_until(&mut net, Duration::from_secs(10), |_| true);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while net.tcp.len() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} left",
            net.tcp.len()
        );
        guest.step(&mut net);
        thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn dropping_the_network_closes_its_listeners_and_connections() {
    let listener = TcpListener::bind((LOCALHOST, 0)).expect("listen");
    let mut net = user_net(|_| {});
    let published = net
        .publish(LOCALHOST, 0, 80, Protocol::Tcp)
        .expect("publish");
    hello(&mut net);
    let guest = SocketAddrV4::new(GUEST, 43000);
    let gateway = SocketAddrV4::new(GATEWAY, local_port(&listener));
    net.send(&tcp_segment(guest, gateway, TcpControl::Syn, 1, None, b""));
    syn_ack(&mut net, guest, gateway, 2);
    let (mut host, _) = listener.accept().expect("accept");

    drop(net);

    host.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    assert!(matches!(host.read(&mut [0u8; 1]), Ok(0) | Err(_)), "closed");
    let refused = TcpStream::connect(published).map_err(|err| err.kind());
    assert_eq!(refused.err(), Some(io::ErrorKind::ConnectionRefused));
}

#[test]
fn tokens_keep_kind_and_id_apart() {
    for kind in [Kind::Tcp, Kind::Udp, Kind::TcpListener, Kind::UdpListener] {
        assert_eq!(untoken(token(kind, 12345)), (kind, 12345));
    }
}

#[test]
fn host_targets_follow_the_address_plan() {
    let net = user_net(|config| config.resolvers = vec!["192.0.2.53:53".parse().expect("addr")]);
    let target = |ip: Ipv4Addr, port| net.host_target(SocketAddrV4::new(ip, port));
    assert_eq!(
        target(GATEWAY, 8080),
        Some("127.0.0.1:8080".parse().expect("a"))
    );
    assert_eq!(target(DNS, 53), Some("192.0.2.53:53".parse().expect("a")));
    assert_eq!(target(DNS, 80), None);
    assert_eq!(target(Ipv4Addr::new(10, 0, 2, 9), 80), None);
    assert_eq!(target(Ipv4Addr::new(127, 0, 0, 1), 80), None);
    assert_eq!(target(Ipv4Addr::new(224, 0, 0, 251), 5353), None);
    assert_eq!(target(Ipv4Addr::new(192, 0, 2, 1), 0), None);
    let out = Ipv4Addr::new(192, 0, 2, 1);
    assert_eq!(target(out, 443), Some(SocketAddr::from((out, 443))));
    let closed = user_net(|config| config.host_loopback = false);
    let blocked = |ip: Ipv4Addr| closed.host_target(SocketAddrV4::new(ip, 22));
    assert_eq!(blocked(GATEWAY), None);
    assert_eq!(
        blocked(Ipv4Addr::new(169, 254, 169, 254)),
        None,
        "cloud metadata"
    );
    // Every address of this host's own interfaces is the host too.
    for ip in host_ipv4_addresses() {
        assert_eq!(blocked(ip), None, "{ip}");
    }
    assert_eq!(
        closed.host_target(SocketAddrV4::new(out, 443)),
        Some(SocketAddr::from((out, 443)))
    );
    assert!(
        !UserNetConfig::new(Vec::new()).host_loopback,
        "closed by default"
    );
}

/// This host's IPv4 addresses, from the kernel's routing table of local addresses.
fn host_ipv4_addresses() -> Vec<Ipv4Addr> {
    let text = std::fs::read_to_string("/proc/net/fib_trie").unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines
        .windows(2)
        .filter(|w| w[1].contains("/32 host LOCAL"))
        .filter_map(|w| w[0].trim().trim_start_matches("|-- ").parse().ok())
        .filter(|ip: &Ipv4Addr| !ip.is_loopback())
        .collect()
}
