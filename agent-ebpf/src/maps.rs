//! Maps shared by all programs. Names are fixed by `agent_common::MAP_*`.

use agent_common::{
    AggKey, AggValue, ArpRecord, CtStatKey, CtStatValue, CtVerdict, DropRecord, HostKey, NatOrigin,
    Tuple, AGG_ENTRIES, CT_EVENT_COUNT, CT_LAST_ENTRIES, DROP_COUNTS_ENTRIES, HOST_FILTER_ENTRIES,
    NAT_ENTRIES, NETNS_FILTER_ENTRIES, REASON_COUNTS_ENTRIES, SPEAKER_ENTRIES, STAT_COUNT,
    STAT_RING_LOST, VIP_ENTRIES,
};
use aya_ebpf::{
    bindings::{
        BPF_F_NO_PREALLOC, BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
    },
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};

use crate::conf;

/// Records for userspace. The agent resizes it at load time (`--ring-size`).
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

/// Exact per-CPU drop counts per reason, for the drops that pass the filters; independent of the
/// ring so a full ring never loses a count.
#[map]
pub static DROP_COUNTS: PerCpuHashMap<u32, u64> =
    PerCpuHashMap::with_max_entries(DROP_COUNTS_ENTRIES, 0);

/// Exact per-CPU counts of the core reasons, by reason: no hash lookup on the common path.
#[map]
pub static REASON_COUNTS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(REASON_COUNTS_ENTRIES, 0);

/// Per-CPU counters indexed by `agent_common::STAT_*`.
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

/// Reasons to keep when `FILTER_REASON` is set.
#[map]
pub static REASON_FILTER: HashMap<u32, u8> = HashMap::with_max_entries(DROP_COUNTS_ENTRIES, 0);

/// Addresses to keep (as source or destination) when `FILTER_HOST` is set.
#[map]
pub static HOST_FILTER: HashMap<HostKey, u8> = HashMap::with_max_entries(HOST_FILTER_ENTRIES, 0);

/// Network namespaces (inodes) to keep when `FILTER_NETNS` is set.
#[map]
pub static NETNS_FILTER: HashMap<u32, u8> = HashMap::with_max_entries(NETNS_FILTER_ENTRIES, 0);

/// Thread-group ids of the processes that announce VIPs, kept by the agent.
#[map]
pub static SPEAKER_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(SPEAKER_ENTRIES, 0);

/// Their names (`comm`, NUL-padded): a restarted speaker is known by its name.
#[map]
pub static SPEAKER_COMMS: HashMap<[u8; 16], u8> = HashMap::with_max_entries(SPEAKER_ENTRIES, 0);

/// Whether `netns` is in the namespace filter (when `FILTER_NETNS` is set).
#[inline(always)]
pub fn netns_listed(netns: u32) -> bool {
    match conf!(filter_netns_one) {
        0 => NETNS_FILTER.get_ptr(netns).is_some(),
        one => netns == one,
    }
}

/// Exact per-CPU counts of conntrack events, indexed by `CtEvent`.
#[map]
pub static CT_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(CT_EVENT_COUNT, 0);

/// Last conntrack statistics seen per (netns, CPU); seeded by the agent for namespaces that
/// existed before it started (a new namespace starts from zero).
#[map]
pub static CT_LAST: LruHashMap<CtStatKey, CtStatValue> =
    LruHashMap::with_max_entries(CT_LAST_ENTRIES, 0);

/// DNAT translations keyed by the translated flow, learned at transmit: a drop behind the DNAT
/// (in a pod's netns, where the skb no longer carries the node's conntrack entry) finds its VIP.
#[map]
pub static NAT: LruHashMap<Tuple, NatOrigin> = LruHashMap::with_max_entries(NAT_ENTRIES, 0);

/// Aggregation mode: exact per-CPU drop counts by VIP, reason, location and conntrack event,
/// with each key's sampling window. Sized by the agent at load time; allocated as keys appear.
#[map]
pub static AGG: PerCpuHashMap<AggKey, AggValue> =
    PerCpuHashMap::with_max_entries(AGG_ENTRIES, BPF_F_NO_PREALLOC);

