//! The bench's figures: results.json (each figure with its spread over rounds), and the lines
//! printed as the bench goes. The markdown is in `report_md.rs`, the targets in `targets.rs`.

use std::{collections::BTreeMap, fmt::Write as _, fs, time::Duration};

use serde_json::{json, Map, Value};

use super::{
    figures::Spread,
    measure::percentile_with_missed,
    passing::Passing,
    tracer::{Kind, Scope, BPFTRACE_PROGRAM},
    Load, PhaseResult,
};

pub use super::report_md::write;

const MIB: f64 = 1024.0 * 1024.0;

/// One line per finished phase, as the bench goes.
pub fn phase_line(p: &PhaseResult) -> String {
    let mut s = format!(
        "{:<14} {:<10} {:>10.0} drops/s  {:>6.0} ns/drop busy ({:.0}% background)",
        p.tracer.name(),
        p.load.name(),
        drops_per_s(p),
        p.busy_ns_per_drop,
        p.background_pct
    );
    if let Some(d) = &p.daemon {
        let _ = write!(
            s,
            "  daemon {:.2}% cpu {:.0} wakeups/s",
            d.rates.cpu_pct, d.rates.wakeups_per_s
        );
    }
    if let Some(c) = &p.counts {
        if let Some(lost) = c.lost {
            let _ = write!(s, "  lost {lost}");
        }
        if let Some(r) = &c.received {
            let _ = write!(s, "  received {}", r.records);
        }
        let _ = write!(
            s,
            "  {}",
            match (p.exact(), p.covers()) {
                (Some(true), _) => "counts exact",
                (Some(false), _) => "COUNTS DIFFER",
                (None, Some(true)) => "counts ≥ generator's (machine-wide)",
                (None, _) => "COUNTS BELOW THE GENERATOR'S",
            }
        );
    }
    // With bpf_stats off (every phase but prog-cost) no program has a run time to show.
    for c in &p.progs {
        if let Some(ns) = c.ns_per_run() {
            let _ = write!(s, "  {} {ns:.0} ns/run", c.name);
        }
    }
    if !p.foreign.is_empty() {
        let _ = write!(s, "  OTHER TRACERS: {}", p.foreign.join("; "));
    }
    if !p.oracle_agrees() {
        let _ = write!(
            s,
            "  KERNEL COUNTERS DISAGREE WITH THE GENERATOR (NoPorts {}, nft {}, expected {:?})",
            p.oracle.udp_no_ports, p.oracle.nft_dropped, p.expected
        );
    }
    if p.markers > 0 && p.tracer == Kind::Watch {
        let q = |x| percentile_with_missed(&p.latencies_ms, p.markers_missed, x);
        let _ = write!(
            s,
            "  latency p50 {:.1} ms p99 {:.1} ms ({} of {} markers missed)",
            q(50.0).unwrap_or(f64::NAN),
            q(99.0).unwrap_or(f64::NAN),
            p.markers_missed,
            p.markers
        );
    }
    s
}

/// One line per passing-traffic round.
pub fn passing_line(p: &Passing) -> String {
    let mut s = format!(
        "{:<14} passing    {:>10.0} packets/s  sent {} received {} (kernel: delivered {}, rcvbuf errors {}){}",
        if p.floor { super::passing::FLOOR } else { p.tracer.name() },
        p.per_s(),
        p.sent,
        p.received,
        p.in_datagrams,
        p.rcvbuf_errors,
        if p.clean() { "" } else { "  NOT CLEAN" }
    );
    for c in &p.progs {
        let _ = write!(s, "  {} {:.0} ns/packet", c.name, p.ns_per_packet(c));
    }
    s
}

fn phases_of<'a>(
    phases: &'a [PhaseResult],
    kind: Kind,
    load: Load,
) -> impl Iterator<Item = &'a PhaseResult> + 'a {
    phases
        .iter()
        .filter(move |p| p.tracer == kind && p.load == load)
}

pub fn one(phases: &[PhaseResult], kind: Kind, load: Load) -> Option<&PhaseResult> {
    phases_of(phases, kind, load).next()
}

pub fn drops_per_s(p: &PhaseResult) -> f64 {
    p.drops() as f64 / p.sent.elapsed.as_secs_f64().max(1e-9)
}

