//! What the bench reads from /proc: system-wide busy time, a process's CPU time, context
//! switches, memory and BPF maps.

use std::{fs, time::Instant};

use anyhow::{Context, Result};

fn clock_tick_ns() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    1_000_000_000 / u64::try_from(hz).unwrap_or(100).max(1)
}

/// CPU time spent by all CPUs outside idle, iowait and steal, in ns (`/proc/stat`, tick
/// resolution). Softirq time counts: that is where drops, and the programs hooked to them, run.
pub fn busy_ns() -> Result<u64> {
    let stat = fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let busy: u64 = [0, 1, 2, 5, 6].iter().filter_map(|&i| v.get(i)).sum();
    Ok(busy * clock_tick_ns())
}

/// CPU time (user + sys, with reaped children) of every process but `ours`, in ns: what the
/// rest of the machine did meanwhile, to subtract from [`busy_ns`]. The ksoftirqd threads count
/// as ours: they run our packets when softirq work is deferred.
pub fn others_cpu_ns(ours: &[u32]) -> u64 {
    let Ok(dir) = fs::read_dir("/proc") else {
        return 0;
    };
    let mut ticks = 0;
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if ours.contains(&pid) {
            continue;
        }
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // The command name, in parentheses, may hold spaces: fields follow the last ')'.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        if head.contains("(ksoftirqd/") {
            continue;
        }
        // utime stime cutime cstime are fields 14-17; `rest` starts at field 3.
        ticks += rest
            .split_whitespace()
            .skip(11)
            .take(4)
            .filter_map(|f| f.parse::<i64>().ok())
            .map(|v| u64::try_from(v).unwrap_or(0))
            .sum::<u64>();
    }
    ticks * clock_tick_ns()
}

/// Other tracers on this machine: BPF programs other processes attached to tracepoints
/// (`bpftool perf show`) and tracefs instances recording `skb/kfree_skb`. Each adds its cost to
/// every packet the bench sends, the no-tracer runs included.
pub fn foreign_tracers(ours: &[u32]) -> Vec<String> {
    let mut found = Vec::new();
    let out = std::process::Command::new("bpftool")
        .args(["perf", "show", "-j"])
        .output();
    let list: serde_json::Value = out
        .ok()
        .and_then(|o| serde_json::from_slice(&o.stdout).ok())
        .unwrap_or_default();
    let mut by_pid = std::collections::BTreeMap::<u64, Vec<String>>::new();
    for e in list.as_array().into_iter().flatten() {
        let Some(pid) = e["pid"].as_u64() else {
            continue;
        };
        if ours.iter().any(|o| u64::from(*o) == pid) {
            continue;
        }
        let what = ["tracepoint", "func", "filename"]
            .iter()
            .find_map(|k| e[k].as_str())
            .unwrap_or("?");
        by_pid.entry(pid).or_default().push(what.to_owned());
    }
    for (pid, hooks) in by_pid {
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        found.push(format!("{}[{pid}]: {}", comm.trim(), hooks.join(", ")));
    }
    let tracefs = std::path::Path::new("/sys/kernel/tracing");
    let instances = fs::read_dir(tracefs.join("instances"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path());
    for dir in std::iter::once(tracefs.to_owned()).chain(instances) {
        let on = fs::read_to_string(dir.join("events/skb/kfree_skb/enable"))
            .is_ok_and(|v| v.trim() == "1");
        if on {
            found.push(format!("tracefs {}: skb/kfree_skb", dir.display()));
        }
    }
    found
}

/// On-CPU time (user + sys) of one thread in ns, from its schedstat (the tick-based utime and
/// stime of `/proc/PID/stat` are 10 ms coarse).
pub fn thread_cpu_ns(pid: u32, tid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A process's CPU time and context switches, summed over its threads.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcSample {
    pub cpu_ns: u64,
    /// Each is a sleep that ended in a wakeup.
    pub voluntary: u64,
    pub nonvoluntary: u64,
    pub at: Option<Instant>,
}

fn status_field(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

pub fn process(pid: u32) -> ProcSample {
    let mut s = ProcSample {
        at: Some(Instant::now()),
        ..ProcSample::default()
    };
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return s;
    };
    for t in tasks.flatten() {
        let Some(tid) = t.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        s.cpu_ns += thread_cpu_ns(pid, tid);
        if let Ok(st) = fs::read_to_string(t.path().join("status")) {
            s.voluntary += status_field(&st, "voluntary_ctxt_switches:");
            s.nonvoluntary += status_field(&st, "nonvoluntary_ctxt_switches:");
        }
    }
    s
}

/// Per-second rates and CPU share between two samples of one process.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcRates {
    /// Percent of one core.
    pub cpu_pct: f64,
    pub wakeups_per_s: f64,
    pub preemptions_per_s: f64,
}

