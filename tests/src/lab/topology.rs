//! The lab's network: namespaces, links, kube-proxy's rules on every node and the speaker that
//! places each VIP on one node.
//!
//! ```text
//!   client c0 10.200.0.1          client c1 10.200.0.2      (fd00:200::1, ::2)
//!        │ eth0                        │ eth0
//!   ┌────┴─────────────────────────────┴──────────┐  namespace "lan": bridge br0
//!   │ br0 (no STP, mcast_snooping 0, no IP)       │  10.200.0.0/24, fd00:200::/64
//!   └────┬──────────────────┬───────────────┬─────┘
//!        │ eth0 10.200.0.11 │ eth0 .12      │ eth0 .13     (fd00:200::11, ::12, ::13)
//!   node n0             node n1         node n2      ip_forward, kube-proxy table, VIPs it holds
//!     p0│    │p1          p0│   │p1       p0│   │p1  10.200.1N.1/32 on each (the pods' gateway)
//!    n0p0  n0p1          n1p0 n1p1       n2p0 n2p1   pods 10.200.1N.(2+k), fd00:200::1N:(2+k)
//! ```
//!
//! Every pod runs TCP and UDP echo servers on 8080 and 5353. A node reaches another node's pods
//! through that node's LAN address. VIPs are in the LAN subnet: the node holding one has it on
//! eth0 (so it answers ARP and NDP for it) and every node's kube-proxy DNATs it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Mutex,
    time::SystemTime,
};

use anyhow::{Context, Result};

use super::{backend::Backend, kubeproxy::ProxyMode, speaker, POD_TCP_PORT, POD_UDP_PORT};
use crate::netns::{veth, Netns};

pub const CLIENTS: usize = 2;
pub const NODES: usize = 3;
pub const PODS_PER_NODE: usize = 2;
/// The interface facing the LAN in clients and nodes, and a pod's only one.
pub const UPLINK: &str = "eth0";
const BRIDGE: &str = "br0";
/// The lab's own table on each node (family inet): the per-VIP counters (the kernel's
/// account), the CNI's network policy, and rules scenarios add. kube-proxy's rules are its own
/// (`super::kubeproxy`).
pub const TABLE: &str = "lab";

/// The service the scenarios break.
pub const VIP_A: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 200, 0, 100));
pub const VIP_A6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x100));
/// The control: on a node of its own, never touched.
pub const VIP_CTL: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 200, 0, 101));
pub const VIP_CTL6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x101));
/// A second service moved with A (stale-arp, policy Cluster).
pub const VIP_B: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 200, 0, 102));
pub const VIP_B6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x102));

pub fn client_ip4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, 0, 1 + i as u8)
}

pub fn client_ip6(i: usize) -> Ipv6Addr {
    v6(&format!("fd00:200::{}", 1 + i))
}

pub fn node_ip4(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, 0, 11 + n as u8)
}

pub fn node_ip6(n: usize) -> Ipv6Addr {
    v6(&format!("fd00:200::{}", 11 + n))
}

/// Written with decimal digits so that node 1's pods read `fd00:200::11:…` like `10.200.11.…`.
fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap_or(Ipv6Addr::UNSPECIFIED)
}

/// A pod: the `k`th on node `node`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pod {
    pub node: usize,
    pub k: usize,
}

impl Pod {
    pub const fn new(node: usize, k: usize) -> Self {
        Self { node, k }
    }

    pub fn all() -> impl Iterator<Item = Pod> {
        (0..NODES).flat_map(|n| (0..PODS_PER_NODE).map(move |k| Pod::new(n, k)))
    }

    pub fn name(self) -> String {
        format!("n{}p{}", self.node, self.k)
    }

    fn index(self) -> usize {
        self.node * PODS_PER_NODE + self.k
    }

    pub fn ip4(self) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, 10 + self.node as u8, 2 + self.k as u8)
    }

    pub fn ip6(self) -> Ipv6Addr {
        v6(&format!("fd00:200::{}:{}", 10 + self.node, 2 + self.k))
    }

    /// Its address in the family of `like`.
    pub fn ip_like(self, like: IpAddr) -> IpAddr {
        match like {
            IpAddr::V4(_) => self.ip4().into(),
            IpAddr::V6(_) => self.ip6().into(),
        }
    }
}

/// Node `n`'s pods' subnets.
pub fn pod_net4(n: usize) -> String {
    format!("10.200.{}.0/24", 10 + n)
}

pub fn pod_net6(n: usize) -> String {
    format!("fd00:200::{}:0/112", 10 + n)
}

fn pod_gw4(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, 10 + n as u8, 1)
}

