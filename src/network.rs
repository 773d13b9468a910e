//! The container's network as `katalite run` sets it up: the `--network` modes and `-p`
//! mappings (Docker's syntax), the static address plan init applies to eth0, and the
//! VMM backend (the built-in user-mode network with its published ports, or a TAP device).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{bail, Context, Result};
use guest_init::NetworkConfig;
use serde::{Deserialize, Serialize};
use vmm::net::usernet::{self, Protocol, UserNet, UserNetConfig};
use vmm::net::Tap;
use vmm::NetConfig;

/// Where published ports listen when `-p` names no host address: the host's loopback only.
/// Docker binds every interface by default, which exposes a sandbox to the whole network.
pub const DEFAULT_PUBLISH_IP: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// `--network`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkMode {
    /// The built-in user-mode network (no privileges): NAT, DNS relay, published ports.
    /// The host itself (its loopback as 10.0.2.2, its own and link-local addresses) is
    /// reachable only with `user:allow_host_loopback=true`.
    User {
        /// `allow_host_loopback=true`.
        allow_host_loopback: bool,
    },
    /// Loopback only.
    None,
    /// An existing TAP device (for root users who want line rate).
    Tap(String),
    /// The interface of the network namespace an engine made for the container, taken
    /// over (`engine_net.rs`); loopback only when it has none. Set by `katalite-runc`
    /// only: never parsed from `--network`, since it takes the address off the interface.
    Engine {
        /// The engine's resolv.conf for the container, the guest's DNS.
        resolv_conf: Option<std::path::PathBuf>,
    },
}

impl fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetworkMode::User {
                allow_host_loopback: false,
            } => f.write_str("user"),
            NetworkMode::User {
                allow_host_loopback: true,
            } => f.write_str("user:allow_host_loopback=true"),
            NetworkMode::None => f.write_str("none"),
            NetworkMode::Tap(name) => write!(f, "tap:{name}"),
            NetworkMode::Engine { .. } => f.write_str("engine"),
        }
    }
}

/// The default network: the user network, the host not reachable.
pub const DEFAULT_NETWORK: NetworkMode = NetworkMode::User {
    allow_host_loopback: false,
};

/// `--network user[:allow_host_loopback=true|false]|none|tap:NAME`.
pub fn parse_network(text: &str) -> Result<NetworkMode, String> {
    if let Some(options) = text.strip_prefix("user:") {
        let allow_host_loopback = match options {
            "allow_host_loopback=true" => true,
            "allow_host_loopback=false" => false,
            _ => {
                return Err(format!(
                    "unknown user network option {options:?} (use allow_host_loopback=true)"
                ))
            }
        };
        return Ok(NetworkMode::User {
            allow_host_loopback,
        });
    }
    match text {
        "user" | "default" | "bridge" => Ok(DEFAULT_NETWORK),
        "none" => Ok(NetworkMode::None),
        "host" => Err("host networking is not available: a VM has its own kernel".into()),
        _ => match text.strip_prefix("tap:") {
            // IFNAMSIZ is 16 with the terminating NUL.
            Some(name) if !name.is_empty() && name.len() < 16 && !name.contains('/') => {
                Ok(NetworkMode::Tap(name.to_string()))
            }
            Some(_) => Err(format!("invalid TAP device name in {text:?}")),
            None => Err(format!(
                "unknown network {text:?} (use user, none or tap:NAME)"
            )),
        },
    }
}

/// One `-p [HOSTIP:]HOSTPORT:CONTAINERPORT[/tcp|/udp]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    /// The host address to listen on.
    pub host_ip: IpAddr,
    /// The host port (0: any free port).
    pub host_port: u16,
    /// The port inside the container.
    pub container_port: u16,
    /// TCP or UDP.
    #[serde(with = "protocol_name")]
    pub protocol: Protocol,
}

/// [`Protocol`] as `tcp` or `udp`: the VMM's type has no serde of its own.
mod protocol_name {
    use serde::{de, Deserialize, Deserializer, Serializer};
    use vmm::net::usernet::Protocol;

    pub fn serialize<S: Serializer>(protocol: &Protocol, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(protocol)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Protocol, D::Error> {
        match String::deserialize(deserializer)?.as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            other => Err(de::Error::custom(format!("unknown protocol {other:?}"))),
        }
    }
}

