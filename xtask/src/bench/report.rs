//! The bench's figures: results.json, the markdown report, the table it prints, the targets and
//! the comparison with the previous run.

use std::{collections::BTreeMap, fmt::Write as _, fs, path::Path, time::Duration};

use anyhow::{Context, Result};
use serde_json::{json, Map, Value};

use super::{
    measure::percentile,
    tracer::{Kind, Scope, BPFTRACE_PROGRAM},
    Load, PhaseResult, HIGH_RATE, LOW_RATE,
};

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
    if !p.latencies_ms.is_empty() {
        let _ = write!(
            s,
            "  latency p50 {:.1} ms p99 {:.1} ms",
            percentile(&p.latencies_ms, 50.0).unwrap_or(0.0),
            percentile(&p.latencies_ms, 99.0).unwrap_or(0.0)
        );
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

fn one(phases: &[PhaseResult], kind: Kind, load: Load) -> Option<&PhaseResult> {
    phases_of(phases, kind, load).next()
}

/// The saturation round with the lowest cost per drop among the quiet ones (among all when
/// none was quiet): other processes disturb the figures however well their time is subtracted.
fn best_saturation(phases: &[PhaseResult], kind: Kind) -> Option<&PhaseResult> {
    let any_quiet = phases_of(phases, kind, Load::Saturation).any(PhaseResult::quiet);
    phases_of(phases, kind, Load::Saturation)
        .filter(|p| p.quiet() || !any_quiet)
        .min_by(|a, b| a.busy_ns_per_drop.total_cmp(&b.busy_ns_per_drop))
}

fn drops_per_s(p: &PhaseResult) -> f64 {
    p.drops() as f64 / p.sent.elapsed.as_secs_f64().max(1e-9)
}

/// A measured figure against its limit (lower is better).
fn target(name: &str, measured: Option<f64>, limit: f64, unit: &str, note: &str) -> Value {
    let met = measured.map(|m| m <= limit);
    let missed_by = measured.filter(|m| *m > limit).map(|m| {
        format!(
            "{:.3}{unit} over ({:.0}% above the limit)",
            m - limit,
            (m / limit - 1.0) * 100.0
        )
    });
    json!({
        "target": name,
        "limit": format!("≤ {limit}{unit}"),
        "measured": measured,
        "met": met,
        "missed_by": missed_by,
        "note": note,
    })
}

/// Everything results.json holds.
pub fn results(
    phases: &[PhaseResult],
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
    let busy = |k: Kind| best_saturation(phases, k).map(|p| p.busy_ns_per_drop);
    let busy_200k = |k: Kind| one(phases, k, Load::High).map(|p| p.busy_ns_per_drop);
    let mut tracers = Map::new();
    let (mut sat, mut overhead, mut overhead_200k) = (Map::new(), Map::new(), Map::new());
    for k in Kind::ALL {
        let daemon = |load| one(phases, k, load).and_then(|p| p.daemon);
        let peak = |f: fn(&super::Daemon) -> u64| {
            phases
                .iter()
                .filter(|p| p.tracer == k)
                .filter_map(|p| p.daemon.as_ref().map(f))
                .max()
        };
        let sat_rounds: Vec<Value> = phases_of(phases, k, Load::Saturation)
            .map(|p| {
                json!({
                    "drops_per_s": drops_per_s(p),
                    "busy_ns_per_drop": p.busy_ns_per_drop,
                    "background_pct": p.background_pct,
                    "quiet": p.quiet(),
                    "exact": p.exact(),
                    "seen": p.counts.as_ref().and_then(|c| c.seen),
                    "delivered": p.counts.as_ref().and_then(|c| c.delivered),
                    "lost": p.counts.as_ref().and_then(|c| c.lost),
                })
            })
            .collect();
        let ov = busy(k).zip(busy(Kind::None)).map(|(t, n)| t - n);
        let ov_200k = busy_200k(k).zip(busy_200k(Kind::None)).map(|(t, n)| t - n);
        let best = best_saturation(phases, k);
        let dps = best.map(drops_per_s);
        if ok(k) {
            sat.insert(k.name().into(), json!(dps));
            if k != Kind::None {
                overhead.insert(k.name().into(), json!(ov));
                overhead_200k.insert(k.name().into(), json!(ov_200k));
            }
        }
        tracers.insert(
            k.name().into(),
            json!({
                "available": ok(k),
                "not_available_because": available.get(&k).and_then(|a| a.as_ref().err()),
                "command": k.command(scope),
                "saturation_drops_per_s": dps,
                "busy_ns_per_drop_saturation": busy(k),
                "overhead_ns_per_drop": ov,
                "overhead_ns_per_drop_200k": ov_200k,
                "achieved_per_s_10k": one(phases, k, Load::Low).map(drops_per_s),
                "achieved_per_s_200k": one(phases, k, Load::High).map(drops_per_s),
                "cpu_pct_10k": daemon(Load::Low).map(|d| d.rates.cpu_pct),
                "cpu_pct_200k": daemon(Load::High).map(|d| d.rates.cpu_pct),
                "wakeups_per_s_10k": daemon(Load::Low).map(|d| d.rates.wakeups_per_s),
                "wakeups_per_s_200k": daemon(Load::High).map(|d| d.rates.wakeups_per_s),
                "daemon_ns_per_drop_saturation": best.and_then(PhaseResult::daemon_ns_per_drop),
                "rss_mb": peak(|d| d.rss).map(|b| b as f64 / MIB),
                "rss_peak_mb": peak(|d| d.rss_peak).map(|b| b as f64 / MIB),
                "maps_mb": peak(|d| d.maps_bytes).map(|b| b as f64 / MIB),
                "saturation_rounds": sat_rounds,
            }),
        );
    }
    let p = &tracers[primary.name()];
    let ratio = |k: Kind| {
        overhead
            .get(k.name())
            .and_then(Value::as_f64)
            .zip(overhead.get(Kind::Bpftrace.name()).and_then(Value::as_f64))
            .filter(|(_, b)| *b > 0.0)
            .map(|(l, b)| l / b)
    };
    let ratios: Map<String, Value> = [Kind::Watch, Kind::Agent]
        .into_iter()
        .filter(|k| ok(*k))
        .map(|k| (k.name().to_owned(), json!(ratio(k))))
        .collect();
    // How far apart the quiet no-tracer rounds are: an overhead below this is not resolved.
    let none_quiet: Vec<f64> = phases_of(phases, Kind::None, Load::Saturation)
        .filter(|p| p.quiet())
        .map(|p| p.busy_ns_per_drop)
        .collect();
    let noise = (none_quiet.len() >= 2).then(|| {
        let (lo, hi) = none_quiet
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
        (hi - lo) / 2.0
    });
    let high = one(phases, primary, Load::High);
    let sustained = high.map(|h| {
        let c = h.counts.as_ref();
        json!({
            "offered": HIGH_RATE,
            "duration_s": h.sent.elapsed.as_secs_f64(),
            "sent": h.drops(),
            "achieved_per_s": drops_per_s(h),
            "seen": c.and_then(|c| c.seen),
            "delivered": c.and_then(|c| c.delivered),
            "lost": c.and_then(|c| c.lost),
            "exact": h.exact(),
        })
    });
    let latency = one(phases, Kind::Watch, Load::Low);
    let lat = |q| latency.and_then(|l| percentile(&l.latencies_ms, q));
    let wakeups = [&p["wakeups_per_s_10k"], &p["wakeups_per_s_200k"]]
        .iter()
        .filter_map(|v| v.as_f64())
        .reduce(f64::max);
    let mut out = json!({
        "schema": 1,
        "quick": durations["quick"],
        "machine": machine(),
        "durations": durations,
        "elapsed_s": elapsed.as_secs_f64(),
        "primary_tracer": primary.name(),
        "bpftrace_program": BPFTRACE_PROGRAM,
        "overhead_ratio_vs_bpftrace": ratio(primary),
        "overhead_ratio_vs_bpftrace_by_tracer": ratios,
        "overhead_ns_per_drop": overhead,
        "overhead_ns_per_drop_200k": overhead_200k,
        "noise_ns_per_drop": noise,
        "saturation_drops_per_s": sat,
        "sustained_200k": sustained,
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
        "latency_ms_p50": lat(50.0),
        "latency_ms_p99": lat(99.0),
        "latency_samples": latency.map(|l| l.latencies_ms.len()),
        "latency_markers_missed": latency.map(|l| l.markers_missed),
        "tracers": tracers,
        "phases": phases.iter().map(PhaseResult::to_json).collect::<Vec<_>>(),
    });
    out["targets"] = targets(&out, primary, phases);
    out
}

fn targets(r: &Value, primary: Kind, phases: &[PhaseResult]) -> Value {
    let f = |k: &str| r[k].as_f64();
    let s = &r["sustained_200k"];
    let sustained_met = s["achieved_per_s"]
        .as_f64()
        .zip(s["lost"].as_u64())
        .map(|(a, lost)| a >= 0.99 * HIGH_RATE as f64 && lost == 0 && s["exact"] == true);
    let dur = s["duration_s"].as_f64().unwrap_or(0.0);
    let sat: Vec<&PhaseResult> = phases_of(phases, primary, Load::Saturation).collect();
    let sat_exact = (!sat.is_empty()).then(|| sat.iter().all(|p| p.exact() == Some(true)));
    // A CPU figure means little at a rate the machine did not reach: say so.
    let achieved = |load: &str| {
        let offered = if load == "10k" { LOW_RATE } else { HIGH_RATE } as f64;
        r["tracers"][primary.name()][format!("achieved_per_s_{load}")]
            .as_f64()
            .filter(|a| *a < 0.95 * offered)
            .map(|a| format!("at {a:.0} drops/s achieved of {offered:.0} offered"))
            .unwrap_or_default()
    };
    let sat_lost: u64 = sat.iter().filter_map(|p| p.counts.as_ref()?.lost).sum();
    json!([
        target(
            "per-drop overhead vs the bpftrace one-liner (ratio)",
            f("overhead_ratio_vs_bpftrace"),
            1.0,
            "",
            &ratio_note(r, primary),
        ),
        {
            "target": "200k drops/s sustained for 60 s with zero loss",
            "limit": "≥ 198,000/s achieved, 0 lost, exact counts, 60 s",
            "measured": format!(
                "{:.0}/s for {dur:.0} s, lost {}, exact {}",
                s["achieved_per_s"].as_f64().unwrap_or(0.0),
                s["lost"],
                s["exact"]
            ),
            "met": sustained_met,
            "missed_by": sustained_met.filter(|m| !m).map(|_| "see measured"),
            "note": if dur < 59.0 { format!("ran {dur:.0} s only (--quick); the full bench runs 60 s") } else { String::new() },
        },
        {
            "target": "exact per-reason counts at saturation, loss reported",
            "limit": "equal to the generator's in every round",
            "measured": format!("{} rounds, exact: {:?}, events lost in total: {sat_lost}", sat.len(), sat_exact),
            "met": sat_exact,
            "missed_by": sat_exact.filter(|m| !m).map(|_| "counts differ: see phases"),
            "note": "",
        },
        target("daemon CPU at 10k drops/s", f("daemon_cpu_pct_10k"), 1.0, "% of a core", &achieved("10k")),
        target("daemon CPU at 200k drops/s", f("daemon_cpu_pct_200k"), 3.0, "% of a core", &achieved("200k")),
        target("daemon wakeups", f("wakeups_per_s"), 2000.0, "/s", "the higher of 10k and 200k drops/s"),
        target(
            "daemon RSS",
            f("rss_mb"),
            32.0,
            " MiB",
            &format!("VmRSS under load; peak VmHWM {}", num(&r["rss_peak_mb"], 1)),
        ),
        target("BPF maps", f("maps_mb"), 8.0, " MiB", "kernel memlock of the maps the daemon holds, defaults"),
        target("drop → stdout latency p99", f("latency_ms_p99"), 100.0, " ms", "lbtrace watch, under 10k drops/s"),
    ])
}

/// What the ratio is made of, and whether the run resolved bpftrace's overhead at all.
fn ratio_note(r: &Value, primary: Kind) -> String {
    let ov = |k: Kind| r["overhead_ns_per_drop"][k.name()].as_f64();
    let (Some(l), Some(b)) = (ov(primary), ov(Kind::Bpftrace)) else {
        return "needs both lbtrace and bpftrace".into();
    };
    let mut note = format!("{l:.0} ns / {b:.0} ns per drop, at saturation");
    if let Some(n) = r["noise_ns_per_drop"].as_f64().filter(|n| b <= *n) {
        let _ = write!(
            note,
            "; bpftrace's overhead is within the noise (±{n:.0} ns between no-tracer rounds), so the ratio is not resolved on this run"
        );
    }
    note
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

fn num(v: &Value, decimals: usize) -> String {
    match v.as_f64() {
        Some(x) => format!("{x:.decimals$}"),
        None if v.is_null() => "–".into(),
        None => v.to_string(),
    }
}

/// The summary tables (printed, and the top of the report).
fn summary_md(r: &Value) -> String {
    let mut s = String::new();
    const COLUMNS: [(&str, &str, usize); 12] = [
        ("drops/s at saturation", "saturation_drops_per_s", 0),
        ("busy ns/drop (sat.)", "busy_ns_per_drop_saturation", 0),
        ("overhead ns/drop (sat.)", "overhead_ns_per_drop", 0),
        ("of which daemon", "daemon_ns_per_drop_saturation", 0),
        ("overhead ns/drop (200k)", "overhead_ns_per_drop_200k", 0),
        ("CPU % 10k", "cpu_pct_10k", 2),
        ("CPU % 200k", "cpu_pct_200k", 2),
        ("wakeups/s 10k", "wakeups_per_s_10k", 0),
        ("wakeups/s 200k", "wakeups_per_s_200k", 0),
        ("RSS MiB", "rss_mb", 1),
        ("peak RSS MiB", "rss_peak_mb", 1),
        ("BPF maps MiB", "maps_mb", 2),
    ];
    let _ = writeln!(
        s,
        "| tracer | {} |\n|---|{}",
        COLUMNS.map(|c| c.0).join(" | "),
        "--:|".repeat(COLUMNS.len())
    );
    for k in Kind::ALL {
        let t = &r["tracers"][k.name()];
        if t["available"] != true {
            let _ = writeln!(
                s,
                "| {} | not available: {} |{}",
                k.name(),
                t["not_available_because"].as_str().unwrap_or("?"),
                "|".repeat(COLUMNS.len() - 1)
            );
            continue;
        }
        let cells: Vec<String> = COLUMNS
            .iter()
            .map(|(_, key, d)| num(&t[*key], *d))
            .collect();
        let _ = writeln!(s, "| {} | {} |", k.name(), cells.join(" | "));
    }
    let rounds: Vec<String> = Kind::ALL
        .iter()
        .filter_map(|k| {
            let all = r["tracers"][k.name()]["saturation_rounds"].as_array()?;
            let quiet = all.iter().filter(|p| p["quiet"] == true).count();
            (!all.is_empty()).then(|| format!("{} {quiet}/{}", k.name(), all.len()))
        })
        .collect();
    let _ = writeln!(
        s,
        "\nAt saturation each tracer's figures are from its cheapest quiet round (other processes below {}% of the CPUs, no other tracer attached); quiet rounds: {}.",
        r["durations"]["quiet_below_background_pct"],
        rounds.join(", ")
    );
    if let Some(f) = r["foreign_tracers"].as_array().filter(|f| !f.is_empty()) {
        let list: Vec<&str> = f.iter().filter_map(Value::as_str).collect();
        let _ = writeln!(
            s,
            "\n**Warning:** other tracers were attached during the bench, adding their cost to every packet (the no-tracer runs included): {}.",
            list.join("; ")
        );
    }
    if let Some(bg) = r["background_pct_max"].as_f64().filter(|b| *b > 10.0) {
        let _ = writeln!(
            s,
            "\n**Warning:** other processes used up to {bg:.0}% of the CPUs during a run. Their time is subtracted from the busy time, but they also took CPU from the generator and the tracers: rates, and the figures at saturation, are lower and noisier than on a quiet machine."
        );
    }
    let _ = writeln!(
        s,
        "\nOverhead ratio {} / bpftrace: **{}** (primary tracer for the targets: {}).\n",
        r["primary_tracer"].as_str().unwrap_or("?"),
        num(&r["overhead_ratio_vs_bpftrace"], 2),
        r["primary_tracer"].as_str().unwrap_or("?"),
    );
    let _ = writeln!(s, "| target | limit | measured | met | missed by |");
    let _ = writeln!(s, "|---|---|---|---|---|");
    for t in r["targets"].as_array().into_iter().flatten() {
        let met = match t["met"].as_bool() {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "not measured",
        };
        let mut measured = num(&t["measured"], 3).trim_matches('"').to_owned();
        if let Some(n) = t["note"].as_str().filter(|n| !n.is_empty()) {
            let _ = write!(measured, " ({n})");
        }
        let _ = writeln!(
            s,
            "| {} | {} | {measured} | {met} | {} |",
            t["target"].as_str().unwrap_or(""),
            t["limit"].as_str().unwrap_or(""),
            t["missed_by"].as_str().unwrap_or(""),
        );
    }
    s
}

const METHOD: &str = "\
## Method

- **Lab.** Two network namespaces made by the bench, joined by a veth (10.200.77.1 → 10.200.77.2,
  the VIP; permanent neighbour entries, IPv6 off, so no other packet is dropped there). The
  generator (`lbtest::blast`) sends 16-byte UDP datagrams with `sendmmsg` (batches of up to 64)
  from one socket per thread, one thread per CPU, 3:1 to a closed port (NO_SOCKET in
  `__udp4_lib_rcv`) and to a port an nftables rule drops (NETFILTER_DROP). Counts are exact
  (from `sendmmsg`'s return values) and checked against the node's `Udp NoPorts` and the nft
  counter. At a fixed rate each thread runs a token bucket, sleeping between batches.
- **Each tracer is started afresh for each load** and stopped with SIGINT: no tracer;
  `lbtrace watch --json --vip VIP`, its stdout read by a bench thread that keeps only the last
  64 KiB (that thread's CPU time is subtracted, so it costs what /dev/null would, except the
  pipe copy inside lbtrace's write); `lbtrace agent` with metrics when it exists; the bpftrace
  one-liner (machine-wide, no filter).
- **Per-drop cost** = system-wide busy CPU time (`/proc/stat`: user, nice, system, irq,
  softirq; not idle, iowait or steal) over the run plus 300 ms of settling, minus the CPU time
  of every other process on the machine meanwhile (`/proc/PID/stat` user + sys with reaped
  children; ksoftirqd counts as ours), divided by the drops. Drops, and the BPF programs hooked
  to them, run in softirq on whichever task sent the packet, so no single process's time holds
  them: only the machine's busy time does. **Overhead** = a tracer's per-drop cost − the
  no-tracer cost; at saturation the machine is fully busy, so this is also the throughput lost.
  The rounds alternate between tracers; each tracer's figures at saturation come from its
  cheapest *quiet* round: other processes below 15% of the CPUs and no other tracer attached
  (BPF programs of other processes on tracepoints, per `bpftool perf show`, or a tracefs
  instance recording `skb/kfree_skb`): both only ever add cost, however well it is subtracted.
  A tracer without a quiet round gets extra rounds, up to a limit. *Noise* is half the spread
  of the quiet no-tracer rounds: an overhead below it is not resolved. *Of which
  daemon* is the tracer process's own CPU time per drop; the rest of the overhead is spent in
  the kernel (BPF programs, ring buffer). The ratio of lbtrace's overhead to bpftrace's is the
  figure to compare across machines; absolute numbers vary.
- **Daemon** CPU % (of one core) = on-CPU time, user + sys, of all its threads
  (`/proc/PID/task/*/schedstat`, ns resolution) over the run; wakeups/s = voluntary context
  switches (each a sleep that ended in a wakeup); RSS = peak VmHWM; BPF maps = `memlock` of the
  map fds it holds (`/proc/PID/fdinfo`).
- **Seen / delivered / lost** come from lbtrace's own summary (kernel counters, records read,
  reserve failures); **exact** = its per-reason counts equal the generator's.
- **Latency**: during the 10k run, marker datagrams to a third closed port, one every 20–60 ms
  (pseudo-random, so they do not lock onto the reader's 50 ms tick), each from its own socket;
  the time from `send_to` to the moment the bench reads the line with that source port on
  lbtrace's stdout.
";

/// Writes results.json and report.md under `dir`, keeping the previous run as *.prev.*; prints
/// the summary (and the comparison with the previous run when asked).
pub fn write(dir: &Path, r: &Value, compare: bool) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    let (json_path, md_path) = (dir.join("results.json"), dir.join("report.md"));
    let prev_path = dir.join("results.prev.json");
    if json_path.exists() {
        fs::rename(&json_path, &prev_path)?;
        if md_path.exists() {
            fs::rename(&md_path, dir.join("report.prev.md"))?;
        }
    }
    let prev: Option<Value> = fs::read(&prev_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let summary = summary_md(r);
    let comparison = compare.then(|| match &prev {
        Some(p) => comparison_md(p, r),
        None => "No previous run to compare with.\n".to_owned(),
    });
    let m = &r["machine"];
    let mut md = format!(
        "# lbtrace bench\n\n{} · kernel {} · {} × {} · commit {} · {}\n\n",
        m["date"].as_str().unwrap_or(""),
        m["kernel"].as_str().unwrap_or(""),
        m["cpus"],
        m["cpu_model"].as_str().unwrap_or("?"),
        m["commit"].as_str().unwrap_or("?"),
        if r["quick"] == true {
            "`--quick` (shorter runs)"
        } else {
            "full run"
        },
    );
    md.push_str(&summary);
    let s = &r["sustained_200k"];
    let _ = write!(
        md,
        "\n## Counts under load\n\n200k drops/s offered for {} s: {} sent ({}/s), seen {}, delivered {}, lost {}, exact {}.\n\n| tracer | load | round | drops/s | expected | counted | seen | delivered | lost | exact |\n|---|---|--:|--:|---|---|--:|--:|--:|---|\n",
        num(&s["duration_s"], 1),
        s["sent"],
        num(&s["achieved_per_s"], 0),
        s["seen"],
        s["delivered"],
        s["lost"],
        s["exact"],
    );
    for p in r["phases"].as_array().into_iter().flatten() {
        let c = &p["counted"];
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            p["tracer"].as_str().unwrap_or(""),
            p["load"].as_str().unwrap_or(""),
            p["round"],
            num(&p["drops_per_s"], 0),
            p["expected"],
            if c.is_null() {
                "–".to_owned()
            } else {
                format!(
                    "{} ({})",
                    c["drops_by_reason"],
                    c["scope"].as_str().unwrap_or("")
                )
            },
            num(&c["events_seen"], 0),
            num(&c["events_delivered"], 0),
            num(&c["events_lost"], 0),
            num(&p["exact"], 0),
        );
    }
    let _ = writeln!(
        md,
        "\n## Latency\n\nDrop → line on lbtrace's stdout, under 10k drops/s: p50 {} ms, p99 {} ms ({} markers, {} not seen).\n",
        num(&r["latency_ms_p50"], 1),
        num(&r["latency_ms_p99"], 1),
        r["latency_samples"],
        r["latency_markers_missed"],
    );
    md.push_str(METHOD);
    if let Some(c) = &comparison {
        let _ = write!(md, "\n## Against the previous run\n\n{c}");
    }
    fs::write(&json_path, serde_json::to_string_pretty(r)? + "\n")?;
    fs::write(&md_path, &md)?;
    println!("\n{summary}");
    if let Some(c) = comparison {
        println!("Against the previous run ({}):\n\n{c}", prev_path.display());
    }
    println!("Written: {} and {}", json_path.display(), md_path.display());
    Ok(())
}

/// The headline figures of two runs side by side.
fn comparison_md(prev: &Value, now: &Value) -> String {
    let mut keys: Vec<String> = [
        "overhead_ratio_vs_bpftrace",
        "daemon_cpu_pct_10k",
        "daemon_cpu_pct_200k",
        "wakeups_per_s",
        "rss_mb",
        "maps_mb",
        "latency_ms_p50",
        "latency_ms_p99",
        "sustained_200k/achieved_per_s",
        "sustained_200k/lost",
    ]
    .map(String::from)
    .to_vec();
    for group in ["overhead_ns_per_drop", "saturation_drops_per_s"] {
        for k in Kind::ALL {
            keys.push(format!("{group}/{}", k.name()));
        }
    }
    let get = |v: &Value, k: &str| v.pointer(&format!("/{k}")).and_then(Value::as_f64);
    let mut s = format!(
        "previous: {} ({})\n\n| figure | previous | now | change |\n|---|--:|--:|--:|\n",
        prev["machine"]["date"].as_str().unwrap_or("?"),
        prev["machine"]["commit"].as_str().unwrap_or("?")
    );
    for k in keys {
        let (a, b) = (get(prev, &k), get(now, &k));
        if a.is_none() && b.is_none() {
            continue;
        }
        let change = match (a, b) {
            (Some(a), Some(b)) if a != 0.0 => format!("{:+.1}%", (b / a - 1.0) * 100.0),
            _ => "–".into(),
        };
        let show = |x: Option<f64>| x.map_or("–".into(), |x| format!("{x:.2}"));
        let _ = writeln!(s, "| {k} | {} | {} | {change} |", show(a), show(b));
    }
    s
}