fn pod_gw6(n: usize) -> Ipv6Addr {
    v6(&format!("fd00:200::{}:1", 10 + n))
}

/// `externalTrafficPolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Any node DNATs to any endpoint, masquerading: works from every node, hides the client.
    Cluster,
    /// A node DNATs only to its own endpoints and drops the traffic when it has none.
    Local,
}

/// A LoadBalancer service: its VIPs, where its endpoints are, which node announces it.
#[derive(Clone, Debug)]
pub struct Service {
    pub name: &'static str,
    pub vips: Vec<IpAddr>,
    pub policy: Policy,
    pub endpoints: Vec<Pod>,
    /// The node the speaker announces the VIPs from.
    pub owner: Option<usize>,
}

impl Service {
    /// The endpoints node `n`'s kube-proxy sends this service's traffic to.
    pub fn endpoints_on(&self, n: usize) -> Vec<Pod> {
        match self.policy {
            Policy::Cluster => self.endpoints.clone(),
            Policy::Local => self
                .endpoints
                .iter()
                .copied()
                .filter(|p| p.node == n)
                .collect(),
        }
    }
}

/// An nft object name for a VIP (no `.` or `:`).
pub fn counter_id(vip: IpAddr) -> String {
    vip.to_string().replace(['.', ':'], "_")
}

/// The per-VIP counters every node's kube-proxy table keeps (the kernel's account, per VIP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Packets for the VIP reaching the node (priority raw, before conntrack).
    Arrive,
    /// Those that conntrack let through (priority mangle).
    Tracked,
    /// New flows dropped because the node has no endpoint for it (policy Local).
    NoEndpoint,
    /// Packets for the VIP reaching a node that does not hold it (a client's stale MAC).
    Stray,
}

impl Counter {
    pub(super) const ALL: [Counter; 4] = [
        Counter::Arrive,
        Counter::Tracked,
        Counter::NoEndpoint,
        Counter::Stray,
    ];

    pub fn name(self, vip: IpAddr) -> String {
        let kind = match self {
            Counter::Arrive => "arrive",
            Counter::Tracked => "tracked",
            Counter::NoEndpoint => "noep",
            Counter::Stray => "stray",
        };
        format!("{kind}_{}", counter_id(vip))
    }
}

pub struct Lab {
    /// The speaker processes, when a scenario runs them: stopped first.
    pub speakers: Option<super::speakers::Speakers>,
    /// Dropped first: a socket left open would keep its pod's namespace alive.
    backends: Vec<Option<Backend>>,
    pub lan: Netns,
    pub clients: Vec<Netns>,
    pub nodes: Vec<Netns>,
    /// Indexed like [`Pod::all`].
    pub pods: Vec<Netns>,
    pub services: Vec<Service>,
    /// Pods whose network policy does not allow traffic in yet: dropped on their node.
    pub denied: Vec<Pod>,
    /// Per node: nft commands a scenario adds to the lab's table (e.g. SNAT); kept across syncs.
    pub extra_rules: Vec<Vec<String>>,
    /// The dialect of kube-proxy's rules on the nodes.
    pub proxy_mode: ProxyMode,
    /// Every endpoint change a sync made, when its rules were loaded on every node.
    pub endpoint_log: Mutex<Vec<EndpointChange>>,
    pub(super) synced: Mutex<BTreeMap<String, BTreeSet<SocketAddr>>>,
}

/// An endpoint added to or removed from a Service port by a kube-proxy sync.
#[derive(Clone, Debug)]
pub struct EndpointChange {
    /// When the sync began writing the first node's rules: an addition shows in the rules
    /// from then on (on that node).
    pub started: SystemTime,
    /// When the sync had written every node's rules: a removal shows from then on.
    pub at: SystemTime,
    pub service: String,
    pub endpoint: SocketAddr,
    pub added: bool,
}

impl Lab {
    /// Builds the topology in namespaces named `{prefix}-…`, programs kube-proxy on every node,
    /// places each service's VIPs on its owner (without announcement) and starts the pods'
    /// servers. Whatever exists when something fails is removed.
    pub fn up(prefix: &str, services: Vec<Service>) -> Result<Self> {
        Self::up_with(prefix, services, ProxyMode::Nftables)
    }