/// The saturation rounds each tracer's figures come from: the same number for every tracer,
/// its first `n` quiet ones, `n` the fewest quiet rounds any tracer had; when a tracer had no
/// quiet round, the first `m` of all, `m` the fewest rounds any had (flagged in the report).
pub fn rounds_used<'a>(
    phases: &'a [PhaseResult],
    kinds: &[Kind],
) -> (BTreeMap<Kind, Vec<&'a PhaseResult>>, bool) {
    let sat = |k: Kind| phases_of(phases, k, Load::Saturation);
    let n = kinds
        .iter()
        .map(|k| sat(*k).filter(|p| p.quiet()).count())
        .min()
        .unwrap_or(0);
    let m = kinds.iter().map(|k| sat(*k).count()).min().unwrap_or(0);
    let quiet = n > 0;
    let used = kinds
        .iter()
        .map(|&k| {
            let v: Vec<&PhaseResult> = if quiet {
                sat(k).filter(|p| p.quiet()).take(n).collect()
            } else {
                sat(k).take(m).collect()
            };
            (k, v)
        })
        .collect();
    (used, quiet)
}

/// ns/run of each program over `rounds`, by program name.
fn program_spreads(rounds: &[&PhaseResult]) -> BTreeMap<String, Spread> {
    let mut by: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for p in rounds {
        for c in &p.progs {
            if let Some(x) = c.ns_per_run() {
                by.entry(c.name.clone()).or_default().push(x);
            }
        }
    }
    by.into_iter()
        .filter_map(|(k, v)| Some((k, Spread::of(&v)?)))
        .collect()
}

/// `kind`'s per-drop overhead over bpftrace's, paired by round ([`Spread::paired_ratio`]).
pub fn paired_ratio(used: &BTreeMap<Kind, Vec<&PhaseResult>>, kind: Kind) -> Option<Spread> {
    let busy = |k: Kind| -> Vec<(usize, f64)> {
        used.get(&k)
            .into_iter()
            .flatten()
            .map(|p| (p.round, p.busy_ns_per_drop))
            .collect()
    };
    Spread::paired_ratio(&busy(Kind::None), &busy(kind), &busy(Kind::Bpftrace))
}

fn spread_json(s: Option<Spread>) -> Value {
    s.map_or(Value::Null, Spread::to_json)
}

/// Per tracer, the passing-traffic figures: packets/s, ns per packet and per run of each
/// program, and the throughput lost against no tracer (as a range).
/// `floor`: the rounds with only the empty tx program instead.
fn passing_json(passing: &[Passing], k: Kind, floor: bool) -> Value {
    let of = |k: Kind, floor: bool| {
        passing
            .iter()
            .filter(move |p| p.tracer == k && p.floor == floor)
    };
    let rounds: Vec<&Passing> = of(k, floor).collect();
    if rounds.is_empty() {
        return Value::Null;
    }
    let rate =
        |k: Kind, floor: bool| Spread::of(&of(k, floor).map(Passing::per_s).collect::<Vec<_>>());
    let loss = rate(k, floor)
        .zip(rate(Kind::None, false))
        .map(|(t, n)| Spread {
            min: (1.0 - t.max / n.min) * 100.0,
            median: (1.0 - t.median / n.median) * 100.0,
            max: (1.0 - t.min / n.max) * 100.0,
            n: t.n.min(n.n),
        });
    let mut progs: BTreeMap<String, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    for p in &rounds {
        for c in &p.progs {
            let e = progs.entry(c.name.clone()).or_default();
            e.0.push(p.ns_per_packet(c));
            if let Some(r) = c.ns_per_run() {
                e.1.push(r);
            }
        }
    }
    let programs: Map<String, Value> = progs
        .into_iter()
        .map(|(name, (pp, pr))| {
            (
                name,
                json!({
                    "ns_per_packet": spread_json(Spread::of(&pp)),
                    "ns_per_run": spread_json(Spread::of(&pr)),
                }),
            )
        })
        .collect();
    json!({
        "rounds": rounds.len(),
        "clean": rounds.iter().all(|p| p.clean()),
        "packets_per_s": spread_json(rate(k, floor)),
        "throughput_loss_pct": spread_json(loss),
        "programs": programs,
    })
}

