//! The network an engine gave the container (dockerd's bridge, CNI): the VM takes over the
//! interface of the network namespace katalite's process runs in. Its IPv4 address,
//! prefix, default gateway and MAC become the guest's, and so do its global IPv6 address
//! and default IPv6 route when the network has them; the engine's resolv.conf is its DNS;
//! the namespace's own stack gives the addresses up (so it no longer answers ARP, neighbour
//! discovery or connections for them) and a packet socket carries the frames between the interface and
//! the guest's NIC. Engines then publish ports (`docker run -p`) to that address as for
//! runc. Only ever done in a namespace made for the container (`katalite-runc`).

use std::fs;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use anyhow::{bail, Context, Result};
use guest_init::{Ipv6Config, NetworkConfig};
use vmm::net::{NetConfig, PacketSocket};

// The interface ioctls (linux/sockios.h), typed as `ioctl` takes them on every libc.
const SIOCGIFADDR: libc::Ioctl = 0x8915;
const SIOCSIFADDR: libc::Ioctl = 0x8916;
const SIOCGIFNETMASK: libc::Ioctl = 0x891b;
const SIOCGIFHWADDR: libc::Ioctl = 0x8927;
const SIOCGIFINDEX: libc::Ioctl = 0x8933;

/// The interface taken over, ready for the VM.
pub struct Adopted {
    /// The guest's NIC on the interface.
    pub net: NetConfig,
    /// What init configures on eth0.
    pub plan: NetworkConfig,
}

/// Takes over the first interface other than loopback of this process's network
/// namespace; `None` when it has none (or none with an IPv4 address): loopback only.
pub fn adopt(resolv_conf: Option<&Path>) -> Result<Option<Adopted>> {
    let dev = fs::read_to_string("/proc/self/net/dev").context("cannot list interfaces")?;
    let Some(name) = interfaces(&dev).into_iter().next() else {
        return Ok(None);
    };
    let socket = Ioctls::new()?;
    let Some((address, netmask)) = socket.ipv4(&name)? else {
        return Ok(None);
    };
    let mac = socket.mac(&name)?;
    let index = socket.index(&name)?;
    let routes = fs::read_to_string("/proc/self/net/route").context("cannot read routes")?;
    let gateway = default_gateway(&routes, &name).unwrap_or(Ipv4Addr::UNSPECIFIED);
    let dns = match resolv_conf {
        Some(path) => nameservers(&fs::read_to_string(path).unwrap_or_default()),
        None => Vec::new(),
    };
    let inet6 = fs::read_to_string("/proc/self/net/if_inet6").unwrap_or_default();
    let routes6 = fs::read_to_string("/proc/self/net/ipv6_route").unwrap_or_default();
    let ipv6 = global_ipv6(&inet6, &name).map(|(address, prefix_len)| Ipv6Config {
        address,
        prefix_len,
        gateway: default_gateway6(&routes6, &name),
    });
    let plan = NetworkConfig {
        address,
        prefix_len: u8::try_from(u32::from(netmask).count_ones()).unwrap_or(32),
        gateway,
        dns,
        ipv6,
    };
    // The namespace's stack lets go of the address, and of IPv6 on the interface (its
    // addresses, and the link-local one the guest's would duplicate), before the guest
    // takes the MAC.
    let _ = fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    socket
        .clear_ipv4(&name)
        .with_context(|| format!("cannot take the address off {name}"))?;
    let backend = PacketSocket::open(index)
        .with_context(|| format!("cannot open a packet socket on {name}"))?;
    Ok(Some(Adopted {
        net: NetConfig {
            mac,
            backend: Box::new(backend),
        },
        plan,
    }))
}

/// Interface names of `/proc/net/dev`, loopback left out, in the kernel's order.
fn interfaces(dev: &str) -> Vec<String> {
    dev.lines()
        .skip(2)
        .filter_map(|line| line.split_once(':'))
        .map(|(name, _)| name.trim().to_string())
        .filter(|name| name != "lo" && !name.is_empty())
        .collect()
}

