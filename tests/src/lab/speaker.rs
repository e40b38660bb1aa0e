//! The speaker's announcements, as MetalLB L2 sends them: gratuitous ARP and unsolicited
//! neighbour advertisements written to an `AF_PACKET` raw socket. `ip addr add` sends neither
//! (kernel-notes.md), so without these a client keeps the old owner's MAC.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::netns::Netns;

const BROADCAST: [u8; 6] = [0xff; 6];
/// Ethernet address of ff02::1 (all nodes).
const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
/// Announcements are spread a little, as a speaker's are, rather than sent as one burst.
const SPACING: Duration = Duration::from_millis(20);

/// Sends `count` gratuitous ARP announcements for `ip` out of `ifname` in `ns`: broadcast ARP
/// requests whose sender and target IP are both `ip` (the form the kernel treats as gratuitous
/// and lets override a neighbour entry at once). `count` 0 sends nothing. Returns frames sent.
pub fn send_garp(ns: &Netns, ifname: &str, ip: Ipv4Addr, count: u32) -> Result<u32> {
    send_frames(ns, ifname, count, |link| garp_frame(link.mac, ip))
}

/// Sends `count` unsolicited neighbour advertisements for `ip` out of `ifname` in `ns`: ICMPv6
/// type 136 to ff02::1, hop limit 255, Override set, with the target link-layer address option,
/// from the interface's link-local address (as MetalLB) or, lacking one, from `ip`. Returns
/// frames sent.
pub fn send_unsolicited_na(ns: &Netns, ifname: &str, ip: Ipv6Addr, count: u32) -> Result<u32> {
    send_frames(ns, ifname, count, |link| {
        na_frame(link.mac, link.link_local.unwrap_or(ip), ip)
    })
}

fn send_frames(
    ns: &Netns,
    ifname: &str,
    count: u32,
    frame: impl Fn(&RawLink) -> Vec<u8> + Sync,
) -> Result<u32> {
    if count == 0 {
        return Ok(0);
    }
    ns.run(|| send_here(ifname, count, &frame))?
        .with_context(|| format!("announcing on {ifname} in {}", ns.name))
}

/// Sends `count` gratuitous ARPs (IPv4) or unsolicited NAs (IPv6) for `ip` out of `ifname` of
/// the caller's own namespace (the lab's speaker process). Returns frames sent.
pub fn announce_here(ifname: &str, ip: std::net::IpAddr, count: u32) -> Result<u32> {
    match ip {
        std::net::IpAddr::V4(v) => send_here(ifname, count, |link| garp_frame(link.mac, v)),
        std::net::IpAddr::V6(v) => send_here(ifname, count, |link| {
            na_frame(link.mac, link.link_local.unwrap_or(v), v)
        }),
    }
}

fn send_here(ifname: &str, count: u32, frame: impl Fn(&RawLink) -> Vec<u8>) -> Result<u32> {
    let sock = RawLink::open(ifname)?;
    let frame = frame(&sock);
    for i in 0..count {
        if i > 0 {
            std::thread::sleep(SPACING);
        }
        sock.send(&frame)?;
    }
    Ok(count)
}

/// An `AF_PACKET` socket bound to nothing, sending whole Ethernet frames out of one interface.
struct RawLink {
    fd: OwnedFd,
    ifindex: i32,
    mac: [u8; 6],
    link_local: Option<Ipv6Addr>,
}