impl fmt::Display for PortMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = SocketAddr::new(self.host_ip, self.host_port);
        write!(f, "{host}->{}/{}", self.container_port, self.protocol)
    }
}

/// Docker's `-p` syntax; an IPv6 host address goes in brackets (`[::1]:8080:80`).
pub fn parse_publish(text: &str) -> Result<PortMapping, String> {
    let (ports, protocol) = match text.rsplit_once('/') {
        Some((ports, "tcp")) => (ports, Protocol::Tcp),
        Some((ports, "udp")) => (ports, Protocol::Udp),
        Some((_, other)) => return Err(format!("invalid protocol {other:?} (tcp or udp)")),
        None => (text, Protocol::Tcp),
    };
    let (host, container) = ports
        .rsplit_once(':')
        .ok_or_else(|| format!("{text:?} is not HOSTPORT:CONTAINERPORT"))?;
    let container_port = port(container)?;
    if container_port == 0 {
        return Err("the container port cannot be 0".into());
    }
    let (host_ip, host_port) = match host.rsplit_once(':') {
        Some((ip, host_port)) => {
            let ip = ip.trim_start_matches('[').trim_end_matches(']');
            let ip = ip
                .parse()
                .map_err(|_| format!("invalid host address {ip:?}"))?;
            (ip, port(host_port)?)
        }
        None => (DEFAULT_PUBLISH_IP, port(host)?),
    };
    Ok(PortMapping {
        host_ip,
        host_port,
        container_port,
        protocol,
    })
}

fn port(text: &str) -> Result<u16, String> {
    text.parse()
        .map_err(|_| format!("invalid port {text:?} (0-65535; ranges are not supported)"))
}

/// The address plan init applies to eth0, or `None` for loopback only. A TAP device gets
/// the same plan as the user network; its owner serves 10.0.2.2/24 on the host side. An
/// engine's interface has its own plan, known once it is taken over ([`attach`]).
pub fn guest_plan(mode: &NetworkMode) -> Option<NetworkConfig> {
    match mode {
        NetworkMode::None | NetworkMode::Engine { .. } => None,
        NetworkMode::User { .. } | NetworkMode::Tap(_) => Some(NetworkConfig {
            address: usernet::GUEST,
            prefix_len: usernet::PREFIX_LEN,
            gateway: usernet::GATEWAY,
            dns: vec![usernet::DNS],
            ipv6: None,
        }),
    }
}

/// The VM's network: the NIC's backend and the plan init applies.
pub struct Attached {
    /// The guest's NIC; `None`: loopback only.
    pub net: Option<NetConfig>,
    /// What init configures on eth0.
    pub plan: Option<NetworkConfig>,
}

/// Opens the network for the VM: binds every published port now, so a port in use fails
/// the run before the guest boots. The VM drops the backend when it ends, which closes
/// every socket and releases the ports.
pub fn attach(mode: &NetworkMode, publish: &[PortMapping]) -> Result<Attached> {
    if !publish.is_empty() && !matches!(mode, NetworkMode::User { .. }) {
        bail!("ports can only be published on the user network, not with --network {mode}");
    }
    let plan = guest_plan(mode);
    let net = match mode {
        NetworkMode::None => None,
        NetworkMode::Engine { resolv_conf } => {
            let adopted = crate::engine_net::adopt(resolv_conf.as_deref())
                .context("cannot take over the engine's network")?;
            return Ok(match adopted {
                Some(adopted) => Attached {
                    net: Some(adopted.net),
                    plan: Some(adopted.plan),
                },
                None => Attached {
                    net: None,
                    plan: None,
                },
            });
        }
        NetworkMode::Tap(name) => {
            let tap = Tap::open(name).with_context(|| format!("cannot use TAP device {name}"))?;
            Some(NetConfig {
                mac: usernet::GUEST_MAC,
                backend: Box::new(tap),
            })
        }
        NetworkMode::User {
            allow_host_loopback,
        } => {
            raise_descriptor_limit();
            let mut config = UserNetConfig::new(usernet::host_resolvers());
            config.host_loopback = *allow_host_loopback;
            let mut net = UserNet::new(config).context("cannot start the user network")?;
            for mapping in publish {
                net.publish(
                    mapping.host_ip,
                    mapping.host_port,
                    mapping.container_port,
                    mapping.protocol,
                )
                .with_context(|| format!("cannot publish {mapping}"))?;
            }
            Some(NetConfig {
                mac: usernet::GUEST_MAC,
                backend: Box::new(net),
            })
        }
    };
    Ok(Attached { net, plan })
}

