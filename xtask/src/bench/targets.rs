//! The table of targets: each figure against its limit, met only beyond the measured spread,
//! and never at a load lower than the target's.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::{
    figures::{target, target_with, Spread, Verdict},
    passing::Passing,
    report::{drops_per_s, one},
    tracer::Kind,
    Load, PhaseResult, HIGH_RATE, LOW_RATE,
};

/// The 200k drops/s run of `lbtrace watch`, whose records the bench reads: every record it
/// received, against the generator and the kernel's counters, and lbtrace's own loss and
/// sampled-out counts.
pub fn sustained(phases: &[PhaseResult]) -> Value {
    let Some(h) = one(phases, Kind::Watch, Load::High) else {
        return Value::Null;
    };
    let c = h.counts.as_ref();
    let received = c.and_then(|c| c.received.as_ref());
    json!({
        "tracer": Kind::Watch.name(),
        "offered": HIGH_RATE,
        "duration_s": h.sent.elapsed.as_secs_f64(),
        "sent": h.drops(),
        "achieved_per_s": drops_per_s(h),
        "kernel_counted": h.oracle.udp_no_ports + h.oracle.nft_dropped,
        "kernel_agrees": h.oracle_agrees(),
        "received": received.map(|r| r.records),
        "received_by_reason": received.map(|r| &r.by_reason),
        "seen": c.and_then(|c| c.seen),
        "delivered": c.and_then(|c| c.delivered),
        "lost": c.and_then(|c| c.lost),
        "sampled_out": c.and_then(|c| c.sampled_out),
        "exact": h.exact(),
    })
}

/// Zero loss at 200k/s: judged only at that rate, from what the bench received and what
/// lbtrace says it sampled out.
pub fn sustained_verdict(s: &Value) -> Verdict {
    let Some(achieved) = s["achieved_per_s"].as_f64() else {
        return Verdict::NotMeasured("no 200k run of lbtrace watch".into());
    };
    if achieved < 0.99 * HIGH_RATE as f64 {
        return Verdict::NotMeasured(format!(
            "not measurable at that rate: {achieved:.0}/s achieved of {HIGH_RATE} offered"
        ));
    }
    let sent = s["sent"].as_u64();
    // Every drop is a record the bench read, or one lbtrace counted and said it sampled out.
    let accounted = s["received"]
        .as_u64()
        .map(|r| r + s["sampled_out"].as_u64().unwrap_or(0));
    let all_received = accounted.is_some() && accounted == sent;
    let ok = all_received
        && s["kernel_counted"].as_u64() == sent
        && s["kernel_agrees"] == true
        && s["lost"].as_u64() == Some(0)
        && s["exact"] == true;
    if ok {
        Verdict::Met
    } else {
        Verdict::Missed
    }
}

/// A daemon's CPU at `load`: judged only when the offered rate was reached.
fn cpu_target(r: &Value, primary: Kind, load: &str, limit: f64) -> Value {
    let offered = if load == "10k" { LOW_RATE } else { HIGH_RATE } as f64;
    let t = &r["tracers"][primary.name()];
    let cpu = t[format!("cpu_pct_{load}")]
        .as_f64()
        .and_then(|x| Spread::of(&[x]));
    let achieved = t[format!("achieved_per_s_{load}")].as_f64();
    let name = format!("daemon CPU at {load} drops/s");
    match achieved {
        Some(a) if a < 0.95 * offered => {
            let why = format!(
                "not measurable at that rate: {a:.0} drops/s achieved of {offered:.0} offered"
            );
            target_with(
                &name,
                cpu,
                &format!("≤ {limit}% of a core"),
                &Verdict::NotMeasured(why),
                "",
            )
        }
        _ => target(&name, cpu, limit, "% of a core", "one run"),
    }
}

/// The kfree_skb program's ns/run (lbtrace's, whichever hook attached) over bpftrace's.
/// From the rounds with `bpf_stats_enabled` on (`Load::Cost`).
fn kfree_ratio(phases: &[PhaseResult], primary: Kind) -> Option<Spread> {
    let per_run = |k: Kind, lbtrace: bool| {
        let v: Vec<f64> = phases
            .iter()
            .filter(|p| p.tracer == k && p.load == Load::Cost)
            .flat_map(|p| &p.progs)
            .filter(|c| !lbtrace || c.name.starts_with("kfree_skb_"))
            .filter_map(super::bpfstats::Cost::ns_per_run)
            .collect();
        Spread::of(&v)
    };
    per_run(primary, true)?.ratio(per_run(Kind::Bpftrace, false)?)
}

