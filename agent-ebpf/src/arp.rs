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
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_boot_ns},
    programs::TracePointContext,
};

use crate::{
    conf,
    kernel::{netns_inum, read},
    maps::{stat_inc, submit, ARP_SCRATCH},
    packet::{host_listed, ETH_P_IPV6},
};

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
const ARPHRD_ETHER: u16 = 1;
const ETH_HLEN: u64 = 14;
const ICMPV6_NS: u8 = 135;
const ICMPV6_NA: u8 = 136;
const AF_INET: i32 = 2;
const AF_INET6: i32 = 10;

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
    if filters & FILTER_NETNS != 0 && netns != conf!(filter_netns) {
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
pub fn handle_frame(skb: u64, direction: u8, probe: ProbeId) {
    if conf!(features) & FEATURE_ARP == 0 {
        return;
    }
    let proto = u16::from_be(read::<u16>(skb, conf!(skb_protocol)).unwrap_or(0));
    // Most packets are neither: leave after one read.
    if proto != ETH_P_ARP && proto != ETH_P_IPV6 && proto != 0 {
        return;
    }
    let _ = try_handle_frame(skb, direction, probe);
}

#[inline(always)]
fn try_handle_frame(skb: u64, direction: u8, probe: ProbeId) -> Result<(), i32> {
    let dev = read::<u64>(skb, conf!(skb_dev))?;
    if read::<u16>(dev, conf!(dev_type))? != ARPHRD_ETHER {
        return Ok(());
    }
    let eth = if direction == DIR_TX {
        read::<u64>(skb, conf!(skb_data))?
    } else {
        let head = read::<u64>(skb, conf!(skb_head))?;
        head + u64::from(read::<u16>(skb, conf!(skb_mac_header))?)
    };
    let ethhdr = read::<[u8; 14]>(eth, 0)?;
    let mut ethertype = u16::from_be_bytes([ethhdr[12], ethhdr[13]]);
    let mut l3 = eth + ETH_HLEN;
    if ethertype == ETH_P_8021Q {
        ethertype = u16::from_be(read::<u16>(eth, 16)?);
        l3 += 4;
    }
    let Some(rec) = ARP_SCRATCH.get_ptr_mut(0) else {
        return Ok(());
    };
    // SAFETY: this CPU's scratch slot; programs do not nest on one CPU.
    let rec = unsafe { &mut *rec };
    *rec = ArpRecord::default();
    rec.eth_dst.copy_from_slice(&ethhdr[..6]);
    match ethertype {
        ETH_P_ARP => {
            // htype, ptype, hlen, plen, oper, sha, spa, tha, tpa (Ethernet/IPv4 only)
            let a = read::<[u8; 28]>(l3, 0)?;
            if a[4] != 6 || a[5] != 4 || u16::from_be_bytes([a[2], a[3]]) != 0x0800 {
                return Ok(());
            }
            rec.op = u16::from_be_bytes([a[6], a[7]]);
            rec.sender_mac.copy_from_slice(&a[8..14]);
            rec.sender_ip[..4].copy_from_slice(&a[14..18]);
            rec.target_mac.copy_from_slice(&a[18..24]);
            rec.target_ip[..4].copy_from_slice(&a[24..28]);
            rec.family = FAMILY_IPV4;
            if a[14..18] == a[24..28] {
                rec.flags |= ARP_FLAG_GRATUITOUS;
            }
        }
        ETH_P_IPV6 => {
            let ip = read::<[u8; 40]>(l3, 0)?;
            // next header ICMPv6, hop limit 255 as NDP requires
            if ip[6] != 58 || ip[7] != 255 {
                return Ok(());
            }
            // type, code, checksum, flags+reserved, target, first option (type, len, lladdr)
            let icmp = read::<[u8; 32]>(l3 + 40, 0)?;
            if icmp[0] != ICMPV6_NS && icmp[0] != ICMPV6_NA {
                return Ok(());
            }
            rec.op = u16::from(icmp[0]);
            rec.family = FAMILY_IPV6;
            rec.ndp_flags = if icmp[0] == ICMPV6_NA { icmp[4] } else { 0 };
            rec.sender_ip.copy_from_slice(&ip[8..24]);
            rec.target_ip.copy_from_slice(&icmp[8..24]);
            // Source (1) or target (2) link-layer address option, else the Ethernet source.
            if (icmp[24] == 1 || icmp[24] == 2) && icmp[25] == 1 {
                rec.sender_mac.copy_from_slice(&icmp[26..32]);
            } else {
                rec.sender_mac.copy_from_slice(&ethhdr[6..12]);
            }
        }
        _ => return Ok(()),
    }
    let net = read::<u64>(dev, conf!(dev_nd_net)).unwrap_or(0);
    rec.netns = netns_inum(net);
    if !keep(rec.netns, &rec.sender_ip, &rec.target_ip, rec.family) {
        return Ok(());
    }
    rec.ifindex = read::<u32>(dev, conf!(dev_ifindex)).unwrap_or(0);
    rec.ifname = read::<[u8; 16]>(dev, conf!(dev_name)).unwrap_or([0; 16]);
    rec.direction = direction;
    if direction == DIR_TX
        && read::<u32>(dev, conf!(dev_priv_flags)).unwrap_or(0) & conf!(priv_flag_bridge_port) != 0
    {
        rec.flags |= ARP_FLAG_BRIDGED;
    }
    rec.header = header(RecordKind::Arp, probe);
    stat_inc(STAT_ARP);
    submit(rec);
    Ok(())
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
        netns: netns_inum(read::<u64>(dev, conf!(dev_nd_net)).unwrap_or(0)),
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
