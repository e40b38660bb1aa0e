//! The diagnosis from the agents' Prometheus series instead of their records: the series are
//! turned into the records they count, one per-scrape bucket at a time, and go through the
//! same [`super::Analyzer`].
//!
//! What metrics cannot carry is said ([`limits`]) and costs confidence ([`lowered`]): no
//! 5-tuples, no backend addresses, no drop locations, no per-client windows (clients'
//! neighbour updates), and times only to a bucket.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use super::{diagnosis::Finding, VipDiagnosis};
use crate::event::{
    record::{ArpRec, DropPath, DropRec, Flow, OwnerSource, VipOwnerRec},
    values::{ArpOp, ConntrackEvent, Direction, L4Proto, Mac, Name, Time},
    Record,
};

/// The series names the diagnosis reads.
pub const DROPS: &str = "lbtrace_vip_drops_total";
pub const CONNTRACK: &str = "lbtrace_conntrack_events_total";
pub const OWNER_SINCE: &str = "lbtrace_vip_owner_since_timestamp_seconds";
pub const OWNER_GARPS: &str = "lbtrace_vip_owner_garps";

/// Confidence is multiplied by this: the evidence is coarser than a recording's.
pub const CONFIDENCE_FACTOR: f64 = 0.85;

/// One series of a range query: its labels and `(unix seconds, value)` points.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Series {
    pub labels: BTreeMap<String, String>,
    pub points: Vec<(f64, f64)>,
}

