//! The guest's interfaces, configured statically from the run config with the classic
//! socket ioctls (netdevice(7), route(4), ipv6(7)): loopback always up, `eth0` with the
//! address, netmask and default route the host chose, and an IPv6 address and route when
//! the engine's network has them. A few calls do not justify a netlink library or a DHCP
//! client in PID 1.

use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd};

use guest_init::{Ipv6Config, NetworkConfig};
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

/// The loopback interface, up in every container (Docker's `--network none` has it too).
const LOOPBACK: &str = "lo";
/// The virtio-net interface: the only NIC the VMM gives, named by the kernel.
const ETHERNET: &str = "eth0";

/// `RTF_UP | RTF_GATEWAY` from linux/route.h: a usable route through a next hop.
const ROUTE_FLAGS: libc::c_ushort = 0x0001 | 0x0002;
/// `AF_INET` as a `sockaddr` family field (2; libc declares the constant as an int).
const FAMILY_INET: libc::sa_family_t = 2;
/// `IFF_UP` as the `short` of `ifreq`'s flags (1; libc declares it as an int).
const FLAG_UP: libc::c_short = 1;

const _: () = assert!(FAMILY_INET as libc::c_int == libc::AF_INET);
const _: () = assert!(FLAG_UP as libc::c_int == libc::IFF_UP);

/// A failed step of the network setup.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The control socket for the ioctls could not be opened.
    #[error("cannot open a socket to configure the network")]
    Socket(#[source] nix::Error),
    /// One ioctl failed.
    #[error("cannot {what} on {interface}")]
    Ioctl {
        /// What was being done.
        what: &'static str,
        /// The interface.
        interface: &'static str,
        /// The kernel's answer.
        #[source]
        source: nix::Error,
    },
}

/// Brings loopback up and, with a network, configures `eth0` and the default route.
pub fn configure(network: Option<&NetworkConfig>) -> Result<(), NetError> {
    let socket = socket_of(AddressFamily::Inet)?;
    // The kernel gives lo 127.0.0.1/8 and ::1 itself when it comes up.
    set_up(&socket, LOOPBACK)?;
    let Some(network) = network else {
        return Ok(());
    };
    set_addresses(&socket, network.address, netmask(network.prefix_len))?;
    set_up(&socket, ETHERNET)?;
    add_default_route(&socket, network.gateway)?;
    match &network.ipv6 {
        Some(ipv6) => configure_ipv6(&socket, ipv6),
        None => Ok(()),
    }
}

/// `struct in6_ifreq` of linux/ipv6.h.
#[repr(C)]
struct In6Ifreq {
    address: libc::in6_addr,
    prefix_len: u32,
    ifindex: libc::c_int,
}

/// `struct in6_rtmsg` of linux/ipv6_route.h.
#[repr(C)]
struct In6Rtmsg {
    dst: libc::in6_addr,
    src: libc::in6_addr,
    gateway: libc::in6_addr,
    route_type: u32,
    dst_len: u16,
    src_len: u16,
    metric: u32,
    info: libc::c_ulong,
    flags: u32,
    ifindex: libc::c_int,
}

nix::ioctl_readwrite_bad!(get_index, libc::SIOCGIFINDEX, libc::ifreq);
nix::ioctl_write_ptr_bad!(set_if6_address, libc::SIOCSIFADDR, In6Ifreq);
nix::ioctl_write_ptr_bad!(add_route6, libc::SIOCADDRT, In6Rtmsg);

fn in6(address: Ipv6Addr) -> libc::in6_addr {
    libc::in6_addr {
        s6_addr: address.octets(),
    }
}

