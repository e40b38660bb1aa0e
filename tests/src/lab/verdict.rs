//! How a scenario's run is judged beyond the three accounts (lbtrace's diagnosis and its quiet
//! views of control VIPs, node-loss's flooded copies) and how its outcome is shown.

use std::{collections::BTreeMap, fmt::Write as _};

use anyhow::{ensure, Context as _, Result};
use serde_json::Value;

use super::{
    accounts::{finding_checks, Check, Role, VipOutcome},
    run::Outcome,
    scenarios::Scenario,
};

/// Runs `lbtrace diagnose` on what `watch --json` recorded, checked by [`finding_checks`].
pub(super) fn diagnosis_checks(
    scenario: Scenario,
    vips: &[VipOutcome],
    stream: &str,
    old_owner: Option<String>,
) -> Result<Vec<Check>> {
    let file = std::env::temp_dir().join(format!("{}.ndjson", crate::unique("lbtdiag")));
    std::fs::write(&file, stream)?;
    let mut args = vec![
        "diagnose".to_owned(),
        file.display().to_string(),
        "--json".to_owned(),
    ];
    for v in vips {
        args.push("--vip".to_owned());
        args.push(v.vip.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = crate::lbtrace::run(&args);
    if out.is_err() {
        let _ = std::fs::remove_file(&file);
    }
    let out = out?;
    ensure!(
        out.status.success(),
        "lbtrace diagnose failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let by_vip: BTreeMap<String, Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|d| (d["vip"].as_str().unwrap_or("").to_owned(), d))
        .collect();
    let mut checks = finding_checks(scenario.expected_cause(), vips, &by_vip);
    if let Some(mac) = old_owner {
        checks.extend(super::accounts::client_window_checks(vips, &by_vip, &mac));
    }
    let views = quiet_views(vips, &file);
    let _ = std::fs::remove_file(&file);
    checks.extend(views?);
    Ok(checks)
}

/// `lbtrace diagnose --json --vip …` of a recording, per VIP.
pub(super) fn diagnose_json(
    stream: &str,
    vips: &[std::net::IpAddr],
) -> Result<BTreeMap<String, Value>> {
    let file = std::env::temp_dir().join(format!("{}.ndjson", crate::unique("lbtdiag")));
    std::fs::write(&file, stream)?;
    let mut args = vec![
        "diagnose".to_owned(),
        file.display().to_string(),
        "--json".to_owned(),
    ];
    for v in vips {
        args.extend(["--vip".to_owned(), v.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = crate::lbtrace::run(&args);
    let _ = std::fs::remove_file(&file);
    let out = out?;
    ensure!(
        out.status.success(),
        "lbtrace diagnose failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|d| (d["vip"].as_str().unwrap_or("").to_owned(), d))
        .collect())
}

/// Every move of `vips` in the diagnosis says `reason`, and (`at`, wall clock) its evidence
/// began within 1 s of then.
pub(super) fn because_checks(
    vips: &[std::net::IpAddr],
    diagnosis: &BTreeMap<String, Value>,
    reason: &str,
    at: Option<f64>,
) -> Vec<Check> {
    vips.iter()
        .map(|vip| {
            let moves: Vec<&Value> = diagnosis
                .get(&vip.to_string())
                .and_then(|d| d["findings"].as_array())
                .into_iter()
                .flatten()
                .filter_map(|f| f["evidence"]["changes"].as_array())
                .flatten()
                .map(|c| &c["because"])
                .collect();
            let wrong: Vec<String> = moves
                .iter()
                .filter(|b| {
                    let when = b["at"]
                        .as_str()
                        .and_then(super::accounts::parse_rfc3339)
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map(|d| d.as_secs_f64());
                    b["reason"] != reason
                        || at.is_some_and(|a| when.is_none_or(|w| (w - a).abs() > 1.0))
                })
                .map(|b| b["says"].as_str().unwrap_or("(no because)").to_owned())
                .collect();
            Check::new(
                !moves.is_empty() && wrong.is_empty(),
                format!(
                    "{vip}: {} move(s), each because {reason}{} (not: {wrong:?})",
                    moves.len(),
                    if at.is_some() {
                        ", within 1 s of the injection"
                    } else {
                        ""
                    }
                ),
            )
        })
        .collect()
}

/// Every control VIP shows no drop in `lbtrace timeline` and no bar in its chart of `lbtrace
/// report`, both from the recording. (A hidden VIP may: stale-arp's B has a few ICMP packets
/// dropped by netfilter, not its service's traffic, counted as the lab's "other".)
fn quiet_views(vips: &[VipOutcome], file: &std::path::Path) -> Result<Vec<Check>> {
    let html = file.with_extension("html");
    let out = crate::lbtrace::run(&[
        "report",
        &file.display().to_string(),
        "-o",
        &html.display().to_string(),
    ])?;
    ensure!(out.status.success(), "lbtrace report failed");
    let page = std::fs::read_to_string(&html);
    let _ = std::fs::remove_file(&html);
    let page = page?;
    let mut checks = Vec::new();
    for v in vips.iter().filter(|v| v.role == Role::Control) {
        let vip = v.vip.to_string();
        let out = crate::lbtrace::run(&["timeline", "--vip", &vip, &file.display().to_string()])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let drops = text.lines().filter(|l| l.contains(" drops ")).count();
        let section = page
            .split("<section class=\"vip\"")
            .find(|s| s.contains(&format!("data-vip=\"{vip}\"")))
            .unwrap_or("");
        let bars = section.matches("class=\"bar\"").count();
        checks.push(Check::new(
            out.status.success() && drops == 0 && bars == 0 && !section.is_empty(),
            format!(
                "{vip} ({}): timeline lines with drops {drops}, report bars {bars}: both 0",
                v.role.name()
            ),
        ));
    }
    Ok(checks)
}

/// node-loss: every frame lost to n0 was flooded to each other host on the LAN but its
/// sender, and dropped there as another host's (OTHERHOST): lbtrace records each copy as local
/// noise, never as loss. This is the measurement behind that row of classes.tsv.
pub(super) fn flood_checks(vips: &[VipOutcome], events: &[Value]) -> Vec<Check> {
    let bystanders = (super::topology::CLIENTS + super::topology::NODES - 2) as u64;
    vips.iter()
        .filter(|v| v.role == Role::Unseen)
        .map(|v| {
            let vip = v.vip.to_string();
            let copies = |class: &str| {
                events
                    .iter()
                    .filter(|e| e["kind"] == "drop" && e["vip"] == vip.as_str())
                    .filter(|e| e["reason"] == "OTHERHOST" && e["class"] == class)
                    .count() as u64
            };
            let (noise, loss) = (copies("local-noise"), copies("loss"));
            Check::new(
                noise == v.kernel * bystanders && loss == 0,
                format!(
                    "{vip}: OTHERHOST copies {noise} local noise ({loss} loss) = kernel {} × {bystanders} bystanders",
                    v.kernel
                ),
            )
        })
        .collect()
}

/// The MAC of a host's LAN interface.
pub(super) fn mac_of(ns: &crate::netns::Netns) -> Result<String> {
    let out = ns.ip(&["-j", "link", "show", super::topology::UPLINK])?;
    let links: Value = serde_json::from_slice(&out.stdout)?;
    links[0]["address"]
        .as_str()
        .map(str::to_owned)
        .context("no MAC in ip -j link")
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    /// What happened when, then per second the client's ok/failed and lbtrace's drops per VIP,
    /// then [`Outcome::summary`].
    pub fn render(&self) -> String {
        let mut o = String::new();
        let s = self.scenario;
        let _ = writeln!(o, "scenario {}: {}", s.name(), s.about());
        for (t, what) in &self.log {
            let _ = writeln!(o, "  {:>5.1}s  {what}", t.as_secs_f64());
        }
        let _ = write!(o, "\n  {:>4} ", "s");
        for v in &self.vips {
            let _ = write!(o, "│ {:<24}", format!("{} {}", v.vip, v.role.name()));
        }
        let _ = write!(o, "\n  {:>4} ", "");
        for _ in &self.vips {
            let _ = write!(
                o,
                "│ {:>5} {:>5} {:>5} {:>6} ",
                "ok", "fail", "retx", "drops"
            );
        }
        o.push('\n');
        for i in 0..self.duration.as_secs() as usize {
            let _ = write!(o, "  {i:>4} ");
            for v in &self.vips {
                let c = v.client_per_second.get(i).copied().unwrap_or_default();
                let d = v.lbtrace_per_second.get(i).copied().unwrap_or(0);
                let _ = write!(
                    o,
                    "│ {:>5} {:>5} {:>5} {:>6} ",
                    c.ok, c.failed, c.retrans, d
                );
            }
            o.push('\n');
        }
        o.push('\n');
        o + &self.summary()
    }

    /// Per VIP: the client's totals, the kernel counter and lbtrace's drops by reason; then the
    /// checks.
    pub fn summary(&self) -> String {
        let mut o = String::new();
        let s = self.scenario;
        let _ = writeln!(
            o,
            "  {:<20} {:<9} {:>8} {:>6} {:>6} {:>7} {:>5} │ {:>6} │ {:>7} {:>5} {:>5}  by reason",
            "VIP",
            "role",
            "attempts",
            "ok",
            "failed",
            "retrans",
            "lost",
            "kernel",
            "lbtrace",
            "noise",
            "other"
        );
        for v in &self.vips {
            let reasons: Vec<String> = v
                .lbtrace_by_reason
                .iter()
                .map(|(r, n)| format!("{r} {n}"))
                .collect();
            let c = v.client;
            let _ = writeln!(
                o,
                "  {:<20} {:<9} {:>8} {:>6} {:>6} {:>7} {:>5} │ {:>6} │ {:>7} {:>5} {:>5}  {}",
                v.vip.to_string(),
                v.role.name(),
                c.attempts,
                c.ok,
                c.failed,
                c.retrans,
                c.lost(),
                v.kernel,
                v.lbtrace,
                v.lbtrace_noise,
                v.lbtrace_other.values().sum::<u64>(),
                reasons.join(", ")
            );
        }
        let _ = writeln!(o, "  kernel: {}", s.kernel_counter());
        let _ = writeln!(
            o,
            "  noise: normal discards of the VIP's traffic, not loss: {}",
            super::accounts::NOISE
                .map(|(r, f)| format!("{r} at {f}"))
                .join(", ")
        );
        let _ = writeln!(
            o,
            "  other: any other drop record of the VIP (ICMP, neighbour discovery): none allowed on a control VIP"
        );
        for v in self.vips.iter().filter(|v| !v.lbtrace_other.is_empty()) {
            let _ = writeln!(o, "    {}: {:?}", v.vip, v.lbtrace_other);
        }
        let _ = writeln!(o, "  lbtrace needs: {}", s.needs());
        for c in &self.checks {
            let _ = writeln!(o, "  {} {}", if c.ok { "ok  " } else { "FAIL" }, c.what);
        }
        o
    }
}
