//! Aggregation mode: the VIP set the kernel attributes drops to, and the exact per-key counts
//! it keeps (read at housekeeping, never per event).

use std::{
    collections::{BTreeSet, HashMap as StdHashMap},
    net::IpAddr,
};

use agent_common::{
    AggKey, AggSlot, AggValue, CtEvent, AGG_FLAG_MULTICAST, MAP_AGG, MAP_AGG_FAST, MAP_VIPS4,
    MAP_VIPS6, MAP_VIP_ADDRS4, MAP_VIP_ADDRS6, MAP_VIP_META, VIP_META_GEN_SHIFT, VIP_META_IPV4,
    VIP_META_IPV6, VIP_META_POOL4, VIP_META_POOL6,
};
use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, PerCpuArray, PerCpuHashMap},
    Ebpf,
};
use ipnet::IpNet;

use super::{map_err, ProbeError, Tracer};
use crate::pipeline::attribution::VipSet;

/// Aggregation settings (the agent's).
#[derive(Clone, Copy, Debug)]
pub struct Aggregation {
    /// Records per key (VIP, reason, location, conntrack event), CPU and second; 0: all.
    pub sample_limit: u32,
    /// Keys `AGG` holds; drops of keys past it are sent as records and still counted.
    pub entries: u32,
}

/// One key's exact total over all CPUs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AggCount {
    pub vip: Option<IpAddr>,
    pub reason: u32,
    pub location: u64,
    /// The conntrack event (unknown values kept), when conntrack caused the drop.
    pub event: Option<Result<CtEvent, u8>>,
    /// The packets' destination was multicast (a benign drop for some reasons).
    pub multicast: bool,
    pub count: u64,
}

fn addr_of(key: &AggKey) -> Option<IpAddr> {
    // The words hold the address in network byte order, as the packet did.
    let bytes: Vec<u8> = key.vip.iter().flat_map(|w| w.to_ne_bytes()).collect();
    match key.family {
        agent_common::FAMILY_IPV4 => {
            let b: [u8; 4] = bytes[..4].try_into().ok()?;
            Some(IpAddr::from(b))
        }
        agent_common::FAMILY_IPV6 => {
            let b: [u8; 16] = bytes.try_into().ok()?;
            Some(IpAddr::from(b))
        }
        _ => None,
    }
}

/// Adds, then removes, one family's VIPs: single addresses in the hash map `maps.0`, pools in
/// the trie `maps.1`. Every add comes first, so a VIP that moves between the two (an address
/// that becomes part of a pool) is never missing.
fn update_family<const N: usize>(
    ebpf: &mut Ebpf,
    (addrs_map, trie_map): (&'static str, &'static str),
    add: &[(u8, [u8; N])],
    remove: &[(u8, [u8; N])],
) -> Result<(), ProbeError> {
    let single = |len: u8| usize::from(len) == N * 8;
    for (adding, nets) in [(true, add), (false, remove)] {
        let map = ebpf
            .map_mut(addrs_map)
            .ok_or(ProbeError::MissingMap(addrs_map))?;
        let mut addrs: HashMap<&mut MapData, [u8; N], u8> =
            HashMap::try_from(map).map_err(map_err(addrs_map))?;
        for (_, addr) in nets.iter().filter(|(len, _)| single(*len)) {
            if adding {
                addrs.insert(*addr, 1, 0).map_err(map_err(addrs_map))?;
            } else {
                let _ = addrs.remove(addr);
            }
        }
        let map = ebpf
            .map_mut(trie_map)
            .ok_or(ProbeError::MissingMap(trie_map))?;
        let mut trie: LpmTrie<&mut MapData, [u8; N], u8> =
            LpmTrie::try_from(map).map_err(map_err(trie_map))?;
        for (len, addr) in nets.iter().filter(|(len, _)| !single(*len)) {
            let key = Key::new(u32::from(*len), *addr);
            if adding {
                trie.insert(&key, 1, 0).map_err(map_err(trie_map))?;
            } else {
                let _ = trie.remove(&key);
            }
        }
    }
    Ok(())
}

