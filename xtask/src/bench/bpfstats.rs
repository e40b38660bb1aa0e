//! What each BPF program costs, measured by the kernel itself: with `kernel.bpf_stats_enabled`
//! on, every program's `run_cnt` and `run_time_ns` (`bpftool prog show -j`) grow with each run.

use std::{
    collections::BTreeMap,
    fs,
    sync::atomic::{AtomicU8, Ordering},
};

use anyhow::{Context, Result};
use serde_json::{json, Value};

const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// lbtrace's programs (agent-ebpf), by name.
pub const LBTRACE_PROGRAMS: [&str; 8] = [
    "kfree_skb_btf",
    "kfree_skb_tp",
    "net_dev_xmit_btf",
    "net_dev_xmit_tp",
    "netif_receive_btf",
    "netif_receive_tp",
    "neigh_update_btf",
    "neigh_update_tp",
];

/// The value to write back on a signal: b'0' or b'1' (0 when there is nothing to restore).
static RESTORE: AtomicU8 = AtomicU8::new(0);

/// Writes the old value back and dies of the signal, as it would have without the handler.
extern "C" fn on_signal(sig: libc::c_int) {
    let v = RESTORE.load(Ordering::Relaxed);
    if v != 0 {
        // SAFETY: open, write, close, signal and raise are async-signal-safe; the path is a
        // NUL-terminated literal and the buffer one byte that lives through the call.
        unsafe {
            let fd = libc::open(
                c"/proc/sys/kernel/bpf_stats_enabled".as_ptr(),
                libc::O_WRONLY,
            );
            if fd >= 0 {
                libc::write(fd, (&raw const v).cast(), 1);
                libc::close(fd);
            }
        }
    }
    // SAFETY: see above.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// `kernel.bpf_stats_enabled = 1` while it lives; the old value is restored when it is dropped
/// (an error unwinds through it) and on SIGINT, SIGTERM or SIGHUP.
pub struct StatsEnabled {
    old: String,
}

impl StatsEnabled {
    pub fn on() -> Result<Self> {
        let old = fs::read_to_string(SYSCTL)
            .with_context(|| format!("{SYSCTL}: per-program statistics"))?
            .trim()
            .to_owned();
        RESTORE.store(if old == "1" { b'1' } else { b'0' }, Ordering::Relaxed);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: installing a handler that only does async-signal-safe calls.
            unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
        }
        fs::write(SYSCTL, "1").with_context(|| format!("enabling {SYSCTL}"))?;
        Ok(Self { old })
    }

    /// Turns the statistics on or off until the next call (the old value still comes back).
    pub fn set(&self, on: bool) -> Result<()> {
        fs::write(SYSCTL, if on { "1" } else { "0" }).with_context(|| format!("writing {SYSCTL}"))
    }
}

impl Drop for StatsEnabled {
    fn drop(&mut self) {
        if let Err(e) = fs::write(SYSCTL, &self.old) {
            eprintln!("bench: cannot restore {SYSCTL} to {}: {e}", self.old);
        }
        RESTORE.store(0, Ordering::Relaxed);
    }
}

/// One loaded program's counters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Prog {
    pub name: String,
    pub tag: String,
    pub run_cnt: u64,
    pub run_time_ns: u64,
    /// Processes holding it (`pids` in bpftool's answer).
    pub pids: Vec<u32>,
}

/// Every loaded program by id.
pub type Snapshot = BTreeMap<u64, Prog>;

pub fn snapshot() -> Result<Snapshot> {
    let out =
        crate::util::output(std::process::Command::new("bpftool").args(["prog", "show", "-j"]))?;
    parse(&serde_json::from_slice(&out.stdout).context("bpftool prog show -j")?)
}

fn parse(list: &Value) -> Result<Snapshot> {
    let mut m = Snapshot::new();
    for p in list.as_array().context("bpftool printed no list")? {
        let Some(id) = p["id"].as_u64() else { continue };
        let pids = p["pids"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| u32::try_from(x["pid"].as_u64()?).ok())
            .collect();
        m.insert(
            id,
            Prog {
                name: p["name"].as_str().unwrap_or("").to_owned(),
                tag: p["tag"].as_str().unwrap_or("").to_owned(),
                run_cnt: p["run_cnt"].as_u64().unwrap_or(0),
                run_time_ns: p["run_time_ns"].as_u64().unwrap_or(0),
                pids,
            },
        );
    }
    Ok(m)
}

/// What one program did between two snapshots.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Cost {
    pub name: String,
    pub runs: u64,
    pub ns: u64,
}

impl Cost {
    pub fn ns_per_run(&self) -> Option<f64> {
        (self.runs > 0).then(|| self.ns as f64 / self.runs as f64)
    }

    pub fn to_json(&self) -> Value {
        json!({"program": self.name, "runs": self.runs, "run_time_ns": self.ns, "ns_per_run": self.ns_per_run()})
    }
}

/// Per program of a tracer (those `ours` selects in `after`), the runs and time since `before`.
/// Programs with the same name (none, normally) are summed.
pub fn costs(before: &Snapshot, after: &Snapshot, ours: impl Fn(u64, &Prog) -> bool) -> Vec<Cost> {
    let mut by_name: BTreeMap<String, Cost> = BTreeMap::new();
    for (id, p) in after.iter().filter(|(id, p)| ours(**id, p)) {
        let b = before.get(id).cloned().unwrap_or_default();
        let c = by_name.entry(p.name.clone()).or_insert_with(|| Cost {
            name: p.name.clone(),
            ..Cost::default()
        });
        c.runs += p.run_cnt.saturating_sub(b.run_cnt);
        c.ns += p.run_time_ns.saturating_sub(b.run_time_ns);
    }
    by_name.into_values().collect()
}

/// Whether a program is one of lbtrace's.
pub fn is_lbtrace(p: &Prog) -> bool {
    LBTRACE_PROGRAMS.contains(&p.name.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_are_deltas_per_program() {
        let before = parse(&json!([
            {"id": 7, "name": "kfree_skb_btf", "tag": "a", "run_cnt": 10, "run_time_ns": 1000},
        ]))
        .unwrap();
        let after = parse(&json!([
            {"id": 7, "name": "kfree_skb_btf", "tag": "a", "run_cnt": 110, "run_time_ns": 31000},
            {"id": 8, "name": "netif_receive_btf", "tag": "b", "run_cnt": 50, "run_time_ns": 2000},
            {"id": 9, "name": "kfree_skb", "tag": "c", "run_cnt": 5, "run_time_ns": 500, "pids": [{"pid": 42, "comm": "bpftrace"}]},
        ]))
        .unwrap();
        let c = costs(&before, &after, |_, p| is_lbtrace(p));
        assert_eq!(c.len(), 2);
        assert_eq!(
            (c[0].name.as_str(), c[0].runs, c[0].ns),
            ("kfree_skb_btf", 100, 30000)
        );
        assert_eq!(c[0].ns_per_run(), Some(300.0));
        assert_eq!(c[1].ns_per_run(), Some(40.0));
        let b = costs(&before, &after, |_, p| p.pids.contains(&42));
        assert_eq!((b[0].name.as_str(), b[0].runs), ("kfree_skb", 5));
    }
}
