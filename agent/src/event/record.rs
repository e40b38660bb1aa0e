//! [`Record`]: the one definition of lbtrace's JSON contract. `watch --json`, `record`, the
//! agent's event file and every reader of a recording go through these types; nothing else
//! writes or parses that JSON.
//!
//! Readers are lenient where old or hand-made recordings may differ: missing fields take their
//! defaults and unknown kinds read as [`Record::Unknown`]. A line whose fields have the wrong
//! type does not read at all and is counted by the reader.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use super::class::{classify_packet, Class};
pub use super::endpoint::{EndpointChange, EndpointRec};
pub use super::header::{Header, ProbeState, ProbeStatus, Status};
pub use super::speaker::{OomFigures, SpeakerEvent, SpeakerLinkRec, SpeakerRec};
use super::values::{
    ArpOp, ConntrackEvent, Direction, Family, L4Proto, Mac, Name, NudState, TcpFlags, Time,
};

/// The recording format this lbtrace writes and reads.
pub const FORMAT: &str = "lbtrace-ndjson";
pub const FORMAT_VERSION: u64 = 1;

/// Reads NDJSON records; lines that are not records (not JSON, or fields of the wrong type)
/// are counted, not fatal. Blank lines are neither.
pub fn read_ndjson(text: &str) -> (Vec<Record>, usize) {
    let mut bad = 0;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Record>(line) {
            Ok(r) => out.push(r),
            Err(_) => bad += 1,
        }
    }
    (out, bad)
}

/// One line of lbtrace's NDJSON. Events are not boxed: one is built per ring record, and a box
/// would allocate for each.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// First line of a recording.
    Header(Box<Header>),
    /// Which probes attached (second line of a recording).
    Status(Status),
    /// A packet the kernel freed with a drop reason.
    Drop(DropRec),
    /// A drop that conntrack caused (same fields; `event` says which).
    Conntrack(DropRec),
    Arp(ArpRec),
    Neigh(NeighRec),
    VipOwner(Box<VipOwnerRec>),
    VipDiscovered(VipDiscoveredRec),
    /// A change of a Service's endpoints in kube-proxy's rules.
    Endpoint(Box<EndpointRec>),
    Finding(FindingRec),
    /// A start, exit, OOM kill or SIGKILL/SIGTERM of a process that announces VIPs.
    Speaker(SpeakerRec),
    /// A dropped memberlist (leader-election) packet between speakers.
    SpeakerLink(SpeakerLinkRec),
    Summary(Box<crate::output::summary::Summary>),
    /// The kernel's exact counts while drops are sampled (every second, and at the end).
    Totals(Box<super::totals::TotalsRec>),
    /// A kind from another version of lbtrace: read, and passed over.
    #[serde(other)]
    Unknown,
}

impl Record {
    /// The VIP the record is attributed to.
    pub fn vip(&self) -> Option<IpAddr> {
        match self {
            Self::Drop(d) | Self::Conntrack(d) => d.vip,
            Self::Arp(a) => a.vip,
            Self::Neigh(n) => n.vip,
            Self::VipOwner(o) => Some(o.vip),
            Self::VipDiscovered(d) => Some(d.vip),
            Self::Endpoint(e) => e.vips.first().copied(),
            Self::Finding(f) => Some(f.vip),
            Self::Speaker(s) => s.vips.first().copied(),
            Self::SpeakerLink(_) => None,
            Self::Header(_)
            | Self::Status(_)
            | Self::Summary(_)
            | Self::Totals(_)
            | Self::Unknown => None,
        }
    }

    /// The Service port (or Service) kube-proxy's rules give the record.
    pub fn service(&self) -> Option<&Name> {
        match self {
            Self::Drop(d) | Self::Conntrack(d) => d.service.as_ref(),
            Self::Arp(a) => a.service.as_ref(),
            Self::Neigh(n) => n.service.as_ref(),
            Self::VipOwner(o) => o.service.as_ref(),
            Self::Endpoint(e) => Some(&e.service),
            _ => None,
        }
    }

