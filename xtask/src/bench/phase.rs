//! One phase of the bench: a tracer under a load, and everything measured about it.

use std::{
    collections::{BTreeMap, HashMap},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::Result;
use lbtest::blast::Sent;
use serde_json::{json, Value};

use super::{
    bpfstats, measure, ncpus,
    tracer::{Counts, Kind, Running},
    Ctx, Lab, Load, Oracle, MARKER_PORT, QUIET_PCT, SETTLE,
};

/// The tracer's own process, measured over the phase.
#[derive(Clone, Copy, Debug, Default)]
pub struct Daemon {
    pub rates: measure::ProcRates,
    /// On-CPU time over the phase.
    pub cpu_ns: u64,
    pub rss: u64,
    pub rss_peak: u64,
    pub maps: u64,
    pub maps_bytes: u64,
}

impl Daemon {
    /// Measured between `before` and now, before the process is stopped.
    pub fn measure(pid: u32, before: &measure::ProcSample) -> Self {
        let (rss, rss_peak) = measure::rss(pid);
        let (maps, maps_bytes) = measure::bpf_maps(pid);
        let now = measure::process(pid);
        Self {
            rates: measure::rates(before, &now),
            cpu_ns: now.cpu_ns.saturating_sub(before.cpu_ns),
            rss,
            rss_peak,
            maps,
            maps_bytes,
        }
    }
}

/// One tracer under one load.
pub struct PhaseResult {
    pub tracer: Kind,
    pub load: Load,
    pub round: usize,
    pub sent: Sent,
    pub markers: u64,
    pub busy_ns_per_drop: f64,
    /// The machine's CPU used by other processes meanwhile, in % of all CPUs (subtracted).
    pub background_pct: f64,
    /// Other tracers attached meanwhile (see [`measure::foreign_tracers`]).
    pub foreign: Vec<String>,
    pub daemon: Option<Daemon>,
    pub counts: Option<Counts>,
    pub expected: BTreeMap<String, u64>,
    pub oracle: Oracle,
    pub latencies_ms: Vec<f64>,
    pub markers_missed: u64,
    /// The tracer's BPF programs over the traffic: runs and time (kernel statistics).
    pub progs: Vec<bpfstats::Cost>,
}

impl PhaseResult {
    /// Total drops the bench made.
    pub fn drops(&self) -> u64 {
        self.sent.total() + self.markers
    }

    /// Whether other processes left the machine mostly to the bench during this phase, and no
    /// other tracer was attached.
    pub fn quiet(&self) -> bool {
        self.background_pct < QUIET_PCT && self.foreign.is_empty()
    }

    /// Whether the kernel's own counters (Udp NoPorts, the nft counter) saw exactly what the
    /// generator sent: if not, the generator's counts are no oracle for this run.
    pub fn oracle_agrees(&self) -> bool {
        let want = |r: &str| self.expected.get(r).copied().unwrap_or(0);
        self.oracle.udp_no_ports == want("NO_SOCKET")
            && self.oracle.nft_dropped == want("NETFILTER_DROP")
    }

    /// The daemon's own CPU time per drop (its part of the overhead; the rest is in the kernel).
    pub fn daemon_ns_per_drop(&self) -> Option<f64> {
        Some(self.daemon?.cpu_ns as f64 / self.drops().max(1) as f64)
    }

    /// See [`exact`]; `None` for bpftrace, which counts the whole machine (other drops
    /// included): see [`PhaseResult::covers`].
    pub fn exact(&self) -> Option<bool> {
        let c = self.counts.as_ref().filter(|_| self.tracer.is_lbtrace())?;
        Some(exact(c, &self.expected))
    }

    /// Whether a machine-wide count holds at least every drop the generator made.
    pub fn covers(&self) -> Option<bool> {
        let c = self.counts.as_ref()?;
        Some(
            self.expected
                .iter()
                .all(|(r, n)| c.by_reason.get(r).copied().unwrap_or(0) >= *n),
        )
    }

    pub fn to_json(&self) -> Value {
        let secs = self.sent.elapsed.as_secs_f64();
        json!({
            "tracer": self.tracer.name(),
            "load": self.load.name(),
            "round": self.round,
            "offered_per_s": self.load.rate(),
            "duration_s": secs,
            "sent": self.sent.total(),
            "markers": self.markers,
            "drops_per_s": self.drops() as f64 / secs.max(1e-9),
            "busy_ns_per_drop": self.busy_ns_per_drop,
            "background_pct": self.background_pct,
            "foreign_tracers": self.foreign,
            "expected": self.expected,
            "oracle": {
                "udp_no_ports": self.oracle.udp_no_ports,
                "nft_dropped": self.oracle.nft_dropped,
                "agrees": self.oracle_agrees(),
            },
            "counted": self.counts.as_ref().map(|c| json!({
                "scope": c.scope,
                "drops_by_reason": c.by_reason,
                "events_seen": c.seen,
                "events_delivered": c.delivered,
                "events_lost": c.lost,
                "events_sampled_out": c.sampled_out,
            })),
            "exact": self.exact(),
            "covers_expected": self.covers(),
            "daemon": self.daemon.map(|d| json!({
                "cpu_pct": d.rates.cpu_pct,
                "ns_per_drop": self.daemon_ns_per_drop(),
                "wakeups_per_s": d.rates.wakeups_per_s,
                "preemptions_per_s": d.rates.preemptions_per_s,
                "rss_bytes": d.rss,
                "rss_peak_bytes": d.rss_peak,
                "bpf_maps": d.maps,
                "bpf_maps_bytes": d.maps_bytes,
            })),
            "latency_samples": self.latencies_ms.len(),
            "latency_markers_missed": self.markers_missed,
            "received": self.counts.as_ref().and_then(|c| c.received.as_ref()).map(|r| json!({
                "records": r.records,
                "by_reason": r.by_reason,
            })),
            "programs": self.progs.iter().map(bpfstats::Cost::to_json).collect::<Vec<_>>(),
        })
    }
}

/// Whether lbtrace's per-reason counts equal the generator's: filtered on the VIP, they must
/// hold nothing else.
pub fn exact(counts: &Counts, expected: &BTreeMap<String, u64>) -> bool {
    counts
        .by_reason
        .iter()
        .filter(|(_, n)| **n > 0)
        .eq(expected.iter().filter(|(_, n)| **n > 0))
}

/// Runs `load` for `duration` with `kind` attached, measuring it all.
pub fn run_phase(
    lab: &Lab,
    ctx: &Ctx,
    kind: Kind,
    load: Load,
    duration: Duration,
    round: usize,
) -> Result<PhaseResult> {
    let markers_on = load == Load::Low;
    let (marker_tx, marker_rx) = mpsc::channel();
    let progs_pre = bpfstats::snapshot()?;
    let tracer = Running::start(
        kind,
        &ctx.bin,
        lab.scope(),
        (markers_on && kind == Kind::Watch).then_some((MARKER_PORT, marker_tx)),
    )?;
    let plan = lab.plan(load.rate(), duration);
    let pid = tracer.pid();
    let oracle0 = lab.oracle()?;
    let proc0 = pid.map(measure::process);
    let ours = [Some(std::process::id()), pid].map(|p| p.unwrap_or(0));
    let reader0 = tracer.reader_cpu_ns();
    let mut foreign = measure::foreign_tracers(&ours);
    let others0 = measure::others_cpu_ns(&ours);
    let progs0 = bpfstats::snapshot()?;
    let busy0 = measure::busy_ns()?;
    let t0 = Instant::now();
    let (sent, marks) = std::thread::scope(|s| -> Result<_> {
        let m = markers_on.then(|| s.spawn(|| lab.send_markers(Instant::now() + duration)));
        let sent = lab.blaster.run(&plan);
        let marks = match m {
            Some(h) => h
                .join()
                .map_err(|_| anyhow::anyhow!("marker thread panicked"))??,
            None => Vec::new(),
        };
        Ok((sent?, marks))
    })?;
    std::thread::sleep(SETTLE);
    let busy = measure::busy_ns()?.saturating_sub(busy0);
    let others = measure::others_cpu_ns(&ours).saturating_sub(others0);
    let interval = t0.elapsed();
    let reader = tracer.reader_cpu_ns().saturating_sub(reader0);
    for f in measure::foreign_tracers(&ours) {
        if !foreign.contains(&f) {
            foreign.push(f);
        }
    }
    let daemon = pid.zip(proc0).map(|(pid, p0)| Daemon::measure(pid, &p0));
    let progs1 = bpfstats::snapshot()?;
    let oracle1 = lab.oracle()?;
    let counts = tracer.stop(&ctx.names)?;
    let seen: HashMap<u16, Instant> = marker_rx.try_iter().collect();
    let mut latencies_ms: Vec<f64> = marks
        .iter()
        .filter_map(|(sport, at)| Some(seen.get(sport)?.duration_since(*at).as_secs_f64() * 1e3))
        .collect();
    latencies_ms.sort_by(f64::total_cmp);
    let markers = marks.len() as u64;
    let expected = lab.expected(&sent, &plan, markers);
    let drops = (sent.total() + markers).max(1);
    Ok(PhaseResult {
        tracer: kind,
        load,
        round,
        busy_ns_per_drop: busy.saturating_sub(others + reader) as f64 / drops as f64,
        background_pct: others as f64 / interval.as_secs_f64() / ncpus() as f64 / 1e7,
        foreign,
        daemon,
        counts,
        expected,
        oracle: Oracle {
            udp_no_ports: oracle1.udp_no_ports - oracle0.udp_no_ports,
            nft_dropped: oracle1.nft_dropped - oracle0.nft_dropped,
        },
        markers_missed: if kind == Kind::Watch && markers_on {
            markers - latencies_ms.len() as u64
        } else {
            0
        },
        latencies_ms,
        markers,
        sent,
        progs: tracer_costs(kind, pid, &progs_pre, &progs0, &progs1),
    })
}

/// The costs, from `s0` to `s1`, of the programs `kind` loaded: those that appeared after `pre`
/// (before it started), lbtrace's by name, bpftrace's held by its process (when bpftool says
/// who holds a program).
pub fn tracer_costs(
    kind: Kind,
    pid: Option<u32>,
    pre: &bpfstats::Snapshot,
    s0: &bpfstats::Snapshot,
    s1: &bpfstats::Snapshot,
) -> Vec<bpfstats::Cost> {
    if kind == Kind::None {
        return Vec::new();
    }
    bpfstats::costs(s0, s1, |id, p| {
        !pre.contains_key(&id)
            && match kind {
                Kind::Bpftrace => p.pids.is_empty() || pid.is_some_and(|pid| p.pids.contains(&pid)),
                Kind::Hooks => super::floor::is_floor(&p.name),
                _ => bpfstats::is_lbtrace(p),
            }
    })
}
