//! Reading an skb: where it came from, and its L3/L4 headers with bounded reads.

use agent_common::{HostKey, PacketInfo, Tuple, FAMILY_IPV4, FAMILY_IPV6, FAMILY_NONE};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::{
    conf,
    kernel::{netns_inum, read},
    maps::HOST_FILTER,
};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_SCTP: u8 = 132;
/// `skb->network_header` when unset (`(u16)~0U`).
const HEADER_UNSET: u16 = 0xffff;
/// IPv6 extension headers followed before giving up on the transport header.
const MAX_IPV6_EXT: usize = 4;

/// Where the skb came from: interface and network namespace.
pub struct Origin {
    pub ifindex: u32,
    pub netns: u32,
    /// `struct net *` of that namespace (0 when unknown).
    pub net: u64,
    pub ifname: [u8; 16],
}

/// The packet's own 5-tuple, in the layout of a conntrack tuple.
#[inline(always)]
pub fn flow_of(pkt: &PacketInfo) -> Tuple {
    Tuple {
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.l4_proto,
        family: pkt.family,
        _pad0: [0; 2],
    }
}

/// The skb's device gives ifindex and netns; without a device the socket gives the netns.
#[inline(always)]
pub fn skb_origin(skb: u64) -> Origin {
    let dev = read::<u64>(skb, conf!(skb_dev)).unwrap_or(0);
    if dev != 0 {
        let ifindex = read::<u32>(dev, conf!(dev_ifindex)).unwrap_or(0);
        let net = read::<u64>(dev, conf!(dev_nd_net)).unwrap_or(0);
        return Origin {
            ifindex,
            netns: netns_inum(net),
            net,
            ifname: read::<[u8; 16]>(dev, conf!(dev_name)).unwrap_or([0; 16]),
        };
    }
    let sk = read::<u64>(skb, conf!(skb_sk)).unwrap_or(0);
    let net = read::<u64>(sk, conf!(sk_net)).unwrap_or(0);
    Origin {
        ifindex: 0,
        netns: netns_inum(net),
        net,
        ifname: [0; 16],
    }
}

/// Parses L3 and L4 headers from `skb->head + skb->network_header` with bounded reads.
#[inline(always)]
pub fn parse_packet(skb: u64, pkt: &mut PacketInfo) -> Result<(), i32> {
    pkt.len = read::<u32>(skb, conf!(skb_len))?;
    pkt.l3_proto = u16::from_be(read::<u16>(skb, conf!(skb_protocol))?);
    let head = read::<u64>(skb, conf!(skb_head))?;
    let nh = read::<u16>(skb, conf!(skb_network_header))?;
    if nh == HEADER_UNSET {
        return Ok(());
    }
    let l3 = head + u64::from(nh);
    let (l4_proto, l4) = match pkt.l3_proto {
        ETH_P_IP => {
            let ip = read::<Ipv4Hdr>(l3, 0)?;
            if ip.vihl >> 4 != 4 {
                return Ok(());
            }
            pkt.family = FAMILY_IPV4;
            pkt.saddr[..4].copy_from_slice(&ip.src_addr);
            pkt.daddr[..4].copy_from_slice(&ip.dst_addr);
            pkt.l4_proto = ip.proto;
            // Only the first fragment carries the transport header.
            if u16::from_be_bytes(ip.frags) & 0x1fff != 0 {
                return Ok(());
            }
            (ip.proto, l3 + u64::from(ip.vihl & 0x0f) * 4)
        }
        ETH_P_IPV6 => {
            let ip = read::<Ipv6Hdr>(l3, 0)?;
            if ip.vcf[0] >> 4 != 6 {
                return Ok(());
            }
            pkt.family = FAMILY_IPV6;
            pkt.saddr = ip.src_addr;
            pkt.daddr = ip.dst_addr;
            match skip_ipv6_ext(ip.next_hdr, l3 + 40)? {
                Some((proto, l4)) => {
                    pkt.l4_proto = proto;
                    (proto, l4)
                }
                None => return Ok(()),
            }
        }
        _ => {
            pkt.family = FAMILY_NONE;
            return Ok(());
        }
    };
    let l4h = read::<[u8; 14]>(l4, 0)?;
    match l4_proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            pkt.sport = u16::from_be_bytes([l4h[0], l4h[1]]);
            pkt.dport = u16::from_be_bytes([l4h[2], l4h[3]]);
            if l4_proto == IPPROTO_TCP {
                pkt.tcp_flags = l4h[13];
            }
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            pkt.icmp_type = l4h[0];
            pkt.icmp_code = l4h[1];
        }
        _ => {}
    }
    Ok(())
}

/// Follows up to `MAX_IPV6_EXT` extension headers; `None` for a non-first fragment or a chain
/// too long to follow.
#[inline(always)]
pub fn skip_ipv6_ext(mut next: u8, mut at: u64) -> Result<Option<(u8, u64)>, i32> {
    for _ in 0..MAX_IPV6_EXT {
        match next {
            // hop-by-hop, routing, destination options: length in 8-octet units past the first 8
            0 | 43 | 60 => {
                let h = read::<[u8; 2]>(at, 0)?;
                next = h[0];
                at += (u64::from(h[1]) + 1) * 8;
            }
            44 => {
                let h = read::<[u8; 4]>(at, 0)?;
                if u16::from_be_bytes([h[2], h[3]]) & 0xfff8 != 0 {
                    return Ok(None);
                }
                next = h[0];
                at += 8;
            }
            _ => return Ok(Some((next, at))),
        }
    }
    Ok(None)
}

/// Whether `addr` of `family` is in the host (or VIP) filter.
#[inline(always)]
pub fn host_listed(addr: &[u8; 16], family: u8) -> bool {
    let key = HostKey {
        addr: *addr,
        family,
        _pad0: [0; 3],
    };
    HOST_FILTER.get_ptr(key).is_some()
}
