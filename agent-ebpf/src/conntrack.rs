//! Conntrack: the entry an skb carries, whether conntrack caused a NETFILTER_DROP, and the NAT
//! map that ties translated flows back to their VIP.

use agent_common::{
    CtEvent, CtStatKey, CtStatValue, DropRecord, NatOrigin, PacketInfo, Tuple, CT_FLAG_CONFIRMED,
    CT_FLAG_DNAT, CT_FLAG_ENTRY, CT_FLAG_NAT_JOIN, CT_FLAG_SNAT, FAMILY_IPV4, FAMILY_IPV6,
    FEATURE_NAT_CAPTURE, STAT_CT_NO_BASELINE, STAT_NAT_LEARNED,
};
use aya_ebpf::helpers::bpf_probe_read_kernel;

use crate::{
    conf,
    kernel::read,
    maps::{stat_inc, CT_LAST, NAT, STATS},
    packet::{flow_of, parse_packet, skb_origin},
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
/// `enum ip_conntrack_info`: a packet of a new, unreplied connection (original direction).
const IP_CT_NEW: u64 = 2;
/// `enum ip_conntrack_status` bits.
const IPS_CONFIRMED: u64 = 1 << 3;
const IPS_SRC_NAT: u64 = 1 << 4;
const IPS_DST_NAT: u64 = 1 << 5;
const IPS_TEMPLATE: u64 = 1 << 11;
/// `skb->_nfct` keeps `ip_conntrack_info` in its low bits.
const NFCT_INFOMASK: u64 = 7;

/// Reads the `nf_conntrack_tuple` at `t` into `out`, in place (stack space is scarce).
#[inline(always)]
fn read_tuple(t: u64, out: &mut Tuple) {
    out.family = match read::<u16>(t, conf!(tuple_l3num)).unwrap_or(0) {
        AF_INET => FAMILY_IPV4,
        AF_INET6 => FAMILY_IPV6,
        _ => 0,
    };
    out.saddr = read(t, conf!(tuple_src_addr)).unwrap_or([0; 16]);
    out.daddr = read(t, conf!(tuple_dst_addr)).unwrap_or([0; 16]);
    out.sport = u16::from_be(read(t, conf!(tuple_src_port)).unwrap_or(0));
    out.dport = u16::from_be(read(t, conf!(tuple_dst_port)).unwrap_or(0));
    out.proto = read(t, conf!(tuple_protonum)).unwrap_or(0);
    out._pad0 = [0; 2];
}

/// `(nf_conn *, ctinfo)` from `skb->_nfct`, skipping templates.
#[inline(always)]
fn skb_ct(skb: u64) -> Option<(u64, u64, u64)> {
    let nfct = read::<u64>(skb, conf!(skb_nfct)).ok()?;
    let ct = nfct & !NFCT_INFOMASK;
    if ct == 0 {
        return None;
    }
    let status = read::<u64>(ct, conf!(ct_status)).ok()?;
    if status & IPS_TEMPLATE != 0 {
        return None;
    }
    Some((ct, nfct & NFCT_INFOMASK, status))
}

/// Fills the record's conntrack fields: the skb's own entry, or else what the NAT map learned
/// about its flow.
#[inline(always)]
pub fn lookup(skb: u64, rec: &mut DropRecord) {
    rec.ct_flags = 0;
    rec.nat_netns = 0;
    rec.orig = Tuple::default();
    rec.reply = Tuple::default();
    if let Some((ct, _, status)) = skb_ct(skb) {
        let mut flags = CT_FLAG_ENTRY;
        if status & IPS_DST_NAT != 0 {
            flags |= CT_FLAG_DNAT;
        }
        if status & IPS_SRC_NAT != 0 {
            flags |= CT_FLAG_SNAT;
        }
        if status & IPS_CONFIRMED != 0 {
            flags |= CT_FLAG_CONFIRMED;
        }
        rec.ct_flags = flags;
        read_tuple(ct + u64::from(conf!(ct_tuple_orig)), &mut rec.orig);
        read_tuple(ct + u64::from(conf!(ct_tuple_reply)), &mut rec.reply);
        return;
    }
    if conf!(features) & FEATURE_NAT_CAPTURE != 0 {
        let key = flow_of(&rec.pkt);
        // SAFETY: the value is copied out at once; LRU entries may be replaced concurrently,
        // which at worst yields another flow's (still valid) bytes.
        if let Some(nat) = unsafe { NAT.get(key) } {
            rec.ct_flags = CT_FLAG_NAT_JOIN;
            rec.orig = nat.orig;
            rec.nat_netns = nat.netns;
        }
    }
}

/// The bits of a pointer, as a plain number: copied through a helper, because the verifier does
/// not let a map pointer be used as an integer directly.
#[inline(always)]
fn addr_of<T>(p: *const T) -> u64 {
    let slot: *const T = p;
    // SAFETY: reads 8 bytes from our own stack slot.
    unsafe { bpf_probe_read_kernel((&raw const slot).cast::<u64>()) }.unwrap_or(0)
}

/// This CPU's per-CPU offset (`__per_cpu_offset[cpu]`, absent from kallsyms without
/// CONFIG_KALLSYMS_ALL): our per-CPU STATS element's address minus the array's per-CPU base.
#[inline(always)]
fn this_cpu_offset() -> Option<u64> {
    let elem = addr_of(STATS.get_ptr(0)?);
    let map = addr_of(&raw const STATS);
    let base = read::<u64>(map, conf!(array_pptrs)).ok()?;
    (elem != 0 && base != 0).then(|| elem.wrapping_sub(base))
}

/// Whether conntrack caused this NETFILTER_DROP: compares the namespace's per-CPU conntrack
/// statistics with what this CPU saw last. An insert failure or a full table increments them on
/// this CPU right before the packet is freed, in the same softirq.
#[inline(always)]
pub fn classify(net: u64, netns: u32, cpu: u32) -> u8 {
    let Some(off) = this_cpu_offset() else {
        return 0;
    };
    let Ok(pcpu) = read::<u64>(net, conf!(net_ct_stat)) else {
        return 0;
    };
    if pcpu == 0 {
        return 0;
    }
    let stat = pcpu.wrapping_add(off);
    let now = CtStatValue {
        insert_failed: read(stat, conf!(stat_insert_failed)).unwrap_or(0),
        drop: read(stat, conf!(stat_drop)).unwrap_or(0),
        early_drop: read(stat, conf!(stat_early_drop)).unwrap_or(0),
        _pad0: 0,
    };
    let key = CtStatKey { netns, cpu };
    // SAFETY: copied out at once; only this CPU writes this key.
    let last = unsafe { CT_LAST.get(key) }.copied().unwrap_or_default();
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "by value, the copies overflow the 512-byte BPF stack"
    )]
    let _ = CT_LAST.insert(&key, &now, 0);
    if now.insert_failed < last.insert_failed || now.drop < last.drop {
        stat_inc(STAT_CT_NO_BASELINE);
        return 0;
    }
    // An insert failure also counts in `drop`: check it first.
    if now.insert_failed != last.insert_failed {
        CtEvent::InsertFailed as u8
    } else if now.drop != last.drop {
        CtEvent::TableFull as u8
    } else if now.early_drop != last.early_drop {
        CtEvent::EarlyDrop as u8
    } else {
        0
    }
}