/// The primary tracer's programs named `prefix*` on passing traffic, in ns per packet.
fn passing_target(passing: &[Passing], primary: Kind, prefix: &str, what: &str) -> Value {
    let rounds: Vec<&Passing> = passing
        .iter()
        .filter(|p| p.tracer == primary && !p.floor)
        .collect();
    let v: Vec<f64> = rounds
        .iter()
        .map(|p| {
            p.progs
                .iter()
                .filter(|c| c.name.starts_with(prefix))
                .map(|c| p.ns_per_packet(c))
                .sum()
        })
        .collect();
    let clean = rounds.iter().all(|p| p.clean());
    let mut note = if clean {
        "per delivered packet, kernel run_time_ns; passing traffic".to_owned()
    } else {
        "SOME ROUNDS WERE NOT CLEAN (datagrams not all delivered)".to_owned()
    };
    if prefix == "net_dev_xmit_" {
        note.push_str(&floor_note(passing));
    }
    let note = note.as_str();
    let name = format!("{what} program ns per passing packet");
    let attached = rounds
        .iter()
        .any(|p| p.progs.iter().any(|c| c.name.starts_with(prefix)));
    if !rounds.is_empty() && !attached {
        // Not loaded at all (the agent hooks received packets only with --arp-rx): passing
        // packets pay nothing for it.
        let note = "not attached by this tracer: nothing per passing packet";
        return target(&name, Spread::of(&[0.0]), 40.0, " ns", note);
    }
    if rounds.is_empty() || v.iter().all(|x| *x == 0.0) {
        let why = Verdict::NotMeasured(format!("no {prefix}* program ran"));
        return target_with(&name, None, "≤ 40 ns", &why, note);
    }
    target(&name, Spread::of(&v), 40.0, " ns", note)
}

/// The empty tp_btf program on the same hook, side by side: the kernel's own per-program cost.
fn floor_note(passing: &[Passing]) -> String {
    let v: Vec<f64> = passing
        .iter()
        .filter(|p| p.floor)
        .flat_map(|p| p.progs.iter().map(|c| p.ns_per_packet(c)))
        .collect();
    match Spread::of(&v) {
        Some(s) => format!(
            "; ns per passing packet of an empty program on this hook: {:.1} ({:.1}–{:.1}, {} rounds)",
            s.median, s.min, s.max, s.n
        ),
        None => "; the empty program on this hook was not measured".to_owned(),
    }
}

pub fn targets(
    r: &Value,
    primary: Kind,
    phases: &[PhaseResult],
    passing: &[Passing],
    used: &BTreeMap<Kind, Vec<&PhaseResult>>,
) -> Value {
    let single = |k: &str| r[k].as_f64().and_then(|x| Spread::of(&[x]));
    let ratio_rows = [(Kind::Agent, 0.5), (Kind::Watch, 1.0)].map(|(k, l)| ratio_target(r, k, l));
    let s = &r["sustained_200k"];
    let sus = sustained_verdict(s);
    let sat = used.get(&primary).cloned().unwrap_or_default();
    let sat_exact = (!sat.is_empty()).then(|| sat.iter().all(|p| p.exact() == Some(true)));
    let sat_lost: u64 = sat.iter().filter_map(|p| p.counts.as_ref()?.lost).sum();
    let latency_missed = r["latency_p99_missed"] == true;
    let lat_t = if latency_missed {
        target_with("drop → stdout latency p99", None, "≤ 100 ms", &Verdict::Missed, &format!("{} markers never seen: p99 falls among them (a missed marker is a latency above any limit)", r["latency_markers_missed"]))
    } else {
        target(
            "drop → stdout latency p99",
            single("latency_ms_p99"),
            100.0,
            " ms",
            "lbtrace watch, under 10k drops/s; missed markers count",
        )
    };
    let v = match sat_exact {
        Some(true) => Verdict::Met,
        Some(false) => Verdict::Missed,
        None => Verdict::NotMeasured("no rounds".into()),
    };
    let exact_t = target_with(
        "exact per-reason counts at saturation, loss reported",
        None,
        "equal to the generator's in every round used",
        &v,
        &format!("{} rounds, events lost in total: {sat_lost}", sat.len()),
    );
    let mut rows = ratio_rows.to_vec();
    rows.extend([
        target_with(
            "kfree_skb program ns/run vs bpftrace's program (ratio)",
            kfree_ratio(phases, primary),
            "≤ 1.0×",
            &Verdict::at_most(kfree_ratio(phases, primary), 1.0),
            "kernel run_time_ns / run_cnt, saturation rounds with bpf_stats_enabled on",
        ),
        passing_target(passing, primary, "net_dev_xmit_", "tx (net_dev_xmit)"),
        passing_target(passing, primary, "netif_receive_", "rx (netif_receive)"),
        target_with(
            "200k drops/s sustained with zero loss (records received + sampled out)",
            s["achieved_per_s"].as_f64().and_then(|x| Spread::of(&[x])),
            "≥ 198,000/s achieved; received + sampled out = sent = kernel count; lost 0; exact",
            &sus,
            &format!(
                "{:.0} s: sent {}, kernel {}, received {}, sampled out {}, lbtrace lost {}, exact {}",
                s["duration_s"].as_f64().unwrap_or(0.0),
                s["sent"],
                s["kernel_counted"],
                s["received"],
                s["sampled_out"],
                s["lost"],
                s["exact"]
            ),
        ),
        exact_t,
        cpu_target(r, primary, "10k", 1.0),
        cpu_target(r, primary, "200k", 3.0),
        target(
            "daemon wakeups",
            single("wakeups_per_s"),
            2000.0,
            "/s",
            "the higher of 10k and 200k drops/s",
        ),
        target(
            "daemon RSS",
            single("rss_mb"),
            32.0,
            " MiB",
            "VmRSS under load",
        ),
        target(
            "BPF maps",
            single("maps_mb"),
            32.0,
            " MiB",
            "kernel memlock of the maps the daemon holds, defaults: the NAT map (131072 flows, 2.6 s at 50k new connections/s) is most of it",
        ),
        lat_t,
    ]);
    rows.extend(scale_targets(&r["scale"]));
    Value::Array(rows)
}