    /// As [`Lab::up`], with kube-proxy in `mode`.
    pub fn up_with(prefix: &str, services: Vec<Service>, mode: ProxyMode) -> Result<Self> {
        let ns = |role: &str| -> Result<Netns> {
            let ns = Netns::create(&format!("{prefix}-{role}"))?;
            // No duplicate address detection: IPv6 addresses (link-local ones too) are usable
            // at once, and the lab starts without DAD's traffic.
            for scope in ["all", "default"] {
                ns.sysctl(&format!("net.ipv6.conf.{scope}.accept_dad"), "0")?;
            }
            Ok(ns)
        };
        let lan = ns("lan")?;
        lan.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
        lan.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        lan.ip(&[
            "link",
            "add",
            BRIDGE,
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        lan.ip(&["link", "set", BRIDGE, "up"])?;
        // A host on the LAN: its eth0 is plugged into the bridge port named after it.
        let on_lan = |role: &str, ip4: Ipv4Addr, ip6: Ipv6Addr| -> Result<Netns> {
            let host = ns(role)?;
            veth(
                &host,
                UPLINK,
                &[&format!("{ip4}/24"), &format!("{ip6}/64")],
                &lan,
                role,
                &[],
            )?;
            lan.ip(&["link", "set", role, "master", BRIDGE])?;
            Ok(host)
        };
        let clients = (0..CLIENTS)
            .map(|i| on_lan(&format!("c{i}"), client_ip4(i), client_ip6(i)))
            .collect::<Result<Vec<_>>>()?;

        let mut nodes = Vec::new();
        for n in 0..NODES {
            let node = on_lan(&format!("n{n}"), node_ip4(n), node_ip6(n))?;
            node.sysctl("net.ipv4.ip_forward", "1")?;
            node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            for other in (0..NODES).filter(|&o| o != n) {
                let (via4, via6) = (node_ip4(other).to_string(), node_ip6(other).to_string());
                node.ip(&["route", "add", &pod_net4(other), "via", &via4])?;
                node.ip(&["route", "add", &pod_net6(other), "via", &via6])?;
            }
            nodes.push(node);
        }

        let mut pods = Vec::new();
        for pod in Pod::all() {
            let p = ns(&pod.name())?;
            let node = &nodes[pod.node];
            let port = format!("p{}", pod.k);
            let (gw4, gw6) = (pod_gw4(pod.node).to_string(), pod_gw6(pod.node).to_string());
            let (ip4, ip6) = (pod.ip4().to_string(), pod.ip6().to_string());
            veth(
                node,
                &port,
                &[&format!("{gw4}/32"), &format!("{gw6}/128")],
                &p,
                UPLINK,
                &[&format!("{ip4}/32"), &format!("{ip6}/128")],
            )?;
            node.ip(&["route", "add", &ip4, "dev", &port])?;
            node.ip(&["route", "add", &ip6, "dev", &port])?;
            for gw in [&gw4, &gw6] {
                p.ip(&["route", "add", gw, "dev", UPLINK])?;
                p.ip(&["route", "add", "default", "via", gw])?;
            }
            pods.push(p);
        }

        let owners: Vec<(String, usize)> = services
            .iter()
            .filter_map(|s| Some((s.name.to_owned(), s.owner?)))
            .collect();
        let mut lab = Self {
            speakers: None,
            backends: Vec::new(),
            lan,
            clients,
            nodes,
            pods,
            services: services
                .into_iter()
                .map(|s| Service { owner: None, ..s })
                .collect(),
            denied: Vec::new(),
            extra_rules: vec![Vec::new(); NODES],
            proxy_mode: mode,
            endpoint_log: Mutex::default(),
            synced: Mutex::default(),
        };
        lab.sync()?;
        for (name, owner) in owners {
            lab.announce(&name, owner, 0)?;
        }
        for pod in Pod::all() {
            let b = Backend::start(lab.pod(pod), POD_TCP_PORT, POD_UDP_PORT)?;
            lab.backends.push(Some(b));
        }
        Ok(lab)
    }

    pub fn pod(&self, pod: Pod) -> &Netns {
        &self.pods[pod.index()]
    }

    pub fn service(&self, name: &str) -> Result<&Service> {
        self.services
            .iter()
            .find(|s| s.name == name)
            .with_context(|| format!("no service {name}"))
    }

    fn service_mut(&mut self, name: &str) -> Result<&mut Service> {
        self.services
            .iter_mut()
            .find(|s| s.name == name)
            .with_context(|| format!("no service {name}"))
    }

    /// The service a VIP belongs to.
    pub fn service_of(&self, vip: IpAddr) -> Result<&Service> {
        self.services
            .iter()
            .find(|s| s.vips.contains(&vip))
            .with_context(|| format!("no service has {vip}"))
    }

    /// The speaker moves `service`'s VIPs to `node`: the old holder drops them, the new one adds
    /// them (now it answers ARP/NDP), then sends `announcements` gratuitous ARPs (IPv4) or
    /// unsolicited NAs (IPv6) each, as MetalLB does on failover. 0 announces nothing.
    pub fn announce(&mut self, service: &str, node: usize, announcements: u32) -> Result<()> {
        let svc = self.service_mut(service)?;
        let old = svc.owner.replace(node);
        let vips = svc.vips.clone();
        for &vip in &vips {
            let cidr = match vip {
                IpAddr::V4(_) => format!("{vip}/32"),
                IpAddr::V6(_) => format!("{vip}/128"),
            };
            if let Some(old) = old {
                self.nodes[old].ip(&["addr", "del", &cidr, "dev", UPLINK])?;
            }
            let mut add = vec!["addr", "add", &cidr, "dev", UPLINK];
            if vip.is_ipv6() {
                add.push("nodad");
            }
            self.nodes[node].ip(&add)?;
        }
        self.sync()?;
        for vip in vips {
            match vip {
                IpAddr::V4(v) => speaker::send_garp(&self.nodes[node], UPLINK, v, announcements)?,
                IpAddr::V6(v) => {
                    speaker::send_unsolicited_na(&self.nodes[node], UPLINK, v, announcements)?
                }
            };
        }
        Ok(())
    }

    /// Changes a service's endpoints (a rollout, a reschedule) and resyncs kube-proxy.
    pub fn set_endpoints(&mut self, service: &str, endpoints: &[Pod]) -> Result<()> {
        self.service_mut(service)?.endpoints = endpoints.to_vec();
        self.sync()
    }

    /// Adds nft commands to node `n`'s kube-proxy table (kept across syncs) and loads them.
    pub fn add_rules(&mut self, n: usize, commands: &[String]) -> Result<()> {
        self.extra_rules[n].extend_from_slice(commands);
        self.sync()
    }

    /// Network policy: traffic to `pod` is dropped on its node until [`Lab::allow`].
    pub fn deny(&mut self, pod: Pod) -> Result<()> {
        self.denied.push(pod);
        self.sync()
    }

    pub fn allow(&mut self, pod: Pod) -> Result<()> {
        self.denied.retain(|p| *p != pod);
        self.sync()
    }

    /// Packets of `family`'s (an address of it) the policy dropped on their way to `pod`.
    pub fn policy_drops(&self, pod: Pod, family: IpAddr) -> Result<u64> {
        self.nodes[pod.node].nft_counter("inet", TABLE, &policy_counter(pod, family))
    }

    /// Closes a pod's listeners (its process went away); connections are refused from now on.
    pub fn stop_backend(&mut self, pod: Pod) {
        if let Some(b) = self.backends[pod.index()].take() {
            b.stop();
        }
    }

    pub fn start_backend(&mut self, pod: Pod) -> Result<()> {
        if self.backends[pod.index()].is_none() {
            let b = Backend::start(self.pod(pod), POD_TCP_PORT, POD_UDP_PORT)?;
            self.backends[pod.index()] = Some(b);
        }
        Ok(())
    }

    /// Shortens the clients' neighbour reachable time (kernel-notes: a stale window of 9–10 s
    /// at 2000 ms instead of 42–51 s).
    pub fn set_client_reachable_ms(&self, ms: u32) -> Result<()> {
        for c in &self.clients {
            for fam in ["ipv4", "ipv6"] {
                c.sysctl(
                    &format!("net.{fam}.neigh.{UPLINK}.base_reachable_time_ms"),
                    &ms.to_string(),
                )?;
            }
        }
        Ok(())
    }

    /// One of the per-VIP counters on node `n`.
    pub fn counter(&self, n: usize, counter: Counter, vip: IpAddr) -> Result<u64> {
        self.nodes[n].nft_counter("inet", TABLE, &counter.name(vip))
    }

    /// A per-VIP counter summed over the nodes.
    pub fn counter_sum(&self, counter: Counter, vip: IpAddr) -> Result<u64> {
        (0..NODES).map(|n| self.counter(n, counter, vip)).sum()
    }

    /// Leaves the lab in place for another process (`lab up`): servers stop here, namespaces
    /// stay.
    pub fn keep(mut self) {
        self.speakers = None;
        self.backends.clear();
        let Self {
            lan,
            clients,
            nodes,
            pods,
            ..
        } = self;
        lan.keep();
        clients
            .into_iter()
            .chain(nodes)
            .chain(pods)
            .for_each(Netns::keep);
    }
}

/// The policy counter of `pod` for the family of `family`.
pub(super) fn policy_counter(pod: Pod, family: IpAddr) -> String {
    let v = if family.is_ipv6() { 6 } else { 4 };
    format!("policy{v}_{}", pod.name())
}

pub use super::host::*;
