//! kfree_skb handling shared by the tp_btf and classic tracepoint programs.

use agent_common::{
    DropRecord, PacketInfo, ProbeId, RecordHeader, RecordKind, Tuple, CT_FLAG_NAT_JOIN,
    FEATURE_CT_STATS, FILTER_CT_EVENT, FILTER_HOST, FILTER_NETNS, FILTER_PORT, FILTER_PROTO,
    FILTER_REASON, STAT_MATCHED, STAT_NAT_JOINED, STAT_READ_ERRORS, STAT_SEEN,
};
use aya_ebpf::helpers::{bpf_get_smp_processor_id, bpf_ktime_get_boot_ns};

use crate::{
    conf, conntrack,
    kernel::Mem,
    maps::{array_inc, count_reason, stat_inc, submit, CT_COUNTS, REASON_FILTER, SCRATCH},
    packet::{host_listed, parse_packet, skb_origin},
};

#[inline(always)]
pub fn handle_drop<M: Mem>(probe: ProbeId, skb: u64, location: u64, reason: u32, rx_sk: u64) {
    stat_inc(STAT_SEEN);
    // SAFETY: plain helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let origin = skb_origin::<M>(skb, rx_sk);
    // Before any filter: every NETFILTER_DROP moves this CPU's conntrack baseline.
    let ct_event =
        if reason == conf!(reason_netfilter_drop) && conf!(features) & FEATURE_CT_STATS != 0 {
            conntrack::classify(origin.net, origin.netns, cpu)
        } else {
            0
        };
    let filters = conf!(filter_flags);
    if filters & FILTER_REASON != 0 && REASON_FILTER.get_ptr(reason).is_none() {
        return;
    }
    if filters & FILTER_NETNS != 0 && origin.netns != conf!(filter_netns) {
        return;
    }
    if filters & FILTER_CT_EVENT != 0 && conf!(filter_ct_events) & (1 << ct_event) == 0 {
        return;
    }
    // The record is built in per-CPU scratch memory: it does not fit the 512-byte stack.
    let Some(rec) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot; programs do not nest on one CPU.
    let rec = unsafe { &mut *rec };
    rec.pkt = PacketInfo::default();
    if parse_packet::<M>(skb, &mut rec.pkt).is_err() {
        stat_inc(STAT_READ_ERRORS);
    }
    conntrack::lookup::<M>(skb, rec);
    if !packet_matches(rec) {
        return;
    }
    count_reason(reason);
    stat_inc(STAT_MATCHED);
    if ct_event != 0 {
        array_inc(&CT_COUNTS, u32::from(ct_event));
    }
    if rec.ct_flags & CT_FLAG_NAT_JOIN != 0 {
        stat_inc(STAT_NAT_JOINED);
    }
    rec.header = RecordHeader {
        // SAFETY: plain helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_boot_ns() },
        kind: RecordKind::Drop as u16,
        probe: probe as u8,
        _pad0: 0,
        cpu,
    };
    rec.location = location;
    rec.reason = reason;
    rec.ifindex = origin.ifindex;
    rec.netns = origin.netns;
    rec.ifname = origin.ifname;
    rec.ct_event = ct_event;
    submit(rec);
}

#[inline(always)]
fn tuple_listed(t: &Tuple) -> bool {
    t.family != 0 && (host_listed(&t.daddr, t.family) || host_listed(&t.saddr, t.family))
}

#[inline(always)]
fn packet_matches(rec: &DropRecord) -> bool {
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
        && !host_listed(&pkt.saddr, pkt.family)
        && !host_listed(&pkt.daddr, pkt.family)
        && !tuple_listed(&rec.orig)
    {
        return false;
    }
    true
}
