//! Ring-buffer bytes → typed events. Sizes are checked; enumerations are decoded with `TryFrom`
//! and unknown values are kept, never transmuted.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use agent_common::{
    ArpRecord, CtEvent, DropRecord, NeighRecord, PacketInfo, ProbeId, RecordHeader, RecordKind,
    Tuple, ARP_FLAG_BRIDGED, ARP_FLAG_GRATUITOUS, CT_FLAG_CONFIRMED, CT_FLAG_DNAT, CT_FLAG_ENTRY,
    CT_FLAG_NAT_JOIN, CT_FLAG_SNAT, DIR_TX, DROP_FLAG_MAC, DROP_FLAG_SAMPLED, FAMILY_IPV4,
    FAMILY_IPV6,
};

use super::{
    record::{NDP_OVERRIDE, NDP_SOLICITED},
    values::{ArpOp, Family, L4Proto, Mac},
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than its {need}-byte {what}")]
    Truncated {
        what: &'static str,
        len: usize,
        need: usize,
    },
    #[error("record kind {0} is unknown to this lbtrace")]
    UnknownKind(u16),
}

/// Packet headers as the kernel parsed them; `None` where the packet had no such field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    pub proto: Option<L4Proto>,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    pub tcp_flags: Option<u8>,
    pub icmp: Option<(u8, u8)>,
    pub len: u32,
    /// Ethertype from `skb->protocol`.
    pub l3_proto: u16,
}

impl Packet {
    fn from_info(p: &PacketInfo) -> Self {
        let ip = matches!(p.family, FAMILY_IPV4 | FAMILY_IPV6);
        let proto = ip
            .then(|| L4Proto::from(p.l4_proto))
            .filter(|p| p.number() != 0);
        let ports = proto.is_some_and(L4Proto::has_ports);
        Self {
            src: addr(p.family, &p.saddr),
            dst: addr(p.family, &p.daddr),
            proto,
            sport: ports.then_some(p.sport),
            dport: ports.then_some(p.dport),
            tcp_flags: (proto == Some(L4Proto::Tcp)).then_some(p.tcp_flags),
            icmp: matches!(proto, Some(L4Proto::Icmp | L4Proto::Icmpv6))
                .then_some((p.icmp_type, p.icmp_code)),
            len: p.len,
            l3_proto: p.l3_proto,
        }
    }

    pub fn family(&self) -> Option<Family> {
        self.src.map(Family::of)
    }
}

fn addr(family: u8, a: &[u8; 16]) -> Option<IpAddr> {
    match family {
        FAMILY_IPV4 => Some(IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))),
        FAMILY_IPV6 => Some(IpAddr::V6(Ipv6Addr::from(*a))),
        _ => None,
    }
}

/// One direction of a conntrack entry (or a pre-NAT flow).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    pub proto: L4Proto,
}

impl Flow {
    fn from_tuple(t: &Tuple) -> Option<Self> {
        Some(Self {
            src: addr(t.family, &t.saddr)?,
            sport: t.sport,
            dst: addr(t.family, &t.daddr)?,
            dport: t.dport,
            proto: L4Proto::from(t.proto),
        })
    }
}

/// What conntrack knew about a dropped packet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Conntrack {
    /// Set when conntrack itself caused the drop; unknown values are kept.
    pub event: Option<Result<CtEvent, u8>>,
    /// The entry's original direction, or the pre-DNAT flow found through the NAT map.
    pub orig: Option<Flow>,
    pub reply: Option<Flow>,
    pub dnat: bool,
    pub snat: bool,
    pub confirmed: bool,
    /// The skb carried no entry; `orig` came from the NAT map, learned in this namespace.
    pub nat_netns: Option<u32>,
}

impl Conntrack {
    fn from_record(r: &DropRecord) -> Self {
        let entry = r.ct_flags & CT_FLAG_ENTRY != 0;
        let joined = r.ct_flags & CT_FLAG_NAT_JOIN != 0;
        Self {
            event: (r.ct_event != 0).then(|| CtEvent::try_from(r.ct_event)),
            orig: if entry || joined {
                Flow::from_tuple(&r.orig)
            } else {
                None
            },
            reply: if entry {
                Flow::from_tuple(&r.reply)
            } else {
                None
            },
            dnat: r.ct_flags & CT_FLAG_DNAT != 0,
            snat: r.ct_flags & CT_FLAG_SNAT != 0,
            confirmed: r.ct_flags & CT_FLAG_CONFIRMED != 0,
            nat_netns: joined.then_some(r.nat_netns),
        }
    }
}