    pub fn time(&self) -> Option<Time> {
        match self {
            Self::Drop(d) | Self::Conntrack(d) => d.time,
            Self::Arp(a) => a.time,
            Self::Neigh(n) => n.time,
            Self::VipOwner(o) => o.time,
            Self::Endpoint(e) => e.time,
            Self::Finding(f) => f.time,
            Self::Speaker(s) => s.time,
            Self::SpeakerLink(l) => l.time,
            Self::Totals(t) => t.time,
            _ => None,
        }
    }

    /// Events (not the header, status or summary lines around them).
    pub fn is_event(&self) -> bool {
        !matches!(
            self,
            Self::Header(_) | Self::Status(_) | Self::Summary(_) | Self::Totals(_) | Self::Unknown
        )
    }

    /// Labels the record with the node it was seen on.
    pub fn set_node(&mut self, node: &Name) {
        let slot = match self {
            Self::Drop(d) | Self::Conntrack(d) => &mut d.node,
            Self::Arp(a) => &mut a.node,
            Self::Neigh(n) => &mut n.node,
            Self::VipOwner(o) => &mut o.node,
            Self::VipDiscovered(d) => &mut d.node,
            Self::Endpoint(e) => &mut e.node,
            Self::Finding(f) => &mut f.node,
            Self::Speaker(s) => &mut s.node,
            Self::SpeakerLink(l) => &mut l.node,
            Self::Totals(t) => &mut t.node,
            _ => return,
        };
        *slot = Some(node.clone());
    }
}

/// One direction of a conntrack entry (or a pre-NAT flow).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    pub proto: L4Proto,
}

/// A dropped packet, where and why, and the VIP it belongs to.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DropRec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<Name>,
    pub time: Option<Time>,
    /// Set when conntrack caused the drop (then the kind is `conntrack`).
    pub event: Option<ConntrackEvent>,
    pub reason: Name,
    pub reason_code: u32,
    /// `function+0xoff`, or the address when symbols are hidden.
    pub location: Name,
    pub cpu: u32,
    pub netns: u32,
    pub ifindex: u32,
    pub ifname: Option<Name>,
    pub family: Option<Family>,
    pub proto: Option<L4Proto>,
    pub src: Option<IpAddr>,
    pub sport: Option<u16>,
    pub dst: Option<IpAddr>,
    pub dport: Option<u16>,
    pub len: u32,
    /// Ethertype from `skb->protocol`: only the terminal line shows it (for non-IP drops).
    #[serde(skip)]
    pub l3_proto: u16,
    pub tcp_flags: Option<TcpFlags>,
    pub icmp_type: Option<u8>,
    pub icmp_code: Option<u8>,
    /// The conntrack entry's original direction, or the pre-DNAT flow from the NAT map.
    pub orig: Option<Flow>,
    pub reply: Option<Flow>,
    /// With `orig` from the NAT map: the namespace where the DNAT happened.
    pub nat_netns: Option<u32>,
    pub vip: Option<IpAddr>,
    /// The frame's Ethernet addresses, when the skb had a MAC header: `dst_mac` is the MAC the
    /// sender used for `dst` (for a VIP, the sender's view of who holds it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_mac: Option<Mac>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_mac: Option<Mac>,
    /// Loss, benign or local noise ([`super::class`]); absent in recordings made before it
    /// existed, which [`DropRec::class`] then classifies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<Class>,
    /// One sample of many (the agent's aggregation mode): exact counts are in the kernel's
    /// counters and the summary, not in the number of records.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sampled: bool,
    /// The Service port (`ns/name:port`) kube-proxy's rules give the flow's address and port;
    /// `ns/name` when only the VIP is known and all its ports are one Service's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<Name>,
    /// The packet's destination is an endpoint in kube-proxy's rules: the drop is at a backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<EndpointRef>,
}

/// A Service's backend, as kube-proxy's rules name it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRef {
    pub addr: SocketAddr,
    pub service: Name,
}