impl RawLink {
    fn open(ifname: &str) -> Result<Self> {
        let cname = std::ffi::CString::new(ifname)?;
        // SAFETY: a valid NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if ifindex == 0 {
            bail!("no interface {ifname}: {}", std::io::Error::last_os_error());
        }
        // Protocol 0: this socket only sends, so it receives nothing.
        // SAFETY: plain socket call; the fd is owned below.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ifreq is plain data; all-zero is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(cname.as_bytes_with_nul()) {
            *dst = *src as libc::c_char;
        }
        // SAFETY: SIOCGIFHWADDR fills ifr_hwaddr of the ifreq we pass.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFHWADDR, &raw mut ifr) } != 0 {
            bail!(
                "SIOCGIFHWADDR {ifname}: {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: the ioctl above set the hwaddr member of the union.
        let data = unsafe { ifr.ifr_ifru.ifru_hwaddr.sa_data };
        let mut mac = [0u8; 6];
        for (m, d) in mac.iter_mut().zip(data) {
            *m = d as u8;
        }
        Ok(Self {
            fd,
            ifindex: i32::try_from(ifindex)?,
            mac,
            link_local: link_local(ifname),
        })
    }

    fn send(&self, frame: &[u8]) -> Result<()> {
        // SAFETY: sockaddr_ll is plain data; all-zero is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = self.ifindex;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: a valid buffer and sockaddr of the stated sizes.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const sll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if n < 0 {
            bail!("sendto: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The fe80::/10 address of `ifname` in the calling thread's namespace.
fn link_local(ifname: &str) -> Option<Ipv6Addr> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we free below.
    if unsafe { libc::getifaddrs(&raw mut list) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cur = list;
    while !cur.is_null() && found.is_none() {
        // SAFETY: a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        // SAFETY: ifa_name is a NUL-terminated string; ifa_addr, when set, is a sockaddr whose
        // family says its type.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        if name.to_bytes() != ifname.as_bytes()
            || ifa.ifa_addr.is_null()
            || i32::from(unsafe { (*ifa.ifa_addr).sa_family }) != libc::AF_INET6
        {
            continue;
        }
        // SAFETY: an AF_INET6 address is a sockaddr_in6.
        let sin6 = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in6>() };
        let a = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
        if a.segments()[0] & 0xffc0 == 0xfe80 {
            found = Some(a);
        }
    }
    // SAFETY: the list from getifaddrs above, freed once.
    unsafe { libc::freeifaddrs(list) };
    found
}

fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(86);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

fn garp_frame(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let mut f = ethernet(BROADCAST, mac, ETH_P_ARP);
    f.extend_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&1u16.to_be_bytes()); // request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&ip.octets());
    f
}

fn na_frame(mac: [u8; 6], src: Ipv6Addr, ip: Ipv6Addr) -> Vec<u8> {
    const ICMPV6: u8 = 58;
    let dst = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    // Type 136, code 0, checksum, flags (Override), reserved, target, option 2 (target
    // link-layer address, 8 bytes).
    let mut icmp = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
    icmp.extend_from_slice(&ip.octets());
    icmp.extend_from_slice(&[2, 1]);
    icmp.extend_from_slice(&mac);
    let sum = icmpv6_checksum(src, dst, &icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());

    let mut f = ethernet(ALL_NODES_MAC, mac, ETH_P_IPV6);
    f.extend_from_slice(&[0x60, 0, 0, 0]); // version 6, no class or flow label
    f.extend_from_slice(&u16::try_from(icmp.len()).unwrap_or(0).to_be_bytes());
    f.extend_from_slice(&[ICMPV6, 255]); // next header, hop limit 255 (ndisc requires it)
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&icmp);
    f
}

/// RFC 4443 checksum over the IPv6 pseudo-header and the ICMPv6 message.
fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, msg: &[u8]) -> u16 {
    let mut data = Vec::with_capacity(40 + msg.len());
    data.extend_from_slice(&src.octets());
    data.extend_from_slice(&dst.octets());
    data.extend_from_slice(&u32::try_from(msg.len()).unwrap_or(0).to_be_bytes());
    data.extend_from_slice(&[0, 0, 0, 58]);
    data.extend_from_slice(msg);
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garp_is_a_broadcast_request_for_itself() {
        let mac = [2, 0, 0, 0, 0, 1];
        let f = garp_frame(mac, Ipv4Addr::new(10, 200, 0, 100));
        assert_eq!(f.len(), 42);
        assert_eq!(&f[..6], &BROADCAST);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1], "request");
        assert_eq!(&f[28..32], &f[38..42], "sender IP = target IP");
    }

    #[test]
    fn na_checksum_verifies() {
        let mac = [2, 0, 0, 0, 0, 1];
        let ip: Ipv6Addr = "fd00:200::100".parse().unwrap();
        let src: Ipv6Addr = "fe80::1".parse().unwrap();
        let f = na_frame(mac, src, ip);
        assert_eq!(f.len(), 14 + 40 + 32);
        assert_eq!(f[14 + 7], 255, "hop limit");
        let icmp = &f[54..];
        // Summing a message that carries its checksum gives 0 (after complement).
        assert_eq!(icmpv6_checksum(src, "ff02::1".parse().unwrap(), icmp), 0);
        assert_eq!(icmp[4] & 0x20, 0x20, "override");
        assert_eq!(
            icmp[4] & 0x40,
            0,
            "not solicited (it goes to a multicast address)"
        );
    }
}