/// The default route's gateway through `interface`, from `/proc/net/route` (addresses
/// in the kernel's byte order, hex).
fn default_gateway(routes: &str, interface: &str) -> Option<Ipv4Addr> {
    routes.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [iface, "00000000", gateway, ..] if *iface == interface => {
                let raw = u32::from_str_radix(gateway, 16).ok()?;
                Some(Ipv4Addr::from(raw.to_le_bytes()))
            }
            _ => None,
        }
    })
}

/// The first global-scope IPv6 address of `interface` and its prefix length, from
/// `/proc/net/if_inet6` (address, index, prefix length, scope, flags in hex; name).
fn global_ipv6(if_inet6: &str, interface: &str) -> Option<(Ipv6Addr, u8)> {
    if_inet6.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [address, _, prefix, "00", _, name] if *name == interface => {
                let address = Ipv6Addr::from(u128::from_str_radix(address, 16).ok()?);
                Some((address, u8::from_str_radix(prefix, 16).ok()?))
            }
            _ => None,
        }
    })
}

/// The default IPv6 route's next hop through `interface`, from `/proc/net/ipv6_route`
/// (destination, its length, source, its length, next hop, metric, counters, flags,
/// name).
fn default_gateway6(routes: &str, interface: &str) -> Option<Ipv6Addr> {
    const ANY: &str = "00000000000000000000000000000000";
    routes.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [ANY, "00", _, _, hop, _, _, _, _, name] if *name == interface && *hop != ANY => {
                Some(Ipv6Addr::from(u128::from_str_radix(hop, 16).ok()?))
            }
            _ => None,
        }
    })
}

/// IPv4 `nameserver` lines of a resolv.conf; loopback resolvers (Docker's embedded DNS
/// at 127.0.0.11) are the namespace's own and unreachable from the guest.
fn nameservers(resolv_conf: &str) -> Vec<Ipv4Addr> {
    resolv_conf
        .lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<Ipv4Addr>().ok())
        .filter(|address| !address.is_loopback())
        .collect()
}

/// The interface ioctls of an AF_INET datagram socket.
struct Ioctls(OwnedFd);

impl Ioctls {
    fn new() -> Result<Self> {
        // SAFETY: socket(2) takes plain integers; the result is checked.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error()).context("cannot open an ioctl socket");
        }
        // SAFETY: `raw` is a new descriptor owned by nothing else.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(raw) }))
    }

    /// `request` on a `struct ifreq` naming `name`; the kernel's answer.
    fn ifreq(
        &self,
        name: &str,
        request: libc::Ioctl,
        input: Option<libc::sockaddr>,
    ) -> io::Result<libc::ifreq> {
        // SAFETY: an all-zero ifreq is a valid value of the plain C struct.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        for (slot, byte) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *slot = libc::c_char::from_ne_bytes([byte]);
        }
        if let Some(address) = input {
            ifr.ifr_ifru.ifru_addr = address;
        }
        // SAFETY: the SIOC* requests used here read and write one ifreq, which `ifr` is,
        // alive for the call.
        let rc = unsafe { libc::ioctl(self.0.as_raw_fd(), request, &mut ifr) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ifr)
    }

    /// The interface's IPv4 address and netmask; `None` when it has no address.
    fn ipv4(&self, name: &str) -> Result<Option<(Ipv4Addr, Ipv4Addr)>> {
        let address = match self.ifreq(name, SIOCGIFADDR, None) {
            Ok(ifr) => ifr,
            Err(err) if err.raw_os_error() == Some(libc::EADDRNOTAVAIL) => return Ok(None),
            Err(err) => return Err(err).with_context(|| format!("cannot read {name}'s address")),
        };
        let netmask = self
            .ifreq(name, SIOCGIFNETMASK, None)
            .with_context(|| format!("cannot read {name}'s netmask"))?;
        // SAFETY: for these requests the kernel fills the union's sockaddr member.
        let (address, netmask) =
            unsafe { (address.ifr_ifru.ifru_addr, netmask.ifr_ifru.ifru_netmask) };
        Ok(Some((inet(&address), inet(&netmask))))
    }

    fn mac(&self, name: &str) -> Result<[u8; 6]> {
        let ifr = self
            .ifreq(name, SIOCGIFHWADDR, None)
            .with_context(|| format!("cannot read {name}'s MAC address"))?;
        // SAFETY: SIOCGIFHWADDR fills the union's hardware-address sockaddr.
        let data = unsafe { ifr.ifr_ifru.ifru_hwaddr.sa_data };
        let mut mac = [0u8; 6];
        for (byte, c) in mac.iter_mut().zip(data) {
            *byte = c.to_ne_bytes()[0];
        }
        if mac == [0; 6] {
            bail!("{name} has no MAC address");
        }
        Ok(mac)
    }

    fn index(&self, name: &str) -> Result<u32> {
        let ifr = self
            .ifreq(name, SIOCGIFINDEX, None)
            .with_context(|| format!("cannot find {name}"))?;
        // SAFETY: SIOCGIFINDEX fills the union's index member.
        let index = unsafe { ifr.ifr_ifru.ifru_ifindex };
        u32::try_from(index).context("negative interface index")
    }

    /// Sets the address to 0.0.0.0, which removes it (and its routes).
    fn clear_ipv4(&self, name: &str) -> io::Result<()> {
        // SAFETY: an all-zero sockaddr_in is valid; it is read as the generic sockaddr of
        // the same size.
        let mut any: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        any.sin_family = u16::try_from(libc::AF_INET).unwrap_or_default();
        // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes).
        let address: libc::sockaddr = unsafe { std::mem::transmute(any) };
        self.ifreq(name, SIOCSIFADDR, Some(address)).map(|_| ())
    }
}