impl DropRec {
    /// What this drop stands for: the recorded class, else the one rule's answer.
    pub fn class(&self) -> Class {
        match (self.class, self.event) {
            (Some(c), _) => c,
            // A drop conntrack caused is always loss.
            (None, Some(_)) => Class::Loss,
            (None, None) => classify_packet(
                &self.reason,
                self.function(),
                self.dst.is_some_and(|d| d.is_multicast()),
            ),
        }
    }

    pub fn is_loss(&self) -> bool {
        self.class().is_loss()
    }

    /// With `class` set from the rule (a live record carries it into recordings).
    pub fn classified(mut self) -> Self {
        self.class = Some(self.class());
        self
    }

    /// The function part of `location`.
    pub fn function(&self) -> &str {
        self.location.split('+').next().unwrap_or("")
    }

    /// The packet's own destination is not the VIP: it was translated (DNAT) to a backend. Its
    /// source may be the VIP itself when the node also masquerades (externalTrafficPolicy:
    /// Cluster).
    pub fn behind_dnat(&self, vip: IpAddr) -> bool {
        let to_backend = self
            .orig
            .as_ref()
            .is_some_and(|o| o.dst == vip && self.dst != Some(o.src));
        self.dst.is_some_and(|dst| dst != vip) && (self.src != Some(vip) || to_backend)
    }

    /// The packet travels back to the client that opened the flow (a reply, or an ICMP error
    /// about the flow): no backend is refusing anything.
    pub fn toward_client(&self) -> bool {
        self.orig.as_ref().is_some_and(|o| self.dst == Some(o.src))
    }

    /// Where on the VIP's path the packet was dropped.
    pub fn path(&self, vip: IpAddr) -> DropPath {
        if self.toward_client() {
            DropPath::Client
        } else if self.behind_dnat(vip) {
            DropPath::Backend
        } else {
            DropPath::Vip
        }
    }

    /// `reason`, or `CT:event` when conntrack caused the drop: the label a person reads.
    pub fn label(&self) -> String {
        match &self.event {
            Some(e) => format!("CT:{e}"),
            None => self.reason.to_string(),
        }
    }
}

/// Where on a VIP's path a drop happened (the `path` label of `lbtrace_vip_drops_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropPath {
    /// Addressed to the VIP itself: at a node that holds it, held it, or never did.
    Vip,
    /// Translated (DNAT) towards a backend.
    Backend,
    /// On its way back to the client.
    Client,
}

impl DropPath {
    pub const ALL: [Self; 3] = [Self::Vip, Self::Backend, Self::Client];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vip => "vip",
            Self::Backend => "backend",
            Self::Client => "client",
        }
    }
}

/// NA flags as on the wire.
pub const NDP_ROUTER: u8 = 0x80;
pub const NDP_SOLICITED: u8 = 0x40;
pub const NDP_OVERRIDE: u8 = 0x20;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NdpFlags {
    pub router: bool,
    pub solicited: bool,
    #[serde(rename = "override")]
    pub override_: bool,
}

impl NdpFlags {
    pub fn from_wire(f: u8) -> Self {
        Self {
            router: f & NDP_ROUTER != 0,
            solicited: f & NDP_SOLICITED != 0,
            override_: f & NDP_OVERRIDE != 0,
        }
    }
}

/// An ARP packet or IPv6 neighbour solicitation/advertisement (`family` tells them apart).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ArpRec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<Name>,
    pub time: Option<Time>,
    pub family: Family,
    pub op: ArpOp,
    /// An announcement nobody asked for: ARP with sender IP = target IP, an ARP reply to the
    /// broadcast address, or an unsolicited neighbour advertisement with the override flag.
    pub gratuitous: bool,
    pub direction: Direction,
    /// A copy the bridge forwarded, not a host's own transmission.
    pub bridged: bool,
    pub sender_ip: Option<IpAddr>,
    pub sender_mac: Mac,
    /// ARP target protocol address, or the NDP target address.
    pub target_ip: Option<IpAddr>,
    pub target_mac: Mac,
    pub ndp_flags: Option<NdpFlags>,
    pub ifname: Option<Name>,
    pub ifindex: u32,
    pub netns: u32,
    pub vip: Option<IpAddr>,
    /// The VIP's Service (`ns/name`, or `ns/name:port` when it has one port) from
    /// kube-proxy's rules; absent when several Services share the VIP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<Name>,
    /// Sent from an AF_PACKET socket (a speaker's own send): the sending process's pid
    /// (thread-group id) and name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm: Option<Name>,
}