/// A packet the kernel freed with a drop reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DropEvent {
    /// CLOCK_BOOTTIME nanoseconds.
    pub ts_ns: u64,
    pub cpu: u32,
    pub probe: Result<ProbeId, u8>,
    pub location: u64,
    pub reason: u32,
    pub ifindex: u32,
    pub ifname: Option<IfName>,
    pub netns: u32,
    pub packet: Packet,
    pub ct: Conntrack,
    /// Ethernet (source, destination) when the skb still had a MAC header.
    pub eth: Option<(Mac, Mac)>,
    /// One sample of many: the kernel counted every drop of its key (aggregation mode).
    pub sampled: bool,
}

fn arp_op(family: u8, op: u16) -> ArpOp {
    match (family, op) {
        (FAMILY_IPV4, 1) => ArpOp::Request,
        (FAMILY_IPV4, 2) => ArpOp::Reply,
        (FAMILY_IPV6, 135) => ArpOp::Solicitation,
        (FAMILY_IPV6, 136) => ArpOp::Advertisement,
        (_, other) => ArpOp::Other(other),
    }
}

/// An ARP packet or IPv6 neighbour solicitation/advertisement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArpEvent {
    pub ts_ns: u64,
    pub cpu: u32,
    pub probe: Result<ProbeId, u8>,
    pub netns: u32,
    pub ifindex: u32,
    pub ifname: Option<IfName>,
    pub op: ArpOp,
    pub tx: bool,
    /// A copy the bridge forwarded, not a host's own transmission.
    pub bridged: bool,
    pub sender_ip: Option<IpAddr>,
    pub sender_mac: Mac,
    /// ARP target protocol address, or the NDP target address.
    pub target_ip: Option<IpAddr>,
    pub target_mac: Mac,
    pub eth_dst: Mac,
    pub ndp_flags: Option<u8>,
    /// An announcement nobody asked for: ARP with sender IP = target IP, an ARP reply to the
    /// broadcast address, or an unsolicited neighbour advertisement with the override flag.
    pub gratuitous: bool,
    /// Sent from an AF_PACKET socket: the sending process (thread-group id) and its name.
    pub sender_task: Option<(u32, Option<IfName>)>,
}

/// A neighbour-cache update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NeighEvent {
    pub ts_ns: u64,
    pub cpu: u32,
    pub probe: Result<ProbeId, u8>,
    /// `None` when the hook could not tell (the classic tracepoint).
    pub netns: Option<u32>,
    pub ifindex: u32,
    pub ifname: Option<IfName>,
    pub ip: Option<IpAddr>,
    pub old_mac: Mac,
    pub new_mac: Mac,
    pub old_state: u8,
    pub new_state: u8,
    pub update_flags: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Drop(DropEvent),
    Arp(ArpEvent),
    Neigh(NeighEvent),
    Proc(super::decode_proc::ProcEvent),
}

impl Event {
    pub fn ts_ns(&self) -> u64 {
        match self {
            Self::Drop(d) => d.ts_ns,
            Self::Arp(a) => a.ts_ns,
            Self::Neigh(n) => n.ts_ns,
            Self::Proc(p) => p.ts_ns,
        }
    }
}

pub(super) fn read_pod<T: Copy>(bytes: &[u8], what: &'static str) -> Result<T, DecodeError> {
    let need = size_of::<T>();
    if bytes.len() < need {
        return Err(DecodeError::Truncated {
            what,
            len: bytes.len(),
            need,
        });
    }
    // SAFETY: length checked above; T is a repr(C) record of plain integers (any bit pattern is
    // valid) and read_unaligned imposes no alignment on the ring buffer's bytes.
    Ok(unsafe { bytes.as_ptr().cast::<T>().read_unaligned() })
}

/// An interface name as the kernel copied it (NUL-padded); decoding allocates nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IfName([u8; 16]);

impl IfName {
    /// `None` for an empty name.
    pub(super) fn new(bytes: &[u8; 16]) -> Option<Self> {
        (bytes[0] != 0).then_some(Self(*bytes))
    }

