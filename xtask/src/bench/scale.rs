//! Scale: 1,000 VIPs and 50k new DNATed connections/s, every drop behind the DNAT.
//!
//! client → node → pod. The client sends one UDP datagram to each VIP of a /22 pool from each of
//! its sockets (distinct source ports), so every datagram is a new conntrack entry in the node,
//! which DNATs VIP:80 to the pod, each VIP to its own closed port (one pod port for all VIPs would
//! make the translated tuples clash and conntrack remap source ports). Every datagram is a
//! NO_SOCKET drop in the pod's namespace, where the skb carries no conntrack entry: lbtrace can
//! attribute it only through the NAT map its transmit hook learned. The agent watches the pod's
//! namespace with the whole pool as `--vip`.
//!
//! Oracles: what the generator sent to each VIP, the pod's Udp NoPorts and the node's nft
//! counter on its DNAT rule (one per new connection: nat chains see only a connection's first
//! packet). Measured: per-VIP counts, `/metrics` scrape time after the load, RSS, NAT learning.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

pub use super::scale_lab::{POOL, RATE, VIPS};
use super::{
    figures::Spread,
    measure,
    scale_lab::{send, vip, ScaleLab, NAT_ENTRIES},
    tracer::{self, Kind, Running},
    Ctx, Daemon,
};

const SCRAPES: usize = 5;

