//! The diagnosis: per VIP, each cause that the samples and ownership changes support, with its
//! evidence and what to do, most likely first. One function per cause.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

pub use super::because::Because;
pub use super::stale::{ClientWindow, StaleArpEvidence};
use super::{because, stale::stale_arp, OwnerChange, Sample, VipState};
use crate::event::values::Time;

/// What the diagnosis can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cause {
    Conntrack,
    MtuMismatch,
    StaleArp,
    SpeakerFailover,
    EndpointChurn,
    PolicyRace,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Conntrack => "conntrack",
            Self::MtuMismatch => "mtu-mismatch",
            Self::StaleArp => "stale-arp",
            Self::SpeakerFailover => "speaker-failover",
            Self::EndpointChurn => "endpoint-churn",
            Self::PolicyRace => "policy-race",
        }
    }
}

/// Counts by a key (reason, netns, backend, ...).
pub type Counts = BTreeMap<String, u64>;

/// Fields are in name order: the JSON reads the same as it always has.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConntrackEvidence {
    pub drops: usize,
    pub events: Counts,
    pub netns: Counts,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MtuEvidence {
    pub drops: usize,
    pub functions: Counts,
    pub reasons: Counts,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MoveEvidence {
    /// Why it moved ([`super::because`]); missing in diagnoses from before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub because: Option<Because>,
    pub from: Option<String>,
    pub garps: u64,
    pub time: Time,
    pub to: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FailoverEvidence {
    pub changes: Vec<MoveEvidence>,
    pub drops_near_changes: usize,
    pub flapping: bool,
    pub macs: BTreeSet<String>,
    pub ownership_changes: usize,
    pub split_brain: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChurnEvidence {
    pub backends: Counts,
    pub bursts: usize,
    pub drops: usize,
    pub reasons: Counts,
    /// From kube-proxy's rules: each failing backend and when its rules dropped it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removals: Vec<super::endpoints::Removal>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyEvidence {
    pub backends: Counts,
    pub drops: usize,
    pub netns: Counts,
    pub stopped: bool,
}

/// The evidence of a finding; its shape follows the cause.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Evidence {
    Conntrack(ConntrackEvidence),
    Mtu(MtuEvidence),
    StaleArp(StaleArpEvidence),
    Failover(FailoverEvidence),
    Churn(ChurnEvidence),
    Policy(PolicyEvidence),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    pub cause: Cause,
    pub confidence: f64,
    pub evidence: Evidence,
    pub first_seen: Time,
    pub hint: String,
    pub last_seen: Time,
    /// The nodes the evidence was seen on, when the records say (agents, merged recordings,
    /// Prometheus).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub nodes: BTreeSet<String>,
    /// What the evidence says, as sentences (from kube-proxy's rules when they were read).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub statements: Vec<String>,
}

impl Finding {
    pub(super) fn new(
        cause: Cause,
        confidence: f64,
        span: (f64, f64),
        evidence: Evidence,
        hint: &str,
    ) -> Self {
        Self {
            cause,
            confidence: (confidence * 100.0).round() / 100.0,
            evidence,
            first_seen: Time::from_secs_f64(span.0),
            hint: hint.to_owned(),
            last_seen: Time::from_secs_f64(span.1),
            nodes: BTreeSet::new(),
            statements: Vec::new(),
        }
    }
}

/// A VIP's findings, most likely first (none: nothing wrong was seen).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VipDiagnosis {
    pub findings: Vec<Finding>,
    pub vip: String,
    /// What the evidence could not show (a diagnosis from metrics).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub limits: Vec<String>,
    /// The VIP's Service ports, from kube-proxy's rules (empty without them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
}

impl VipDiagnosis {
    /// `VIP` or `VIP (ns/name)`, as the text outputs name it.
    pub fn title(&self) -> String {
        vip_title(&self.vip, &self.services)
    }
}

/// A VIP and its Services (`ns/name`, ports left out), as the text outputs name a VIP.
pub fn vip_title(vip: &str, service_ports: &[String]) -> String {
    let names: BTreeSet<&str> = service_ports
        .iter()
        .map(|s| s.rsplit_once(':').map_or(s.as_str(), |(svc, _)| svc))
        .collect();
    if names.is_empty() {
        return vip.to_owned();
    }
    let names: Vec<&str> = names.into_iter().collect();
    format!("{vip} ({})", names.join(", "))
}

pub(super) fn span(samples: &[&Sample]) -> (f64, f64) {
    let first = samples.iter().map(|s| s.t).fold(f64::INFINITY, f64::min);
    let last = samples
        .iter()
        .map(|s| s.t)
        .fold(f64::NEG_INFINITY, f64::max);
    (first, last)
}

pub(super) fn count_by(samples: &[&Sample], key: impl Fn(&Sample) -> String) -> Counts {
    let mut m = BTreeMap::new();
    for s in samples {
        *m.entry(key(s)).or_default() += 1;
    }
    m
}

/// The last time of the burst that starts at `first`: times no more than `gap` seconds apart.
pub(super) fn burst_end(samples: &[&Sample], first: f64, gap: f64) -> f64 {
    let mut ts: Vec<f64> = samples
        .iter()
        .map(|s| s.t)
        .filter(|t| *t >= first)
        .collect();
    ts.sort_by(f64::total_cmp);
    let mut end = first;
    for t in ts {
        if t - end > gap {
            break;
        }
        end = t;
    }
    end
}

/// Groups times into bursts separated by more than `gap` seconds.
fn bursts(samples: &[&Sample], gap: f64) -> usize {
    let mut ts: Vec<f64> = samples.iter().map(|s| s.t).collect();
    ts.sort_by(f64::total_cmp);
    ts.windows(2).filter(|w| w[1] - w[0] > gap).count() + usize::from(!ts.is_empty())
}

/// Reasons a backend gives when nothing listens or its process went away mid-stream.
pub(super) fn endpoint_gone(s: &Sample) -> bool {
    &*s.reason == "NO_SOCKET"
        || (&*s.reason == "NOT_SPECIFIED"
            && matches!(s.function.as_str(), "tcp_v4_rcv" | "tcp_v6_rcv"))
        || &*s.reason == "TCP_RESET"
}

fn too_big(s: &Sample) -> bool {
    &*s.reason == "PKT_TOO_BIG"
        || matches!(
            s.function.as_str(),
            "ip_fragment" | "ip6_fragment" | "ip_do_fragment"
        )
        || s.icmp == Some((3, 4))
}

pub(super) fn reasons(samples: &[&Sample]) -> Counts {
    count_by(samples, |s| s.reason.to_string())
}

pub(super) fn netns(samples: &[&Sample]) -> Counts {
    count_by(samples, |s| s.netns.to_string())
}

fn backends(samples: &[&Sample]) -> Counts {
    count_by(samples, |s| s.dst.clone())
}

pub(super) fn diagnose_vip(
    vip: &str,
    st: &VipState,
    end: f64,
    ctx: &because::Context,
) -> Vec<Finding> {
    let all: Vec<&Sample> = st.samples.iter().collect();
    let mut out: Vec<Finding> = [
        conntrack(&all),
        mtu_mismatch(&all),
        endpoint_churn(&all),
        policy_race(&all, end),
    ]
    .into_iter()
    .flatten()
    .collect();
    let stale = stale_arp(vip, st, &all);
    let stale_conf = stale.as_ref().map_or(0.0, |f| f.confidence);
    // Keep the order the findings were made in for equal confidences: stale ARP and failover
    // came after MTU and before churn.
    let at = out
        .iter()
        .position(|f| matches!(f.cause, Cause::EndpointChurn | Cause::PolicyRace))
        .unwrap_or(out.len());
    let failover = speaker_failover(vip, st, &all, stale_conf, ctx);
    out.splice(at..at, stale.into_iter().chain(failover));
    out.sort_by(|a, b| b.confidence.total_cmp(&a.confidence));
    super::endpoints::annotate(&mut out, st);
    out
}

fn conntrack(all: &[&Sample]) -> Option<Finding> {
    let ct: Vec<&Sample> = all
        .iter()
        .copied()
        .filter(|s| s.ct_event.is_some())
        .collect();
    if ct.is_empty() {
        return None;
    }
    let events = count_by(&ct, |s| {
        s.ct_event.map(|e| e.to_string()).unwrap_or_default()
    });
    let hint = if events.contains_key("table_full") {
        "the conntrack table is full: raise nf_conntrack_max (and the hash size), or shorten timeouts of idle flows"
    } else {
        "conntrack entries clash after SNAT: use externalTrafficPolicy: Local (no SNAT), or fully random SNAT port allocation (--random-fully)"
    };
    let evidence = Evidence::Conntrack(ConntrackEvidence {
        drops: ct.len(),
        events,
        netns: netns(&ct),
    });
    Some(Finding::new(
        Cause::Conntrack,
        0.95,
        span(&ct),
        evidence,
        hint,
    ))
}

fn mtu_mismatch(all: &[&Sample]) -> Option<Finding> {
    let mtu: Vec<&Sample> = all.iter().copied().filter(|s| too_big(s)).collect();
    if mtu.is_empty() {
        return None;
    }
    let evidence = Evidence::Mtu(MtuEvidence {
        drops: mtu.len(),
        functions: count_by(&mtu, |s| s.function.clone()),
        reasons: reasons(&mtu),
    });
    Some(Finding::new(
        Cause::MtuMismatch,
        0.9,
        span(&mtu),
        evidence,
        "packets larger than a hop's MTU are dropped (DF set): check the overlay/VXLAN MTU (typically 1450) against the pods' and nodes' MTU, and that ICMP fragmentation-needed is not filtered",
    ))
}

fn speaker_failover(
    vip: &str,
    st: &VipState,
    all: &[&Sample],
    stale_conf: f64,
    ctx: &because::Context,
) -> Option<Finding> {
    let moves: Vec<&OwnerChange> = st.changes.iter().filter(|c| c.old_mac.is_some()).collect();
    // A VIP held by two hosts at once is a finding even when only one of them announced.
    let (first, last) = match (moves.first(), moves.last()) {
        (Some(f), Some(l)) => (f.t, l.t),
        _ if st.split_brain => (st.split_brain_at, st.split_brain_at),
        _ => return None,
    };
    let near = all
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
    let changes: Vec<MoveEvidence> = moves
        .iter()
        .map(|c| MoveEvidence {
            because: vip
                .parse()
                .ok()
                .map(|ip| because::explain(ip, c, &st.link_signs, ctx)),
            from: c.old_mac.map(|m| m.to_string()),
            garps: c.garps,
            time: Time::from_secs_f64(c.t),
            to: c.new_mac.to_string(),
        })
        .collect();
    let becauses: Vec<&Because> = changes.iter().filter_map(|m| m.because.as_ref()).collect();
    let behind = because::behind_flapping(&becauses);
    let statements: Vec<String> = behind
        .iter()
        .map(|(s, _)| s.clone())
        .chain(changes.iter().filter_map(|m| {
            // Planned and unexplained moves are in the evidence; the sentences name failures.
            let b = m.because.as_ref().filter(|b| b.reason.is_failure())?;
            Some(format!(
                "moved at {} to {}: {}",
                m.time.clock_micros(),
                m.to,
                b.says
            ))
        }))
        .collect();
    let evidence = Evidence::Failover(FailoverEvidence {
        changes,
        drops_near_changes: near,
        flapping: st.flapping || moves.len() >= 3,
        macs: moves
            .iter()
            .flat_map(|c| {
                [
                    c.old_mac.map(|m| m.to_string()).unwrap_or_default(),
                    c.new_mac.to_string(),
                ]
            })
            .collect(),
        ownership_changes: moves.len(),
        split_brain: st.split_brain,
    });
    let hint = if let Some((_, hint)) = behind {
        hint
    } else if st.split_brain {
        "two speakers announce the VIP at once (split brain): check the speakers' memberlist/leader election and that only one node holds the VIP"
    } else if flapping {
        "the VIP's leader keeps moving: check speaker health, node readiness flapping and memberlist timeouts"
    } else {
        "the VIP moved between nodes; loss right after a move is expected to be short when the new speaker sends gratuitous ARP"
    };
    let mut f = Finding::new(Cause::SpeakerFailover, conf, (first, last), evidence, hint);
    f.statements = statements;
    Some(f)
}

fn endpoint_churn(all: &[&Sample]) -> Option<Finding> {
    let churn: Vec<&Sample> = all
        .iter()
        .copied()
        .filter(|s| s.behind_dnat && s.ct_event.is_none() && endpoint_gone(s))
        .collect();
    if churn.is_empty() {
        return None;
    }
    let n = bursts(&churn, 2.0);
    let evidence = Evidence::Churn(ChurnEvidence {
        backends: backends(&churn),
        bursts: n,
        drops: churn.len(),
        reasons: reasons(&churn),
        removals: Vec::new(),
    });
    Some(Finding::new(
        Cause::EndpointChurn,
        if n >= 2 { 0.85 } else { 0.7 },
        span(&churn),
        evidence,
        "a backend behind the VIP had no listener while it still got traffic: check readiness probes and that endpoints are removed before the process stops (preStop, terminationGracePeriod)",
    ))
}

fn policy_race(all: &[&Sample], end: f64) -> Option<Finding> {
    let policy: Vec<&Sample> = all
        .iter()
        .copied()
        .filter(|s| s.behind_dnat && !s.toward_client && s.ct_event.is_none())
        .filter(|s| &*s.reason == "NETFILTER_DROP")
        .collect();
    if policy.is_empty() {
        return None;
    }
    let (first, last) = span(&policy);
    let stopped = last < end - 2.0;
    let evidence = Evidence::Policy(PolicyEvidence {
        backends: backends(&policy),
        drops: policy.len(),
        netns: netns(&policy),
        stopped,
    });
    Some(Finding::new(
        Cause::PolicyRace,
        if stopped { 0.85 } else { 0.5 },
        (first, last),
        evidence,
        "traffic reached a new backend before its network policy allowed it: gate readiness on policy programming, or allow the service's traffic before the pod becomes an endpoint",
    ))
}
