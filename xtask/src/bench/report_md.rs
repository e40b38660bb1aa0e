//! The markdown report, the summary printed at the end, and the comparison with the previous run.

use std::{fmt::Write as _, fs, path::Path};

use anyhow::{Context, Result};
use serde_json::Value;

use super::{report::num, tracer::Kind};

/// The summary tables (printed, and the top of the report).
fn summary_md(r: &Value) -> String {
    let mut s = String::new();
    const COLUMNS: [(&str, &str, usize); 12] = [
        ("drops/s at saturation", "saturation_drops_per_s", 0),
        ("busy ns/drop (sat.), median (min–max)", "busy_shown", 0),
        (
            "overhead ns/drop (sat.), median (min–max)",
            "overhead_shown",
            0,
        ),
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
        "\nAt saturation each tracer's figures are the median, min and max of the same number of rounds ({}, {}), its first quiet ones (other processes below {}% of the CPUs, no other tracer attached); quiet rounds: {}.",
        r["saturation_rounds_used"],
        if r["saturation_rounds_quiet"] == true { "all quiet" } else { "**not all quiet**: some tracer had none" },
        r["durations"]["quiet_below_background_pct"],
        rounds.join(", ")
    );
    s.push_str(&programs_md(r));
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
    let ratios: Vec<String> = r["overhead_ratios"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|x| {
            let t = x["tracer"].as_str().unwrap_or("?");
            format!("{t} **{}**", spread_md(&x["spread"], 2))
        })
        .collect();
    let _ = writeln!(
        s,
        "\nPer-drop overhead over bpftrace's: {} (the daemon's targets are {}'s).\n",
        ratios.join(", "),
        r["primary_tracer"].as_str().unwrap_or("?"),
    );
    let _ = writeln!(s, "A target is **met** only when its whole measured range (min–max over rounds) holds it, **missed** only when none of it does; otherwise it is *within noise*.\n");
    let _ = writeln!(s, "| target | limit | measured | verdict |");
    let _ = writeln!(s, "|---|---|---|---|");
    for t in r["targets"].as_array().into_iter().flatten() {
        let verdict = t["verdict"].as_str().unwrap_or("?");
        let verdict = match t["met"].as_bool() {
            Some(true) => verdict.to_owned(),
            _ => format!("**{verdict}**"),
        };
        let mut measured = num(&t["shown"], 3);
        if let Some(n) = t["note"].as_str().filter(|n| !n.is_empty()) {
            let _ = write!(measured, " ({n})");
        }
        let _ = writeln!(
            s,
            "| {} | {} | {measured} | {verdict} |",
            t["target"].as_str().unwrap_or(""),
            t["limit"].as_str().unwrap_or(""),
        );
    }
    s
}

/// `median (min–max)` of a spread object.
fn spread_md(v: &Value, d: usize) -> String {
    if v.is_null() {
        return "–".into();
    }
    format!(
        "{} ({}–{})",
        num(&v["median"], d),
        num(&v["min"], d),
        num(&v["max"], d)
    )
}

