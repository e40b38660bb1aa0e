//! Per-VIP timelines and the diagnosis, from the NDJSON records `watch --json`, `record` and the
//! agent's event file write. Live and offline analyses read the same records, so they agree.
//!
//! Memory is bounded: at most [`MAX_VIPS`] VIPs (more fold into `other`, counted), per VIP at
//! most [`FINE_BUCKETS`] one-second buckets (older ones roll up into minute buckets, at most
//! [`COARSE_BUCKETS`]) and [`MAX_SAMPLES`] drop samples for the diagnosis (beyond that only the
//! buckets count them). Bucket totals always equal the records they summarize.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::{json, Value};

pub const MAX_VIPS: usize = 64;
pub const FINE_BUCKETS: usize = 3600;
pub const COARSE_BUCKETS: usize = 1440;
pub const MAX_SAMPLES: usize = 20_000;
const MAX_CHANGES: usize = 256;
/// Label of the VIPs past [`MAX_VIPS`].
pub const OTHER: &str = "other";

/// Counts of one time bucket.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Bucket {
    pub drops: u64,
    pub drops_by_reason: BTreeMap<String, u64>,
    pub drops_by_netns: BTreeMap<u64, u64>,
    pub conntrack: BTreeMap<String, u64>,
    pub announcements: u64,
    pub garps: u64,
    pub owner_changes: u64,
    pub neigh_changes: u64,
}

impl Bucket {
    fn merge(&mut self, o: &Bucket) {
        self.drops += o.drops;
        for (k, v) in &o.drops_by_reason {
            *self.drops_by_reason.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.drops_by_netns {
            *self.drops_by_netns.entry(*k).or_default() += v;
        }
        for (k, v) in &o.conntrack {
            *self.conntrack.entry(k.clone()).or_default() += v;
        }
        self.announcements += o.announcements;
        self.garps += o.garps;
        self.owner_changes += o.owner_changes;
        self.neigh_changes += o.neigh_changes;
    }
}

/// A VIP's history: one-second buckets, rolled up into minutes when old.
#[derive(Clone, Debug, Default)]
pub struct Timeline {
    /// Unix second → bucket.
    pub fine: BTreeMap<u64, Bucket>,
    /// Unix minute start (seconds) → bucket.
    pub coarse: BTreeMap<u64, Bucket>,
}

impl Timeline {
    fn bucket(&mut self, sec: u64) -> &mut Bucket {
        if self.fine.len() >= FINE_BUCKETS && !self.fine.contains_key(&sec) {
            if let Some((old, b)) = self.fine.pop_first() {
                self.coarse.entry(old - old % 60).or_default().merge(&b);
                while self.coarse.len() > COARSE_BUCKETS {
                    self.coarse.pop_first();
                }
            }
        }
        self.fine.entry(sec).or_default()
    }

    /// All buckets, minutes first, as `(start second, width seconds, bucket)`.
    pub fn buckets(&self) -> impl Iterator<Item = (u64, u64, &Bucket)> {
        self.coarse
            .iter()
            .map(|(s, b)| (*s, 60, b))
            .chain(self.fine.iter().map(|(s, b)| (*s, 1, b)))
    }

