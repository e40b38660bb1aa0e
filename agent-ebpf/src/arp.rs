//! ARP and IPv6 neighbour discovery seen on transmit and receive, and neighbour-cache updates.
//!
//! MetalLB-style speakers send gratuitous ARP from AF_PACKET sockets, which never pass
//! `arp_xmit`: the device transmit and receive tracepoints see them, so frames are parsed there.

use agent_common::{
    ArpRecord, NeighRecord, ProbeId, RecordHeader, RecordKind, ARP_FLAG_BRIDGED,
    ARP_FLAG_GRATUITOUS, DIR_TX, FAMILY_IPV4, FAMILY_IPV6, FEATURE_ARP, FILTER_CT_EVENT,
    FILTER_HOST, FILTER_NETNS, FILTER_PORT, FILTER_PROTO, FILTER_REASON, STAT_ARP, STAT_NEIGH,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_smp_processor_id,
        bpf_ktime_get_boot_ns,
    },
    programs::TracePointContext,
};
use network_types::{
    arp::ArpHdr,
    eth::{EthHdr, EtherType},
    icmp::Icmpv6Hdr,
    ip::Ipv6Hdr,
    vlan::VlanHdr,
};

use crate::{
    conf,
    kernel::{netns_inum, read, Mem, Probe},
    maps::{netns_listed, stat_inc, submit, ARP_SCRATCH},
    packet::{host_listed, ETH_ARP, ETH_IPV6, ETH_VLAN, ICMPV6},
};

/// `dev->type` of Ethernet devices.
const ARPHRD_ETHER: u16 = 1;
/// NDP message types (RFC 4861), absent from network-types 0.2.0's `Icmpv6Type`.
const ICMPV6_NS: u8 = 135;
const ICMPV6_NA: u8 = 136;
/// NDP option types carrying a link-layer address.
const ND_OPT_SOURCE_LLADDR: u8 = 1;
const ND_OPT_TARGET_LLADDR: u8 = 2;
/// NDP requires hop limit 255: the message was not forwarded.
const NDP_HOP_LIMIT: u8 = 255;
const AF_INET: i32 = 2;
const AF_INET6: i32 = 10;
const AF_PACKET: u16 = 17;

/// A neighbour solicitation or advertisement with its first option (RFC 4861), read as one
/// block; network-types 0.2.0 has no NDP layout.
#[repr(C)]
struct NdpMsg {
    /// For an advertisement the first data byte holds the R, S and O flags.
    icmp: Icmpv6Hdr,
    target: [u8; 16],
    opt: NdpLladdrOpt,
}

/// A link-layer address option for Ethernet: length 1 (8 octets).
#[repr(C)]
struct NdpLladdrOpt {
    kind: u8,
    /// In 8-octet units.
    len: u8,
    lladdr: [u8; 6],
}

/// Filters that only make sense for drops exclude neighbour records altogether.
const DROP_ONLY_FILTERS: u32 = FILTER_REASON | FILTER_PORT | FILTER_PROTO | FILTER_CT_EVENT;

#[inline(always)]
fn header(kind: RecordKind, probe: ProbeId) -> RecordHeader {
    RecordHeader {
        // SAFETY: plain helpers without arguments.
        ts_ns: unsafe { bpf_ktime_get_boot_ns() },
        kind: kind as u16,
        probe: probe as u8,
        _pad0: 0,
        // SAFETY: as above.
        cpu: unsafe { bpf_get_smp_processor_id() },
    }
}

/// Netns and host filters; `None` when the record is filtered out.
#[inline(always)]
fn keep(netns: u32, a: &[u8; 16], b: &[u8; 16], family: u8) -> bool {
    let filters = conf!(filter_flags);
    if filters & DROP_ONLY_FILTERS != 0 {
        return false;
    }
    if filters & FILTER_NETNS != 0 && !netns_listed(netns) {
        return false;
    }
    if filters & FILTER_HOST != 0 && !host_listed(a, family) && !host_listed(b, family) {
        return false;
    }
    true
}

