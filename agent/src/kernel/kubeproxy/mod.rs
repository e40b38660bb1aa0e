//! kube-proxy's own view of the Services on a node, read from the rules it programmed in a
//! network namespace: nftables mode (tables `ip kube-proxy`, `ip6 kube-proxy`, through
//! `nft -j list ruleset`) and iptables mode (`KUBE-*` chains, through `iptables-save` and
//! `ip6tables-save`). The formats are kube-proxy's (`pkg/proxy/nftables/proxier.go`,
//! `pkg/proxy/iptables/proxier.go`); a rule of another shape is skipped and counted, never an
//! error.

pub mod iptables;
pub mod nft;
mod poll;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use serde::{Deserialize, Serialize};

pub use poll::{interval, spawn, Snapshot, DEFAULT_INTERVAL};

use crate::event::values::{L4Proto, Name};

/// Which of kube-proxy's modes programmed the rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Nftables,
    Iptables,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nftables => "nftables",
            Self::Iptables => "iptables",
        }
    }
}

/// A Service's address, protocol and port as clients (or pods) address it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub ip: IpAddr,
    /// IP protocol number.
    pub proto: u8,
    pub port: u16,
}

/// What kind of Service address a frontend is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FrontendKind {
    ClusterIp,
    /// A LoadBalancer ingress IP (iptables mode names it so).
    LoadBalancer,
    /// A `spec.externalIPs` address (iptables mode).
    ExternalIp,
    /// LoadBalancer or external IP: nftables mode sends both to the same `external-` chain.
    External,
    /// Only in a no-endpoints rule, which does not say.
    Unknown,
}

impl FrontendKind {
    /// Whether the address can be a LoadBalancer IP (what `--discover-vips` learns).
    pub fn maybe_load_balancer(self) -> bool {
        matches!(self, Self::LoadBalancer | Self::External)
    }
}

/// A Service with nothing to send its traffic to, as kube-proxy's rules say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NoEndpoints {
    /// No endpoint anywhere: kube-proxy rejects.
    NoEndpoints,
    /// `externalTrafficPolicy: Local` (or internal Local) and none on this node: kube-proxy
    /// drops.
    NoLocalEndpoints,
}

impl NoEndpoints {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoEndpoints => "no endpoints",
            Self::NoLocalEndpoints => "no local endpoints",
        }
    }
}

/// One backend of a Service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub proto: u8,
}

/// What kube-proxy's rules in one namespace say.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeRules {
    pub modes: BTreeSet<Mode>,
    pub frontends: BTreeMap<Frontend, (Name, FrontendKind)>,
    /// Service port (`ns/name:port`) → the endpoints kube-proxy DNATs it to.
    pub endpoints: BTreeMap<Name, BTreeSet<Endpoint>>,
    pub no_endpoints: BTreeMap<Name, NoEndpoints>,
    /// Rules (or map elements) of a shape this reader does not know.
    pub skipped: u64,
}

impl NodeRules {
    pub fn is_empty(&self) -> bool {
        self.modes.is_empty()
    }

    fn add_frontend(&mut self, f: Frontend, service: Name, kind: FrontendKind) {
        // A Service's address seen as external and as unknown (its no-endpoints rule) keeps
        // the more precise kind.
        let e = self.frontends.entry(f).or_insert((service.clone(), kind));
        if e.1 == FrontendKind::Unknown {
            *e = (service, kind);
        }
    }

    fn add_endpoint(&mut self, service: Name, ep: Endpoint) {
        self.endpoints.entry(service).or_default().insert(ep);
    }
}

/// A Service port's name as kube-proxy writes it (`ServicePortName.String()`): `ns/name:port`,
/// or `ns/name` for an unnamed port.
pub fn service_name(ns: &str, name: &str, port: &str) -> Option<Name> {
    let ok = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !ok(ns) || !ok(name) || !(port.is_empty() || ok(port)) {
        return None;
    }
    Some(if port.is_empty() {
        format!("{ns}/{name}").into()
    } else {
        format!("{ns}/{name}:{port}").into()
    })
}

/// Checks a `ns/name:port` (or `ns/name`) taken from a comment.
pub fn parse_service_name(s: &str) -> Option<Name> {
    let (ns, rest) = s.split_once('/')?;
    let (name, port) = rest.split_once(':').unwrap_or((rest, ""));
    service_name(ns, name, port)
}

fn proto_number(s: &str) -> Option<u8> {
    L4Proto::parse(s)
        .filter(|p| p.has_ports())
        .map(L4Proto::number)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_as_kube_proxy_writes_them() {
        assert_eq!(
            parse_service_name("default/web:https").as_deref(),
            Some("default/web:https")
        );
        assert_eq!(parse_service_name("ns1/svc1").as_deref(), Some("ns1/svc1"));
        assert_eq!(parse_service_name("no slash"), None);
        assert_eq!(parse_service_name("a/b c:d"), None);
        assert_eq!(service_name("a", "b", "").as_deref(), Some("a/b"));
    }
}
