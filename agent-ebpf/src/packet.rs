//! Reading an skb: where it came from, and its L3/L4 headers with bounded reads.

use agent_common::{
    HostKey, PacketInfo, Tuple, DROP_FLAG_MAC, FAMILY_IPV4, FAMILY_IPV6, FAMILY_NONE,
};
use network_types::{
    eth::EtherType,
    icmp::{Icmpv4Hdr, Icmpv6Hdr},
    ip::{IpProto, Ipv4Hdr, Ipv6Hdr},
    sctp::SctpHdr,
    tcp::TcpHdr,
    udp::UdpHdr,
};

use crate::{
    conf,
    kernel::{netns_inum, read, Mem},
    maps::HOST_FILTER,
};

/// EtherTypes as `skb->protocol` holds them: network byte order, like `EtherType`'s values.
pub const ETH_IPV4: u16 = EtherType::Ipv4 as u16;
pub const ETH_IPV6: u16 = EtherType::Ipv6 as u16;
pub const ETH_ARP: u16 = EtherType::Arp as u16;
pub const ETH_VLAN: u16 = EtherType::Ieee8021q as u16;
const TCP: u8 = IpProto::Tcp as u8;
const UDP: u8 = IpProto::Udp as u8;
const SCTP: u8 = IpProto::Sctp as u8;
const ICMP: u8 = IpProto::Icmp as u8;
pub const ICMPV6: u8 = IpProto::Ipv6Icmp as u8;
const HOP_BY_HOP: u8 = IpProto::HopOpt as u8;
const ROUTING: u8 = IpProto::Ipv6Route as u8;
const FRAGMENT: u8 = IpProto::Ipv6Frag as u8;
const DEST_OPTS: u8 = IpProto::Ipv6Opts as u8;
/// `skb->network_header` when unset (`(u16)~0U`).
pub const HEADER_UNSET: u16 = 0xffff;
/// IPv6 extension headers followed before giving up on the transport header.
const MAX_IPV6_EXT: usize = 4;

/// The start shared by the hop-by-hop, routing and destination options headers (RFC 8200);
/// network-types 0.2.0 has no IPv6 extension headers.
#[repr(C)]
struct Ipv6OptsHdr {
    next_hdr: u8,
    /// Length in 8-octet units, not counting the first 8 octets.
    hdr_ext_len: u8,
}

/// IPv6 fragment header (RFC 8200).
#[repr(C)]
struct Ipv6FragHdr {
    next_hdr: u8,
    _reserved: u8,
    /// Offset in 8-octet units (13 bits), 2 reserved bits, M flag.
    frag_off: [u8; 2],
    _id: [u8; 4],
}