/// Parses ARP or an NDP solicitation/advertisement from the frame of `skb`. On transmit the frame
/// starts at `skb->data`; on receive the Ethernet header was pulled and `mac_header` marks it.
#[inline(always)]
pub fn handle_frame<M: Mem>(skb: u64, direction: u8, probe: ProbeId) {
    if conf!(features) & FEATURE_ARP == 0 {
        return;
    }
    // Network byte order, compared with EtherTypes in the same order.
    let proto = M::read::<u16>(skb, conf!(skb_protocol)).unwrap_or(0);
    // Most packets are neither: leave after one read.
    if proto != ETH_ARP && proto != ETH_IPV6 && proto != 0 {
        return;
    }
    if proto == ETH_IPV6 && !maybe_ndp::<M>(skb, direction) {
        return;
    }
    let _ = try_handle_frame::<M>(skb, direction, probe);
}

/// Whether an IPv6 packet can be neighbour discovery (ICMPv6 with hop limit 255), from the
/// start of its IPv6 header alone: other IPv6 traffic leaves after this one small read. On
/// transmit `skb->data` is the Ethernet header; on receive it was pulled past it.
#[inline(always)]
fn maybe_ndp<M: Mem>(skb: u64, direction: u8) -> bool {
    let Ok(data) = M::read::<u64>(skb, conf!(skb_data)) else {
        return false;
    };
    let l3 = if direction == DIR_TX {
        data + EthHdr::LEN as u64
    } else {
        data
    };
    // version/class/flow (4), payload length (2), next header, hop limit
    match read::<[u8; 8]>(l3, 0) {
        Ok(h) => h[6] == ICMPV6 && h[7] == NDP_HOP_LIMIT,
        Err(_) => true,
    }
}

