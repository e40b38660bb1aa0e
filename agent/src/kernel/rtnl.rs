//! What a network namespace knows about addresses, read over rtnetlink: the addresses
//! configured on its interfaces (with each interface's MAC) and its neighbour table. Plain
//! `NETLINK_ROUTE` dumps: the socket belongs to the namespace of the thread that opens it
//! (see [`super::netns::in_netns`]).

use std::{
    collections::BTreeMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use crate::event::values::Mac;

/// An address configured on an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Addr {
    pub ip: IpAddr,
    pub prefix: u8,
    pub ifindex: u32,
    pub ifname: String,
    /// The interface's MAC (`None` for interfaces without one, as loopback).
    pub mac: Option<Mac>,
}

/// A neighbour-table entry with a link-layer address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub ip: IpAddr,
    pub mac: Mac,
    /// NUD state bits (`NUD_REACHABLE` 0x02, `NUD_STALE` 0x04, …).
    pub state: u16,
    pub ifindex: u32,
}

const RTM_GETLINK: u16 = 18;
const RTM_GETADDR: u16 = 22;
const RTM_GETNEIGH: u16 = 30;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
/// Entries that carry no usable address (`NUD_INCOMPLETE`, `NUD_FAILED`, `NUD_NOARP`).
const NUD_UNUSABLE: u16 = 0x01 | 0x20 | 0x40;

/// Interfaces, their addresses and the neighbour table of the current thread's namespace.
pub fn addresses() -> io::Result<Vec<Addr>> {
    let sock = Rtnl::open()?;
    let mut links: BTreeMap<u32, (String, Option<Mac>)> = BTreeMap::new();
    // ifinfomsg: family, pad, type u16, index i32, flags u32, change u32 (16 bytes).
    sock.dump(RTM_GETLINK, &[0u8; 16], |body| {
        let ifindex = u32::from_ne_bytes(body.get(4..8)?.try_into().ok()?);
        let (mut name, mut mac) = (String::new(), None);
        for (ty, v) in attrs(body.get(16..)?) {
            match ty {
                IFLA_IFNAME => {
                    name = String::from_utf8_lossy(v.split(|b| *b == 0).next()?).into_owned();
                }
                IFLA_ADDRESS if v.len() == 6 => mac = Some(Mac(v.try_into().ok()?)),
                _ => {}
            }
        }
        links.insert(ifindex, (name, mac.filter(|m| !m.is_zero())));
        Some(())
    })?;
    let mut out = Vec::new();
    // ifaddrmsg: family, prefixlen, flags, scope, index u32 (8 bytes).
    sock.dump(RTM_GETADDR, &[0u8; 8], |body| {
        let (family, prefix) = (*body.first()?, *body.get(1)?);
        let ifindex = u32::from_ne_bytes(body.get(4..8)?.try_into().ok()?);
        let mut ip = None;
        for (ty, v) in attrs(body.get(8..)?) {
            // IFA_LOCAL is the address itself on point-to-point links; IFA_ADDRESS otherwise.
            if ty == IFA_LOCAL || (ty == IFA_ADDRESS && ip.is_none()) {
                ip = ip_of(family, v);
            }
        }
        let (ifname, mac) = links.get(&ifindex).cloned().unwrap_or_default();
        out.push(Addr {
            ip: ip?,
            prefix,
            ifindex,
            ifname,
            mac,
        });
        Some(())
    })?;
    Ok(out)
}

/// The neighbour table (IPv4 and IPv6) of the current thread's namespace: entries with a MAC.
pub fn neighbours() -> io::Result<Vec<Neighbour>> {
    let sock = Rtnl::open()?;
    let mut out = Vec::new();
    // ndmsg: family, pad×3, ifindex i32, state u16, flags u8, type u8 (12 bytes).
    sock.dump(RTM_GETNEIGH, &[0u8; 12], |body| {
        let family = *body.first()?;
        let ifindex = u32::from_ne_bytes(body.get(4..8)?.try_into().ok()?);
        let state = u16::from_ne_bytes(body.get(8..10)?.try_into().ok()?);
        let (mut ip, mut mac) = (None, None);
        for (ty, v) in attrs(body.get(12..)?) {
            match ty {
                NDA_DST => ip = ip_of(family, v),
                NDA_LLADDR if v.len() == 6 => mac = Some(Mac(v.try_into().ok()?)),
                _ => {}
            }
        }
        if state & NUD_UNUSABLE == 0 {
            out.push(Neighbour {
                ip: ip?,
                mac: mac?,
                state,
                ifindex,
            });
        }
        Some(())
    })?;
    Ok(out)
}

