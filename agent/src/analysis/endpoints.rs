//! What kube-proxy's rules add to the diagnosis: when a failing backend left the rules (the
//! propagation delay of an endpoint change), and drops at a node whose rules had no local
//! endpoint for an `externalTrafficPolicy: Local` Service.

use std::{collections::BTreeMap, net::SocketAddr};

use serde::{Deserialize, Serialize};

use super::{
    diagnosis::{Cause, Evidence, Finding},
    Sample, VipState,
};
use crate::{
    event::{
        record::{EndpointChange, EndpointRec},
        values::{Name, Time},
    },
    kernel::kubeproxy::NoEndpoints,
    output::timeline::number,
};

/// Endpoint changes kept per VIP, and Service names per VIP.
pub const MAX_CHANGES: usize = 4096;
pub const MAX_SERVICES: usize = 16;

/// A backend that dropped traffic, and when kube-proxy's rules stopped sending it any.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Removal {
    pub backend: SocketAddr,
    pub service: Name,
    pub drops: usize,
    pub reasons: BTreeMap<String, u64>,
    pub first_drop: Time,
    /// `None`: still in the rules at the end.
    pub removed_at: Option<Time>,
    /// From the first drop to the removal: the propagation delay.
    pub delay_s: Option<f64>,
}

impl Removal {
    pub fn statement(&self) -> String {
        let reasons: Vec<&str> = self.reasons.keys().map(String::as_str).collect();
        let head = format!(
            "backend {} of {} dropped {} packets ({}) while kube-proxy still sent traffic to it",
            self.backend,
            self.service,
            self.drops,
            reasons.join("/")
        );
        match self.delay_s {
            Some(d) => format!(
                "{head}; it was removed from the rules {} s after its first drop",
                number(d)
            ),
            None => format!("{head}; it was still in the rules at the end"),
        }
    }
}

impl VipState {
    pub(super) fn add_endpoint(&mut self, t: f64, e: &EndpointRec) {
        if self.endpoint_changes.len() < MAX_CHANGES {
            self.endpoint_changes.push((t, Box::new(e.clone())));
        }
    }
}

/// The removals of the backends that dropped `churn`'s packets: per backend, the drops up to
/// each time the rules dropped it.
fn removals(churn: &[&Sample], st: &VipState) -> Vec<Removal> {
    let mut by_backend: BTreeMap<(SocketAddr, Name), Vec<&Sample>> = BTreeMap::new();
    for s in churn {
        if let Some((addr, svc)) = &s.endpoint {
            by_backend.entry((*addr, svc.clone())).or_default().push(s);
        }
    }
    let mut out = Vec::new();
    for ((addr, service), drops) in by_backend {
        let mut gone: Vec<f64> = st
            .endpoint_changes
            .iter()
            .filter(|(_, e)| e.change == EndpointChange::Removed && e.endpoint == Some(addr))
            .map(|(t, _)| *t)
            .collect();
        gone.sort_by(f64::total_cmp);
        let mut from = f64::NEG_INFINITY;
        for until in gone.iter().copied().map(Some).chain([None]) {
            let part: Vec<&&Sample> = drops
                .iter()
                .filter(|s| s.t > from && until.is_none_or(|u| s.t <= u))
                .collect();
            if let Some(first) = part.iter().map(|s| s.t).min_by(f64::total_cmp) {
                let mut reasons = BTreeMap::new();
                for s in &part {
                    *reasons.entry(s.reason.to_string()).or_insert(0) += 1;
                }
                out.push(Removal {
                    backend: addr,
                    service: service.clone(),
                    drops: part.len(),
                    reasons,
                    first_drop: Time::from_secs_f64(first),
                    removed_at: until.map(Time::from_secs_f64),
                    delay_s: until.map(|u| ((u - first) * 100.0).round() / 100.0),
                });
            }
            from = until.unwrap_or(f64::INFINITY);
        }
    }
    out
}

/// Nodes (netns) whose rules had, at some time, no local endpoints for the VIP's Services.
fn no_local(st: &VipState) -> BTreeMap<u32, Name> {
    let mut ever = BTreeMap::new();
    for (_, e) in &st.endpoint_changes {
        let (Some(NoEndpoints::NoLocalEndpoints), Some(netns)) = (e.state, e.netns) else {
            continue;
        };
        match e.change {
            EndpointChange::Entered | EndpointChange::Present => {
                ever.insert(netns, e.service.clone());
            }
            _ => {}
        }
    }
    ever
}

/// Adds what the rules say to the findings: removals and their statements on endpoint churn,
/// and the nodes with no local endpoints where the VIP's traffic was dropped.
pub(super) fn annotate(findings: &mut [Finding], st: &VipState) {
    if st.endpoint_changes.is_empty() {
        return;
    }
    for f in findings.iter_mut() {
        if f.cause != Cause::EndpointChurn {
            continue;
        }
        let churn: Vec<&Sample> = st
            .samples
            .iter()
            .filter(|s| s.behind_dnat && s.ct_event.is_none() && s.endpoint.is_some())
            .filter(|s| super::diagnosis::endpoint_gone(s))
            .collect();
        let r = removals(&churn, st);
        f.statements.extend(r.iter().map(Removal::statement));
        if let Evidence::Churn(e) = &mut f.evidence {
            e.removals = r;
        }
    }
    let nodes = no_local(st);
    let mut lines = Vec::new();
    for (netns, service) in &nodes {
        let drops = st
            .samples
            .iter()
            .filter(|s| !s.behind_dnat && s.netns == u64::from(*netns))
            .filter(|s| &*s.reason == "NETFILTER_DROP")
            .count();
        if drops > 0 {
            lines.push(format!(
                "{service} has externalTrafficPolicy: Local with no local endpoints on the node of netns {netns}: kube-proxy's rules there dropped {drops} of the VIP's packets"
            ));
        }
    }
    if let Some(f) = findings.first_mut() {
        f.statements.extend(lines);
    }
}
