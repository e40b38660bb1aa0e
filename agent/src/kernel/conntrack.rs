//! What conntrack reports in each namespace: per-CPU statistics, table fill, and the pressure
//! on each table while lbtrace runs.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs, io,
    path::Path,
};

use serde::{Deserialize, Serialize};

use super::netns::{in_netns, namespaces};

/// Warn when a namespace's conntrack table is this full (percent of nf_conntrack_max).
const TABLE_WARN_PERCENT: u64 = 80;

/// One CPU's row of `/proc/net/stat/nf_conntrack`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtCpuStat {
    pub insert_failed: u32,
    pub drop: u32,
    pub early_drop: u32,
    pub clash_resolve: u32,
}

/// A namespace's conntrack statistics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CtTable {
    /// Entries in this namespace's table.
    pub entries: u64,
    /// One row per possible CPU, in CPU order.
    pub per_cpu: Vec<CtCpuStat>,
}

impl CtTable {
    pub fn sum(&self) -> CtCpuStat {
        self.per_cpu
            .iter()
            .fold(CtCpuStat::default(), |a, r| CtCpuStat {
                insert_failed: a.insert_failed.wrapping_add(r.insert_failed),
                drop: a.drop.wrapping_add(r.drop),
                early_drop: a.early_drop.wrapping_add(r.early_drop),
                clash_resolve: a.clash_resolve.wrapping_add(r.clash_resolve),
            })
    }
}

/// Parses `/proc/net/stat/nf_conntrack`: a header of column names, then hex values per CPU.
pub fn parse_ct_stat(text: &str) -> Option<CtTable> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next()?.split_whitespace().collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let (entries, insert_failed, drop, early_drop) = (
        col("entries")?,
        col("insert_failed")?,
        col("drop")?,
        col("early_drop")?,
    );
    let clash = col("clashres");
    let mut table = CtTable::default();
    for line in lines {
        let vals: Vec<u64> = line
            .split_whitespace()
            .map(|v| u64::from_str_radix(v, 16).unwrap_or(0))
            .collect();
        let get = |i: usize| vals.get(i).copied().unwrap_or(0);
        let get32 = |i: usize| u32::try_from(get(i)).unwrap_or(u32::MAX);
        table.entries = get(entries);
        table.per_cpu.push(CtCpuStat {
            insert_failed: get32(insert_failed),
            drop: get32(drop),
            early_drop: get32(early_drop),
            clash_resolve: clash.map_or(0, get32),
        });
    }
    Some(table)
}

/// The conntrack statistics of the namespace at `path`; `None` when conntrack is not active
/// there.
pub fn conntrack_stats(path: &Path) -> io::Result<Option<CtTable>> {
    in_netns(path, || {
        fs::read_to_string("/proc/thread-self/net/stat/nf_conntrack")
            .ok()
            .and_then(|t| parse_ct_stat(&t))
    })
}

/// `nf_conntrack_max`: one global limit, compared with each namespace's own count.
pub fn conntrack_max() -> Option<u64> {
    fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Conntrack tables of all namespaces, by inode.
pub fn all_conntrack_tables() -> HashMap<u32, CtTable> {
    namespaces()
        .into_iter()
        .filter_map(|(ino, path)| Some((ino, conntrack_stats(&path).ok()??)))
        .collect()
}

/// A namespace's table in the summary: how full it got, and how its per-CPU counters moved.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TableReport {
    pub clash_resolved_per_cpu: Vec<u32>,
    pub drop_per_cpu: Vec<u32>,
    pub early_drop_per_cpu: Vec<u32>,
    pub entries: u64,
    pub insert_failed_per_cpu: Vec<u32>,
    pub max: Option<u64>,
    pub peak_entries: u64,
}

/// Conntrack table pressure per namespace: entries against nf_conntrack_max, and how the
/// per-CPU insert_failed, drop, early_drop and clash_resolve counters moved while watching.
pub struct TablePressure {
    start: HashMap<u32, CtTable>,
    pub last: HashMap<u32, CtTable>,
    peak: HashMap<u32, u64>,
    warned: HashSet<u32>,
    pub max: Option<u64>,
}

