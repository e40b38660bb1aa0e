//! The lab as a cluster: one agent per node (its namespace and its pods'), scraped by Debian's
//! real Prometheus, beside the scenario's host-wide `watch`.
//!
//! - `diagnose --prometheus` names the injected cause first for the affected VIPs, names the
//!   nodes involved, says what metrics cannot show, and finds nothing for the other VIPs;
//! - the agents' per-node event files, merged, give the findings of the host-wide recording.
//!
//! The scenario's own accounts (client = kernel = lbtrace) are tests/tests/lab.rs's; they are
//! printed here.

use std::collections::{BTreeMap, BTreeSet};

use lbtest::{
    lab::{
        cluster::Finished,
        scenarios::{self, Options, Outcome, Role, Scenario},
        topology,
    },
    lbtrace, require_root, unique,
};
use serde_json::Value;

fn run(scenario: Scenario) -> Outcome {
    require_root();
    let conntrack_max = topology::conntrack_max().unwrap();
    let prefix = unique("lbtcl");
    let outcome = scenarios::run(
        scenario,
        &Options {
            prefix: prefix.clone(),
            duration: None,
            cluster: true,
            proxy_mode: None,
        },
    );
    let left = topology::leftovers(&prefix, &conntrack_max).unwrap();
    let outcome = outcome.unwrap();
    println!("{}", outcome.render());
    assert!(left.is_empty(), "left behind: {left:?}");
    outcome
}

/// `lbtrace diagnose ARGS --json --vip …` per VIP.
fn diagnose(args: &[&str], o: &Outcome) -> BTreeMap<String, Value> {
    let vips: Vec<String> = o.vips.iter().map(|v| v.vip.to_string()).collect();
    let mut all: Vec<&str> = vec!["diagnose"];
    all.extend_from_slice(args);
    all.push("--json");
    for v in &vips {
        all.extend(["--vip", v]);
    }
    let out = lbtrace::run(&all).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{all:?}: {stderr}");
    println!(
        "lbtrace {}:\n{}{stderr}",
        all.join(" "),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|d| (d["vip"].as_str().unwrap_or("").to_owned(), d))
        .collect()
}

fn causes(d: &Value) -> Vec<&str> {
    d["findings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["cause"].as_str())
        .collect()
}

fn from_prometheus(o: &Outcome, c: &Finished, expected: &str, nodes: &[&str]) {
    let (from, to) = (format!("{:.3}", c.from), format!("{:.3}", c.to));
    let url = c.prom.url();
    let by_vip = diagnose(
        &[
            "--prometheus",
            &url,
            "--from",
            &from,
            "--to",
            &to,
            "--step",
            "1",
        ],
        o,
    );
    for v in &o.vips {
        let d = &by_vip[&v.vip.to_string()];
        let found = causes(d);
        if v.role != Role::Affected {
            assert!(
                found.is_empty(),
                "{}: {:?} found for a VIP that loses nothing: {d}",
                v.vip,
                found
            );
            continue;
        }
        assert_eq!(found.first(), Some(&expected), "{}: {d}", v.vip);
        let named: BTreeSet<&str> = d["findings"][0]["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        for n in nodes {
            assert!(named.contains(n), "{}: node {n} not named: {d}", v.vip);
        }
        assert!(
            d["limits"].as_array().is_some_and(|l| !l.is_empty()),
            "{}: the limits of metrics are not said: {d}",
            v.vip
        );
        // Buckets of one second, scrapes every second: the window within two of the client's.
        if let Some(window) = d["findings"][0]["evidence"]["window_s"].as_f64() {
            let client = v.loss_span.map_or(0.0, |(a, b)| (b - a).as_secs_f64());
            assert!(
                (window - client).abs() <= 2.0,
                "{}: stale window {window} s from Prometheus vs the client's {client:.1} s",
                v.vip
            );
        }
        let conf = d["findings"][0]["confidence"].as_f64().unwrap_or(1.0);
        assert!(conf < 0.95, "{}: confidence {conf} not lowered", v.vip);
    }
}

/// The per-node event files, merged, find what the host-wide recording finds.
fn merged_equals_host_wide(o: &Outcome, c: &Finished) {
    let host = std::env::temp_dir().join(format!("{}.ndjson", unique("lbthost")));
    std::fs::write(&host, &o.stream).unwrap();
    let whole = diagnose(&[host.to_str().unwrap()], o);
    let _ = std::fs::remove_file(&host);
    let files: Vec<&str> = c.files.iter().map(|f| f.to_str().unwrap()).collect();
    let merged = diagnose(&files, o);
    for v in &o.vips {
        let vip = v.vip.to_string();
        assert_eq!(
            causes(&merged[&vip]),
            causes(&whole[&vip]),
            "{vip}: merged {} vs host-wide {}",
            merged[&vip],
            whole[&vip]
        );
        let window = |d: &Value| d["findings"][0]["evidence"]["window_s"].as_f64();
        if let (Some(a), Some(b)) = (window(&merged[&vip]), window(&whole[&vip])) {
            assert!(
                (a - b).abs() <= 1.0,
                "{vip}: stale window {a} merged vs {b}"
            );
        }
    }
}

fn check(scenario: Scenario, expected: &str, nodes: &[&str]) {
    let o = run(scenario);
    let c = o.cluster.clone().expect("the cluster ran");
    from_prometheus(&o, &c, expected, nodes);
    merged_equals_host_wide(&o, &c);
}

#[test]
fn stale_arp_from_prometheus_and_merged_recordings() {
    check(Scenario::StaleArp, "stale-arp", &["n0", "n1"]);
}

#[test]
fn failover_garp_from_prometheus_and_merged_recordings() {
    check(Scenario::FailoverGarp, "speaker-failover", &["n0", "n1"]);
}

#[test]
fn conntrack_snat_from_prometheus_and_merged_recordings() {
    check(Scenario::ConntrackSnat, "conntrack", &["n0"]);
}
