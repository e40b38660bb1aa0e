//! Ring-buffer bytes → typed events. Sizes are checked; enumerations are decoded with `TryFrom`
//! and unknown values are kept, never transmuted.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use agent_common::{
    CtEvent, DropRecord, PacketInfo, ProbeId, RecordHeader, RecordKind, Tuple, CT_FLAG_CONFIRMED,
    CT_FLAG_DNAT, CT_FLAG_ENTRY, CT_FLAG_NAT_JOIN, CT_FLAG_SNAT, FAMILY_IPV4, FAMILY_IPV6,
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

/// Transport protocol; unknown numbers are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum L4Proto {
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
    Sctp,
    Other(u8),
}

impl From<u8> for L4Proto {
    fn from(v: u8) -> Self {
        match v {
            6 => Self::Tcp,
            17 => Self::Udp,
            1 => Self::Icmp,
            58 => Self::Icmpv6,
            132 => Self::Sctp,
            other => Self::Other(other),
        }
    }
}

impl L4Proto {
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
            Self::Icmp => 1,
            Self::Icmpv6 => 58,
            Self::Sctp => 132,
            Self::Other(n) => n,
        }
    }

    pub fn name(self) -> String {
        match self {
            Self::Tcp => "tcp".into(),
            Self::Udp => "udp".into(),
            Self::Icmp => "icmp".into(),
            Self::Icmpv6 => "icmpv6".into(),
            Self::Sctp => "sctp".into(),
            Self::Other(n) => format!("proto-{n}"),
        }
    }

    /// Parses `tcp`, `udp`, `icmp`, `icmpv6`, `sctp` or a protocol number.
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Some(Self::Tcp),
            "udp" => Some(Self::Udp),
            "icmp" => Some(Self::Icmp),
            "icmpv6" | "ipv6-icmp" => Some(Self::Icmpv6),
            "sctp" => Some(Self::Sctp),
            other => other.parse::<u8>().ok().map(Self::from),
        }
    }

    fn has_ports(self) -> bool {
        matches!(self, Self::Tcp | Self::Udp | Self::Sctp)
    }
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

    pub fn family(&self) -> Option<&'static str> {
        match self.src {
            Some(IpAddr::V4(_)) => Some("ipv4"),
            Some(IpAddr::V6(_)) => Some("ipv6"),
            None => None,
        }
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
    pub ifname: Option<String>,
    pub netns: u32,
    pub packet: Packet,
    pub ct: Conntrack,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Drop(DropEvent),
}

impl Event {
    pub fn ts_ns(&self) -> u64 {
        match self {
            Self::Drop(d) => d.ts_ns,
        }
    }
}

fn read_pod<T: Copy>(bytes: &[u8], what: &'static str) -> Result<T, DecodeError> {
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

fn c_string(bytes: &[u8]) -> Option<String> {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    (end > 0).then(|| String::from_utf8_lossy(&bytes[..end]).into_owned())
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
                ifname: c_string(&r.ifname),
                netns: r.netns,
                packet: Packet::from_info(&r.pkt),
                ct: Conntrack::from_record(&r),
            }))
        }
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
        let Event::Drop(d) = decode(&as_bytes(&rec)).unwrap();
        assert_eq!(d.probe, Ok(ProbeId::KfreeSkbTracepoint));
        assert_eq!(d.ifname.as_deref(), Some("lo"));
        assert_eq!(d.packet.src, Some("127.0.0.1".parse().unwrap()));
        assert_eq!(d.packet.dport, Some(1));
        assert_eq!(d.packet.tcp_flags, Some(0x02));
        assert_eq!(d.packet.icmp, None);
        assert_eq!(d.ct, Conntrack::default());
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
        let Event::Drop(d) = decode(&as_bytes(&rec)).unwrap();
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
        let Event::Drop(d) = decode(&as_bytes(&rec)).unwrap();
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
        let Event::Drop(d) = decode(&bytes).unwrap();
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