/// The scale phase's rows: attribution, evictions, scrape time, RSS (see `scale.rs`).
pub fn scale_targets(s: &Value) -> Vec<Value> {
    const WHAT: &str = "1,000 VIPs, 50k new DNATed connections/s";
    let name = |t: &str| format!("{WHAT}: {t}");
    if let Some(e) = s["error"].as_str() {
        let why = Verdict::NotMeasured(e.to_owned());
        return [
            "every drop attributed",
            "evictions counted",
            "/metrics scrape",
            "agent RSS",
        ]
        .map(|t| target_with(&name(t), None, "", &why, ""))
        .to_vec();
    }
    let (o, a) = (&s["oracle"], &s["attribution"]);
    let achieved = s["achieved_per_s"].as_f64().unwrap_or(0.0);
    let offered = s["offered_per_s"].as_f64().unwrap_or(0.0);
    let note = format!(
        "{:.0} new conns/s for {:.1} s: sent {}, pod NoPorts {}, node DNATs {}; lbtrace: {} on the VIPs, {}/1000 VIPs exact, {} elsewhere (none/other/unsent), label overflow {}",
        achieved,
        s["duration_s"].as_f64().unwrap_or(0.0),
        s["sent"],
        o["pod_udp_no_ports"],
        o["node_new_connections"],
        a["attributed"],
        a["vips_exact"],
        a["elsewhere"],
        a["label_overflow"],
    );
    let attributed = if achieved < 0.95 * offered {
        Verdict::NotMeasured(format!(
            "not measurable at that rate: {achieved:.0}/s achieved of {offered:.0} offered"
        ))
    } else if o["agrees"] != true {
        Verdict::NotMeasured("the kernel's counters disagree with the generator".into())
    } else if s["exact"] == true {
        Verdict::Met
    } else {
        Verdict::Missed
    };
    let nat = &s["nat"];
    let evictions = match (
        nat["evictions_reported"].as_u64(),
        nat["evictions_in_kernel"].as_u64(),
    ) {
        (Some(r), Some(k)) if r == k => Verdict::Met,
        (_, None) => Verdict::NotMeasured("the NAT map's entries could not be read".into()),
        _ => Verdict::Missed,
    };
    let nat_note = format!(
        "NAT map of {} entries holding {} after {} new connections: {} evictions in the kernel (at least {}); lbtrace's series after the load: {}",
        nat["map_entries"],
        nat["held_in_kernel"],
        o["node_new_connections"],
        nat["evictions_in_kernel"],
        nat["evictions_at_least"],
        match nat["series"].as_object().filter(|m| !m.is_empty()) {
            Some(m) => m
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", "),
            None => "no lbtrace_nat* series in /metrics".into(),
        },
    );
    let mb = |k: &str| s[k].as_f64();
    let rss = mb("rss_mb").zip(mb("rss_peak_mb")).map(|(a, b)| a.max(b));
    vec![
        target_with(
            &name("every drop attributed"),
            None,
            "per VIP = sent; nothing elsewhere",
            &attributed,
            &note,
        ),
        target_with(
            &name("evictions counted"),
            nat["evictions_reported"]
                .as_f64()
                .and_then(|x| Spread::of(&[x])),
            "lbtrace_nat_evictions_total = new connections − entries the map holds",
            &evictions,
            &nat_note,
        ),
        target(
            &name("/metrics scrape"),
            Spread::from_json(&s["scrape_ms"]),
            100.0,
            " ms",
            &format!("after the load, {} bytes", s["metrics_bytes"]),
        ),
        target(
            &name("agent RSS"),
            rss.and_then(|x| Spread::of(&[x])),
            32.0,
            " MiB",
            &format!(
                "the higher of steady {:.1} MiB and peak (VmHWM) {:.1} MiB",
                mb("rss_mb").unwrap_or(f64::NAN),
                mb("rss_peak_mb").unwrap_or(f64::NAN)
            ),
        ),
    ]
}