/// Lifts the soft descriptor limit to the hard one: every guest connection is a host
/// socket, and the common soft limit of 1024 is below the network's connection cap.
fn raise_descriptor_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        // Best effort: with the old limit, connections past it are refused cleanly.
        let _ = setrlimit(Resource::Nofile, limit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_defaults_to_loopback_and_tcp() {
        let mapping = parse_publish("8080:80").expect("valid");
        assert_eq!(mapping.host_ip, DEFAULT_PUBLISH_IP);
        assert_eq!((mapping.host_port, mapping.container_port), (8080, 80));
        assert_eq!(mapping.protocol, Protocol::Tcp);
        assert_eq!(mapping.to_string(), "127.0.0.1:8080->80/tcp");
    }

    #[test]
    fn publish_takes_a_host_address_and_a_protocol() {
        let mapping = parse_publish("0.0.0.0:5353:53/udp").expect("valid");
        assert_eq!(mapping.host_ip, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        assert_eq!(mapping.protocol, Protocol::Udp);
        let mapping = parse_publish("[::1]:8443:443/tcp").expect("valid");
        assert_eq!(mapping.host_ip, "::1".parse::<IpAddr>().expect("ip"));
        assert_eq!((mapping.host_port, mapping.container_port), (8443, 443));
    }

    #[test]
    fn bad_publish_specs_are_refused() {
        for bad in [
            "80",
            "8080:0",
            "x:80",
            "8080:80/sctp",
            "1.2.3:8080:80",
            "8080-8081:80-81",
            "70000:80",
        ] {
            assert!(parse_publish(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn network_modes_parse() {
        assert_eq!(parse_network("user"), Ok(DEFAULT_NETWORK));
        assert_eq!(
            parse_network("user:allow_host_loopback=true"),
            Ok(NetworkMode::User {
                allow_host_loopback: true
            })
        );
        assert_eq!(
            parse_network("user:allow_host_loopback=false"),
            Ok(DEFAULT_NETWORK)
        );
        assert!(parse_network("user:allow_host_loopback=yes").is_err());
        assert!(parse_network("user:other=1").is_err());
        assert_eq!(parse_network("none"), Ok(NetworkMode::None));
        assert_eq!(
            parse_network("tap:tap0"),
            Ok(NetworkMode::Tap("tap0".into()))
        );
        assert!(parse_network("host").is_err());
        assert!(parse_network("tap:").is_err());
        assert!(parse_network("tap:averyveryverylongname").is_err());
        assert!(parse_network("bogus").is_err());
    }

    #[test]
    fn loopback_only_has_no_plan_and_no_backend() {
        assert_eq!(guest_plan(&NetworkMode::None), None);
        let plan = guest_plan(&DEFAULT_NETWORK).expect("user plan");
        assert_eq!(plan.address, usernet::GUEST);
        assert_eq!(plan.dns, vec![usernet::DNS]);
        let none = attach(&NetworkMode::None, &[]).expect("none");
        assert!(none.net.is_none() && none.plan.is_none());
    }

    #[test]
    fn ports_are_published_only_on_the_user_network() {
        let mapping = parse_publish("0:80").expect("valid");
        let err = attach(&NetworkMode::None, &[mapping])
            .map(|_| ())
            .expect_err("refused");
        assert!(err.to_string().contains("--network none"), "{err}");
    }

    #[test]
    fn a_port_in_use_fails_before_boot() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = taken.local_addr().expect("addr").port();
        let mapping = parse_publish(&format!("{port}:80")).expect("valid");
        let err = attach(&DEFAULT_NETWORK, &[mapping])
            .map(|_| ())
            .expect_err("in use");
        assert!(format!("{err:#}").contains("cannot publish"), "{err:#}");
    }
}