/// Whether `n` is a single address rather than a pool.
fn single(n: &IpNet) -> bool {
    n.prefix_len() == n.max_prefix_len()
}

/// The prefixes of `nets`, split by family.
#[expect(
    clippy::type_complexity,
    reason = "two lists of (prefix length, address) pairs"
)]
fn split<'a>(nets: impl Iterator<Item = &'a IpNet>) -> (Vec<(u8, [u8; 4])>, Vec<(u8, [u8; 16])>) {
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for n in nets {
        match n {
            IpNet::V4(n) => v4.push((n.prefix_len(), n.addr().octets())),
            IpNet::V6(n) => v6.push((n.prefix_len(), n.addr().octets())),
        }
    }
    (v4, v6)
}

/// The prefixes a VIP set puts in the kernel's trie.
pub fn prefixes(vips: &VipSet) -> BTreeSet<IpNet> {
    vips.addrs()
        .iter()
        .map(|a| IpNet::from(*a))
        .chain(vips.pools().iter().copied())
        .collect()
}

/// Makes the kernel's VIP maps hold exactly `want` (single addresses in the hash maps, pools
/// in the tries), from `have`: adds before it removes, so a VIP kept across a reload never
/// goes unattributed.
pub(super) fn write_vips(
    ebpf: &mut Ebpf,
    have: &BTreeSet<IpNet>,
    want: &BTreeSet<IpNet>,
) -> Result<(), ProbeError> {
    let (add4, add6) = split(want.difference(have));
    let (del4, del6) = split(have.difference(want));
    update_family(ebpf, (MAP_VIP_ADDRS4, MAP_VIPS4), &add4, &del4)?;
    update_family(ebpf, (MAP_VIP_ADDRS6, MAP_VIPS6), &add6, &del6)?;
    let meta = want.iter().fold(0u32, |m, n| match (n, single(n)) {
        (IpNet::V4(_), true) => m | VIP_META_IPV4,
        (IpNet::V4(_), false) => m | VIP_META_IPV4 | VIP_META_POOL4,
        (IpNet::V6(_), true) => m | VIP_META_IPV6,
        (IpNet::V6(_), false) => m | VIP_META_IPV6 | VIP_META_POOL6,
    });
    let map = ebpf
        .map_mut(MAP_VIP_META)
        .ok_or(ProbeError::MissingMap(MAP_VIP_META))?;
    let mut arr: Array<&mut MapData, u64> = Array::try_from(map).map_err(map_err(MAP_VIP_META))?;
    // A new generation, never 0 (what an unwritten cache slot holds), written after the maps.
    let old = arr.get(&0, 0).map_err(map_err(MAP_VIP_META))?;
    let generation = ((old >> VIP_META_GEN_SHIFT) as u32).wrapping_add(1).max(1);
    let value = u64::from(meta) | u64::from(generation) << VIP_META_GEN_SHIFT;
    arr.set(0, value, 0).map_err(map_err(MAP_VIP_META))
}

impl Tracer {
    /// Makes the kernel's VIP maps hold exactly `vips` (see [`write_vips`]).
    pub fn set_vips(&mut self, vips: &VipSet) -> Result<(), ProbeError> {
        if !self.aggregating {
            return Ok(());
        }
        let want = prefixes(vips);
        // Unchanged: no write, and no new generation to empty the programs' caches.
        if want == self.vips_in_kernel {
            return Ok(());
        }
        write_vips(&mut self.ebpf, &self.vips_in_kernel, &want)?;
        self.vips_in_kernel = want;
        Ok(())
    }

