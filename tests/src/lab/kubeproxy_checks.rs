//! What the lab checks of lbtrace's reading of kube-proxy's rules: the Service on every record
//! tied to a VIP, one `endpoint` record per endpoint change a sync made, the propagation delay
//! `diagnose` states on endpoint-churn, and the LoadBalancer IPs `--discover-vips` learns.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{ensure, Result};
use serde_json::Value;

use super::{
    accounts::Check,
    kubeproxy::{expected_service, ProxyMode},
    scenarios::Scenario,
    topology::{EndpointChange, Lab},
};
use crate::lbtrace::Watch;

/// How often lbtrace re-reads kube-proxy's rules in the lab (`--kube-proxy-interval`).
pub const LBTRACE_INTERVAL: &str = "0.25";
/// How late an endpoint record may be: one of lbtrace's reads, plus the time reading the
/// rules of every node takes on a busy host.
const RECORD_LAG: f64 = 1.0;

fn ip(v: &Value, k: &str) -> Option<IpAddr> {
    v[k].as_str()?.parse().ok()
}

/// The port of the record's flow at the VIP: the original destination behind DNAT, else the
/// packet's own.
fn vip_port(e: &Value, vip: IpAddr) -> Option<u16> {
    let port = |k: &str| e[k].as_u64().and_then(|p| u16::try_from(p).ok());
    if ip(&e["orig"], "dst") == Some(vip) {
        return e["orig"]["dport"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok());
    }
    if ip(e, "dst") == Some(vip) {
        return port("dport");
    }
    if ip(e, "src") == Some(vip) {
        return port("sport");
    }
    None
}

fn wall(v: &Value) -> Option<f64> {
    let t = humantime_secs(v["time"].as_str()?)?;
    Some(t)
}

/// Seconds since the epoch of an RFC 3339 UTC time (`2026-11-26T03:16:08.123456789Z`).
fn humantime_secs(s: &str) -> Option<f64> {
    let (date, time) = s.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, min, sec) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86400.0 + h * 3600.0 + min * 60.0 + sec)
}

fn secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The checks of kube-proxy's names and endpoint changes on a lab run: every record tied to a
/// VIP carries the Service the lab programmed; every endpoint change the lab's syncs made is
/// one `endpoint` record within one read of lbtrace's; and when the run removed a failing
/// endpoint, `diagnose` states the backend, its Service and the propagation delay within 1 s
/// of the lab's own log.
pub fn checks(
    lab: &Lab,
    t0: Instant,
    log: &[(Duration, String)],
    events: &[Value],
    stream: &str,
) -> Result<Vec<Check>> {
    let mut out = vec![names_check(lab, events)];
    let started = secs(SystemTime::now()) - t0.elapsed().as_secs_f64();
    out.push(endpoint_records_check(lab, events, started - 5.0));
    if let Some(c) = propagation_check(log, stream)? {
        out.push(c);
    }
    Ok(out)
}

fn names_check(lab: &Lab, events: &[Value]) -> Check {
    let (mut total, mut wrong) = (0, Vec::new());
    for e in events {
        let Some(vip) = ip(e, "vip") else { continue };
        let kind = e["kind"].as_str().unwrap_or("");
        let port = match kind {
            "drop" | "conntrack" => vip_port(e, vip),
            "arp" | "neigh" | "vip_owner" => None,
            _ => continue,
        };
        // An ICMP error about a flow names its port in `orig`; one without is the VIP's.
        let want = expected_service(lab, vip, port);
        total += 1;
        if e["service"].as_str() != want.as_deref() {
            wrong.push(format!(
                "{kind} {vip} port {port:?}: {} (want {want:?})",
                e["service"]
            ));
        }
    }
    Check::new(
        total > 0 && wrong.is_empty(),
        format!(
            "kube-proxy names ({}): {total} records tied to a VIP, {} without the Service the lab programmed{}",
            lab.proxy_mode.name(),
            wrong.len(),
            wrong.first().map(|w| format!(", e.g. {w}")).unwrap_or_default()
        ),
    )
}