/// Everything results.json holds.
pub fn results(
    phases: &[PhaseResult],
    passing: &[Passing],
    scale: &Value,
    available: &BTreeMap<Kind, Result<(), String>>,
    scope: Scope,
    durations: &Value,
    elapsed: Duration,
) -> Value {
    let ok = |k: Kind| available.get(&k).is_some_and(Result::is_ok);
    let primary = if ok(Kind::Agent) {
        Kind::Agent
    } else {
        Kind::Watch
    };
    let kinds: Vec<Kind> = Kind::ALL.into_iter().filter(|k| ok(*k)).collect();
    let (used, quiet) = rounds_used(phases, &kinds);
    let busy = |k: Kind| {
        Spread::of(
            &used
                .get(&k)
                .into_iter()
                .flatten()
                .map(|p| p.busy_ns_per_drop)
                .collect::<Vec<_>>(),
        )
    };
    let overhead = |k: Kind| busy(k).zip(busy(Kind::None)).map(|(t, n)| t.minus(n));
    let busy_200k = |k: Kind| one(phases, k, Load::High).map(|p| p.busy_ns_per_drop);
    let mut tracers = Map::new();
    let (mut sat, mut ov_all, mut ov_200k) = (Map::new(), Map::new(), Map::new());
    for k in Kind::ALL {
        let daemon = |load| one(phases, k, load).and_then(|p| p.daemon);
        let peak = |f: fn(&super::Daemon) -> u64| {
            phases
                .iter()
                .filter(|p| p.tracer == k)
                .filter_map(|p| p.daemon.as_ref().map(f))
                .max()
        };
        let rounds = used.get(&k).cloned().unwrap_or_default();
        let sat_rounds: Vec<Value> = phases_of(phases, k, Load::Saturation)
            .map(|p| {
                json!({
                    "drops_per_s": drops_per_s(p),
                    "busy_ns_per_drop": p.busy_ns_per_drop,
                    "background_pct": p.background_pct,
                    "quiet": p.quiet(),
                    "used": rounds.iter().any(|r| std::ptr::eq(*r, p)),
                    "exact": p.exact(),
                    "lost": p.counts.as_ref().and_then(|c| c.lost),
                })
            })
            .collect();
        let dps = Spread::of(&rounds.iter().map(|p| drops_per_s(p)).collect::<Vec<_>>());
        let ov = overhead(k).filter(|_| k != Kind::None);
        let ov200 = busy_200k(k).zip(busy_200k(Kind::None)).map(|(t, n)| t - n);
        let daemon_ns = Spread::of(
            &rounds
                .iter()
                .filter_map(|p| p.daemon_ns_per_drop())
                .collect::<Vec<_>>(),
        );
        if ok(k) {
            sat.insert(k.name().into(), json!(dps.map(|s| s.median)));
            if k != Kind::None {
                ov_all.insert(k.name().into(), json!(ov.map(|s| s.median)));
                ov_200k.insert(k.name().into(), json!(ov200));
            }
        }
        let cost: Vec<&PhaseResult> = phases_of(phases, k, Load::Cost).collect();
        let programs: Map<String, Value> = program_spreads(&cost)
            .into_iter()
            .map(|(n, s)| (n, s.to_json()))
            .collect();
        tracers.insert(
            k.name().into(),
            json!({
                "available": ok(k),
                "not_available_because": available.get(&k).and_then(|a| a.as_ref().err()),
                "command": k.command(scope),
                "saturation_drops_per_s": dps.map(|s| s.median),
                "saturation_drops_per_s_spread": spread_json(dps),
                "busy_ns_per_drop_saturation": busy(k).map(|s| s.median),
                "busy_ns_per_drop_spread": spread_json(busy(k)),
                "busy_shown": busy(k).map(|s| s.show(0)),
                "overhead_ns_per_drop": ov.map(|s| s.median),
                "overhead_ns_per_drop_spread": spread_json(ov),
                "overhead_shown": ov.map(|s| s.show(0)),
                "overhead_ns_per_drop_200k": ov200,
                "achieved_per_s_10k": one(phases, k, Load::Low).map(drops_per_s),
                "achieved_per_s_200k": one(phases, k, Load::High).map(drops_per_s),
                "cpu_pct_10k": daemon(Load::Low).map(|d| d.rates.cpu_pct),
                "cpu_pct_200k": daemon(Load::High).map(|d| d.rates.cpu_pct),
                "wakeups_per_s_10k": daemon(Load::Low).map(|d| d.rates.wakeups_per_s),
                "wakeups_per_s_200k": daemon(Load::High).map(|d| d.rates.wakeups_per_s),
                "daemon_ns_per_drop_saturation": daemon_ns.map(|s| s.median),
                "rss_mb": peak(|d| d.rss).map(|b| b as f64 / MIB),
                "rss_peak_mb": peak(|d| d.rss_peak).map(|b| b as f64 / MIB),
                "maps_mb": peak(|d| d.maps_bytes).map(|b| b as f64 / MIB),
                "programs_ns_per_run_saturation": programs,
                "passing": passing_json(passing, k, false),
                "saturation_rounds": sat_rounds,
            }),
        );
    }
    let p = &tracers[primary.name()];
    let ratio = paired_ratio(&used, primary);
    let ratios: Vec<Value> = [Kind::Agent, Kind::Watch, Kind::Hooks, Kind::AgentNoTx]
        .map(|k| json!({"tracer": k.name(), "spread": spread_json(paired_ratio(&used, k))}))
        .into();
    let latency = one(phases, Kind::Watch, Load::Low);
    let lat =
        |q| latency.and_then(|l| percentile_with_missed(&l.latencies_ms, l.markers_missed, q));
    let finite = |x: Option<f64>| x.filter(|v| v.is_finite());
    let wakeups = [&p["wakeups_per_s_10k"], &p["wakeups_per_s_200k"]]
        .iter()
        .filter_map(|v| v.as_f64())
        .reduce(f64::max);
    let mut out = json!({
        "schema": 2,
        "quick": durations["quick"],
        "machine": machine(),
        "durations": durations,
        "elapsed_s": elapsed.as_secs_f64(),
        "primary_tracer": primary.name(),
        "bpftrace_program": BPFTRACE_PROGRAM,
        "bpftrace_reason_names": "the kernel's, from tracefs skb/kfree_skb format (__print_symbolic)",
        "saturation_rounds_used": used.values().next().map(Vec::len),
        "saturation_rounds_quiet": quiet,
        "overhead_ratio_vs_bpftrace": ratio.map(|r| r.median),
        "overhead_ratio_spread": spread_json(ratio),
        "overhead_ratios": ratios,
        "overhead_ns_per_drop": ov_all,
        "overhead_ns_per_drop_200k": ov_200k,
        "saturation_drops_per_s": sat,
        "sustained_200k": super::targets::sustained(phases),
        "daemon_cpu_pct_10k": p["cpu_pct_10k"],
        "daemon_cpu_pct_200k": p["cpu_pct_200k"],
        "wakeups_per_s": wakeups,
        "wakeups_per_s_10k": p["wakeups_per_s_10k"],
        "wakeups_per_s_200k": p["wakeups_per_s_200k"],
        "rss_mb": p["rss_mb"],
        "rss_peak_mb": p["rss_peak_mb"],
        "background_pct_max": phases.iter().map(|p| p.background_pct).reduce(f64::max),
        "foreign_tracers": phases.iter().flat_map(|p| p.foreign.iter().cloned()).collect::<std::collections::BTreeSet<_>>(),
        "maps_mb": p["maps_mb"],
        "latency_tracer": Kind::Watch.name(),
        "latency_ms_p50": finite(lat(50.0)),
        "latency_ms_p99": finite(lat(99.0)),
        "latency_p99_missed": lat(99.0).is_some_and(f64::is_infinite),
        "latency_samples": latency.map(|l| l.latencies_ms.len()),
        "latency_markers_missed": latency.map(|l| l.markers_missed),
        "tracers": tracers,
        "phases": phases.iter().map(PhaseResult::to_json).collect::<Vec<_>>(),
        "passing": passing.iter().map(Passing::to_json).collect::<Vec<_>>(),
        "passing_floor": passing_json(passing, Kind::None, true),
        "scale": scale,
    });
    out["targets"] = super::targets::targets(&out, primary, phases, passing, &used);
    out
}

fn machine() -> Value {
    let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned());
    let cmd = |c: &mut std::process::Command| {
        c.output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    json!({
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "cpus": super::ncpus(),
        "cpu_model": model,
        "date": cmd(std::process::Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])),
        "commit": cmd(std::process::Command::new("git").args(["-C", &crate::root().to_string_lossy(), "describe", "--always", "--dirty"])),
    })
}

pub fn num(v: &Value, decimals: usize) -> String {
    match v.as_f64() {
        Some(x) => format!("{x:.decimals$}"),
        None if v.is_null() => "–".into(),
        None => v.as_str().map_or_else(|| v.to_string(), str::to_owned),
    }
}