/// Gives eth0 its global IPv6 address and, with a gateway, the default IPv6 route.
fn configure_ipv6(socket: &OwnedFd, ipv6: &Ipv6Config) -> Result<(), NetError> {
    // Duplicate address detection would hold the address back for a second; the engine
    // gave it to this container alone. Best effort: without it the address comes later.
    let _ = std::fs::write("/proc/sys/net/ipv6/conf/eth0/accept_dad", "0");
    let mut req = request(ETHERNET);
    // SAFETY: SIOCGIFINDEX reads and fills the one ifreq `req` is, alive for the call.
    unsafe { get_index(socket.as_raw_fd(), &mut req) }
        .map_err(failed("read the index", ETHERNET))?;
    // SAFETY: SIOCGIFINDEX filled the union's index member, the one read here.
    let ifindex = unsafe { req.ifr_ifru.ifru_ifindex };
    let socket6 = socket_of(AddressFamily::Inet6)?;
    let address = In6Ifreq {
        address: in6(ipv6.address),
        prefix_len: u32::from(ipv6.prefix_len.min(128)),
        ifindex,
    };
    // SAFETY: SIOCSIFADDR on an AF_INET6 socket reads one struct in6_ifreq, which
    // In6Ifreq mirrors with C layout, alive for the call.
    unsafe { set_if6_address(socket6.as_raw_fd(), &address) }
        .map_err(failed("set the IPv6 address", ETHERNET))?;
    let Some(gateway) = ipv6.gateway else {
        return Ok(());
    };
    let route = In6Rtmsg {
        dst: in6(Ipv6Addr::UNSPECIFIED),
        src: in6(Ipv6Addr::UNSPECIFIED),
        gateway: in6(gateway),
        route_type: 0,
        dst_len: 0,
        src_len: 0,
        metric: 1,
        info: 0,
        flags: u32::from(ROUTE_FLAGS),
        ifindex,
    };
    // SAFETY: SIOCADDRT on an AF_INET6 socket reads one struct in6_rtmsg, which In6Rtmsg
    // mirrors with C layout, alive for the call.
    unsafe { add_route6(socket6.as_raw_fd(), &route) }
        .map_err(failed("add the default IPv6 route", ETHERNET))?;
    Ok(())
}

fn socket_of(family: AddressFamily) -> Result<OwnedFd, NetError> {
    socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None).map_err(NetError::Socket)
}

/// The netmask of a prefix length (lengths above 32 count as 32).
fn netmask(prefix_len: u8) -> Ipv4Addr {
    let bits = u32::from(prefix_len.min(32));
    Ipv4Addr::from(u32::MAX.checked_shl(32 - bits).unwrap_or(0))
}

/// An `ifreq` naming `interface`, everything else zero.
fn request(interface: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain C data (a name array and a union of integers and sockaddrs);
    // all-zero bytes are a valid value of it.
    let mut req: libc::ifreq = unsafe { mem::zeroed() };
    // Names are short ASCII constants of this module, well under IFNAMSIZ with the NUL.
    for (slot, byte) in req.ifr_name.iter_mut().zip(interface.bytes()) {
        *slot = byte as libc::c_char;
    }
    req
}

