//! Network namespaces on this host, and what conntrack reports inside each.

use std::{
    collections::{BTreeMap, HashMap},
    fs::{self, File},
    io,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

/// Every network namespace reachable through a process (`/proc/PID/ns/net`) or a bind mount
/// (`/run/netns/NAME`, as `ip netns` makes), by inode. One path per namespace.
pub fn namespaces() -> BTreeMap<u32, PathBuf> {
    let mut out = BTreeMap::new();
    let mut add = |p: PathBuf| {
        if let Ok(m) = fs::metadata(&p) {
            if let Ok(ino) = u32::try_from(m.ino()) {
                out.entry(ino).or_insert(p);
            }
        }
    };
    if let Ok(dir) = fs::read_dir("/run/netns") {
        for e in dir.flatten() {
            add(e.path());
        }
    }
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            if e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
            {
                add(e.path().join("ns/net"));
            }
        }
    }
    out
}

/// Runs `f` on a thread that has entered the namespace at `path`.
pub fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let ns = File::open(path)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this thread only, with an fd we hold open.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| io::Error::other("netns thread panicked"))?
    })
}

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