    pub fn total(&self) -> Bucket {
        let mut t = Bucket::default();
        for (_, _, b) in self.buckets() {
            t.merge(b);
        }
        t
    }
}

/// One drop (or conntrack-caused drop) kept for the diagnosis.
#[derive(Clone, Debug)]
struct Sample {
    t: f64,
    netns: u64,
    reason: String,
    ct_event: Option<String>,
    function: String,
    /// The packet's own destination is not the VIP: it was translated (DNAT) to a backend.
    behind_dnat: bool,
    dst: String,
    icmp: Option<(u64, u64)>,
}

#[derive(Clone, Debug)]
struct OwnerChange {
    t: f64,
    old_mac: Option<String>,
    old_netns: Option<u64>,
    new_mac: String,
    new_netns: Option<u64>,
    garps: u64,
}

#[derive(Debug, Default)]
struct VipState {
    timeline: Timeline,
    samples: Vec<Sample>,
    samples_dropped: u64,
    changes: Vec<OwnerChange>,
    /// (time, new MAC) of client neighbour updates for the VIP.
    neigh: Vec<(f64, String)>,
    flapping: bool,
    split_brain: bool,
}

#[derive(Debug, Default)]
pub struct Analyzer {
    vips: BTreeMap<String, VipState>,
    watched: BTreeSet<String>,
    pub first: Option<f64>,
    pub last: Option<f64>,
    /// Records attributed to VIPs past the bound.
    pub folded: u64,
    pub records: u64,
}

/// Seconds since the epoch of an RFC 3339 `time` field.
fn time_of(v: &Value) -> Option<f64> {
    let t = humantime::parse_rfc3339(v["time"].as_str()?).ok()?;
    Some(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs_f64())
}

fn rfc3339(t: f64) -> String {
    // Clamped to what RFC 3339 can write: a time near the end of year 9999 rounds up past it.
    const LAST: f64 = 253_402_300_799.0;
    let d = std::time::Duration::from_secs_f64(t.clamp(0.0, LAST));
    humantime::format_rfc3339_nanos(std::time::UNIX_EPOCH + d).to_string()
}

impl Analyzer {
    /// `watched`: VIPs that get an entry even when nothing happened to them.
    pub fn new(watched: impl IntoIterator<Item = String>) -> Self {
        Self {
            watched: watched.into_iter().collect(),
            ..Self::default()
        }
    }

    pub fn watch(&mut self, vip: &str) {
        self.watched.insert(vip.to_owned());
    }

    fn state(&mut self, vip: &str) -> &mut VipState {
        let key = if self.vips.contains_key(vip) || self.vips.len() < MAX_VIPS {
            vip.to_owned()
        } else {
            self.folded += 1;
            OTHER.to_owned()
        };
        self.vips.entry(key).or_default()
    }

    /// Takes one record. Records without a VIP only move the observed time span.
    pub fn add(&mut self, r: &Value) {
        let kind = r["kind"].as_str().unwrap_or("");
        match kind {
            "header" => {
                for v in r["vips"].as_array().into_iter().flatten() {
                    if let Some(v) = v.as_str() {
                        self.watch(v);
                    }
                }
                return;
            }
            "summary" => return,
            _ => {}
        }
        self.records += 1;
        let t = time_of(r);
        if let Some(t) = t {
            self.first = Some(self.first.map_or(t, |f| f.min(t)));
            self.last = Some(self.last.map_or(t, |l| l.max(t)));
        }
        let Some(vip) = r["vip"].as_str().map(str::to_owned) else {
            return;
        };
        let t = t.unwrap_or(0.0);
        let sec = t as u64;
        let st = self.state(&vip);
        match kind {
            "drop" | "conntrack" => {
                let reason = r["reason"].as_str().unwrap_or("UNKNOWN").to_owned();
                let netns = r["netns"].as_u64().unwrap_or(0);
                let ct_event = r["event"].as_str().map(str::to_owned);
                let b = st.timeline.bucket(sec);
                b.drops += 1;
                *b.drops_by_reason.entry(reason.clone()).or_default() += 1;
                *b.drops_by_netns.entry(netns).or_default() += 1;
                if let Some(e) = &ct_event {
                    *b.conntrack.entry(e.clone()).or_default() += 1;
                }
                if st.samples.len() >= MAX_SAMPLES {
                    st.samples_dropped += 1;
                    return;
                }
                let dst = r["dst"].as_str().unwrap_or("").to_owned();
                st.samples.push(Sample {
                    t,
                    netns,
                    reason,
                    ct_event,
                    function: r["location"]
                        .as_str()
                        .unwrap_or("")
                        .split('+')
                        .next()
                        .unwrap_or("")
                        .to_owned(),
                    behind_dnat: !dst.is_empty() && dst != vip && r["src"].as_str() != Some(&vip),
                    dst,
                    icmp: r["icmp_type"]
                        .as_u64()
                        .map(|ty| (ty, r["icmp_code"].as_u64().unwrap_or(0))),
                });
            }
            "arp" => {
                let announces = r["direction"] == "tx"
                    && r["bridged"] == false
                    && (r["gratuitous"] == true
                        || r["op"] == "reply"
                        || r["op"] == "neighbor-advertisement");
                if announces {
                    let b = st.timeline.bucket(sec);
                    b.announcements += 1;
                    if r["gratuitous"] == true {
                        b.garps += 1;
                        if let Some(c) = st.changes.last_mut() {
                            if r["sender_mac"].as_str() == Some(c.new_mac.as_str()) {
                                c.garps += 1;
                            }
                        }
                    }
                }
            }
            "vip_owner" => {
                let new_mac = r["new_mac"].as_str().unwrap_or("").to_owned();
                // The announcement that made the change follows this record and counts then.
                let garps = 0;
                if r["old_mac"].is_null() {
                    // First sighting of an owner: not a change.
                    st.changes.push(OwnerChange {
                        t,
                        old_mac: None,
                        old_netns: None,
                        new_mac,
                        new_netns: r["new_netns"].as_u64(),
                        garps,
                    });
                } else {
                    st.timeline.bucket(sec).owner_changes += 1;
                    st.changes.push(OwnerChange {
                        t,
                        old_mac: r["old_mac"].as_str().map(str::to_owned),
                        old_netns: r["old_netns"].as_u64(),
                        new_mac,
                        new_netns: r["new_netns"].as_u64(),
                        garps,
                    });
                }
                if st.changes.len() > MAX_CHANGES {
                    st.changes.remove(0);
                }
            }
            "neigh" if r["old_mac"] != r["new_mac"] => {
                st.timeline.bucket(sec).neigh_changes += 1;
                st.neigh
                    .push((t, r["new_mac"].as_str().unwrap_or("").to_owned()));
            }
            "finding" => match r["finding"].as_str() {
                Some("flapping") => st.flapping = true,
                Some("split-brain") => st.split_brain = true,
                _ => {}
            },
            _ => {}
        }
    }