/// A `sockaddr` holding an IPv4 address (as `sockaddr_in`, which is no larger).
fn sockaddr(address: Ipv4Addr) -> libc::sockaddr {
    let inet = libc::sockaddr_in {
        sin_family: FAMILY_INET,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(address).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes (asserted below at compile time)
    // and the kernel reads a sockaddr's bytes by its family, which is AF_INET here.
    unsafe { mem::transmute::<libc::sockaddr_in, libc::sockaddr>(inet) }
}

const _: () = assert!(mem::size_of::<libc::sockaddr_in>() == mem::size_of::<libc::sockaddr>());

// netdevice(7) and route(4) requests. nix's "bad" macros take the raw request numbers
// and cast them to the C library's request type (an int on musl, unsigned long on glibc).
nix::ioctl_readwrite_bad!(get_flags, libc::SIOCGIFFLAGS, libc::ifreq);
nix::ioctl_write_ptr_bad!(set_flags, libc::SIOCSIFFLAGS, libc::ifreq);
nix::ioctl_write_ptr_bad!(set_if_address, libc::SIOCSIFADDR, libc::ifreq);
nix::ioctl_write_ptr_bad!(set_if_netmask, libc::SIOCSIFNETMASK, libc::ifreq);
nix::ioctl_write_ptr_bad!(add_route, libc::SIOCADDRT, RouteEntry);

/// The error of one failed request.
fn failed(what: &'static str, interface: &'static str) -> impl FnOnce(nix::Error) -> NetError {
    move |source| NetError::Ioctl {
        what,
        interface,
        source,
    }
}

/// Sets the `IFF_UP` flag of `interface`, keeping its other flags.
fn set_up(socket: &OwnedFd, interface: &'static str) -> Result<(), NetError> {
    let fd = socket.as_raw_fd();
    let mut req = request(interface);
    // SAFETY: SIOCGIFFLAGS reads and fills the one ifreq `req` is, alive for the call.
    unsafe { get_flags(fd, &mut req) }.map_err(failed("read the flags", interface))?;
    // SAFETY: SIOCGIFFLAGS filled the union's flags member, the one read here.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | FLAG_UP;
    // SAFETY: SIOCSIFFLAGS reads the one ifreq `req` is, alive for the call.
    unsafe { set_flags(fd, &req) }.map_err(failed("bring the link up", interface))?;
    Ok(())
}

/// Gives eth0 its address and netmask.
fn set_addresses(socket: &OwnedFd, address: Ipv4Addr, mask: Ipv4Addr) -> Result<(), NetError> {
    let fd = socket.as_raw_fd();
    let mut req = request(ETHERNET);
    req.ifr_ifru.ifru_addr = sockaddr(address);
    // SAFETY: SIOCSIFADDR reads the one ifreq `req` is, alive for the call.
    unsafe { set_if_address(fd, &req) }.map_err(failed("set the address", ETHERNET))?;
    req.ifr_ifru.ifru_addr = sockaddr(mask);
    // SAFETY: SIOCSIFNETMASK reads the one ifreq `req` is, alive for the call.
    unsafe { set_if_netmask(fd, &req) }.map_err(failed("set the netmask", ETHERNET))?;
    Ok(())
}

/// `struct rtentry` of linux/route.h, declared here because the libc crate has it for musl
/// only, and init's tests build for the host's glibc too.
#[repr(C)]
struct RouteEntry {
    pad1: libc::c_ulong,
    dst: libc::sockaddr,
    gateway: libc::sockaddr,
    genmask: libc::sockaddr,
    flags: libc::c_ushort,
    pad2: libc::c_short,
    pad3: libc::c_ulong,
    pad4: *mut libc::c_void,
    metric: libc::c_short,
    dev: *mut libc::c_char,
    mtu: libc::c_ulong,
    window: libc::c_ulong,
    irtt: libc::c_ushort,
}

/// Adds `default via gateway` (destination and mask 0.0.0.0; the kernel picks eth0, whose
/// subnet holds the gateway).
fn add_default_route(socket: &OwnedFd, gateway: Ipv4Addr) -> Result<(), NetError> {
    let route = RouteEntry {
        pad1: 0,
        dst: sockaddr(Ipv4Addr::UNSPECIFIED),
        gateway: sockaddr(gateway),
        genmask: sockaddr(Ipv4Addr::UNSPECIFIED),
        flags: ROUTE_FLAGS,
        pad2: 0,
        pad3: 0,
        pad4: std::ptr::null_mut(),
        metric: 0,
        dev: std::ptr::null_mut(),
        mtu: 0,
        window: 0,
        irtt: 0,
    };
    // SAFETY: SIOCADDRT reads one struct rtentry, which RouteEntry mirrors field for field
    // with C layout; the null device pointer asks the kernel to choose the interface.
    unsafe { add_route(socket.as_raw_fd(), &route) }
        .map_err(failed("add the default route", ETHERNET))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netmasks_follow_the_prefix_length() {
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(32), Ipv4Addr::BROADCAST);
        assert_eq!(netmask(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(netmask(40), Ipv4Addr::BROADCAST);
        assert_eq!(netmask(17), Ipv4Addr::new(255, 255, 128, 0));
    }

    #[test]
    fn addresses_are_in_network_byte_order() {
        let addr = sockaddr(Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(addr.sa_family, FAMILY_INET);
        // sa_data: two port bytes, then the address as it goes on the wire.
        let bytes: Vec<u8> = addr.sa_data[2..6].iter().map(|&b| b as u8).collect();
        assert_eq!(bytes, [10, 0, 2, 15]);
    }

    #[test]
    fn the_route_entry_has_the_kernels_size() {
        // sizeof(struct rtentry) on x86-64, alignment padding included.
        assert_eq!(mem::size_of::<RouteEntry>(), 120);
        // sizeof(struct in6_ifreq) and sizeof(struct in6_rtmsg) on x86-64.
        assert_eq!(mem::size_of::<In6Ifreq>(), 24);
        assert_eq!(mem::size_of::<In6Rtmsg>(), 80);
    }

    #[test]
    fn interface_names_are_nul_terminated() {
        let req = request("eth0");
        assert_eq!(
            req.ifr_name[..5],
            [b'e' as libc::c_char, b't' as _, b'h' as _, b'0' as _, 0]
        );
    }
}