/// At transmit: remember a new DNATed flow under its translated 5-tuple.
#[inline(always)]
pub fn learn_nat(skb: u64) {
    let Some((ct, ctinfo, status)) = skb_ct(skb) else {
        return;
    };
    if ctinfo != IP_CT_NEW || status & IPS_DST_NAT == 0 {
        return;
    }
    let mut pkt = PacketInfo::default();
    if parse_packet(skb, &mut pkt).is_err() {
        return;
    }
    let mut value = NatOrigin {
        orig: Tuple::default(),
        netns: skb_origin(skb).netns,
        _pad0: 0,
    };
    read_tuple(ct + u64::from(conf!(ct_tuple_orig)), &mut value.orig);
    let key = flow_of(&pkt);
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "by value, the copies overflow the 512-byte BPF stack"
    )]
    let learned = NAT.insert(&key, &value, 0).is_ok();
    if learned {
        stat_inc(STAT_NAT_LEARNED);
    }
}

/// Entry for the transmit hooks: NAT learning, and ARP/NDP.
#[inline(always)]
pub fn handle_xmit(skb: u64, probe: agent_common::ProbeId) {
    if conf!(features) & FEATURE_NAT_CAPTURE != 0 {
        learn_nat(skb);
    }
    crate::arp::handle_frame(skb, agent_common::DIR_TX, probe);
}