/// `kind`'s per-drop overhead over bpftrace's, paired by round, as the results hold it.
fn paired(r: &Value, kind: Kind) -> Option<Spread> {
    r["overhead_ratios"]
        .as_array()?
        .iter()
        .find(|x| x["tracer"] == kind.name())
        .and_then(|x| Spread::from_json(&x["spread"]))
}

/// `kind`'s per-drop overhead at saturation over the bpftrace one-liner's, against `limit`.
fn ratio_target(r: &Value, kind: Kind, limit: f64) -> Value {
    let ov = |k: Kind| Spread::from_json(&r["tracers"][k.name()]["overhead_ns_per_drop_spread"]);
    let name = format!(
        "per-drop overhead, {} vs the bpftrace one-liner (ratio, paired by round)",
        kind.name()
    );
    let ratio = paired(r, kind);
    if ratio.is_some() {
        return target(&name, ratio, limit, "", &overhead_note(r, kind));
    }
    let why = if ov(kind).is_some() && ov(Kind::Bpftrace).is_some() {
        Verdict::WithinNoise
    } else {
        Verdict::NotMeasured(format!("needs {} and bpftrace", kind.name()))
    };
    let note = format!(
        "{}; bpftrace's overhead is not above zero in every round, so no ratio is resolved",
        overhead_note(r, kind)
    );
    target_with(&name, None, &format!("≤ {limit}"), &why, &note)
}

/// Each tracer's overhead with its spread, and the floor: empty programs on the same hooks.
fn overhead_note(r: &Value, primary: Kind) -> String {
    let shown = |k: Kind| {
        r["tracers"][k.name()]["overhead_shown"]
            .as_str()
            .unwrap_or("–")
            .to_owned()
    };
    let ratio = |k: Kind| paired(r, k).map_or("–".into(), |s| s.show(2));
    format!(
        "overhead ns/drop at saturation, median (min–max over the same number of quiet rounds, against no tracer's): {} {}, bpftrace {}; empty programs on the hooks a dropped packet crosses here (kfree_skb, and the tx hook at the sender) {}, a ratio of {}; the agent without its tx program {}, a ratio of {}",
        primary.name(),
        shown(primary),
        shown(Kind::Bpftrace),
        shown(Kind::Hooks),
        ratio(Kind::Hooks),
        shown(Kind::AgentNoTx),
        ratio(Kind::AgentNoTx),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lower_load_is_never_met() {
        let r = json!({"tracers": {"lbtrace-agent": {
            "cpu_pct_200k": 1.0, "achieved_per_s_200k": 150_000.0,
            "cpu_pct_10k": 0.5, "achieved_per_s_10k": 10_000.0,
        }}});
        let t = cpu_target(&r, Kind::Agent, "200k", 3.0);
        assert_eq!(t["met"], Value::Null, "{t}");
        assert!(t["verdict"]
            .as_str()
            .unwrap()
            .contains("not measurable at that rate"));
        assert_eq!(cpu_target(&r, Kind::Agent, "10k", 1.0)["met"], true);
        let s = |achieved: f64, received: u64| {
            json!({"achieved_per_s": achieved, "sent": 1_200_000, "received": received,
                "kernel_counted": 1_200_000, "kernel_agrees": true, "lost": 0, "exact": true})
        };
        assert_eq!(sustained_verdict(&s(200_000.0, 1_200_000)), Verdict::Met);
        assert!(matches!(
            sustained_verdict(&s(150_000.0, 1_200_000)),
            Verdict::NotMeasured(_)
        ));
        // lbtrace says 0 lost and exact, but the bench did not receive every record.
        assert_eq!(sustained_verdict(&s(200_000.0, 1_199_999)), Verdict::Missed);
        let mut no_received = s(200_000.0, 0);
        no_received["received"] = Value::Null;
        assert_eq!(sustained_verdict(&no_received), Verdict::Missed);
        // Sampling: what the bench did not receive, lbtrace counted and said it sampled out.
        let mut sampled = s(200_000.0, 2_000);
        sampled["sampled_out"] = json!(1_198_000);
        assert_eq!(sustained_verdict(&sampled), Verdict::Met);
        sampled["sampled_out"] = json!(1_197_999);
        assert_eq!(sustained_verdict(&sampled), Verdict::Missed);
    }
}