impl Series {
    fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// What the range queries returned, per series name.
#[derive(Clone, Debug, Default)]
pub struct MetricsInput {
    pub start: f64,
    pub end: f64,
    pub step: f64,
    pub drops: Vec<Series>,
    pub conntrack: Vec<Series>,
    pub owner_since: Vec<Series>,
    pub owner_garps: Vec<Series>,
}

/// What a diagnosis from metrics cannot see.
pub fn limits(step: f64) -> Vec<String> {
    vec![
        format!("from Prometheus series in {step} s buckets: times are known to a bucket (and a scrape interval), confidence ×{CONFIDENCE_FACTOR}"),
        "metrics carry no 5-tuples, backend addresses, drop locations or clients' neighbour updates: per-client stale windows, flows and backends need `lbtrace record` on the nodes involved".to_owned(),
        "drops by path count the agents' records: above the sample limit (per key, CPU and second) they undercount; lbtrace_drops_total stays exact".to_owned(),
    ]
}

/// `d` with each finding's confidence lowered and the limits said.
pub fn lowered(mut d: VipDiagnosis, step: f64) -> VipDiagnosis {
    for f in &mut d.findings {
        lower(f);
    }
    d.limits = limits(step);
    d
}

fn lower(f: &mut Finding) {
    f.confidence = (f.confidence * CONFIDENCE_FACTOR * 100.0).round() / 100.0;
}

/// Counter increases per bucket: `(bucket end, increase)`. A series that appears after the
/// first step counts from zero; a value that falls is a restart, counted from zero again.
fn increases(s: &Series, start: f64, step: f64) -> Vec<(f64, u64)> {
    let mut out = Vec::new();
    let mut prev: Option<f64> = None;
    for &(t, v) in &s.points {
        let base = match prev {
            Some(p) if v >= p => p,
            Some(_) => 0.0,
            // Present at the start: what it held then happened before.
            None if t <= start + step / 2.0 => v,
            None => 0.0,
        };
        let n = (v - base).round();
        if n >= 1.0 {
            out.push((t, n as u64));
        }
        prev = Some(v);
    }
    out
}

/// A stand-in address for what metrics do not say (a backend, a client), of `vip`'s family.
fn unknown_like(vip: IpAddr) -> IpAddr {
    match vip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

/// Nodes get stand-in namespace numbers (1, 2, …, in name order): the diagnosis tells nodes
/// apart by namespace.
struct Nodes(BTreeMap<String, u32>);

impl Nodes {
    fn new(input: &MetricsInput) -> Self {
        let names: BTreeSet<String> = [&input.drops, &input.conntrack, &input.owner_since]
            .into_iter()
            .flatten()
            .map(|s| s.label("node").to_owned())
            .collect();
        Self(names.into_iter().zip(1..).collect())
    }

    fn netns(&self, node: &str) -> u32 {
        self.0.get(node).copied().unwrap_or(0)
    }
}

/// The records the series count, in time order.
pub fn records(input: &MetricsInput, vips: &[String]) -> Vec<Record> {
    let nodes = Nodes::new(input);
    let keep = |s: &Series| {
        let v = s.label("vip");
        v.parse::<IpAddr>().is_ok() && (vips.is_empty() || vips.iter().any(|w| w == v))
    };
    let mut out = Vec::new();
    // Conntrack-caused drops are also in the drop series (as NETFILTER_DROP): taken out there,
    // per VIP and node, earliest first. The two come from different counters (the kernel's
    // totals, the records), so they may land a scrape apart.
    let mut ct_budget: BTreeMap<(String, String), u64> = BTreeMap::new();
    for s in input.conntrack.iter().filter(|s| keep(s)) {
        let event = s.label("event").parse::<ConntrackEvent>().ok();
        for (t, n) in increases(s, input.start, input.step) {
            let key = (s.label("vip").to_owned(), s.label("node").to_owned());
            *ct_budget.entry(key).or_default() += n;
            spread(&mut out, t, n, input.step, |time| {
                let mut d = drop_rec(s, time, DropPath::Vip, &nodes);
                d.reason = "NETFILTER_DROP".into();
                d.event = event;
                Record::Conntrack(d)
            });
        }
    }
    let mut drops: Vec<&Series> = input.drops.iter().filter(|s| keep(s)).collect();
    // Path `vip` first: conntrack's drops are taken out of it before `backend`.
    drops.sort_by_key(|s| s.label("path") != "vip");
    for s in drops {
        let path = match s.label("path") {
            "backend" => DropPath::Backend,
            "client" => DropPath::Client,
            _ => DropPath::Vip,
        };
        for (t, mut n) in increases(s, input.start, input.step) {
            if s.label("reason") == "NETFILTER_DROP" {
                let key = (s.label("vip").to_owned(), s.label("node").to_owned());
                if let Some(b) = ct_budget.get_mut(&key) {
                    let taken = (*b).min(n);
                    *b -= taken;
                    n -= taken;
                }
            }
            spread(&mut out, t, n, input.step, |time| {
                Record::Drop(drop_rec(s, time, path, &nodes))
            });
        }
    }
    owners(input, &nodes, &keep, &mut out);
    out.sort_by(|a, b| {
        let t = |r: &Record| r.time().map_or(0.0, Time::as_secs_f64);
        t(a).total_cmp(&t(b))
    });
    out
}

/// `n` records spread evenly over the bucket that ends at `end`.
fn spread(out: &mut Vec<Record>, end: f64, n: u64, step: f64, make: impl Fn(Time) -> Record) {
    for k in 0..n {
        let t = end - step + step * (k + 1) as f64 / (n + 1) as f64;
        out.push(make(Time::from_secs_f64(t)));
    }
}

fn drop_rec(s: &Series, time: Time, path: DropPath, nodes: &Nodes) -> DropRec {
    let vip: Option<IpAddr> = s.label("vip").parse().ok();
    let unknown = vip.map(unknown_like);
    let (dst, orig) = match path {
        DropPath::Vip => (vip, None),
        DropPath::Backend => (unknown, None),
        DropPath::Client => (
            unknown,
            vip.zip(unknown).map(|(vip, u)| Flow {
                src: u,
                sport: 0,
                dst: vip,
                dport: 0,
                proto: L4Proto::Other(0),
            }),
        ),
    };
    DropRec {
        node: Some(s.label("node").into()),
        time: Some(time),
        reason: s.label("reason").into(),
        netns: nodes.netns(s.label("node")),
        dst,
        orig,
        vip,
        ..DropRec::default()
    }
}

/// One takeover: when a node's MAC began announcing a VIP, and the GARPs it sent then.
struct Takeover {
    t: f64,
    node: String,
    mac: Mac,
    garps: u64,
}

/// Ownership changes from every node's takeover times, with their GARPs as announcements.
fn owners(
    input: &MetricsInput,
    nodes: &Nodes,
    keep: &dyn Fn(&Series) -> bool,
    out: &mut Vec<Record>,
) {
    let mut by_vip: BTreeMap<IpAddr, Vec<Takeover>> = BTreeMap::new();
    for s in input.owner_since.iter().filter(|s| keep(s)) {
        let (Ok(vip), Ok(mac)) = (
            s.label("vip").parse::<IpAddr>(),
            s.label("mac").parse::<Mac>(),
        ) else {
            continue;
        };
        let garps = input.owner_garps.iter().find(|g| {
            ["vip", "mac", "node"]
                .iter()
                .all(|l| g.label(l) == s.label(l))
        });
        let mut seen: BTreeSet<u64> = BTreeSet::new();
        for &(_, since) in &s.points {
            if !seen.insert(since.to_bits()) {
                continue;
            }
            // The GARPs counted while this takeover was the node's latest.
            let next = s.points.iter().map(|p| p.1).find(|v| *v > since);
            let g = garps.map_or(0.0, |g| {
                g.points
                    .iter()
                    .filter(|(t, _)| *t >= since && next.is_none_or(|n| *t < n))
                    .map(|p| p.1)
                    .fold(0.0, f64::max)
            });
            by_vip.entry(vip).or_default().push(Takeover {
                t: since,
                node: s.label("node").to_owned(),
                mac,
                garps: g as u64,
            });
        }
    }
    for (vip, mut takeovers) in by_vip {
        takeovers.sort_by(|a, b| a.t.total_cmp(&b.t));
        // Only the owner at the start matters of what came before it.
        let first = takeovers
            .iter()
            .rposition(|k| k.t <= input.start)
            .unwrap_or(0);
        let mut prev: Option<&Takeover> = None;
        for k in &takeovers[first..] {
            if prev.is_some_and(|p| p.mac == k.mac) {
                continue;
            }
            let t = k.t.max(input.start);
            out.push(owner_rec(vip, t, prev, k, nodes));
            for i in 0..k.garps {
                out.push(garp(vip, t + 0.001 * (i + 1) as f64, k, nodes));
            }
            prev = Some(k);
        }
    }
}

fn owner_rec(vip: IpAddr, t: f64, prev: Option<&Takeover>, k: &Takeover, nodes: &Nodes) -> Record {
    Record::VipOwner(Box::new(VipOwnerRec {
        node: Some(k.node.as_str().into()),
        time: Some(Time::from_secs_f64(t)),
        vip,
        old_mac: prev.map(|p| p.mac),
        old_netns: prev.map(|p| nodes.netns(&p.node)),
        new_mac: k.mac,
        new_netns: Some(nodes.netns(&k.node)),
        ifname: None,
        source: Some(OwnerSource::Announced),
        service: None,
    }))
}

fn garp(vip: IpAddr, t: f64, k: &Takeover, nodes: &Nodes) -> Record {
    Record::Arp(ArpRec {
        node: Some(Name::from(k.node.as_str())),
        time: Some(Time::from_secs_f64(t)),
        op: ArpOp::Request,
        gratuitous: true,
        direction: Direction::Tx,
        sender_ip: Some(vip),
        sender_mac: k.mac,
        target_ip: Some(vip),
        netns: nodes.netns(&k.node),
        vip: Some(vip),
        ..ArpRec::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::{diagnosis::Cause, Analyzer};

    fn series(labels: &[(&str, &str)], points: &[(f64, f64)]) -> Series {
        Series {
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            points: points.to_vec(),
        }
    }

    const T0: f64 = 1_800_000_000.0;
    const A: &str = "10.200.0.100";

    /// n0 held A from T0; drops at n0 from +5 s to +15 s; n1 took A over at +15 s.
    fn stale(garps: f64) -> MetricsInput {
        let steps = |f: &dyn Fn(f64) -> Option<f64>| -> Vec<(f64, f64)> {
            (0..30)
                .map(|i| T0 + f64::from(i))
                .filter_map(|t| Some((t, f(t - T0)?)))
                .collect()
        };
        let drops = steps(&|s| Some(((s - 5.0).clamp(0.0, 10.0) * 3.0).round()));
        let n0 = [("vip", A), ("mac", "02:00:00:00:00:0a"), ("node", "n0")];
        let n1 = [("vip", A), ("mac", "02:00:00:00:00:0b"), ("node", "n1")];
        MetricsInput {
            start: T0,
            end: T0 + 29.0,
            step: 1.0,
            drops: vec![series(
                &[
                    ("vip", A),
                    ("reason", "NETFILTER_DROP"),
                    ("path", "vip"),
                    ("node", "n0"),
                ],
                &drops,
            )],
            conntrack: Vec::new(),
            owner_since: vec![
                series(&n0, &steps(&|_| Some(T0 - 100.0))),
                series(&n1, &steps(&|s| (s >= 15.0).then_some(T0 + 15.0))),
            ],
            owner_garps: vec![series(&n1, &steps(&|s| (s >= 15.0).then_some(garps)))],
        }
    }

    fn diagnose(input: &MetricsInput) -> Vec<Finding> {
        let mut a = Analyzer::new([A.to_owned()]);
        for r in records(input, &[]) {
            a.add(&r);
        }
        let d = a.diagnose();
        lowered(d.into_iter().next().unwrap(), input.step).findings
    }

    #[test]
    fn a_move_without_garp_after_drops_at_the_old_owner_is_stale_arp_on_both_nodes() {
        let input = stale(0.0);
        let drops = records(&input, &[])
            .iter()
            .filter(|r| matches!(r, Record::Drop(_)))
            .count();
        assert_eq!(drops, 30, "every counted drop, none twice");
        let f = diagnose(&input);
        assert_eq!(f[0].cause, Cause::StaleArp, "{f:?}");
        assert_eq!(f[0].confidence, 0.77);
        let nodes: Vec<&str> = f[0].nodes.iter().map(String::as_str).collect();
        assert_eq!(nodes, ["n0", "n1"]);
        // With GARPs right at the move and a short window, the failover leads.
        let mut quick = stale(3.0);
        quick.drops[0].points = (0..30)
            .map(|i| (T0 + f64::from(i), if i >= 15 { 4.0 } else { 0.0 }))
            .collect();
        let f = diagnose(&quick);
        assert_eq!(f[0].cause, Cause::SpeakerFailover, "{f:?}");
    }

    #[test]
    fn conntrack_drops_a_scrape_apart_from_their_records_are_not_counted_twice() {
        let base = [("vip", A), ("node", "n0")];
        let mut drop_labels = base.to_vec();
        drop_labels.extend([("reason", "NETFILTER_DROP"), ("path", "backend")]);
        let mut ct_labels = base.to_vec();
        ct_labels.push(("event", "insert_failed"));
        let input = MetricsInput {
            start: T0,
            end: T0 + 5.0,
            step: 1.0,
            drops: vec![series(
                &drop_labels,
                &[(T0, 0.0), (T0 + 1.0, 4.0), (T0 + 2.0, 4.0)],
            )],
            conntrack: vec![series(
                &ct_labels,
                &[(T0, 0.0), (T0 + 1.0, 0.0), (T0 + 2.0, 4.0)],
            )],
            ..MetricsInput::default()
        };
        let f = diagnose(&input);
        let causes: Vec<Cause> = f.iter().map(|f| f.cause).collect();
        assert_eq!(causes, [Cause::Conntrack], "{f:?}");
    }

    #[test]
    fn counters_that_appear_or_restart_count_from_zero() {
        let s = series(&[], &[(10.0, 4.0), (11.0, 6.0), (12.0, 1.0), (13.0, 1.0)]);
        assert_eq!(increases(&s, 10.0, 1.0), [(11.0, 2), (12.0, 1)]);
        assert_eq!(increases(&s, 5.0, 1.0), [(10.0, 4), (11.0, 2), (12.0, 1)]);
    }
}
