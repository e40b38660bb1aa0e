//! `cargo xtask bench`: lbtrace's cost against no tracer and against the bpftrace one-liner, all
//! measured in one run on this machine, in namespaces the bench creates.
//!
//! A client namespace sends small UDP datagrams over a veth to a node namespace (the VIP), where
//! they are dropped: to a closed port (NO_SOCKET) and to a port an nftables rule drops
//! (NETFILTER_DROP), 3:1, with exact counts. Each tracer is started afresh for each load:
//! saturation (as fast as the generator goes), 10k and 200k drops/s. Then passing traffic
//! ([`passing`]) and 1,000 VIPs behind DNAT ([`scale`]).

mod bpfstats;
mod counts;
mod figures;
mod floor;
mod lab;
mod measure;
mod passing;
mod report;
mod report_md;
mod scale;
mod scale_lab;
mod soak;
mod targets;
mod tracer;

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    path::PathBuf,
    process::Command,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::Result;
use lbtest::blast::Sent;
use serde_json::{json, Value};

use crate::util::{require_root, step};
pub use lab::{Lab, Oracle};
use tracer::{Counts, Kind, Running};

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 200, 77, 1);
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 77, 2);
const CLOSED_PORT: u16 = 40000;
const FILTERED_PORT: u16 = 40001;
/// Marker drops for the latency measurement go to their own closed port.
const MARKER_PORT: u16 = 40999;
const LOW_RATE: u64 = 10_000;
const HIGH_RATE: u64 = 200_000;
/// After the generator stops: lets a tracer finish what is queued (its drain tick is 50 ms)
/// inside the measured interval.
const SETTLE: Duration = Duration::from_millis(300);
/// A phase is quiet when other processes used less than this share of all CPUs meanwhile.
const QUIET_PCT: f64 = 15.0;

#[derive(Clone, Copy, Debug)]
pub struct Opts {
    pub quick: bool,
    pub compare: bool,
    pub soak: bool,
    pub soak_secs: u64,
    pub soak_rate: u64,
    /// Only the scale phase.
    pub scale: bool,
}

/// How long each measurement runs.
#[derive(Clone, Copy, Debug)]
struct Durations {
    saturation: Duration,
    rounds: usize,
    /// At most this many more rounds for tracers with fewer than `rounds` quiet ones.
    extra_rounds: usize,
    /// Saturation rounds per tracer with `bpf_stats_enabled` on, for the per-program costs.
    cost_rounds: usize,
    low: Duration,
    high: Duration,
    /// Passing traffic (see [`passing`]): how long, how many rounds per tracer.
    passing: Duration,
    passing_rounds: usize,
    /// The scale phase (see [`scale`]).
    scale: Duration,
}

impl Durations {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                saturation: Duration::from_millis(2500),
                rounds: 3,
                extra_rounds: 3,
                cost_rounds: 2,
                low: Duration::from_secs(4),
                high: Duration::from_secs(6),
                passing: Duration::from_secs(2),
                passing_rounds: 2,
                scale: Duration::from_secs(3),
            }
        } else {
            Self {
                saturation: Duration::from_secs(10),
                rounds: 5,
                extra_rounds: 5,
                cost_rounds: 3,
                low: Duration::from_secs(30),
                high: Duration::from_secs(60),
                passing: Duration::from_secs(5),
                passing_rounds: 3,
                scale: Duration::from_secs(10),
            }
        }
    }
}

/// Which load a phase ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Load {
    /// As fast as the generator goes, with `bpf_stats_enabled` off: the overhead a user pays.
    Saturation,
    /// The same with `bpf_stats_enabled` on: what each program costs. The statistics are not
    /// free (two clock reads per run, some 50 ns here), and a tracer with two programs on the
    /// drop path would pay them twice in the overhead.
    Cost,
    Low,
    High,
}

impl Load {
    fn name(self) -> &'static str {
        match self {
            Self::Saturation => "saturation",
            Self::Cost => "prog-cost",
            Self::Low => "10k",
            Self::High => "200k",
        }
    }

    fn rate(self) -> Option<u64> {
        match self {
            Self::Saturation | Self::Cost => None,
            Self::Low => Some(LOW_RATE),
            Self::High => Some(HIGH_RATE),
        }
    }
}

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

/// Run-wide inputs of every phase.
pub struct Ctx {
    pub bin: PathBuf,
    /// Drop-reason code → name, from the kernel's tracefs format (bpftrace prints codes): not
    /// lbtrace's own table, which is under test.
    pub names: BTreeMap<u32, String>,
}

impl Ctx {
    fn new(bin: PathBuf) -> Result<Self> {
        Ok(Self {
            bin,
            names: tracer::kernel_reason_names()?,
        })
    }
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
                _ => bpfstats::is_lbtrace(p),
            }
    })
}

pub fn ncpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Lets bpftrace (and lbtrace) lock what they need without a warning.
fn raise_memlock() {
    let inf = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid struct; failure leaves the old limit.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &inf) };
}

/// Which tracers this machine can run, and why not for the others.
fn availability(bin: &std::path::Path) -> BTreeMap<Kind, Result<(), String>> {
    let mut m = BTreeMap::new();
    m.insert(Kind::None, Ok(()));
    m.insert(Kind::Watch, Ok(()));
    m.insert(
        Kind::Agent,
        if tracer::agent_available(bin) {
            Ok(())
        } else {
            Err(
                "`lbtrace agent` does not exist in this build (`lbtrace agent --help` fails)"
                    .into(),
            )
        },
    );
    let bpftrace = crate::setup::ensure_apt(&["bpftrace"])
        .map_err(|e| format!("cannot install bpftrace: {e:#}"))
        .and_then(|()| {
            crate::util::output(Command::new("bpftrace").arg("--version"))
                .map(|_| ())
                .map_err(|e| format!("{e:#}"))
        });
    m.insert(Kind::Bpftrace, bpftrace);
    m
}