#[inline(always)]
fn try_handle_frame<M: Mem>(skb: u64, direction: u8, probe: ProbeId) -> Result<(), i32> {
    let dev = M::read::<u64>(skb, conf!(skb_dev))?;
    if M::read::<u16>(dev, conf!(dev_type))? != ARPHRD_ETHER {
        return Ok(());
    }
    let eth = if direction == DIR_TX {
        M::read::<u64>(skb, conf!(skb_data))?
    } else {
        let head = M::read::<u64>(skb, conf!(skb_head))?;
        head + u64::from(M::read::<u16>(skb, conf!(skb_mac_header))?)
    };
    let ethhdr = read::<EthHdr>(eth, 0)?;
    let mut ethertype = ethhdr.ether_type;
    let mut l3 = eth + EthHdr::LEN as u64;
    if ethertype == ETH_VLAN {
        ethertype = read::<VlanHdr>(l3, 0)?.ether_type;
        l3 += VlanHdr::LEN as u64;
    }
    let Some(rec) = ARP_SCRATCH.get_ptr_mut(0) else {
        return Ok(());
    };
    // SAFETY: this CPU's scratch slot; programs do not nest on one CPU.
    let rec = unsafe { &mut *rec };
    *rec = ArpRecord::default();
    rec.eth_dst = ethhdr.dst_addr;
    match ethertype {
        ETH_ARP => {
            // Ethernet/IPv4 only: the fixed layout of `ArpHdr`.
            let a = read::<ArpHdr>(l3, 0)?;
            if a.hlen != 6 || a.plen != 4 || a.ptype() != u16::from_be(EtherType::Ipv4 as u16) {
                return Ok(());
            }
            rec.op = a.oper();
            rec.sender_mac = a.sha;
            rec.sender_ip[..4].copy_from_slice(&a.spa);
            rec.target_mac = a.tha;
            rec.target_ip[..4].copy_from_slice(&a.tpa);
            rec.family = FAMILY_IPV4;
            if a.spa == a.tpa {
                rec.flags |= ARP_FLAG_GRATUITOUS;
            }
        }
        ETH_IPV6 => {
            let ip = read::<Ipv6Hdr>(l3, 0)?;
            if ip.next_hdr != ICMPV6 || ip.hop_limit != NDP_HOP_LIMIT {
                return Ok(());
            }
            let ndp = read::<NdpMsg>(l3 + Ipv6Hdr::LEN as u64, 0)?;
            let kind = ndp.icmp.type_;
            if kind != ICMPV6_NS && kind != ICMPV6_NA {
                return Ok(());
            }
            rec.op = u16::from(kind);
            rec.family = FAMILY_IPV6;
            rec.ndp_flags = if kind == ICMPV6_NA {
                ndp.icmp.data[0]
            } else {
                0
            };
            rec.sender_ip = ip.src_addr;
            rec.target_ip = ndp.target;
            // A link-layer address option names the sender, else the Ethernet source does.
            let opt = &ndp.opt;
            if (opt.kind == ND_OPT_SOURCE_LLADDR || opt.kind == ND_OPT_TARGET_LLADDR)
                && opt.len == 1
            {
                rec.sender_mac = opt.lladdr;
            } else {
                rec.sender_mac = ethhdr.src_addr;
            }
        }
        _ => return Ok(()),
    }
    let net = M::read::<u64>(dev, conf!(dev_nd_net)).unwrap_or(0);
    rec.netns = netns_inum::<M>(net);
    if !keep(rec.netns, &rec.sender_ip, &rec.target_ip, rec.family) {
        return Ok(());
    }
    rec.ifindex = M::read::<u32>(dev, conf!(dev_ifindex)).unwrap_or(0);
    rec.ifname = M::read::<[u8; 16]>(dev, conf!(dev_name)).unwrap_or([0; 16]);
    rec.direction = direction;
    if direction == DIR_TX
        && M::read::<u32>(dev, conf!(dev_priv_flags)).unwrap_or(0) & conf!(priv_flag_bridge_port)
            != 0
    {
        rec.flags |= ARP_FLAG_BRIDGED;
    }
    if direction == DIR_TX && rec.flags & ARP_FLAG_BRIDGED == 0 {
        sender_task::<M>(skb, rec);
    }
    rec.header = header(RecordKind::Arp, probe);
    stat_inc(STAT_ARP);
    submit(rec);
    Ok(())
}

/// A frame sent from an AF_PACKET socket (how speakers announce) is transmitted in the
/// sending task's context: that task is the announcer. Kernel-made replies carry no socket.
#[inline(always)]
fn sender_task<M: Mem>(skb: u64, rec: &mut ArpRecord) {
    let sk = M::read::<u64>(skb, conf!(skb_sk)).unwrap_or(0);
    if sk == 0 || M::read::<u16>(sk, conf!(sk_family)).unwrap_or(0) != AF_PACKET {
        return;
    }
    rec.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    rec.comm = bpf_get_current_comm().unwrap_or([0; 16]);
}

#[inline(always)]
fn emit_neigh(rec: &NeighRecord) {
    if !keep(rec.netns, &rec.ip, &rec.ip, rec.family) {
        return;
    }
    stat_inc(STAT_NEIGH);
    submit(rec);
}

#[inline(always)]
fn mac6(bytes: &[u8; 8]) -> [u8; 6] {
    [bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5]]
}