impl TablePressure {
    /// Nothing known yet (before [`Self::start`]).
    pub fn empty() -> Self {
        Self {
            start: HashMap::new(),
            last: HashMap::new(),
            peak: HashMap::new(),
            warned: HashSet::new(),
            max: None,
        }
    }

    /// Every namespace's table now: the baseline the summary compares with.
    pub fn start() -> Self {
        let start = all_conntrack_tables();
        Self {
            last: start.clone(),
            peak: start.iter().map(|(n, t)| (*n, t.entries)).collect(),
            start,
            warned: HashSet::new(),
            max: conntrack_max(),
        }
    }

    pub fn poll(&mut self) {
        self.last = all_conntrack_tables();
        // The limit is a sysctl: it can change while lbtrace runs.
        self.max = conntrack_max();
        for (ns, t) in &self.last {
            let peak = self.peak.entry(*ns).or_default();
            *peak = (*peak).max(t.entries);
            let Some(max) = self.max.filter(|m| *m > 0) else {
                continue;
            };
            let percent = t.entries * 100 / max;
            if percent >= TABLE_WARN_PERCENT {
                if self.warned.insert(*ns) {
                    tracing::warn!(
                        "conntrack table of netns {ns} is {percent}% full ({} of nf_conntrack_max {max})",
                        t.entries
                    );
                }
            } else {
                self.warned.remove(ns);
            }
        }
    }

    /// Entries per namespace now.
    pub fn entries(&self) -> BTreeMap<u32, u64> {
        self.last.iter().map(|(ns, t)| (*ns, t.entries)).collect()
    }

    /// Namespaces whose conntrack counters moved, or whose table came near full.
    pub fn finish(&mut self) -> BTreeMap<u32, TableReport> {
        self.poll();
        let mut out = BTreeMap::new();
        for (ns, now) in &self.last {
            let before = self.start.get(ns).cloned().unwrap_or_default();
            let per_cpu = |f: fn(&CtCpuStat) -> u32| -> Vec<u32> {
                now.per_cpu
                    .iter()
                    .enumerate()
                    .map(|(i, r)| f(r).wrapping_sub(before.per_cpu.get(i).map_or(0, f)))
                    .collect()
            };
            let report = TableReport {
                insert_failed_per_cpu: per_cpu(|r| r.insert_failed),
                drop_per_cpu: per_cpu(|r| r.drop),
                early_drop_per_cpu: per_cpu(|r| r.early_drop),
                clash_resolved_per_cpu: per_cpu(|r| r.clash_resolve),
                entries: now.entries,
                max: self.max,
                peak_entries: self.peak.get(ns).copied().unwrap_or(now.entries),
            };
            let near_full = self
                .max
                .is_some_and(|m| m > 0 && report.peak_entries * 100 / m >= TABLE_WARN_PERCENT);
            let moved = [
                &report.insert_failed_per_cpu,
                &report.drop_per_cpu,
                &report.early_drop_per_cpu,
                &report.clash_resolved_per_cpu,
            ]
            .iter()
            .any(|v| v.iter().any(|n| *n > 0));
            if moved || near_full {
                out.insert(*ns, report);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_per_cpu_rows_by_column_name() {
        let text = "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart\n\
                    00000005  00000001 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000003 00000004 00000000 00000000  00000000 00000000 00000000 00000000\n\
                    00000005  00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 0000000a 0000000b 00000002 00000000  00000000 00000000 00000000 00000000\n";
        let t = parse_ct_stat(text).unwrap();
        assert_eq!(t.entries, 5);
        assert_eq!(t.per_cpu.len(), 2);
        assert_eq!(t.per_cpu[1].insert_failed, 10);
        assert_eq!(t.per_cpu[1].drop, 11);
        assert_eq!(t.per_cpu[1].early_drop, 2);
        assert_eq!(t.sum().insert_failed, 13);
        assert_eq!(t.sum().clash_resolve, 1);
        assert!(parse_ct_stat("").is_none());
    }
}