fn endpoint_records_check(lab: &Lab, events: &[Value], since: f64) -> Check {
    let made: Vec<EndpointChange> = lab
        .endpoint_log
        .lock()
        .map(|l| l.iter().filter(|c| secs(c.at) >= since).cloned().collect())
        .unwrap_or_default();
    let mut seen: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "endpoint")
        .filter(|e| e["change"] == "added" || e["change"] == "removed")
        .collect();
    let (mut problems, mut worst) = (Vec::new(), 0.0f64);
    for c in &made {
        let change = if c.added { "added" } else { "removed" };
        let ep = c.endpoint.to_string();
        // An addition is in the rules once the sync wrote its first node; a removal once it
        // wrote the last.
        let from = secs(if c.added { c.started } else { c.at });
        let lag_of = |e: &Value| wall(e).unwrap_or(0.0) - from;
        let window = |lag: f64| (-0.05..=RECORD_LAG + secs(c.at) - from).contains(&lag);
        let same = |e: &Value| {
            e["service"] == c.service.as_str()
                && e["endpoint"] == ep.as_str()
                && e["change"] == change
        };
        let matching: Vec<usize> = (0..seen.len())
            .filter(|&i| same(seen[i]) && window(lag_of(seen[i])))
            .collect();
        let [i] = matching[..] else {
            let nearest = seen
                .iter()
                .filter(|e| same(e))
                .map(|e| lag_of(e))
                .min_by(|a, b| a.abs().total_cmp(&b.abs()));
            problems.push(format!(
                "{change} {ep} of {}: {} records in time (nearest {nearest:.2?} s after the sync)",
                c.service,
                matching.len()
            ));
            continue;
        };
        worst = worst.max(lag_of(seen[i]));
        seen.remove(i);
    }
    for e in &seen {
        problems.push(format!("an endpoint record the lab did not cause: {e}"));
    }
    Check::new(
        problems.is_empty(),
        format!(
            "endpoint records ({}): {} changes made by kube-proxy syncs, each once within {RECORD_LAG} s (latest {worst:.2} s){}",
            lab.proxy_mode.name(),
            made.len(),
            if problems.is_empty() { String::new() } else { format!("; {} wrong: {}", problems.len(), problems.join("; ")) }
        ),
    )
}

/// The lab's propagation delays (from a listener's stop to the sync that removed it).
fn propagations(log: &[(Duration, String)]) -> Vec<f64> {
    let mut out = Vec::new();
    let mut stopped = None;
    for (t, what) in log {
        // The sync's line says "… after it stopped listening" too.
        if what.contains("removed from a's endpoints") {
            if let Some(s) = stopped.take() {
                out.push(t.as_secs_f64() - s);
            }
        } else if what.contains("stopped listening") {
            stopped = Some(t.as_secs_f64());
        }
    }
    out
}

fn propagation_check(log: &[(Duration, String)], stream: &str) -> Result<Option<Check>> {
    let lab_delays = propagations(log);
    if lab_delays.is_empty() {
        return Ok(None);
    }
    let file = std::env::temp_dir().join(format!("{}.ndjson", crate::unique("lbtkp")));
    std::fs::write(&file, stream)?;
    let out = crate::lbtrace::run(&["diagnose", &file.display().to_string()]);
    let _ = std::fs::remove_file(&file);
    let text = String::from_utf8_lossy(&out?.stdout).into_owned();
    // "backend 10.200.11.2:8080 of lab/a:http dropped N packets (…) while kube-proxy still sent
    // traffic to it; it was removed from the rules T s after its first drop"
    let mut stated = Vec::new();
    for line in text
        .lines()
        .filter(|l| l.contains("removed from the rules"))
    {
        let t = line
            .split("removed from the rules ")
            .nth(1)
            .and_then(|r| r.split(" s after").next())
            .and_then(|t| t.parse::<f64>().ok());
        let named =
            line.contains("backend 10.200.11.2:") || line.contains("backend [fd00:200::11:2]:");
        stated.push((t, named && line.contains("lab/a:")));
    }
    let d = lab_delays.iter().sum::<f64>() / lab_delays.len() as f64;
    let ok = stated.len() >= 2 * lab_delays.len()
        && stated
            .iter()
            .all(|(t, named)| *named && t.is_some_and(|t| (t - d).abs() <= 1.0));
    Ok(Some(Check::new(
        ok,
        format!(
            "diagnose states backend, Service and propagation delay: lab {:?} s, lbtrace {:?}",
            lab_delays
                .iter()
                .map(|d| (d * 100.0).round() / 100.0)
                .collect::<Vec<_>>(),
            stated
                .iter()
                .map(|(t, _)| t.unwrap_or(f64::NAN))
                .collect::<Vec<_>>()
        ),
    )))
}

