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
mod kind;
mod lab;
mod measure;
mod passing;
mod phase;
mod report;
mod report_md;
mod scale;
mod scale_lab;
mod soak;
mod targets;
mod tracer;

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Result;
use serde_json::{json, Value};

use crate::util::{require_root, step};
pub use lab::{Lab, Oracle};
pub use phase::{exact, run_phase, tracer_costs, Daemon, PhaseResult};
use tracer::Kind;

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
    m.insert(Kind::AgentNoTx, m[&Kind::Agent].clone());
    m.insert(
        Kind::Hooks,
        floor::Floor::drop_path()
            .map(drop)
            .map_err(|e| format!("{e:#}")),
    );
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
        // The agent without tx runs the agent's programs less one: nothing new to cost.
        let costed = |k: &Kind| !matches!(k, Kind::None | Kind::AgentNoTx);
        for kind in Kind::ALL.into_iter().filter(costed) {
            if available[&kind].is_ok() {
                let load = (Load::Cost, d.saturation, round);
                run_logged(&lab, &ctx, kind, load, &mut phases, &mut available);
            }
        }
    }
    stats.set(false)?;
    for load in [(Load::Low, d.low, 0), (Load::High, d.high, 0)] {
        for kind in Kind::ALL.into_iter().filter(|k| k.runs_every_phase()) {
            if available[&kind].is_ok() {
                run_logged(&lab, &ctx, kind, load, &mut phases, &mut available);
            }
        }
    }
    stats.set(true)?;
    let mut passing = Vec::new();
    for round in 0..d.passing_rounds {
        // Each tracer, then the floor: the empty program on the tx hook alone.
        let kinds = Kind::ALL
            .into_iter()
            .filter(|k| k.runs_every_phase() && available[k].is_ok());
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