pub fn bench(opts: Opts) -> Result<()> {
    require_root("the bench loads eBPF programs and creates network namespaces")?;
    crate::setup::setup()?;
    let bin = crate::build()?;
    raise_memlock();
    let ctx = Ctx::new(bin)?;
    if opts.soak {
        return soak::soak(&ctx, &opts);
    }
    let started = Instant::now();
    let d = Durations::new(opts.quick);
    if opts.scale {
        return scale::alone(&ctx, d.scale);
    }
    step(&format!(
        "bench: lab (client {CLIENT} → veth → node {VIP}; UDP to :{CLOSED_PORT} closed and :{FILTERED_PORT} nft-dropped, 3:1)"
    ));
    let lab = Lab::new()?;
    step("bench: tracers");
    let mut available = availability(&ctx.bin);
    for (k, a) in &available {
        eprintln!(
            "    {:<14} {}",
            k.name(),
            match a {
                Ok(()) => k.command(lab.scope()),
                Err(e) => format!("not available: {e}"),
            }
        );
    }
    let mut phases: Vec<PhaseResult> = Vec::new();
    let stats = bpfstats::StatsEnabled::on()?;
    stats.set(false)?;
    // Saturation rounds alternate between tracers; a tracer with fewer than `rounds` quiet ones
    // (see PhaseResult::quiet) gets extra ones, up to a limit. The figures then use the same
    // number of quiet rounds for every tracer (report::rounds_used).
    for round in 0..d.rounds + d.extra_rounds {
        let wanted: Vec<Kind> = Kind::ALL
            .into_iter()
            .filter(|k| available[k].is_ok())
            .filter(|k| {
                let quiet = phases
                    .iter()
                    .filter(|p| p.tracer == *k && p.load == Load::Saturation && p.quiet())
                    .count();
                round < d.rounds || quiet < d.rounds
            })
            .collect();
        if wanted.is_empty() {
            break;
        }
        for kind in wanted {
            let load = (Load::Saturation, d.saturation, round);
            run_logged(&lab, &ctx, kind, load, &mut phases, &mut available);
        }
    }
    stats.set(true)?;
    for round in 0..d.cost_rounds {
        for kind in Kind::ALL.into_iter().filter(|k| *k != Kind::None) {
            if available[&kind].is_ok() {
                let load = (Load::Cost, d.saturation, round);
                run_logged(&lab, &ctx, kind, load, &mut phases, &mut available);
            }
        }
    }
    stats.set(false)?;
    for load in [(Load::Low, d.low, 0), (Load::High, d.high, 0)] {
        for kind in Kind::ALL {
            if available[&kind].is_ok() {
                run_logged(&lab, &ctx, kind, load, &mut phases, &mut available);
            }
        }
    }
    stats.set(true)?;
    let mut passing = Vec::new();
    for round in 0..d.passing_rounds {
        // Each tracer, then the floor: the empty program on the tx hook alone.
        let kinds = Kind::ALL.into_iter().filter(|k| available[k].is_ok());
        for (kind, floor) in kinds.map(|k| (k, false)).chain([(Kind::None, true)]) {
            match passing::run_passing(&lab, &ctx, (kind, floor), d.passing, round) {
                Ok(p) => {
                    eprintln!("    {}", report::passing_line(&p));
                    passing.push(p);
                }
                Err(e) => eprintln!("    {} passing: failed: {e:#}", kind.name()),
            }
        }
    }
    let scale = if available[&Kind::Agent].is_ok() {
        scale::run(&ctx, d.scale)
    } else {
        json!({"error": "lbtrace agent is not available"})
    };
    let results = report::results(
        &phases,
        &passing,
        &scale,
        &available,
        lab.scope(),
        &d_json(&d, opts.quick),
        started.elapsed(),
    );
    let dir = crate::root().join("target/bench");
    report::write(&dir, &results, opts.compare)
}

/// Runs one phase, printing its line; a tracer that fails is not run again.
fn run_logged(
    lab: &Lab,
    ctx: &Ctx,
    kind: Kind,
    (load, duration, round): (Load, Duration, usize),
    phases: &mut Vec<PhaseResult>,
    available: &mut BTreeMap<Kind, Result<(), String>>,
) {
    match run_phase(lab, ctx, kind, load, duration, round) {
        Ok(p) => {
            eprintln!("    {}", report::phase_line(&p));
            phases.push(p);
        }
        Err(e) => {
            eprintln!("    {} {}: failed: {e:#}", kind.name(), load.name());
            available.insert(
                kind,
                Err(format!("failed during the {} run: {e:#}", load.name())),
            );
        }
    }
}

fn d_json(d: &Durations, quick: bool) -> Value {
    json!({
        "quick": quick,
        "saturation_s": d.saturation.as_secs_f64(),
        "saturation_rounds": d.rounds,
        "saturation_extra_rounds_max": d.extra_rounds,
        "cost_rounds": d.cost_rounds,
        "quiet_below_background_pct": QUIET_PCT,
        "load_10k_s": d.low.as_secs_f64(),
        "load_200k_s": d.high.as_secs_f64(),
        "passing_s": d.passing.as_secs_f64(),
        "passing_rounds": d.passing_rounds,
        "scale_s": d.scale.as_secs_f64(),
    })
}