/// The agent refreshes its kernel counters once a second: scrape until the pool's NO_SOCKET
/// drops reach the pod's count (5 s at most; a count that stays short is what is judged).
fn settled(addr: SocketAddr, want: u64) -> Result<String> {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let text = tracer::http_get(addr, "/metrics")?;
        let n: u64 = tracer::samples(&text, "lbtrace_drops_total")
            .filter(|(l, _)| tracer::label(l, "reason") == Some("NO_SOCKET"))
            .map(|(_, n)| n)
            .sum();
        if n >= want || Instant::now() > end {
            return Ok(text);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The scrape once the agent's own count of its NAT map (`lbtrace_nat_entries`) is `held`.
fn recounted(addr: SocketAddr, held: u64) -> Result<String> {
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        let text = tracer::http_get(addr, "/metrics")?;
        if nat_series(&text).get("lbtrace_nat_entries") == Some(&held) || Instant::now() > end {
            return Ok(text);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `SCRAPES` timed scrapes of /metrics, in ms.
fn scrape_times(addr: SocketAddr) -> Result<Vec<f64>> {
    (0..SCRAPES)
        .map(|_| {
            let t = Instant::now();
            tracer::http_get(addr, "/metrics")?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            std::thread::sleep(Duration::from_millis(100));
            Ok(ms)
        })
        .collect()
}

/// What lbtrace said, against what was sent per VIP.
fn attribution(text: &str, per_vip: &[u64]) -> Value {
    let sent: BTreeMap<String, u64> = (0..VIPS)
        .map(|i| (vip(i).to_string(), per_vip[i]))
        .collect();
    let mut counted: BTreeMap<String, u64> = BTreeMap::new();
    let mut elsewhere: BTreeMap<String, u64> = BTreeMap::new();
    for (l, n) in tracer::samples(text, "lbtrace_drops_total") {
        let (v, r) = (
            tracer::label(l, "vip").unwrap_or("?"),
            tracer::label(l, "reason"),
        );
        if r == Some("NO_SOCKET") && sent.contains_key(v) {
            *counted.entry(v.to_owned()).or_default() += n;
        } else if n > 0 {
            *elsewhere
                .entry(format!("{v} {}", r.unwrap_or("?")))
                .or_default() += n;
        }
    }
    let differ: Vec<Value> = sent
        .iter()
        .filter(|(v, n)| counted.get(*v).copied().unwrap_or(0) != **n)
        .map(|(v, n)| json!({"vip": v, "sent": n, "counted": counted.get(v).copied().unwrap_or(0)}))
        .collect();
    let overflow: u64 = tracer::samples(text, "lbtrace_label_overflow_total")
        .map(|(_, n)| n)
        .sum();
    json!({
        "attributed": counted.values().sum::<u64>(),
        "vips_exact": VIPS - differ.len(),
        "vips_differ": differ.len(),
        "first_differences": differ.iter().take(5).collect::<Vec<_>>(),
        "elsewhere": elsewhere.values().sum::<u64>(),
        "elsewhere_by_label": elsewhere,
        "label_overflow": overflow,
    })
}

/// Every `lbtrace_nat*` series, summed by name (what the agent says about NAT learning).
fn nat_series(text: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for l in text.lines().filter(|l| l.starts_with("lbtrace_nat")) {
        let name = l.split(['{', ' ']).next().unwrap_or_default();
        if let Some((_, v)) = l.rsplit_once(' ') {
            *out.entry(name.to_owned()).or_default() += v.parse::<f64>().unwrap_or(0.0) as u64;
        }
    }
    out
}

/// Translations the agent's NAT map holds, from the kernel (`bpftool map dump`): new
/// connections minus these are the evictions.
fn nat_map_entries(pid: u32) -> Result<u64> {
    let mut held = std::collections::BTreeSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))?.flatten() {
        let info = std::fs::read_to_string(fd.path()).unwrap_or_default();
        if let Some(id) = info.lines().find_map(|l| l.strip_prefix("map_id:")) {
            held.insert(id.trim().to_owned());
        }
    }
    let out =
        crate::util::output(std::process::Command::new("bpftool").args(["map", "show", "-j"]))?;
    let maps: Value = serde_json::from_slice(&out.stdout).context("bpftool map show -j")?;
    let id = maps
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["name"] == "NAT" && held.contains(&m["id"].to_string()))
        .context("the agent holds no map named NAT")?["id"]
        .to_string();
    let out = crate::util::output(
        std::process::Command::new("bpftool").args(["map", "dump", "id", &id]),
    )?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            l.strip_prefix("Found ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .context("no element count in bpftool map dump")
}

fn agent_args(pod_netns: u32) -> Vec<String> {
    let netns = pod_netns.to_string();
    let nat = NAT_ENTRIES.to_string();
    [
        "agent",
        "--metrics-addr",
        "ADDR",
        "--netns",
        &netns,
        "--vip",
        POOL,
        "--nat-entries",
        &nat,
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Runs the phase, printing its line; any failure is in the result's `error` (the namespaces
/// are gone either way).
pub fn run(ctx: &Ctx, duration: Duration) -> Value {
    crate::util::step(&format!(
        "bench: scale ({VIPS} VIPs of {POOL}, {RATE} new DNATed connections/s, client → node → pod)"
    ));
    let s = run_inner(ctx, duration).unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
    eprintln!("    {}", line(&s));
    s
}

/// `cargo xtask bench --scale`: the phase alone, its targets printed and its figures written to
/// target/bench/scale.json.
pub fn alone(ctx: &Ctx, duration: Duration) -> Result<()> {
    let s = run(ctx, duration);
    for t in super::targets::scale_targets(&s) {
        eprintln!(
            "    {}: {} ({}) — {}",
            t["target"].as_str().unwrap_or(""),
            t["verdict"].as_str().unwrap_or(""),
            t["shown"].as_str().unwrap_or("–"),
            t["note"].as_str().unwrap_or("")
        );
    }
    let dir = crate::root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("scale.json"),
        serde_json::to_string_pretty(&s)? + "\n",
    )?;
    match s["error"].as_str() {
        Some(e) => bail!("scale: {e}"),
        None => Ok(()),
    }
}

fn run_inner(ctx: &Ctx, duration: Duration) -> Result<Value> {
    let sockets = (RATE as f64 * duration.as_secs_f64() / VIPS as f64 * 1.5) as usize + 4;
    let lab = ScaleLab::new(sockets)?;
    let tracer = Running::start_args(Kind::Agent, &ctx.bin, agent_args(lab.pod.inode), None)?;
    let (pid, addr) = (
        tracer.pid().context("no agent pid")?,
        tracer.metrics_addr().context("no metrics address")?,
    );
    let o0 = lab.oracle()?;
    let p0 = measure::process(pid);
    let (per_vip, elapsed) = send(&lab.socks, duration)?;
    let o = lab.oracle()?.minus(o0);
    let text = settled(addr, o.no_ports)?;
    // No traffic now: the map holds what it will hold at the scrapes.
    let held = nat_map_entries(pid).ok();
    // The agent recounts its map a few seconds after a burst of learning: wait for it.
    let text = match held {
        Some(h) => recounted(addr, h).unwrap_or(text),
        None => text,
    };
    let daemon = Daemon::measure(pid, &p0);
    let scrape_ms = scrape_times(addr)?;
    tracer.stop(&ctx.names)?;
    drop(lab);
    let sent: u64 = per_vip.iter().sum();
    let nat = nat_series(&text);
    let evictions = nat.get("lbtrace_nat_evictions_total").copied();
    let learned = nat.get("lbtrace_nat_learned_total").copied();
    let a = attribution(&text, &per_vip);
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    Ok(json!({
        "vips": VIPS,
        "pool": POOL,
        "command": format!("lbtrace {}", agent_args(0).join(" ").replace("--netns 0", "--netns <pod>")),
        "offered_per_s": RATE,
        "duration_s": elapsed.as_secs_f64(),
        "sockets_used": sockets_used(&per_vip),
        "sent": sent,
        "achieved_per_s": sent as f64 / elapsed.as_secs_f64().max(1e-9),
        "oracle": {
            "pod_udp_no_ports": o.no_ports,
            "node_new_connections": o.new_conns,
            "node_conntrack_insert_failed": o.ct_insert_failed,
            "node_conntrack_drop": o.ct_drop,
            "node_conntrack_early_drop": o.ct_early_drop,
            "agrees": o.no_ports == sent && o.new_conns == sent,
        },
        "attribution": a,
        "exact": a["vips_differ"] == 0 && a["elsewhere"] == 0 && a["label_overflow"] == 0,
        "scrape_ms": Spread::of(&scrape_ms).map(Spread::to_json),
        "scrape_ms_samples": scrape_ms,
        "metrics_bytes": text.len(),
        "rss_mb": mib(daemon.rss),
        "rss_peak_mb": mib(daemon.rss_peak),
        "maps_mb": mib(daemon.maps_bytes),
        "agent_cpu_pct": daemon.rates.cpu_pct,
        "nat": {
            "series": nat,
            "map_entries": NAT_ENTRIES,
            "learned_reported": learned,
            "held_in_kernel": held,
            "evictions_reported": evictions,
            "evictions_in_kernel": held.map(|h| o.new_conns.saturating_sub(h)),
            "evictions_at_least": o.new_conns.saturating_sub(NAT_ENTRIES),
        },
    }))
}

/// Sockets that sent at least one datagram: the datagrams to VIP 0 (each socket starts there).
fn sockets_used(per_vip: &[u64]) -> u64 {
    per_vip.first().copied().unwrap_or(0)
}

/// One line for the bench's progress output.
pub fn line(s: &Value) -> String {
    if let Some(e) = s["error"].as_str() {
        return format!("scale: failed: {e}");
    }
    let a = &s["attribution"];
    format!(
        "scale          {} VIPs {:>8.0} new conns/s  sent {}  NoPorts {}  attributed {} ({} VIPs exact, {} elsewhere)  scrape {:.1} ms  RSS {:.1} MiB peak {:.1}  cpu {:.1}%",
        s["vips"],
        s["achieved_per_s"].as_f64().unwrap_or(0.0),
        s["sent"],
        s["oracle"]["pod_udp_no_ports"],
        a["attributed"],
        a["vips_exact"],
        a["elsewhere"],
        s["scrape_ms"]["median"].as_f64().unwrap_or(f64::NAN),
        s["rss_mb"].as_f64().unwrap_or(f64::NAN),
        s["rss_peak_mb"].as_f64().unwrap_or(f64::NAN),
        s["agent_cpu_pct"].as_f64().unwrap_or(f64::NAN),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_and_attribution() {
        let mut per_vip = vec![0u64; VIPS];
        per_vip[0] = 3;
        per_vip[1] = 2;
        let text = "lbtrace_drops_total{vip=\"10.200.64.1\",reason=\"NO_SOCKET\",node=\"n\"} 3\n\
                    lbtrace_drops_total{vip=\"10.200.64.2\",reason=\"NO_SOCKET\",node=\"n\"} 1\n\
                    lbtrace_drops_total{vip=\"none\",reason=\"NO_SOCKET\",node=\"n\"} 1\n\
                    lbtrace_nat_evictions_total{node=\"n\"} 7\n";
        let a = attribution(text, &per_vip);
        assert_eq!(
            (a["attributed"].as_u64(), a["vips_differ"].as_u64()),
            (Some(4), Some(1))
        );
        assert_eq!(a["elsewhere"].as_u64(), Some(1));
        assert_eq!(nat_series(text)["lbtrace_nat_evictions_total"], 7);
    }
}