    /// The name up to its first NUL, invalid UTF-8 replaced.
    pub fn to_text(&self) -> String {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(16);
        String::from_utf8_lossy(&self.0[..end]).into_owned()
    }
}

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let header: RecordHeader = read_pod(bytes, "header")?;
    match RecordKind::try_from(header.kind).map_err(DecodeError::UnknownKind)? {
        RecordKind::Drop => {
            let r: DropRecord = read_pod(bytes, "drop record")?;
            Ok(Event::Drop(DropEvent {
                ts_ns: r.header.ts_ns,
                cpu: r.header.cpu,
                probe: ProbeId::try_from(r.header.probe),
                location: r.location,
                reason: r.reason,
                ifindex: r.ifindex,
                ifname: IfName::new(&r.ifname),
                netns: r.netns,
                packet: Packet::from_info(&r.pkt),
                ct: Conntrack::from_record(&r),
                eth: (r.flags & DROP_FLAG_MAC != 0).then_some((Mac(r.eth_src), Mac(r.eth_dst))),
                sampled: r.flags & DROP_FLAG_SAMPLED != 0,
            }))
        }
        RecordKind::Arp => {
            let r: ArpRecord = read_pod(bytes, "arp record")?;
            let op = arp_op(r.family, r.op);
            let eth_dst = Mac(r.eth_dst);
            let ndp_flags = (op == ArpOp::Advertisement).then_some(r.ndp_flags);
            let gratuitous = r.flags & ARP_FLAG_GRATUITOUS != 0
                || (op == ArpOp::Reply && eth_dst.is_broadcast())
                || ndp_flags.is_some_and(|f| f & NDP_SOLICITED == 0 && f & NDP_OVERRIDE != 0);
            Ok(Event::Arp(ArpEvent {
                ts_ns: r.header.ts_ns,
                cpu: r.header.cpu,
                probe: ProbeId::try_from(r.header.probe),
                netns: r.netns,
                ifindex: r.ifindex,
                ifname: IfName::new(&r.ifname),
                op,
                tx: r.direction == DIR_TX,
                bridged: r.flags & ARP_FLAG_BRIDGED != 0,
                sender_ip: addr(r.family, &r.sender_ip),
                sender_mac: Mac(r.sender_mac),
                target_ip: addr(r.family, &r.target_ip),
                target_mac: Mac(r.target_mac),
                eth_dst,
                ndp_flags,
                gratuitous,
                sender_task: (r.pid != 0).then(|| (r.pid, IfName::new(&r.comm))),
            }))
        }
        RecordKind::Neigh => {
            let r: NeighRecord = read_pod(bytes, "neighbour record")?;
            Ok(Event::Neigh(NeighEvent {
                ts_ns: r.header.ts_ns,
                cpu: r.header.cpu,
                probe: ProbeId::try_from(r.header.probe),
                netns: (r.netns != 0).then_some(r.netns),
                ifindex: r.ifindex,
                ifname: IfName::new(&r.ifname),
                ip: addr(r.family, &r.ip),
                old_mac: Mac(r.old_mac),
                new_mac: Mac(r.new_mac),
                old_state: r.old_state,
                new_state: r.new_state,
                update_flags: r.update_flags,
            }))
        }
        RecordKind::Proc => super::decode_proc::decode(bytes).map(Event::Proc),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn as_bytes<T: Copy>(v: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a repr(C) value with explicit padding.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    #[test]
    fn decodes_tcp_drop() {
        let mut rec = DropRecord::default();
        rec.header.kind = RecordKind::Drop as u16;
        rec.header.probe = 2;
        rec.reason = 3;
        rec.ifname[..2].copy_from_slice(b"lo");
        rec.pkt.family = FAMILY_IPV4;
        rec.pkt.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        rec.pkt.daddr[..4].copy_from_slice(&[127, 0, 0, 2]);
        rec.pkt.l4_proto = 6;
        rec.pkt.sport = 40000;
        rec.pkt.dport = 1;
        rec.pkt.tcp_flags = 0x02;
        let Ok(Event::Drop(d)) = decode(&as_bytes(&rec)) else {
            panic!("not a drop")
        };
        assert_eq!(d.probe, Ok(ProbeId::KfreeSkbTracepoint));
        assert_eq!(d.ifname.map(|n| n.to_text()).as_deref(), Some("lo"));
        assert_eq!(d.packet.src, Some("127.0.0.1".parse().unwrap()));
        assert_eq!(d.packet.dport, Some(1));
        assert_eq!(d.packet.tcp_flags, Some(0x02));
        assert_eq!(d.packet.icmp, None);
        assert_eq!(d.ct, Conntrack::default());
    }

    #[test]
    fn decodes_garp_and_unsolicited_na() {
        let mut rec = ArpRecord::default();
        rec.header.kind = RecordKind::Arp as u16;
        rec.family = FAMILY_IPV4;
        rec.op = 1;
        rec.direction = DIR_TX;
        rec.flags = ARP_FLAG_GRATUITOUS;
        rec.sender_ip[..4].copy_from_slice(&[10, 200, 0, 100]);
        rec.target_ip[..4].copy_from_slice(&[10, 200, 0, 100]);
        rec.sender_mac = [2, 0, 0, 0, 0, 0xb];
        let Ok(Event::Arp(a)) = decode(&as_bytes(&rec)) else {
            panic!("not arp")
        };
        assert!(a.gratuitous && a.tx && !a.bridged);
        assert_eq!(a.op, ArpOp::Request);
        assert_eq!(a.sender_ip, Some("10.200.0.100".parse().unwrap()));
        assert_eq!(a.sender_mac.to_string(), "02:00:00:00:00:0b");

        let mut na = ArpRecord::default();
        na.header.kind = RecordKind::Arp as u16;
        na.family = FAMILY_IPV6;
        na.op = 136;
        na.ndp_flags = NDP_OVERRIDE;
        na.target_ip = "fd00:200::100".parse::<Ipv6Addr>().unwrap().octets();
        let Ok(Event::Arp(a)) = decode(&as_bytes(&na)) else {
            panic!("not ndp")
        };
        assert!(a.gratuitous);
        assert_eq!(a.target_ip, Some("fd00:200::100".parse().unwrap()));
        na.ndp_flags = NDP_OVERRIDE | NDP_SOLICITED;
        let Ok(Event::Arp(a)) = decode(&as_bytes(&na)) else {
            panic!("not ndp")
        };
        assert!(
            !a.gratuitous,
            "a solicited advertisement answers a question"
        );
    }

    #[test]
    fn decodes_conntrack_and_nat_join() {
        let mut rec = DropRecord::default();
        rec.header.kind = RecordKind::Drop as u16;
        rec.ct_event = 1;
        rec.ct_flags = CT_FLAG_ENTRY | CT_FLAG_DNAT;
        rec.orig.family = FAMILY_IPV4;
        rec.orig.daddr[..4].copy_from_slice(&[10, 200, 0, 100]);
        rec.orig.dport = 80;
        rec.orig.proto = 6;
        rec.reply.family = FAMILY_IPV4;
        let Ok(Event::Drop(d)) = decode(&as_bytes(&rec)) else {
            panic!("not a drop")
        };
        assert_eq!(d.ct.event, Some(Ok(CtEvent::InsertFailed)));
        assert!(d.ct.dnat && !d.ct.snat);
        assert_eq!(
            d.ct.orig.as_ref().unwrap().dst,
            "10.200.0.100".parse::<IpAddr>().unwrap()
        );
        assert_eq!(d.ct.nat_netns, None);
        rec.ct_flags = CT_FLAG_NAT_JOIN;
        rec.ct_event = 9;
        rec.nat_netns = 42;
        let Ok(Event::Drop(d)) = decode(&as_bytes(&rec)) else {
            panic!("not a drop")
        };
        assert_eq!(d.ct.event, Some(Err(9)));
        assert_eq!(d.ct.nat_netns, Some(42));
        assert!(d.ct.reply.is_none());
        assert_eq!(d.ct.orig.unwrap().dport, 80);
    }

    #[test]
    fn keeps_unknown_values_and_rejects_short_records() {
        let mut rec = DropRecord::default();
        rec.header.kind = RecordKind::Drop as u16;
        rec.header.probe = 77;
        rec.pkt.family = FAMILY_IPV6;
        rec.pkt.l4_proto = 253;
        let bytes = as_bytes(&rec);
        let Ok(Event::Drop(d)) = decode(&bytes) else {
            panic!("not a drop")
        };
        assert_eq!(d.probe, Err(77));
        assert_eq!(d.packet.proto, Some(L4Proto::Other(253)));
        assert_eq!(d.packet.sport, None);
        assert!(matches!(
            decode(&bytes[..20]),
            Err(DecodeError::Truncated { .. })
        ));
        let mut odd = bytes.clone();
        odd[8] = 99;
        assert_eq!(decode(&odd), Err(DecodeError::UnknownKind(99)));
        assert!(decode(&[]).is_err());
    }
}
