//! kfree_skb handling shared by the tp_btf and classic tracepoint programs.
//!
//! Two paths: with `FEATURE_AGGREGATE` (the agent; `watch` and its kin unless `--sample-limit
//! 0`) every drop that passes the filters is counted in `AGG` with the least reading it can, and
//! a record is built only for a sample; without it every such drop becomes a record.

use agent_common::{
    DropRecord, PacketInfo, ProbeId, RecordHeader, RecordKind, Tuple, CT_FLAG_NAT_JOIN,
    DROP_FLAG_MEMBERLIST, DROP_FLAG_SAMPLED, FEATURE_AGGREGATE, FEATURE_CT_STATS,
    FEATURE_MEMBERLIST, FILTER_CT_EVENT, FILTER_HOST, FILTER_NETNS, FILTER_PACKET, FILTER_PORT,
    FILTER_PROTO, FILTER_REASON, FILTER_VIP, STAT_NAT_JOINED, STAT_READ_ERRORS, STAT_SAMPLED_OUT,
};
use aya_ebpf::helpers::{bpf_get_smp_processor_id, bpf_ktime_get_boot_ns};

use crate::{
    aggregate::{self, Outcome},
    attribution, conf, conntrack,
    kernel::Mem,
    maps::{
        array_inc, count_reason, netns_listed, stat_inc, submit, CT_COUNTS, REASON_FILTER, SCRATCH,
    },
    packet::{host_listed, parse_packet, read_macs, skb_net, skb_origin},
    verdict,
};

/// What the drop hook hands over.
#[derive(Clone, Copy)]
pub struct Drop {
    pub probe: ProbeId,
    pub skb: u64,
    pub location: u64,
    pub reason: u32,
    /// The receiving socket (tp_btf on recent kernels), else 0.
    pub rx_sk: u64,
}

#[inline(always)]
pub fn handle_drop<M: Mem>(d: Drop) {
    // The kernel never frees a null skb. Leaving here lets the compiler drop every later null
    // check of it: else it merges two such checks, and 6.1's verifier, which learns nothing
    // from comparing a BTF pointer with zero, follows the impossible mix ("R3 !read_ok").
    if d.skb == 0 {
        return;
    }
    let filters = conf!(filter_flags);
    if filters & FILTER_REASON != 0 && REASON_FILTER.get_ptr(d.reason).is_none() {
        // Still moves the conntrack baseline, as every NETFILTER_DROP must.
        let _ = ct_event::<M>(&d);
        return;
    }
    if conf!(features) & FEATURE_AGGREGATE != 0 {
        aggregated::<M>(&d, filters);
    } else {
        every::<M>(&d, filters);
    }
}

/// Whether conntrack caused this drop: classified for every NETFILTER_DROP, before any filter,
/// because each one takes this CPU's verdict or moves its conntrack baseline. Returns `(event, netns)`.
#[inline(always)]
fn ct_event<M: Mem>(d: &Drop) -> Option<(u8, u32)> {
    if d.reason != conf!(reason_netfilter_drop) || conf!(features) & FEATURE_CT_STATS == 0 {
        return None;
    }
    let (net, netns) = skb_net::<M>(d.skb, d.rx_sk);
    if let Some(event) = verdict::classify::<M>(d.skb, net) {
        return Some((event, netns));
    }
    // SAFETY: plain helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    Some((conntrack::classify(net, netns, cpu), netns))
}

/// The conntrack event (0 when none), or `None` when the namespace or event filter rejects
/// the drop. The namespace is read once, for both.
#[inline(always)]
fn namespace_and_event<M: Mem>(d: &Drop, filters: u32) -> Option<u8> {
    let ct = ct_event::<M>(d);
    let event = ct.map_or(0, |(e, _)| e);
    if filters & FILTER_NETNS != 0 {
        let netns = match ct {
            Some((_, n)) => n,
            None => skb_net::<M>(d.skb, d.rx_sk).1,
        };
        if !netns_listed(netns) {
            return None;
        }
    }
    if filters & FILTER_CT_EVENT != 0 && conf!(filter_ct_events) & (1 << event) == 0 {
        return None;
    }
    Some(event)
}

