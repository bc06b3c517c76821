//! Reads where a redirected connection was going before iptables' REDIRECT rewrote it.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

/// `SO_ORIGINAL_DST` and `IP6T_SO_ORIGINAL_DST` share this value (linux/netfilter_ipv4.h, ip6_tables.h).
const SO_ORIGINAL_DST: libc::c_int = 80;

/// The original destination of an accepted, NAT-redirected TCP connection.
///
/// Fails with `ENOENT` when the connection was not redirected (no conntrack NAT entry).
pub fn original_dst(sock: &impl AsRawFd, local: SocketAddr) -> io::Result<SocketAddr> {
    let fd = sock.as_raw_fd();
    match local {
        SocketAddr::V4(_) => {
            // SAFETY: zeroed sockaddr_in is a valid value; getsockopt writes at most `len` bytes.
            let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let rc = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_IP,
                    SO_ORIGINAL_DST,
                    &mut addr as *mut _ as *mut libc::c_void,
                    &mut len,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
            Ok(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(addr.sin_port),
            )))
        }
        SocketAddr::V6(_) => {
            // SAFETY: as above, for sockaddr_in6.
            let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            let rc = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_IPV6,
                    SO_ORIGINAL_DST,
                    &mut addr as *mut _ as *mut libc::c_void,
                    &mut len,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            let ip = Ipv6Addr::from(addr.sin6_addr.s6_addr);
            let v6 = SocketAddrV6::new(ip, u16::from_be(addr.sin6_port), 0, 0);
            // A v4 connection accepted on a dual-stack socket reports a v4-mapped address.
            Ok(match v6.ip().to_ipv4_mapped() {
                Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, v6.port())),
                None => SocketAddr::V6(v6),
            })
        }
    }
}