/// Per-CPU direct-mapped cache in front of `AGG` (see `AggSlot`).
#[map]
pub static AGG_FAST: PerCpuArray<agent_common::AggSlot> =
    PerCpuArray::with_max_entries(agent_common::AGG_FAST_SLOTS, 0);

/// The pools drops are attributed to in the kernel, per family; kept current by the agent.
/// Keys are a prefix length, then the address in network byte order.
#[map]
pub static VIPS4: LpmTrie<u32, u8> = LpmTrie::with_max_entries(VIP_ENTRIES, 0);
#[map]
pub static VIPS6: LpmTrie<[u32; 4], u8> = LpmTrie::with_max_entries(VIP_ENTRIES, 0);

/// The single VIPs, by address (network byte order, as words: the same bytes userspace writes);
/// kept current by the agent.
#[map]
pub static VIP_ADDRS4: HashMap<u32, u8> = HashMap::with_max_entries(VIP_ENTRIES, 0);
#[map]
pub static VIP_ADDRS6: HashMap<[u32; 4], u8> = HashMap::with_max_entries(VIP_ENTRIES, 0);

/// Which VIP maps hold entries, and their generation (`MAP_VIP_META` in agent_common).
#[map]
pub static VIP_META: Array<u64> = Array::with_max_entries(1, 0);

/// Per-CPU direct-mapped cache of VIP lookups, by address (`crate::attribution::VipCacheSlot`).
#[map]
pub static VIP_CACHE: PerCpuArray<crate::attribution::VipCacheSlot> =
    PerCpuArray::with_max_entries(crate::attribution::VIP_CACHE_SLOTS, 0);

/// Per-CPU direct-mapped cache in front of `CT_LAST`, by namespace.
#[map]
pub static CT_CACHE: PerCpuArray<crate::conntrack::CtCacheSlot> =
    PerCpuArray::with_max_entries(crate::conntrack::CT_CACHE_SLOTS, 0);

/// Conntrack's last verdicts on this CPU, where its functions are hooked (`crate::verdict`).
#[map]
pub static CT_VERDICT: PerCpuArray<CtVerdict> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's per-CPU offset, once found (conntrack classification).
#[map]
pub static CPU_OFFSET: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU scratch space where a drop record is assembled before it is copied to the ring.
#[map]
pub static SCRATCH: PerCpuArray<DropRecord> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU scratch space for ARP/NDP records.
#[map]
pub static ARP_SCRATCH: PerCpuArray<ArpRecord> = PerCpuArray::with_max_entries(1, 0);

/// Copies `rec` to the ring for userspace; a full ring is counted, never retried.
#[inline(always)]
pub fn submit<T>(rec: &T) {
    if EVENTS.output::<T>(rec, wakeup_flags()).is_err() {
        stat_inc(STAT_RING_LOST);
    }
}

/// Wake the reader only once enough bytes wait; below that its timer collects them.
#[inline(always)]
fn wakeup_flags() -> u64 {
    if conf!(wakeup_bytes) == 0 {
        return 0;
    }
    if EVENTS.query(u64::from(BPF_RB_AVAIL_DATA)) >= conf!(wakeup_bytes) {
        u64::from(BPF_RB_FORCE_WAKEUP)
    } else {
        u64::from(BPF_RB_NO_WAKEUP)
    }
}

#[inline(always)]
pub fn array_inc(map: &PerCpuArray<u64>, index: u32) {
    if let Some(v) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot; these programs do not nest on one CPU.
        unsafe { *v += 1 };
    }
}

#[inline(always)]
pub fn stat_inc(index: u32) {
    array_inc(&STATS, index);
}

#[inline(always)]
pub fn count_reason(reason: u32) {
    if reason < REASON_COUNTS_ENTRIES {
        array_inc(&REASON_COUNTS, reason);
        return;
    }
    if let Some(v) = DROP_COUNTS.get_ptr_mut(reason) {
        // SAFETY: per-CPU value of an existing key.
        unsafe { *v += 1 };
        return;
    }
    if DROP_COUNTS
        .insert(reason, 1, u64::from(BPF_NOEXIST))
        .is_err()
    {
        // Another CPU created the key first; its value on this CPU starts at zero.
        if let Some(v) = DROP_COUNTS.get_ptr_mut(reason) {
            // SAFETY: as above.
            unsafe { *v += 1 };
        }
    }
}