/// Aggregation (the agent, and `watch` unless `--sample-limit 0`): count under (VIP, reason,
/// location, conntrack event); a record only for a sample. Headers are read only when a VIP is
/// configured, or a packet filter (host, port, protocol) needs them before counting.
#[inline(always)]
fn aggregated<M: Mem>(d: &Drop, filters: u32) {
    let Some(event) = namespace_and_event::<M>(d, filters) else {
        return;
    };
    let Some(rec) = SCRATCH.get_ptr_mut(0) else {
        count_exactly(d.reason, event);
        return;
    };
    // SAFETY: this CPU's scratch slot; programs do not nest on one CPU.
    let rec = unsafe { &mut *rec };
    // The packet's addresses, read once for the VIP and a host (or --vip) filter. That filter
    // alone is settled by them when one is listed: only otherwise (behind NAT, or another
    // filter) is the whole record read first.
    let meta = attribution::vip_meta();
    let host_only = filters & FILTER_PACKET == FILTER_HOST;
    let addrs = if meta.bits != 0 || host_only {
        attribution::packet_addrs::<M>(d.skb)
    } else {
        None
    };
    let filtered = match filters & FILTER_PACKET {
        0 => false,
        FILTER_HOST => {
            // Memberlist traffic passes it too: it is evidence for every VIP.
            if addrs.as_ref().is_some_and(attribution::hosts_listed)
                || aggregate::memberlist::<M>(d.skb)
            {
                false
            } else if conntrack::translated::<M>(d.skb) {
                true
            } else {
                return;
            }
        }
        _ => true,
    };
    let (vip, parsed) = attribution::attribute::<M>(d.skb, (addrs.as_ref(), meta), rec, filtered);
    let key = aggregate::key(d, event, vip);
    // Counted only when the packet passes the filters, as on the path of every drop.
    if filtered && !packet_matches(rec, is_memberlist(&rec.pkt)) {
        return;
    }
    // Election traffic is rare and every drop of it is evidence: never sampled out. It passes
    // the VIP filter too: it is evidence for every VIP.
    let always = key.family == 0 && aggregate::memberlist::<M>(d.skb);
    if filters & FILTER_VIP != 0 && key.family == 0 && !always {
        return;
    }
    // `AGG` holds the exact counts per reason and event; the arrays only what it could not.
    let flags = match aggregate::count::<M>(&key, always) {
        Outcome::Skip => {
            stat_inc(STAT_SAMPLED_OUT);
            return;
        }
        Outcome::Sample => DROP_FLAG_SAMPLED,
        Outcome::Memberlist => DROP_FLAG_MEMBERLIST,
        Outcome::Unaggregated => {
            count_exactly(d.reason, event);
            0
        }
    };
    if !parsed {
        parse_into::<M>(d.skb, rec);
    }
    send::<M>(d, event, rec, flags);
}

/// `watch` and `record`: every drop that passes the filters becomes a record.
#[inline(always)]
fn every<M: Mem>(d: &Drop, filters: u32) {
    let Some(event) = namespace_and_event::<M>(d, filters) else {
        return;
    };
    // The record is built in per-CPU scratch memory: it does not fit the 512-byte stack.
    let Some(rec) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot; programs do not nest on one CPU.
    let rec = unsafe { &mut *rec };
    parse_into::<M>(d.skb, rec);
    let memberlist = is_memberlist(&rec.pkt);
    if !packet_matches(rec, memberlist) {
        return;
    }
    count_exactly(d.reason, event);
    send::<M>(
        d,
        event,
        rec,
        if memberlist { DROP_FLAG_MEMBERLIST } else { 0 },
    );
}

/// The per-reason and per-conntrack-event counts, independent of the ring.
#[inline(always)]
fn count_exactly(reason: u32, event: u8) {
    count_reason(reason);
    if event != 0 {
        array_inc(&CT_COUNTS, u32::from(event));
    }
}

/// Headers and conntrack state of the packet, into the scratch record.
#[inline(always)]
pub fn parse_into<M: Mem>(skb: u64, rec: &mut DropRecord) {
    rec.pkt = PacketInfo::default();
    if parse_packet::<M>(skb, &mut rec.pkt).is_err() {
        stat_inc(STAT_READ_ERRORS);
    }
    conntrack::lookup::<M>(skb, rec);
}

/// Completes the record (origin, time, MACs) and sends it.
#[inline(always)]
fn send<M: Mem>(d: &Drop, event: u8, rec: &mut DropRecord, flags: u8) {
    if rec.ct_flags & CT_FLAG_NAT_JOIN != 0 {
        stat_inc(STAT_NAT_JOINED);
    }
    let origin = skb_origin::<M>(d.skb, d.rx_sk);
    rec.header = RecordHeader {
        // SAFETY: plain helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_boot_ns() },
        kind: RecordKind::Drop as u16,
        probe: d.probe as u8,
        _pad0: 0,
        // SAFETY: as above.
        cpu: unsafe { bpf_get_smp_processor_id() },
    };
    rec.location = d.location;
    rec.reason = d.reason;
    rec.ifindex = origin.ifindex;
    rec.netns = origin.netns;
    rec.ifname = origin.ifname;
    rec.ct_event = event;
    rec.flags = flags | read_macs::<M>(d.skb, &mut rec.eth_src, &mut rec.eth_dst);
    submit(rec);
}

#[inline(always)]
fn tuple_listed(t: &Tuple) -> bool {
    t.family != 0 && (host_listed(&t.daddr, t.family) || host_listed(&t.saddr, t.family))
}

/// TCP or UDP to or from the memberlist port (with the feature on).
#[inline(always)]
fn is_memberlist(pkt: &PacketInfo) -> bool {
    let port = conf!(memberlist_port);
    conf!(features) & FEATURE_MEMBERLIST != 0
        && (pkt.l4_proto == 6 || pkt.l4_proto == 17)
        && (pkt.sport == port || pkt.dport == port)
}

/// The filters; memberlist traffic passes the host (VIP) filter: it is evidence for every VIP.
#[inline(always)]
fn packet_matches(rec: &DropRecord, memberlist: bool) -> bool {
    let pkt = &rec.pkt;
    let flags = conf!(filter_flags);
    if flags & FILTER_PROTO != 0 && pkt.l4_proto != conf!(filter_proto) {
        return false;
    }
    if flags & FILTER_PORT != 0
        && pkt.sport != conf!(filter_port)
        && pkt.dport != conf!(filter_port)
    {
        return false;
    }
    // A host (or VIP) matches the packet's addresses or, behind NAT, the flow's original ones.
    if flags & FILTER_HOST != 0
        && !memberlist
        && !host_listed(&pkt.saddr, pkt.family)
        && !host_listed(&pkt.daddr, pkt.family)
        && !tuple_listed(&rec.orig)
    {
        return false;
    }
    true
}