    pub fn timeline(&self, vip: &str) -> Option<&Timeline> {
        self.vips.get(vip).map(|s| &s.timeline)
    }

    /// Every VIP watched or seen, in order.
    pub fn vips(&self) -> Vec<String> {
        let mut all: BTreeSet<String> = self.watched.clone();
        all.extend(self.vips.keys().cloned());
        all.into_iter().collect()
    }

    /// The MAC that last announced the VIP.
    pub fn owner(&self, vip: &str) -> Option<String> {
        self.vips
            .get(vip)?
            .changes
            .last()
            .map(|c| c.new_mac.clone())
    }

    /// Ownership changes of a VIP: (time, old MAC, new MAC).
    pub fn changes(&self, vip: &str) -> Vec<(f64, Option<String>, String)> {
        self.vips
            .get(vip)
            .map(|s| {
                s.changes
                    .iter()
                    .filter(|c| c.old_mac.is_some())
                    .map(|c| (c.t, c.old_mac.clone(), c.new_mac.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// One entry per VIP, findings most likely first.
    pub fn diagnose(&self) -> Vec<Value> {
        self.vips()
            .into_iter()
            .map(|vip| {
                let findings = self
                    .vips
                    .get(&vip)
                    .map(|s| diagnose_vip(&vip, s, self.last.unwrap_or(0.0)))
                    .unwrap_or_default();
                json!({"vip": vip, "findings": findings})
            })
            .collect()
    }
}

fn finding(
    cause: &str,
    confidence: f64,
    first: f64,
    last: f64,
    evidence: Value,
    hint: &str,
) -> Value {
    json!({
        "cause": cause,
        "confidence": (confidence * 100.0).round() / 100.0,
        "first_seen": rfc3339(first),
        "last_seen": rfc3339(last),
        "evidence": evidence,
        "hint": hint,
    })
}

fn span(samples: &[&Sample]) -> (f64, f64) {
    let first = samples.iter().map(|s| s.t).fold(f64::INFINITY, f64::min);
    let last = samples
        .iter()
        .map(|s| s.t)
        .fold(f64::NEG_INFINITY, f64::max);
    (first, last)
}

fn count_by<'a>(
    samples: &[&'a Sample],
    key: impl Fn(&'a Sample) -> String,
) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for s in samples {
        *m.entry(key(s)).or_default() += 1;
    }
    m
}

/// Groups times into bursts separated by more than `gap` seconds.
fn bursts(samples: &[&Sample], gap: f64) -> usize {
    let mut ts: Vec<f64> = samples.iter().map(|s| s.t).collect();
    ts.sort_by(f64::total_cmp);
    ts.windows(2).filter(|w| w[1] - w[0] > gap).count() + usize::from(!ts.is_empty())
}

/// Reasons a backend gives when nothing listens or its process went away mid-stream.
fn endpoint_gone(s: &Sample) -> bool {
    s.reason == "NO_SOCKET"
        || (s.reason == "NOT_SPECIFIED"
            && matches!(s.function.as_str(), "tcp_v4_rcv" | "tcp_v6_rcv"))
        || s.reason == "TCP_RESET"
}

fn too_big(s: &Sample) -> bool {
    s.reason == "PKT_TOO_BIG"
        || matches!(
            s.function.as_str(),
            "ip_fragment" | "ip6_fragment" | "ip_do_fragment"
        )
        || s.icmp == Some((3, 4))
}

fn diagnose_vip(vip: &str, st: &VipState, end: f64) -> Vec<Value> {
    let mut out = Vec::new();
    let all: Vec<&Sample> = st.samples.iter().collect();
    let moves: Vec<&OwnerChange> = st.changes.iter().filter(|c| c.old_mac.is_some()).collect();

    let ct: Vec<&Sample> = all
        .iter()
        .copied()
        .filter(|s| s.ct_event.is_some())
        .collect();
    if !ct.is_empty() {
        let (first, last) = span(&ct);
        let events = count_by(&ct, |s| s.ct_event.clone().unwrap_or_default());
        let hint = if events.contains_key("table_full") {
            "the conntrack table is full: raise nf_conntrack_max (and the hash size), or shorten timeouts of idle flows"
        } else {
            "conntrack entries clash after SNAT: use externalTrafficPolicy: Local (no SNAT), or fully random SNAT port allocation (--random-fully)"
        };
        out.push(finding(
            "conntrack",
            0.95,
            first,
            last,
            json!({"events": events, "drops": ct.len(), "netns": count_by(&ct, |s| s.netns.to_string())}),
            hint,
        ));
    }

    let mtu: Vec<&Sample> = all.iter().copied().filter(|s| too_big(s)).collect();
    if !mtu.is_empty() {
        let (first, last) = span(&mtu);
        out.push(finding(
            "mtu-mismatch",
            0.9,
            first,
            last,
            json!({"drops": mtu.len(), "reasons": count_by(&mtu, |s| s.reason.clone()), "functions": count_by(&mtu, |s| s.function.clone())}),
            "packets larger than a hop's MTU are dropped (DF set): check the overlay/VXLAN MTU (typically 1450) against the pods' and nodes' MTU, and that ICMP fragmentation-needed is not filtered",
        ));
    }

    // Stale ARP: traffic for the VIP still reaches a node that announced it before and drops
    // there: after a move to another owner, or with "not my address" (the VIP left it silently).
    let owner_at = |t: f64| st.changes.iter().rev().find(|c| c.t <= t);
    let stale: Vec<&Sample> = all
        .iter()
        .copied()
        .filter(|s| s.ct_event.is_none() && !s.behind_dnat && s.dst == vip)
        .filter(|s| {
            let Some(o) = owner_at(s.t) else {
                return false;
            };
            let moved_on = st
                .changes
                .iter()
                .any(|c| c.t > o.t && c.new_mac != o.new_mac);
            let at_owner = o.new_netns == Some(s.netns);
            let at_old = moves
                .iter()
                .any(|c| c.t <= s.t && c.old_netns == Some(s.netns));
            (at_owner && (moved_on || s.reason == "IP_INADDRERRORS")) || at_old
        })
        .collect();
    let mut stale_conf = 0.0;
    if !stale.is_empty() {
        let (first, last) = span(&stale);
        // The move these drops follow, or the one that ended them.
        let change = moves
            .iter()
            .rev()
            .find(|c| c.t <= first)
            .or_else(|| moves.iter().find(|c| c.t >= first))
            .copied();
        let window = match change {
            Some(c) if c.t > first => c.t - first,
            Some(c) => last - c.t,
            None => last - first,
        };
        let garps = change.map_or(0, |c| c.garps);
        let updated = change.map_or(0, |c| {
            st.neigh
                .iter()
                .filter(|(t, mac)| *t >= c.t && *mac == c.new_mac)
                .count()
        });
        stale_conf = if garps == 0 || window > 3.0 {
            0.9
        } else {
            0.45
        };
        out.push(finding(
            "stale-arp",
            stale_conf,
            first,
            last,
            json!({
                "moved_at": change.map(|c| rfc3339(c.t)),
                "old_mac": change.and_then(|c| c.old_mac.clone()).or_else(|| owner_at(first).map(|o| o.new_mac.clone())),
                "new_mac": change.map(|c| c.new_mac.clone()),
                "old_owner_netns": count_by(&stale, |s| s.netns.to_string()),
                "drops_at_old_owner": stale.len(),
                "window_s": (window * 10.0).round() / 10.0,
                "garps_sent": garps,
                "client_updates_seen": updated,
                "reasons": count_by(&stale, |s| s.reason.clone()),
            }),
            "clients kept the old owner's MAC after the VIP moved: make the speaker send gratuitous ARP / unsolicited NA on failover, lower the clients' neighbour timers (base_reachable_time_ms, gc_stale_time), or let the old node forward (externalTrafficPolicy: Cluster)",
        ));
    }

    if !moves.is_empty() {
        let near: usize = all
            .iter()
            .filter(|s| moves.iter().any(|c| s.t >= c.t - 1.0 && s.t <= c.t + 10.0))
            .count();
        let flapping = st.flapping || st.split_brain || moves.len() >= 3;
        // Repeated moves explain the drops after each of them better than stale caches do.
        let mut conf: f64 = if flapping { 0.9 } else { 0.6 };
        if near > 0 {
            conf += 0.05;
        }
        if stale_conf >= 0.9 && !flapping {
            conf = 0.5;
        }
        let first = moves.first().map_or(0.0, |c| c.t);
        let last = moves.last().map_or(0.0, |c| c.t);
        let macs: BTreeSet<&str> = moves
            .iter()
            .flat_map(|c| [c.old_mac.as_deref().unwrap_or(""), c.new_mac.as_str()])
            .collect();
        out.push(finding(
            "speaker-failover",
            conf,
            first,
            last,
            json!({
                "ownership_changes": moves.len(),
                "changes": moves.iter().map(|c| json!({"time": rfc3339(c.t), "from": c.old_mac, "to": c.new_mac, "garps": c.garps})).collect::<Vec<_>>(),
                "macs": macs,
                "flapping": st.flapping || moves.len() >= 3,
                "split_brain": st.split_brain,
                "drops_near_changes": near,
            }),
            if st.split_brain {
                "two speakers announce the VIP at once (split brain): check the speakers' memberlist/leader election and that only one node holds the VIP"
            } else if flapping {
                "the VIP's leader keeps moving: check speaker health, node readiness flapping and memberlist timeouts"
            } else {
                "the VIP moved between nodes; loss right after a move is expected to be short when the new speaker sends gratuitous ARP"
            },
        ));
    }

    let churn: Vec<&Sample> = all
        .iter()
        .copied()
        .filter(|s| s.behind_dnat && s.ct_event.is_none() && endpoint_gone(s))
        .collect();
    if !churn.is_empty() {
        let (first, last) = span(&churn);
        let n = bursts(&churn, 2.0);
        out.push(finding(
            "endpoint-churn",
            if n >= 2 { 0.85 } else { 0.7 },
            first,
            last,
            json!({"drops": churn.len(), "bursts": n, "backends": count_by(&churn, |s| s.dst.clone()), "reasons": count_by(&churn, |s| s.reason.clone())}),
            "a backend behind the VIP had no listener while it still got traffic: check readiness probes and that endpoints are removed before the process stops (preStop, terminationGracePeriod)",
        ));
    }

    let policy: Vec<&Sample> = all
        .iter()
        .copied()
        .filter(|s| s.behind_dnat && s.ct_event.is_none() && s.reason == "NETFILTER_DROP")
        .collect();
    if !policy.is_empty() {
        let (first, last) = span(&policy);
        let stopped = last < end - 2.0;
        out.push(finding(
            "policy-race",
            if stopped { 0.85 } else { 0.5 },
            first,
            last,
            json!({"drops": policy.len(), "stopped": stopped, "backends": count_by(&policy, |s| s.dst.clone()), "netns": count_by(&policy, |s| s.netns.to_string())}),
            "traffic reached a new backend before its network policy allowed it: gate readiness on policy programming, or allow the service's traffic before the pod becomes an endpoint",
        ));
    }

    out.sort_by(|a, b| {
        b["confidence"]
            .as_f64()
            .unwrap_or(0.0)
            .total_cmp(&a["confidence"].as_f64().unwrap_or(0.0))
    });
    let _ = vip;
    out
}

/// Reads NDJSON records; lines that are not JSON objects are counted, not fatal.
pub fn read_records(text: &str) -> (Vec<Value>, usize) {
    let mut bad = 0;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(v) if v.is_object() => out.push(v),
            _ => bad += 1,
        }
    }
    (out, bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> String {
        rfc3339(1_800_000_000.0 + s as f64)
    }

    fn drop_rec(s: u64, vip: &str, netns: u64, reason: &str, dst: &str) -> Value {
        json!({"time": at(s), "kind": "drop", "reason": reason, "location": "nft_do_chain+0x1", "netns": netns, "dst": dst, "src": "10.200.0.2", "vip": vip})
    }

    #[test]
    fn buckets_total_the_records_even_when_rolled_up() {
        let mut a = Analyzer::new([]);
        let n = FINE_BUCKETS as u64 + 500;
        for s in 0..n {
            a.add(&drop_rec(s, "10.200.0.100", 1, "NO_SOCKET", "10.200.0.100"));
        }
        let tl = a.timeline("10.200.0.100").unwrap();
        assert!(tl.fine.len() <= FINE_BUCKETS);
        assert!(!tl.coarse.is_empty());
        assert_eq!(tl.total().drops, n);
        assert_eq!(tl.total().drops_by_reason["NO_SOCKET"], n);
    }

    #[test]
    fn vips_past_the_bound_fold_into_other() {
        let mut a = Analyzer::new([]);
        for i in 0..(MAX_VIPS + 3) {
            a.add(&drop_rec(0, &format!("10.200.9.{i}"), 1, "NO_SOCKET", "x"));
        }
        assert_eq!(a.folded, 3);
        assert_eq!(a.timeline(OTHER).unwrap().total().drops, 3);
    }

    #[test]
    fn stale_arp_is_named_first_with_its_window() {
        let vip = "10.200.0.100";
        let mut a = Analyzer::new([vip.to_owned(), "10.200.0.101".to_owned()]);
        a.add(&json!({"time": at(0), "kind": "vip_owner", "vip": vip, "old_mac": null, "new_mac": "aa", "new_netns": 11}));
        a.add(&json!({"time": at(10), "kind": "vip_owner", "vip": vip, "old_mac": "aa", "old_netns": 11, "new_mac": "bb", "new_netns": 12}));
        for s in 10..22 {
            a.add(&drop_rec(s, vip, 11, "NETFILTER_DROP", vip));
        }
        let d = a.diagnose();
        assert_eq!(d.len(), 2);
        let f = d[0]["findings"].as_array().unwrap();
        assert_eq!(f[0]["cause"], "stale-arp");
        assert_eq!(f[0]["evidence"]["window_s"], 11.0);
        assert_eq!(f[0]["evidence"]["garps_sent"], 0);
        assert_eq!(f[1]["cause"], "speaker-failover");
        assert!(
            d[1]["findings"].as_array().unwrap().is_empty(),
            "the control VIP has none"
        );
    }

    #[test]
    fn churn_and_policy_race_are_told_apart() {
        let vip = "10.200.0.100";
        let mut a = Analyzer::new([vip.to_owned()]);
        for s in [1, 2, 8, 9] {
            a.add(&drop_rec(s, vip, 30, "NO_SOCKET", "10.200.11.2"));
        }
        let d = a.diagnose();
        assert_eq!(d[0]["findings"][0]["cause"], "endpoint-churn");
        assert_eq!(d[0]["findings"][0]["evidence"]["bursts"], 2);
        let mut a = Analyzer::new([vip.to_owned()]);
        for s in 1..5 {
            a.add(&drop_rec(s, vip, 30, "NETFILTER_DROP", "10.200.11.3"));
        }
        a.add(&json!({"time": at(20), "kind": "drop", "reason": "NO_SOCKET", "netns": 1, "dst": "10.200.77.1"}));
        let d = a.diagnose();
        assert_eq!(d[0]["findings"][0]["cause"], "policy-race");
        assert_eq!(d[0]["findings"][0]["evidence"]["stopped"], true);
    }

    #[test]
    fn bad_lines_are_counted() {
        let (recs, bad) =
            read_records("{\"kind\":\"drop\"}\nnot json\n[1]\n\n{\"kind\":\"summary\"}\n");
        assert_eq!((recs.len(), bad), (2, 2));
    }
}