/// How long the discovery run waits after a change to the rules: a few of lbtrace's reads.
const SETTLE: Duration = Duration::from_millis(1500);

/// `--discover-vips` against a lab's rules in `mode`: lbtrace, given no VIP, must learn every
/// LoadBalancer IP the lab programmed (those there when it starts, and those of a Service
/// added while it runs), each once, and nothing else (no ClusterIP, no address in the rules
/// of another kind). The lab announces nothing; lbtrace may learn the VIPs placed on a node
/// from its addresses too, but the late Service's VIPs are on no node: only the rules have them.
pub fn discovery(prefix: &str, mode: ProxyMode) -> Result<Check> {
    let mut services = Scenario::StaleArp.services();
    let late = services.pop().filter(|s| s.name == "b");
    ensure!(late.is_some(), "stale-arp's services end with b");
    let mut lab = Lab::up_with(prefix, services, mode)?;
    let watch = Watch::start(&[
        "--json",
        "--discover-vips",
        "--kube-proxy-interval",
        LBTRACE_INTERVAL,
    ])?;
    std::thread::sleep(SETTLE);
    lab.services.extend(late);
    lab.sync()?;
    std::thread::sleep(SETTLE);
    let finished = watch.stop()?;
    ensure!(
        finished.status.success(),
        "lbtrace failed: {}",
        finished.stderr
    );
    let programmed: Vec<IpAddr> = lab.services.iter().flat_map(|s| s.vips.clone()).collect();
    let mut found: BTreeMap<IpAddr, usize> = BTreeMap::new();
    let late: Vec<IpAddr> = lab.services.last().map_or(Vec::new(), |s| s.vips.clone());
    // Where each VIP was learned from, as lbtrace's note says.
    let mut notes: BTreeMap<IpAddr, String> = BTreeMap::new();
    for e in finished
        .events
        .iter()
        .filter(|e| e["kind"] == "vip_discovered")
    {
        if let Some(vip) = ip(e, "vip") {
            *found.entry(vip).or_default() += 1;
            notes.insert(vip, e["note"].as_str().unwrap_or("").to_owned());
        }
    }
    let missing: Vec<&IpAddr> = programmed
        .iter()
        .filter(|v| !found.contains_key(v))
        .collect();
    let extra: Vec<&IpAddr> = found.keys().filter(|v| !programmed.contains(v)).collect();
    let twice: Vec<&IpAddr> = found
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(v, _)| v)
        .collect();
    let not_from_rules: Vec<&IpAddr> = late
        .iter()
        .filter(|v| {
            notes
                .get(v)
                .is_none_or(|n| !n.contains("kube-proxy's rules"))
        })
        .collect();
    Ok(Check::new(
        missing.is_empty() && extra.is_empty() && twice.is_empty() && not_from_rules.is_empty(),
        format!(
            "--discover-vips ({}): {} LoadBalancer IPs programmed ({} added while running), {} learned; missing {missing:?}, not programmed {extra:?}, more than once {twice:?}, added ones not from the rules {not_from_rules:?}; notes {notes:?}",
            mode.name(),
            programmed.len(),
            late.len(),
            found.len(),
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn propagations_from_the_log() {
        let log = [
            (Duration::from_secs_f64(3.1), "n1p0 stopped listening (still an endpoint)".to_owned()),
            (Duration::from_secs_f64(4.6), "kube-proxy sync: n1p0 removed from a's endpoints, 1.5 s after it stopped listening".to_owned()),
        ];
        let p = propagations(&log);
        assert_eq!(p.len(), 1);
        assert!((p[0] - 1.5).abs() < 1e-9);
    }
}