/// Where the skb came from: interface and network namespace.
pub struct Origin {
    pub ifindex: u32,
    pub netns: u32,
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

/// The skb's network namespace, `(struct net *, inode)`: from its device, else its socket,
/// else the receiving socket the drop hook names (`rx_sk`, 0 when unknown).
#[inline(always)]
pub fn skb_net<M: Mem>(skb: u64, rx_sk: u64) -> (u64, u32) {
    let dev = M::read::<u64>(skb, conf!(skb_dev)).unwrap_or(0);
    let net = if dev != 0 {
        M::read::<u64>(dev, conf!(dev_nd_net)).unwrap_or(0)
    } else {
        let sk = match M::read::<u64>(skb, conf!(skb_sk)).unwrap_or(0) {
            0 => rx_sk,
            sk => sk,
        };
        M::read::<u64>(sk, conf!(sk_net)).unwrap_or(0)
    };
    (net, netns_inum::<M>(net))
}

/// Where the skb came from: its namespace as [`skb_net`] finds it, and its device's index
/// and name when it has one.
#[inline(always)]
pub fn skb_origin<M: Mem>(skb: u64, rx_sk: u64) -> Origin {
    let (_, netns) = skb_net::<M>(skb, rx_sk);
    let dev = M::read::<u64>(skb, conf!(skb_dev)).unwrap_or(0);
    let (ifindex, ifname) = if dev == 0 {
        (0, [0; 16])
    } else {
        (
            M::read::<u32>(dev, conf!(dev_ifindex)).unwrap_or(0),
            M::read::<[u8; 16]>(dev, conf!(dev_name)).unwrap_or([0; 16]),
        )
    };
    Origin {
        ifindex,
        netns,
        ifname,
    }
}

/// The frame's Ethernet source and destination, when the skb has a MAC header of at least 14
/// bytes before its network header; returns `DROP_FLAG_MAC` then, else 0 (and zeroes).
#[inline(always)]
pub fn read_macs<M: Mem>(skb: u64, src: &mut [u8; 6], dst: &mut [u8; 6]) -> u8 {
    *src = [0; 6];
    *dst = [0; 6];
    let (Ok(head), Ok(mac), Ok(nh)) = (
        M::read::<u64>(skb, conf!(skb_head)),
        M::read::<u16>(skb, conf!(skb_mac_header)),
        M::read::<u16>(skb, conf!(skb_network_header)),
    ) else {
        return 0;
    };
    if mac == HEADER_UNSET || nh == HEADER_UNSET || nh < mac || nh - mac < 14 {
        return 0;
    }
    let at = head + u64::from(mac);
    match (read::<[u8; 6]>(at, 0), read::<[u8; 6]>(at, 6)) {
        (Ok(d), Ok(s)) => {
            *dst = d;
            *src = s;
            DROP_FLAG_MAC
        }
        _ => 0,
    }
}

/// Bytes read at the network header in one go: an IPv6 or an IPv4 header (without options)
/// and a TCP header fit. The linear buffer always extends past it (tailroom and
/// `skb_shared_info`), so a short packet reads harmless bytes that are never used.
const HDR_BLOCK: usize = 64;

/// A header of type `T` at `off` from the network header: from the block read already when it
/// lies inside, else read on its own (IPv4 options, IPv6 extension headers).
#[inline(always)]
fn header_at<T: Copy>(block: &[u8; HDR_BLOCK], l3: u64, off: usize) -> Result<T, i32> {
    // Bound `off` itself, not `off + size`: older verifiers (6.1) do not carry a bound learnt
    // on the sum back to `off`, and reject the stack read as possibly out of the frame.
    if off <= HDR_BLOCK - size_of::<T>() {
        // SAFETY: in bounds (checked above); headers are plain bytes and integers.
        return Ok(unsafe { block.as_ptr().add(off).cast::<T>().read_unaligned() });
    }
    read::<T>(l3, off as u32)
}

/// Parses L3 and L4 headers from `skb->head + skb->network_header`: one read of a block that
/// holds both in the common case.
#[inline(always)]
pub fn parse_packet<M: Mem>(skb: u64, pkt: &mut PacketInfo) -> Result<(), i32> {
    pkt.len = M::read::<u32>(skb, conf!(skb_len))?;
    let proto = M::read::<u16>(skb, conf!(skb_protocol))?;
    pkt.l3_proto = u16::from_be(proto);
    let head = M::read::<u64>(skb, conf!(skb_head))?;
    let nh = M::read::<u16>(skb, conf!(skb_network_header))?;
    if nh == HEADER_UNSET {
        return Ok(());
    }
    if proto != ETH_IPV4 && proto != ETH_IPV6 {
        pkt.family = FAMILY_NONE;
        return Ok(());
    }
    let l3 = head + u64::from(nh);
    let block = read::<[u8; HDR_BLOCK]>(l3, 0)?;
    let (l4_proto, l4_off) = if proto == ETH_IPV4 {
        let ip = header_at::<Ipv4Hdr>(&block, l3, 0)?;
        if ip.version() != 4 {
            return Ok(());
        }
        pkt.family = FAMILY_IPV4;
        pkt.saddr[..4].copy_from_slice(&ip.src_addr);
        pkt.daddr[..4].copy_from_slice(&ip.dst_addr);
        pkt.l4_proto = ip.proto;
        // Only the first fragment carries the transport header.
        if ip.frag_offset() != 0 {
            return Ok(());
        }
        (ip.proto, usize::from(ip.ihl()))
    } else {
        let ip = header_at::<Ipv6Hdr>(&block, l3, 0)?;
        if ip.version() != 6 {
            return Ok(());
        }
        pkt.family = FAMILY_IPV6;
        pkt.saddr = ip.src_addr;
        pkt.daddr = ip.dst_addr;
        match skip_ipv6_ext(ip.next_hdr, l3 + Ipv6Hdr::LEN as u64)? {
            Some((proto, l4)) => {
                pkt.l4_proto = proto;
                (proto, (l4 - l3) as usize)
            }
            None => return Ok(()),
        }
    };
    transport(&block, l3, l4_off, l4_proto, pkt)
}

/// The transport header's ports, flags or ICMP type, by the type its protocol names.
#[inline(always)]
fn transport(
    block: &[u8; HDR_BLOCK],
    l3: u64,
    off: usize,
    proto: u8,
    pkt: &mut PacketInfo,
) -> Result<(), i32> {
    match proto {
        TCP => {
            let tcp = header_at::<TcpHdr>(block, l3, off)?;
            pkt.sport = u16::from_be_bytes(tcp.source);
            pkt.dport = u16::from_be_bytes(tcp.dest);
            // Bits 8..16 of the data-offset/flags word: the flags byte, CWR down to FIN.
            pkt.tcp_flags = tcp._bitfield_1.get(8, 8) as u8;
        }
        UDP => {
            let udp = header_at::<UdpHdr>(block, l3, off)?;
            pkt.sport = udp.src_port();
            pkt.dport = udp.dst_port();
        }
        SCTP => {
            let sctp = header_at::<SctpHdr>(block, l3, off)?;
            pkt.sport = u16::from_be_bytes(sctp.src);
            pkt.dport = u16::from_be_bytes(sctp.dst);
        }
        ICMP => {
            let icmp = header_at::<Icmpv4Hdr>(block, l3, off)?;
            pkt.icmp_type = icmp.type_;
            pkt.icmp_code = icmp.code;
        }
        ICMPV6 => {
            let icmp = header_at::<Icmpv6Hdr>(block, l3, off)?;
            pkt.icmp_type = icmp.type_;
            pkt.icmp_code = icmp.code;
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
            HOP_BY_HOP | ROUTING | DEST_OPTS => {
                let h = read::<Ipv6OptsHdr>(at, 0)?;
                next = h.next_hdr;
                at += (u64::from(h.hdr_ext_len) + 1) * 8;
            }
            FRAGMENT => {
                let h = read::<Ipv6FragHdr>(at, 0)?;
                if u16::from_be_bytes(h.frag_off) & 0xfff8 != 0 {
                    return Ok(None);
                }
                next = h.next_hdr;
                at += size_of::<Ipv6FragHdr>() as u64;
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