fn ip_of(family: u8, v: &[u8]) -> Option<IpAddr> {
    match (i32::from(family), v.len()) {
        (libc::AF_INET, 4) => Some(Ipv4Addr::from(<[u8; 4]>::try_from(v).ok()?).into()),
        (libc::AF_INET6, 16) => Some(Ipv6Addr::from(<[u8; 16]>::try_from(v).ok()?).into()),
        _ => None,
    }
}

/// The attributes (type, value) of a message body, 4-byte aligned.
fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16::from_ne_bytes(b.get(0..2)?.try_into().ok()?));
        let ty = u16::from_ne_bytes(b.get(2..4)?.try_into().ok()?) & 0x3fff;
        let v = b.get(4..len)?;
        b = b.get(align(len)..).unwrap_or(&[]);
        Some((ty, v))
    })
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

struct Rtnl(OwnedFd);

impl Rtnl {
    fn open() -> io::Result<Self> {
        // SAFETY: plain socket call; the fd is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd we own.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Sends a dump request and hands each answer's body to `each` (a body it cannot read is
    /// skipped) until the kernel says done.
    fn dump(
        &self,
        ty: u16,
        header: &[u8],
        mut each: impl FnMut(&[u8]) -> Option<()>,
    ) -> io::Result<()> {
        let len = 16 + header.len();
        let mut req = Vec::with_capacity(len);
        req.extend_from_slice(&u32::try_from(len).unwrap_or(0).to_ne_bytes());
        req.extend_from_slice(&ty.to_ne_bytes());
        req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        req.extend_from_slice(&1u32.to_ne_bytes());
        req.extend_from_slice(&0u32.to_ne_bytes());
        req.extend_from_slice(header);
        // SAFETY: a valid buffer of the stated length; the kernel is the default destination.
        if unsafe { libc::send(self.0.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 1 << 16];
        loop {
            // SAFETY: receiving into a buffer we own, of its length.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
            let mut msgs = &buf[..n];
            while msgs.len() >= 16 {
                let mlen = u32::from_ne_bytes(msgs[0..4].try_into().unwrap_or_default()) as usize;
                let mty = u16::from_ne_bytes([msgs[4], msgs[5]]);
                if mlen < 16 || mlen > msgs.len() {
                    return Err(io::Error::other("truncated netlink message"));
                }
                match mty {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let code = i32::from_ne_bytes(msgs[16..20].try_into().unwrap_or_default());
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                    _ => {
                        let _ = each(&msgs[16..mlen]);
                    }
                }
                msgs = msgs.get(align(mlen)..).unwrap_or(&[]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_walked_with_their_padding() {
        // IFLA_IFNAME "lo\0" (len 7, padded to 8), then IFLA_ADDRESS of 6 bytes.
        let mut b = vec![7, 0, 3, 0, b'l', b'o', 0, 0];
        b.extend_from_slice(&[10, 0, 1, 0, 2, 0, 0, 0, 0, 1, 0, 0]);
        let got: Vec<(u16, usize)> = attrs(&b).map(|(t, v)| (t, v.len())).collect();
        assert_eq!(got, [(3, 3), (1, 6)]);
        // A length past the end stops the walk instead of reading beyond.
        assert_eq!(attrs(&[200, 0, 1, 0, 1]).count(), 0);
    }

    #[test]
    fn reads_this_namespace() {
        // Any namespace has loopback; reading needs no privilege.
        let addrs = addresses().unwrap();
        assert!(addrs.iter().any(|a| a.ip.is_loopback()), "{addrs:?}");
        neighbours().unwrap();
    }
}