/// tp_btf neigh_update(n, lladdr, new, flags, nlmsg_pid): the entry still holds the old state.
#[inline(always)]
pub fn handle_neigh_btf(n: u64, lladdr: u64, new_state: u8, flags: u32) {
    if conf!(features) & FEATURE_ARP == 0 {
        return;
    }
    let dev = read::<u64>(n, conf!(neigh_dev)).unwrap_or(0);
    let tbl = read::<u64>(n, conf!(neigh_tbl)).unwrap_or(0);
    let family = match read::<i32>(tbl, conf!(tbl_family)).unwrap_or(0) {
        AF_INET => FAMILY_IPV4,
        AF_INET6 => FAMILY_IPV6,
        _ => return,
    };
    let mut rec = NeighRecord {
        header: header(RecordKind::Neigh, ProbeId::NeighUpdateBtf),
        netns: netns_inum::<Probe>(read::<u64>(dev, conf!(dev_nd_net)).unwrap_or(0)),
        ifindex: read::<u32>(dev, conf!(dev_ifindex)).unwrap_or(0),
        ifname: read::<[u8; 16]>(dev, conf!(dev_name)).unwrap_or([0; 16]),
        family,
        old_state: read::<u8>(n, conf!(neigh_nud_state)).unwrap_or(0),
        new_state,
        update_flags: flags,
        ..NeighRecord::default()
    };
    if family == FAMILY_IPV4 {
        let k = read::<[u8; 4]>(n, conf!(neigh_primary_key)).unwrap_or([0; 4]);
        rec.ip[..4].copy_from_slice(&k);
    } else {
        rec.ip = read::<[u8; 16]>(n, conf!(neigh_primary_key)).unwrap_or([0; 16]);
    }
    let old = read::<[u8; 8]>(n, conf!(neigh_ha)).unwrap_or([0; 8]);
    rec.old_mac = mac6(&old);
    rec.new_mac = rec.old_mac;
    if lladdr != 0 {
        if let Ok(new) = read::<[u8; 8]>(lladdr, 0) {
            rec.new_mac = mac6(&new);
            rec.has_lladdr = 1;
        }
    }
    emit_neigh(&rec);
}

/// The classic tracepoint neigh/neigh_update: fields at offsets from tracefs; it carries the
/// device name but no namespace.
#[inline(always)]
pub fn handle_neigh_tp(ctx: &TracePointContext) -> Result<(), i32> {
    if conf!(features) & FEATURE_ARP == 0 {
        return Ok(());
    }
    let (family_at, dev_at, lladdr_at, state_at, key4_at, key6_at, new_at, new_state_at, flags_at) = (
        conf!(tp_neigh_family) as usize,
        conf!(tp_neigh_dev) as usize,
        conf!(tp_neigh_lladdr) as usize,
        conf!(tp_neigh_nud_state) as usize,
        conf!(tp_neigh_key4) as usize,
        conf!(tp_neigh_key6) as usize,
        conf!(tp_neigh_new_lladdr) as usize,
        conf!(tp_neigh_new_state) as usize,
        conf!(tp_neigh_update_flags) as usize,
    );
    // SAFETY: every offset comes from this kernel's tracefs format for neigh/neigh_update.
    unsafe {
        let family = match ctx.read_at::<u32>(family_at)? as i32 {
            AF_INET => FAMILY_IPV4,
            AF_INET6 => FAMILY_IPV6,
            _ => return Ok(()),
        };
        let mut rec = NeighRecord {
            header: header(RecordKind::Neigh, ProbeId::NeighUpdateTracepoint),
            family,
            old_state: ctx.read_at::<u8>(state_at)?,
            new_state: ctx.read_at::<u8>(new_state_at)?,
            update_flags: ctx.read_at::<u32>(flags_at)?,
            has_lladdr: 1,
            ..NeighRecord::default()
        };
        // __data_loc: low 16 bits offset of the string in the record, high 16 its length
        let loc = ctx.read_at::<u32>(dev_at)?;
        rec.ifname = ctx
            .read_at::<[u8; 16]>((loc & 0xffff) as usize)
            .unwrap_or([0; 16]);
        if family == FAMILY_IPV4 {
            let k = ctx.read_at::<[u8; 4]>(key4_at)?;
            rec.ip[..4].copy_from_slice(&k);
        } else {
            rec.ip = ctx.read_at::<[u8; 16]>(key6_at)?;
        }
        rec.old_mac = mac6(&ctx.read_at::<[u8; 8]>(lladdr_at)?);
        rec.new_mac = mac6(&ctx.read_at::<[u8; 8]>(new_at)?);
        emit_neigh(&rec);
    }
    Ok(())
}