    /// Exact totals per aggregation key (empty unless aggregating): `AGG`'s per-CPU counts plus
    /// those of the `AGG_FAST` slots the CPUs claimed for the key.
    pub fn agg_counts(&self) -> Result<Vec<AggCount>, ProbeError> {
        if !self.aggregating {
            return Ok(Vec::new());
        }
        let map = |name| self.ebpf.map(name).ok_or(ProbeError::MissingMap(name));
        let agg: PerCpuHashMap<&MapData, AggKey, AggValue> =
            PerCpuHashMap::try_from(map(MAP_AGG)?).map_err(map_err(MAP_AGG))?;
        let fast: PerCpuArray<&MapData, AggSlot> =
            PerCpuArray::try_from(map(MAP_AGG_FAST)?).map_err(map_err(MAP_AGG_FAST))?;
        let mut counts = Vec::new();
        for item in agg.iter() {
            let (key, per_cpu) = item.map_err(map_err(MAP_AGG))?;
            counts.extend(per_cpu.iter().map(|v| (key, v.count)));
        }
        for per_cpu in fast.iter() {
            counts.extend(claimed(per_cpu.map_err(map_err(MAP_AGG_FAST))?.iter()));
        }
        Ok(merge(counts))
    }
}

/// The (key, count) of each claimed slot.
fn claimed<'a, I>(slots: I) -> impl Iterator<Item = (AggKey, u64)> + use<'a, I>
where
    I: Iterator<Item = &'a AggSlot>,
{
    slots
        .filter(|s| s.used != 0)
        .map(|s| (s.key, s.value.count))
}

/// One total per key, from per-CPU counts found in either map.
fn merge(counts: impl IntoIterator<Item = (AggKey, u64)>) -> Vec<AggCount> {
    let mut totals: StdHashMap<AggKey, u64> = StdHashMap::new();
    for (key, count) in counts {
        *totals.entry(key).or_default() += count;
    }
    totals
        .into_iter()
        .map(|(key, count)| AggCount {
            vip: addr_of(&key),
            reason: key.reason,
            location: key.location,
            event: (key.ct_event != 0).then(|| CtEvent::try_from(key.ct_event)),
            multicast: key.flags & AGG_FLAG_MULTICAST != 0,
            count,
        })
        .collect()
}

/// The kernel's tick rate: the resolution of the coarse clocks is one jiffy.
pub(super) fn kernel_hz() -> u32 {
    let mut res = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_getres only writes the timespec it is given.
    let ok = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &raw mut res) } == 0;
    match (ok, res.tv_sec, u32::try_from(res.tv_nsec)) {
        (true, 0, Ok(ns)) if ns > 0 => 1_000_000_000 / ns,
        _ => 0,
    }
}

/// The power of two of jiffies nearest a second (0 when the tick rate is unknown).
pub(super) fn window_shift(hz: u32) -> u32 {
    if hz == 0 {
        return 0;
    }
    let below = 31 - hz.leading_zeros();
    let (lo, hi) = (1u64 << below, 1u64 << (below + 1));
    if u64::from(hz) - lo <= hi - u64::from(hz) {
        below.max(1)
    } else {
        below + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(reason: u32) -> AggKey {
        AggKey {
            reason,
            location: 0xffff_ffff_8100_0000,
            ..AggKey::default()
        }
    }

    fn slot(used: u32, reason: u32, count: u64) -> AggSlot {
        AggSlot {
            used,
            key: key(reason),
            value: AggValue {
                count,
                ..AggValue::default()
            },
            ..AggSlot::default()
        }
    }

    #[test]
    fn a_key_counts_its_slots_and_its_hash_entries_once_each() {
        // CPU 0 counts reason 2 in a slot, CPU 1 in AGG; a free slot adds nothing.
        let slots = [slot(1, 2, 5), slot(0, 2, 99), slot(1, 3, 1)];
        let hashed = [(key(2), 7), (key(2), 0)];
        let mut got: Vec<(u32, u64)> = merge(hashed.into_iter().chain(claimed(slots.iter())))
            .into_iter()
            .map(|c| (c.reason, c.count))
            .collect();
        got.sort_unstable();
        assert_eq!(got, [(2, 12), (3, 1)]);
    }
}