impl ArpRec {
    /// The address this packet announces a MAC for, when it is a host's own announcement: its
    /// transmitted (not bridged) ARP reply, neighbour advertisement or gratuitous ARP.
    ///
    /// This is the one rule of what an announcement is; ownership, metrics and the analysis
    /// all ask it.
    pub fn announced(&self) -> Option<IpAddr> {
        if self.direction != Direction::Tx || self.bridged {
            return None;
        }
        self.announces()
    }

    /// The address the packet announces a MAC for, whoever sent or forwarded it: a reply, an
    /// advertisement or a gratuitous request (a plain request asks, it does not announce).
    pub fn announces(&self) -> Option<IpAddr> {
        match self.op {
            ArpOp::Reply => self.sender_ip,
            ArpOp::Advertisement => self.target_ip,
            ArpOp::Request if self.gratuitous => self.sender_ip,
            _ => None,
        }
    }

    /// A gratuitous announcement (the kind a speaker sends on failover).
    pub fn is_garp(&self) -> bool {
        self.gratuitous && self.announced().is_some()
    }
}

/// A neighbour-cache update.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NeighRec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<Name>,
    pub time: Option<Time>,
    pub ip: Option<IpAddr>,
    pub old_mac: Mac,
    pub new_mac: Mac,
    pub old_state: NudState,
    pub new_state: NudState,
    pub ifname: Option<Name>,
    pub ifindex: u32,
    /// `None` when the hook could not tell (the classic tracepoint).
    pub netns: Option<u32>,
    pub vip: Option<IpAddr>,
    /// As [`ArpRec::service`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<Name>,
}

/// The MAC announcing a VIP changed (`old_mac` is null at the first sighting).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VipOwnerRec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<Name>,
    #[serde(default)]
    pub time: Option<Time>,
    pub vip: IpAddr,
    #[serde(default)]
    pub old_mac: Option<Mac>,
    #[serde(default)]
    pub old_netns: Option<u32>,
    pub new_mac: Mac,
    #[serde(default)]
    pub new_netns: Option<u32>,
    #[serde(default)]
    pub ifname: Option<Name>,
    /// How the new owner was learned (absent in older recordings: an announcement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<OwnerSource>,
    /// As [`ArpRec::service`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<Name>,
}

/// How lbtrace learned who holds a VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OwnerSource {
    /// The host announced it (GARP, ARP reply, neighbour advertisement).
    Announced,
    /// At start: the address is configured on that host's interface.
    Configured,
    /// At start: a neighbour table maps the VIP to that MAC (the host is not reachable).
    Neighbour,
}

/// A VIP learned from an announcement or from kube-proxy's rules (`--discover-vips`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VipDiscoveredRec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<Name>,
    pub vip: IpAddr,
    pub mac: Mac,
    #[serde(default)]
    pub netns: u32,
    #[serde(default)]
    pub ifname: Option<Name>,
    #[serde(default)]
    pub note: String,
}

/// What ownership tracking finds on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FindingKind {
    Flapping,
    SplitBrain,
}

impl FindingKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Flapping => "flapping",
            Self::SplitBrain => "split-brain",
        }
    }
}

/// A flapping or split-brain finding, as it happens (and in the summary, without a time).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FindingRec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<Name>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
    pub finding: FindingKind,
    pub vip: IpAddr,
    /// The MACs involved.
    #[serde(default)]
    pub macs: Vec<Mac>,
    #[serde(default)]
    pub changes: usize,
    #[serde(default)]
    pub detail: String,
}
