//! Counters the programs keep on their own: exact, whatever the ring buffer loses.

use std::collections::BTreeMap;

use agent_common::{
    CtEvent, Tuple, MAP_CT_COUNTS, MAP_DROP_COUNTS, MAP_NAT, MAP_REASON_COUNTS, MAP_STATS,
    STAT_AGG_FULL, STAT_ARP, STAT_CT_NO_BASELINE, STAT_NAT_JOINED, STAT_NAT_LEARNED, STAT_NEIGH,
    STAT_PROC, STAT_READ_ERRORS, STAT_RING_LOST, STAT_SAMPLED_OUT,
};
use aya::maps::{HashMap, MapData, PerCpuArray, PerCpuHashMap};

use super::{map_err, ProbeError, Tracer};
use crate::kernel::btf::DropReasons;

/// Counters kept by the kernel independently of the ring buffer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    /// Drops that passed the filters, per reason code.
    pub by_reason: BTreeMap<u32, u64>,
    /// Records that did not fit in the ring buffer, per CPU.
    pub lost_per_cpu: Vec<u64>,
    pub matched: u64,
    pub read_errors: u64,
    /// Conntrack-caused drops that passed the filters, per event.
    pub ct_events: BTreeMap<CtEvent, u64>,
    pub ct_no_baseline: u64,
    pub nat_learned: u64,
    pub nat_joined: u64,
    /// ARP/NDP and neighbour records that passed the filters.
    pub arp: u64,
    pub neigh: u64,
    /// Process records (speaker lifecycle, OOM victims).
    pub proc: u64,
    /// Aggregation: drops counted exactly but not sent as records (over the sample limit).
    pub sampled_out: u64,
    /// Aggregation: drops whose key did not fit the kernel's map (sent as records instead).
    pub agg_full: u64,
    /// Per loaded program, the runs the kernel skipped because it was already running on
    /// that CPU: events no program saw.
    pub missed: BTreeMap<String, u64>,
}

impl KernelCounters {
    pub fn lost(&self) -> u64 {
        self.lost_per_cpu.iter().sum()
    }

    /// Every event the kernel let through the filters, records or not: the left side of
    /// `seen = delivered + lost + sampled out`.
    pub fn events_seen(&self) -> u64 {
        self.matched + self.arp + self.neigh + self.proc
    }

    /// Drops per reason name, the reasons with none left out.
    pub fn drops_by_reason(&self, reasons: &DropReasons) -> BTreeMap<String, u64> {
        self.by_reason
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(r, n)| (reasons.name(*r), *n))
            .collect()
    }
}

/// The NAT map's occupancy: how many translations it holds of how many it can.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatOccupancy {
    pub entries: u64,
    pub capacity: u64,
    /// Translations learned when the count began: `evicted` compares the two of one moment.
    pub learned: u64,
}

impl NatOccupancy {
    /// Translations learned but no longer held at the count: the LRU map evicted them (a
    /// translated 5-tuple reused by a later connection counts too: its entry was replaced).
    /// Learned before the walk began, so translations added during it never count as evicted.
    pub fn evicted(&self) -> u64 {
        self.learned.saturating_sub(self.entries)
    }
}

impl Tracer {
    /// Counts the NAT map's entries: one key walk, so the caller keeps it rare.
    pub fn nat_occupancy(&self, learned: u64) -> Result<NatOccupancy, ProbeError> {
        let map = self
            .ebpf
            .map(MAP_NAT)
            .ok_or(ProbeError::MissingMap(MAP_NAT))?;
        let capacity = map_capacity(map);
        let nat: HashMap<&MapData, Tuple, agent_common::NatOrigin> =
            HashMap::try_from(map).map_err(map_err(MAP_NAT))?;
        let entries = nat.keys().filter(Result::is_ok).count() as u64;
        Ok(NatOccupancy {
            entries,
            capacity,
            learned,
        })
    }

    fn per_cpu_array(&self, name: &'static str) -> Result<Vec<Vec<u64>>, ProbeError> {
        let map = self.ebpf.map(name).ok_or(ProbeError::MissingMap(name))?;
        let arr: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map).map_err(map_err(name))?;
        arr.iter()
            .map(|v| v.map(|per_cpu| per_cpu.to_vec()).map_err(map_err(name)))
            .collect()
    }

    pub fn counters(&self) -> Result<KernelCounters, ProbeError> {
        let mut out = KernelCounters::default();
        let map = self
            .ebpf
            .map(MAP_DROP_COUNTS)
            .ok_or(ProbeError::MissingMap(MAP_DROP_COUNTS))?;
        let counts: PerCpuHashMap<&MapData, u32, u64> =
            PerCpuHashMap::try_from(map).map_err(map_err(MAP_DROP_COUNTS))?;
        for item in counts.iter() {
            let (reason, per_cpu) = item.map_err(map_err(MAP_DROP_COUNTS))?;
            out.by_reason.insert(reason, per_cpu.iter().sum());
        }
        // Core reasons count in an array slot each; only those that happened are kept.
        for (reason, per_cpu) in self.per_cpu_array(MAP_REASON_COUNTS)?.iter().enumerate() {
            let n: u64 = per_cpu.iter().sum();
            if let (true, Ok(reason)) = (n > 0, u32::try_from(reason)) {
                *out.by_reason.entry(reason).or_default() += n;
            }
        }
        let stats = self.per_cpu_array(MAP_STATS)?;
        let total = |idx: u32| stats.get(idx as usize).map_or(0, |v| v.iter().sum());
        out.lost_per_cpu = stats
            .get(STAT_RING_LOST as usize)
            .cloned()
            .unwrap_or_default();
        out.sampled_out = total(STAT_SAMPLED_OUT);
        out.agg_full = total(STAT_AGG_FULL);
        out.read_errors = total(STAT_READ_ERRORS);
        out.ct_no_baseline = total(STAT_CT_NO_BASELINE);
        out.nat_learned = total(STAT_NAT_LEARNED);
        out.nat_joined = total(STAT_NAT_JOINED);
        out.arp = total(STAT_ARP);
        out.neigh = total(STAT_NEIGH);
        out.proc = total(STAT_PROC);
        for (idx, per_cpu) in self.per_cpu_array(MAP_CT_COUNTS)?.iter().enumerate() {
            let event = u8::try_from(idx)
                .ok()
                .and_then(|i| CtEvent::try_from(i).ok());
            if let Some(e) = event {
                *out.ct_events.entry(e).or_default() += per_cpu.iter().sum::<u64>();
            }
        }
        // Aggregating, the kernel counts per key what the arrays count otherwise.
        for a in self.agg_counts()? {
            *out.by_reason.entry(a.reason).or_default() += a.count;
            if let Some(Ok(e)) = a.event {
                *out.ct_events.entry(e).or_default() += a.count;
            }
        }
        out.matched = out.by_reason.values().sum();
        out.missed = self.recursion_misses();
        Ok(out)
    }
}

fn map_capacity(map: &aya::maps::Map) -> u64 {
    let aya::maps::Map::LruHashMap(d) = map else {
        return 0;
    };
    d.info().map_or(0, |i| u64::from(i.max_entries()))
}
