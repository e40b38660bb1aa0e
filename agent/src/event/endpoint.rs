//! Endpoint records: changes of a Service's endpoints as kube-proxy's rules show them.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use super::values::{Name, Time};

/// What changed about a Service's endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EndpointChange {
    /// `endpoint` joined the Service's endpoints (in any node's rules).
    Added,
    /// `endpoint` left them (no node's rules have it any more).
    Removed,
    /// The Service went into `state` on the node `netns`.
    Entered,
    /// The Service came out of `state` on the node `netns`.
    Left,
    /// The Service was in `state` on the node `netns` when lbtrace started (not a change).
    Present,
}

impl EndpointChange {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "added",
            Self::Removed => "removed",
            Self::Entered => "entered",
            Self::Left => "left",
            Self::Present => "present",
        }
    }
}

/// A change of a Service's endpoints, as kube-proxy's rules on the node show it: the moment the
/// data path changed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EndpointRec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<Name>,
    #[serde(default)]
    pub time: Option<Time>,
    pub service: Name,
    pub change: EndpointChange,
    /// The endpoint added or removed.
    #[serde(default)]
    pub endpoint: Option<SocketAddr>,
    /// `no-endpoints` or `no-local-endpoints` (entered, left, present).
    #[serde(default)]
    pub state: Option<crate::kernel::kubeproxy::NoEndpoints>,
    /// The namespace of the node whose rules changed (entered, left, present).
    #[serde(default)]
    pub netns: Option<u32>,
    /// The Service's LoadBalancer (or external) IPs in the rules.
    #[serde(default)]
    pub vips: Vec<IpAddr>,
}