/// The IPv4 address in a `sockaddr` that holds a `sockaddr_in`.
fn inet(address: &libc::sockaddr) -> Ipv4Addr {
    let bytes: Vec<u8> = address.sa_data[2..6]
        .iter()
        .map(|c| c.to_ne_bytes()[0])
        .collect();
    Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interfaces_skip_loopback() {
        let dev = "Inter-|   Receive\n face |bytes\n    lo: 1 2 3\n  eth0: 4 5 6\nveth1: 7\n";
        assert_eq!(interfaces(dev), ["eth0", "veth1"]);
    }

    #[test]
    fn the_default_gateway_is_read_in_kernel_byte_order() {
        let routes = "Iface\tDestination\tGateway \tFlags\n\
                      eth0\t00000000\t010011AC\t0003\n\
                      eth0\t000011AC\t00000000\t0001\n";
        assert_eq!(
            default_gateway(routes, "eth0"),
            Some(Ipv4Addr::new(172, 17, 0, 1))
        );
        assert_eq!(default_gateway(routes, "eth1"), None);
    }

    #[test]
    fn the_global_ipv6_address_and_gateway_are_read_from_proc() {
        let inet6 = "fe80000000000000004242fffeac1102 0a 40 20 80     eth0\n\
                     fd00dead000000000000000000000002 0a 40 00 80     eth0\n\
                     00000000000000000000000000000001 01 80 10 80       lo\n";
        assert_eq!(
            global_ipv6(inet6, "eth0"),
            Some(("fd00:dead::2".parse().expect("v6"), 64))
        );
        assert_eq!(global_ipv6(inet6, "lo"), None);
        let routes = "fd00dead000000000000000000000000 40 00000000000000000000000000000000 00 \
                      00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n\
                      00000000000000000000000000000000 00 00000000000000000000000000000000 00 \
                      fd00dead000000000000000000000001 00000400 00000001 00000000 00000003     eth0\n";
        assert_eq!(
            default_gateway6(routes, "eth0"),
            Some("fd00:dead::1".parse().expect("v6"))
        );
        assert_eq!(default_gateway6(routes, "eth1"), None);
    }

    #[test]
    fn nameservers_are_ipv4_and_not_loopback() {
        let conf = "# docker\nnameserver 10.0.3.3\nnameserver 127.0.0.11\nnameserver ::1\n\
                    search lab\nnameserver 8.8.8.8\n";
        assert_eq!(
            nameservers(conf),
            [Ipv4Addr::new(10, 0, 3, 3), Ipv4Addr::new(8, 8, 8, 8)]
        );
    }
}