/// Per tracer and program: ns/run at saturation (dropping traffic) and, on passing traffic,
/// ns/run, ns per packet; the passing throughput and its loss against no tracer.
fn programs_md(r: &Value) -> String {
    let mut s = String::from(
        "\n### Per BPF program (kernel run_time_ns / run_cnt, bpf_stats_enabled)\n\n| tracer | program | ns/run, dropping (sat., own rounds) | ns/run, passing | ns per passing packet |\n|---|---|--:|--:|--:|\n",
    );
    // Each tracer, then the empty program on the tx hook (the floor of any program there).
    let floor = super::passing::FLOOR;
    let rows = Kind::ALL
        .iter()
        .map(|k| {
            let t = &r["tracers"][k.name()];
            (
                k.name(),
                &t["programs_ns_per_run_saturation"],
                &t["passing"],
            )
        })
        .chain([(floor, &Value::Null, &r["passing_floor"])]);
    for (tracer, drop, pass) in rows {
        let drop = drop.as_object().cloned().unwrap_or_default();
        let pass = pass["programs"].as_object().cloned().unwrap_or_default();
        let names: std::collections::BTreeSet<&String> = drop.keys().chain(pass.keys()).collect();
        for n in names {
            let field = |f: &str| pass.get(n).map_or(Value::Null, |p| p[f].clone());
            let _ = writeln!(
                s,
                "| {tracer} | {n} | {} | {} | {} |",
                spread_md(drop.get(n).unwrap_or(&Value::Null), 0),
                spread_md(&field("ns_per_run"), 0),
                spread_md(&field("ns_per_packet"), 1),
            );
        }
    }
    s.push_str("\n### Passing traffic (UDP delivered to a drained socket, one sender thread)\n\n| tracer | packets/s | throughput loss vs none, % | every packet delivered |\n|---|--:|--:|---|\n");
    let rows = Kind::ALL
        .iter()
        .map(|k| (k.name(), &r["tracers"][k.name()]["passing"]))
        .chain([(floor, &r["passing_floor"])]);
    for (tracer, p) in rows {
        if p.is_null() {
            continue;
        }
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            tracer,
            spread_md(&p["packets_per_s"], 0),
            spread_md(&p["throughput_loss_pct"], 1),
            p["clean"]
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
  `lbtrace watch --json --vip VIP` (its default sampling: the kernel counts every drop, at most
  1,000 records per key, CPU and second go through the ring), its stdout read by a bench thread that keeps only the last
  64 KiB for the summary but counts every drop record it reads (that thread's CPU time is subtracted, so it costs what /dev/null would, except the
  pipe copy inside lbtrace's write); `lbtrace agent` with metrics when it exists; the bpftrace
  one-liner (machine-wide, no filter).
- **Per-drop cost** = system-wide busy CPU time (`/proc/stat`: user, nice, system, irq,
  softirq; not idle, iowait or steal) over the run plus 300 ms of settling, minus the CPU time
  of every other process on the machine meanwhile (`/proc/PID/stat` user + sys with reaped
  children; ksoftirqd counts as ours), divided by the drops. Drops, and the BPF programs hooked
  to them, run in softirq on whichever task sent the packet, so no single process's time holds
  them: only the machine's busy time does. **Overhead** = a tracer's per-drop cost − the
  no-tracer cost; at saturation the machine is fully busy, so this is also the throughput lost.
  The rounds alternate between tracers; each tracer's figures at saturation are the median,
  min and max of the same number of *quiet* rounds for every tracer: other processes below 15%
  of the CPUs and no other tracer attached (BPF programs of other processes on tracepoints, per
  `bpftool perf show`, or a tracefs instance recording `skb/kfree_skb`). A tracer with too few
  quiet rounds gets extra rounds, up to a limit. An overhead is a range: (tracer − none) from
  min−max to max−min, median−median; a target is met only when the whole range holds it. *Of which
  daemon* is the tracer process's own CPU time per drop; the rest of the overhead is spent in
  the kernel (BPF programs, ring buffer). The ratio of lbtrace's overhead to bpftrace's is the
  figure to compare across machines; absolute numbers vary. It is paired by round: a round
  runs every tracer back to back, and each round gives (tracer − none) / (bpftrace − none), so
  a drift of the machine between rounds cancels; its range is over rounds. *empty-hooks* is no
  tracer: empty tp_btf programs on kfree_skb and on the tx hook, which every dropped packet
  here crosses (it is sent from the client namespace), the floor any tracer hooking them pays.
  *lbtrace-agent-no-tx* is the agent with its tx program refused (the test-only
  `LBTRACE_DISABLE_PROBES`): not a setting to run, but what the tx hook costs the agent per drop.
- **Daemon** CPU % (of one core) = on-CPU time, user + sys, of all its threads
  (`/proc/PID/task/*/schedstat`, ns resolution) over the run; wakeups/s = voluntary context
  switches (each a sleep that ended in a wakeup); RSS = peak VmHWM; BPF maps = `memlock` of the
  map fds it holds (`/proc/PID/fdinfo`).
- **Seen / delivered / lost** come from lbtrace's own summary (kernel counters, records read,
  reserve failures); **exact** = its per-reason counts equal the generator's. **Received** =
  the drop records the bench itself read from `lbtrace watch`'s stdout, every one: zero loss at
  200k/s means received + sampled out (lbtrace's count of drops it counted but did not send) =
  sent = the kernel's count (Udp NoPorts + the nft counter), lost 0, exact, at the offered rate
  (at a lower achieved rate it is *not measurable*). CPU targets likewise.
- **bpftrace's counts** are named by the kernel's own table (tracefs `skb/kfree_skb` format,
  `__print_symbolic`), not lbtrace's.
- **Per program**: `kernel.bpf_stats_enabled` is restored after the bench (also on error and
  on SIGINT/SIGTERM/SIGHUP). It is off for the overhead, CPU and latency rounds, as on a
  user's node: its two clock reads per program run cost some 50 ns here, paid twice per drop
  by a tracer with programs on both the tx and the drop hooks. It is on for saturation rounds
  of their own (*prog-cost*) and for passing traffic; each program's `run_cnt` and
  `run_time_ns` (`bpftool prog show -j`) are read before and after the traffic of each round. lbtrace's
  programs are matched by name, bpftrace's as the programs its process loaded.
- **Passing traffic**: one sender thread sends 16-byte UDP datagrams as fast as it can to a
  socket bound in the node namespace (64 MiB receive buffer, drained with `recvmmsg` by a bench
  thread); clean = the sink and the kernel (Udp InDatagrams, RcvbufErrors) say every datagram
  was delivered. ns per passing packet = a program's run time / packets delivered; throughput
  loss = 1 − packets/s with the tracer / packets/s with none. Each round also runs the flow
  with no tracer but an empty tp_btf program (`r0 = 0; exit`, loaded by the bench) on
  `net_dev_start_xmit`, the tx program's hook: its ns per passing packet is the kernel's own
  cost of any program there under bpf_stats, the floor beneath the tx target.
- **Scale**: namespaces client → node → pod; the node DNATs UDP to each of 1,000 VIPs of a /22
  (port 80) to its own closed port of the pod, so every datagram is a NO_SOCKET drop in the
  pod's namespace, which lbtrace can attribute only through its NAT map. Each client socket
  (its own source port) sends one datagram to every VIP, so every datagram is a new conntrack
  entry (the node's nft counter on the DNAT rule counts them; `nf_conntrack_udp_timeout` is 2 s
  in the node's namespace only). Exact = lbtrace_drops_total{reason=NO_SOCKET} of every VIP
  equals what was sent to it, with nothing anywhere else; judged only at the offered rate and
  when the pod's Udp NoPorts and the node's counter equal what was sent. Scrapes are timed
  (connect to last byte) after the load; evictions in the kernel = new connections − the
  entries the agent's NAT map holds after the load (`bpftool map dump`), against
  `lbtrace_nat_evictions_total` at the same moment.
- **Latency**: during the 10k run (`lbtrace watch --sample-limit 0`: the markers share their
  sampling key with the flood, so every drop is sent), marker datagrams to a third closed port, one every 20–60 ms
  (pseudo-random, so they do not lock onto the reader's 50 ms tick), each from its own socket;
  the time from `send_to` to the moment the bench reads the line with that source port on
  lbtrace's stdout.
";

/// The scale phase: 1,000 VIPs, 50k new DNATed connections/s (see `scale.rs`).
fn scale_md(s: &Value) -> String {
    if let Some(e) = s["error"].as_str() {
        return format!("## Scale\n\nNot measured: {e}\n\n");
    }
    let (o, a, nat) = (&s["oracle"], &s["attribution"], &s["nat"]);
    let rows = [
        (
            "agent",
            format!("`{}`", s["command"].as_str().unwrap_or("")),
        ),
        (
            "VIPs with traffic / pool",
            format!("{} / {}", s["vips"], s["pool"].as_str().unwrap_or("")),
        ),
        (
            "new connections/s offered / achieved",
            format!("{} / {}", s["offered_per_s"], num(&s["achieved_per_s"], 0)),
        ),
        ("duration s", num(&s["duration_s"], 1)),
        ("sent (generator)", s["sent"].to_string()),
        (
            "new DNATed connections (node nft counter)",
            o["node_new_connections"].to_string(),
        ),
        (
            "NO_SOCKET drops (pod Udp NoPorts)",
            o["pod_udp_no_ports"].to_string(),
        ),
        (
            "node conntrack insert_failed / drop / early_drop",
            format!(
                "{} / {} / {}",
                o["node_conntrack_insert_failed"],
                o["node_conntrack_drop"],
                o["node_conntrack_early_drop"]
            ),
        ),
        (
            "lbtrace: NO_SOCKET on the VIPs",
            a["attributed"].to_string(),
        ),
        (
            "lbtrace: VIPs exact / differing",
            format!("{} / {}", a["vips_exact"], a["vips_differ"]),
        ),
        (
            "lbtrace: drops elsewhere (none, other, unsent pool addresses)",
            format!("{} {}", a["elsewhere"], a["elsewhere_by_label"]),
        ),
        ("lbtrace: label overflow", a["label_overflow"].to_string()),
        (
            "NAT map size / held after the load (bpftool)",
            format!(
                "{} / {}",
                nat["map_entries"],
                num(&nat["held_in_kernel"], 0)
            ),
        ),
        (
            "NAT evictions in the kernel (new − held) / lbtrace_nat_evictions_total",
            format!(
                "{} / {}",
                num(&nat["evictions_in_kernel"], 0),
                num(&nat["evictions_reported"], 0)
            ),
        ),
        ("lbtrace_nat* series", nat["series"].to_string()),
        (
            "/metrics scrape ms, median (min–max)",
            spread_md(&s["scrape_ms"], 1),
        ),
        ("/metrics bytes", s["metrics_bytes"].to_string()),
        (
            "agent RSS / peak MiB",
            format!("{} / {}", num(&s["rss_mb"], 1), num(&s["rss_peak_mb"], 1)),
        ),
        ("agent BPF maps MiB", num(&s["maps_mb"], 1)),
        ("agent CPU % of a core", num(&s["agent_cpu_pct"], 1)),
    ];
    let mut md = String::from("## Scale\n\n| figure | value |\n|---|--:|\n");
    for (k, v) in rows {
        let _ = writeln!(md, "| {k} | {v} |");
    }
    md.push('\n');
    md
}

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
    md.push_str(&scale_md(&r["scale"]));
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