pub fn rates(a: &ProcSample, b: &ProcSample) -> ProcRates {
    let secs = match (a.at, b.at) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64().max(1e-9),
        _ => return ProcRates::default(),
    };
    ProcRates {
        cpu_pct: b.cpu_ns.saturating_sub(a.cpu_ns) as f64 / secs / 1e7,
        wakeups_per_s: b.voluntary.saturating_sub(a.voluntary) as f64 / secs,
        preemptions_per_s: b.nonvoluntary.saturating_sub(a.nonvoluntary) as f64 / secs,
    }
}

/// `(VmRSS, VmHWM)` in bytes.
pub fn rss(pid: u32) -> (u64, u64) {
    let st = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    (
        status_field(&st, "VmRSS:") * 1024,
        status_field(&st, "VmHWM:") * 1024,
    )
}

/// The BPF maps a process holds open: `(count, bytes)`, the bytes being what the kernel charges
/// for them (`memlock` in fdinfo, which includes a ring buffer's data pages).
pub fn bpf_maps(pid: u32) -> (u64, u64) {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return (0, 0);
    };
    let mut seen = std::collections::BTreeSet::new();
    let (mut n, mut bytes) = (0, 0);
    for fd in fds.flatten() {
        let is_map =
            fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == "anon_inode:bpf-map");
        if !is_map {
            continue;
        }
        let info = fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        // The same map may be open twice: count it once.
        if !seen.insert(status_field(&info, "map_id:")) {
            continue;
        }
        n += 1;
        bytes += status_field(&info, "memlock:");
    }
    (n, bytes)
}

/// Nearest-rank percentile of latencies where `missed` more samples never arrived: a missed
/// sample is a latency above any limit, so a rank that falls among them is infinite.
pub fn percentile_with_missed(sorted: &[f64], missed: u64, p: f64) -> Option<f64> {
    let n = sorted.len() + usize::try_from(missed).unwrap_or(usize::MAX);
    if n == 0 {
        return None;
    }
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    Some(
        sorted
            .get(rank.clamp(1, n) - 1)
            .copied()
            .unwrap_or(f64::INFINITY),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missed_markers_count_in_the_percentile() {
        let v: Vec<f64> = (1..=98).map(f64::from).collect();
        // 98 seen, 2 never: p99 is one of the missed ones.
        assert_eq!(percentile_with_missed(&v, 2, 99.0), Some(f64::INFINITY));
        assert_eq!(percentile_with_missed(&v, 2, 50.0), Some(50.0));
        assert_eq!(percentile_with_missed(&v, 0, 99.0), Some(98.0));
        assert_eq!(percentile_with_missed(&[], 3, 50.0), Some(f64::INFINITY));
        assert_eq!(percentile_with_missed(&[], 0, 50.0), None);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile_with_missed(&v, 0, 50.0), Some(50.0));
        assert_eq!(percentile_with_missed(&v, 0, 99.0), Some(99.0));
        assert_eq!(percentile_with_missed(&[3.0], 0, 99.0), Some(3.0));
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(process(me).cpu_ns > 0);
        assert!(rss(me).0 > 0);
        assert!(busy_ns().unwrap() > 0);
        assert!(others_cpu_ns(&[me]) > 0);
    }
}
