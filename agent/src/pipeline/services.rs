//! Services and their endpoints as kube-proxy's rules on the watched nodes say, merged over
//! the nodes: names for records (`service`, `endpoint`), `endpoint` records for every change,
//! and the LoadBalancer IPs `--discover-vips` learns.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::mpsc::Receiver,
    time::Duration,
};

use crate::{
    event::{
        record::{EndpointChange, EndpointRec, EndpointRef, VipDiscoveredRec},
        values::{Mac, Name, Time},
        Record,
    },
    kernel::kubeproxy::{self, Endpoint, Frontend, Mode, NoEndpoints, NodeRules, Snapshot},
};
use serde::{Deserialize, Serialize};

/// The catalog fed by the rules reader's snapshots.
pub struct KubeProxy {
    rx: Receiver<Snapshot>,
    pub catalog: Catalog,
    /// `--discover-vips`: LoadBalancer IPs in the rules become VIPs.
    pub discover: bool,
}

impl KubeProxy {
    /// Starts reading the rules every `interval`, and waits (a few seconds at most) for the
    /// first read: records get names from the start.
    pub fn start(interval: Duration, discover: bool) -> std::io::Result<Self> {
        let rx = kubeproxy::spawn(interval)?;
        let mut catalog = Catalog::default();
        if let Ok(first) = rx.recv_timeout(FIRST_READ) {
            let present = catalog.update(first);
            catalog.pending = present;
        }
        Ok(Self {
            rx,
            catalog,
            discover,
        })
    }

    /// The snapshots that came since the last call, each as the records of what it changed.
    pub fn poll(&mut self) -> Vec<Record> {
        let mut out = std::mem::take(&mut self.catalog.pending);
        while let Ok(s) = self.rx.try_recv() {
            out.extend(self.catalog.update(s));
        }
        self.catalog.changes += out
            .iter()
            .filter(|r| matches!(r, Record::Endpoint(e) if e.change != EndpointChange::Present))
            .count() as u64;
        out
    }
}

/// What the rules reader saw, for the summary and the metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct KubeProxyStats {
    /// Namespaces (nodes) whose rules were read last.
    pub namespaces: usize,
    pub modes: Vec<Mode>,
    pub service_ports: usize,
    /// `endpoint` records of changes (not the ones present at the start).
    pub endpoint_changes: u64,
    /// Rules of a shape lbtrace does not know, skipped (a newer kube-proxy, hand-made rules).
    pub rules_skipped: u64,
}

/// What the catalog knows, merged over every node's rules.
#[derive(Debug, Default)]
pub struct Catalog {
    nodes: BTreeMap<u32, NodeRules>,
    frontends: HashMap<Frontend, Name>,
    backends: HashMap<Endpoint, Name>,
    /// LoadBalancer (or external) IP → its Service ports.
    lb: BTreeMap<IpAddr, BTreeSet<Name>>,
    /// Whether a snapshot was taken in (the first is the baseline, not a change).
    started: bool,
    /// Rules of an unknown shape in the latest snapshot.
    pub skipped: u64,
    /// When each node's rules were last read: a failed read keeps the last ones a while.
    last_read: BTreeMap<u32, Time>,
    /// Records of the first read, made before the pipeline ran.
    pending: Vec<Record>,
    /// Endpoint changes made into records.
    changes: u64,
}

/// How long lbtrace waits for the first read of the rules.
const FIRST_READ: Duration = Duration::from_secs(5);
/// How long a node's last rules stand in for reads that failed.
const KEEP_UNREAD: Duration = Duration::from_secs(10);

/// A Service port's endpoints over a set of nodes.
fn union<'a>(
    nodes: impl Iterator<Item = &'a NodeRules>,
) -> BTreeMap<&'a Name, BTreeSet<SocketAddr>> {
    let mut out: BTreeMap<&Name, BTreeSet<SocketAddr>> = BTreeMap::new();
    for n in nodes {
        for (svc, eps) in &n.endpoints {
            out.entry(svc)
                .or_default()
                .extend(eps.iter().map(|e| e.addr));
        }
    }
    out
}

/// `ns/name` of `ns/name:port`.
fn service_of(port: &str) -> &str {
    port.rsplit_once(':').map_or(port, |(s, _)| s)
}

impl Catalog {
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn stats(&self) -> KubeProxyStats {
        let modes: BTreeSet<Mode> = self.nodes.values().flat_map(|r| r.modes.clone()).collect();
        let ports: BTreeSet<&Name> = self
            .nodes
            .values()
            .flat_map(|r| r.frontends.values().map(|(n, _)| n))
            .collect();
        KubeProxyStats {
            namespaces: self.nodes.len(),
            modes: modes.into_iter().collect(),
            service_ports: ports.len(),
            endpoint_changes: self.changes,
            rules_skipped: self.skipped,
        }
    }

    /// The Services (`ns/name`) whose LoadBalancer IP `vip` is.
    pub fn vip_services(&self, vip: IpAddr) -> Vec<&str> {
        let names: BTreeSet<&str> = self
            .lb
            .get(&vip)
            .into_iter()
            .flatten()
            .map(|n| service_of(n))
            .collect();
        names.into_iter().collect()
    }

    /// Takes a new snapshot; returns the `endpoint` records of what changed since the last
    /// one. Endpoints count over the nodes both snapshots have (a node seen for the first time
    /// is a baseline); no-endpoint states per node.
    pub fn update(&mut self, mut snap: Snapshot) -> Vec<Record> {
        let mut out = Vec::new();
        for ino in snap.nodes.keys() {
            self.last_read.insert(*ino, snap.at);
        }
        for (ino, rules) in &self.nodes {
            let recent = self
                .last_read
                .get(ino)
                .is_some_and(|t| snap.at.since(*t) < KEEP_UNREAD);
            if recent && !snap.nodes.contains_key(ino) {
                snap.nodes.insert(*ino, rules.clone());
            }
        }
        let common = |n: &u32| self.nodes.contains_key(n) && snap.nodes.contains_key(n);
        let before = union(self.nodes.iter().filter(|(n, _)| common(n)).map(|(_, r)| r));
        let after = union(snap.nodes.iter().filter(|(n, _)| common(n)).map(|(_, r)| r));
        let services: BTreeSet<&Name> = before.keys().chain(after.keys()).copied().collect();
        let none = BTreeSet::new();
        let mut changes = Vec::new();
        for svc in services {
            let (b, a) = (
                before.get(svc).unwrap_or(&none),
                after.get(svc).unwrap_or(&none),
            );
            for ep in a.difference(b) {
                changes.push((svc.clone(), EndpointChange::Added, Some(*ep), None, None));
            }
            for ep in b.difference(a) {
                changes.push((svc.clone(), EndpointChange::Removed, Some(*ep), None, None));
            }
        }
        for (ino, rules) in &snap.nodes {
            let old = self.nodes.get(ino).filter(|_| self.started);
            states(*ino, old, rules, &mut changes);
        }
        self.nodes = snap.nodes;
        self.index();
        for (service, change, endpoint, state, netns) in changes {
            out.push(Record::Endpoint(Box::new(EndpointRec {
                node: None,
                time: Some(snap.at),
                vips: self.vips_of(&service),
                service,
                change,
                endpoint,
                state,
                netns,
            })));
        }
        self.started = true;
        out
    }

    fn index(&mut self) {
        self.frontends.clear();
        self.backends.clear();
        self.lb.clear();
        self.skipped = 0;
        for r in self.nodes.values() {
            self.skipped += r.skipped;
            for (f, (name, kind)) in &r.frontends {
                self.frontends.insert(*f, name.clone());
                if kind.maybe_load_balancer() {
                    self.lb.entry(f.ip).or_default().insert(name.clone());
                }
            }
            for (name, eps) in &r.endpoints {
                for ep in eps {
                    self.backends.insert(*ep, name.clone());
                }
            }
        }
    }

    fn vips_of(&self, service: &Name) -> Vec<IpAddr> {
        self.lb
            .iter()
            .filter(|(_, s)| s.contains(service))
            .map(|(ip, _)| *ip)
            .collect()
    }

    /// LoadBalancer IPs in the rules (with nftables mode: also external IPs, which it does not
    /// tell apart), each with its Service ports.
    pub fn load_balancer_ips(&self) -> impl Iterator<Item = (&IpAddr, &BTreeSet<Name>)> {
        self.lb.iter()
    }

    /// A `vip_discovered` record for an address learned from the rules.
    pub fn discovered(&self, ip: IpAddr) -> Record {
        let names: Vec<&str> = self
            .lb
            .get(&ip)
            .into_iter()
            .flatten()
            .map(|n| &**n)
            .collect();
        Record::VipDiscovered(VipDiscoveredRec {
            node: None,
            vip: ip,
            mac: Mac::default(),
            netns: 0,
            ifname: None,
            note: format!(
                "learned from kube-proxy's rules: {} (--discover-vips)",
                names.join(", ")
            ),
        })
    }

    fn frontend(&self, ip: Option<IpAddr>, proto: u8, port: Option<u16>) -> Option<Name> {
        let f = Frontend {
            ip: ip?,
            proto,
            port: port?,
        };
        self.frontends.get(&f).cloned()
    }

    /// The Service of a VIP without a port: the one Service port it has, or `ns/name` when
    /// all its ports are one Service's.
    pub fn vip_service(&self, vip: IpAddr) -> Option<Name> {
        let names = self.lb.get(&vip)?;
        if names.len() == 1 {
            return names.first().cloned();
        }
        let mut services = names.iter().map(|n| service_of(n));
        let first = services.next()?;
        services.all(|s| s == first).then(|| first.into())
    }

    /// Sets `service` and `endpoint` of a record from the rules.
    pub fn annotate(&self, r: &mut Record) {
        if self.nodes.is_empty() {
            return;
        }
        match r {
            Record::Drop(d) | Record::Conntrack(d) => {
                let proto = d.proto.map(|p| p.number()).unwrap_or(0);
                let endpoint = d.dst.zip(d.dport).and_then(|(ip, port)| {
                    let ep = Endpoint {
                        addr: SocketAddr::new(ip, port),
                        proto,
                    };
                    let service = self.backends.get(&ep)?.clone();
                    Some(EndpointRef {
                        addr: ep.addr,
                        service,
                    })
                });
                let orig = d.orig.as_ref();
                d.service = orig
                    .and_then(|o| self.frontend(Some(o.dst), o.proto.number(), Some(o.dport)))
                    .or_else(|| self.frontend(d.dst, proto, d.dport))
                    .or_else(|| self.frontend(d.src, proto, d.sport))
                    .or_else(|| endpoint.as_ref().map(|e| e.service.clone()))
                    .or_else(|| d.vip.and_then(|v| self.vip_service(v)));
                d.endpoint = endpoint;
            }
            Record::Arp(a) => a.service = a.vip.and_then(|v| self.vip_service(v)),
            Record::Neigh(n) => n.service = n.vip.and_then(|v| self.vip_service(v)),
            Record::VipOwner(o) => o.service = self.vip_service(o.vip),
            _ => {}
        }
    }
}

type Change = (
    Name,
    EndpointChange,
    Option<SocketAddr>,
    Option<NoEndpoints>,
    Option<u32>,
);

/// No-endpoint states of one node that changed (all of them `present` at the baseline).
fn states(ino: u32, old: Option<&NodeRules>, new: &NodeRules, out: &mut Vec<Change>) {
    let Some(old) = old else {
        for (svc, s) in &new.no_endpoints {
            out.push((
                svc.clone(),
                EndpointChange::Present,
                None,
                Some(*s),
                Some(ino),
            ));
        }
        return;
    };
    let names: BTreeSet<&Name> = old
        .no_endpoints
        .keys()
        .chain(new.no_endpoints.keys())
        .collect();
    for svc in names {
        let (b, a) = (old.no_endpoints.get(svc), new.no_endpoints.get(svc));
        if b == a {
            continue;
        }
        if let Some(s) = b {
            out.push((svc.clone(), EndpointChange::Left, None, Some(*s), Some(ino)));
        }
        if let Some(s) = a {
            out.push((
                svc.clone(),
                EndpointChange::Entered,
                None,
                Some(*s),
                Some(ino),
            ));
        }
    }
}

/// Time of a snapshot, for tests.
#[cfg(test)]
fn at(s: f64) -> Time {
    Time::from_secs_f64(1_800_000_000.0 + s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::kubeproxy::FrontendKind;

    fn node(eps: &[&str], no_local: bool) -> NodeRules {
        let mut r = NodeRules::default();
        r.modes.insert(Mode::Nftables);
        let svc: Name = "lab/a:http".into();
        r.frontends.insert(
            Frontend {
                ip: "10.200.0.100".parse().unwrap(),
                proto: 6,
                port: 80,
            },
            (svc.clone(), FrontendKind::External),
        );
        r.endpoints.insert(
            svc.clone(),
            eps.iter()
                .map(|e| Endpoint {
                    addr: e.parse().unwrap(),
                    proto: 6,
                })
                .collect(),
        );
        if no_local {
            r.no_endpoints.insert(svc, NoEndpoints::NoLocalEndpoints);
        }
        r
    }

    fn snap(t: f64, nodes: Vec<(u32, NodeRules)>) -> Snapshot {
        Snapshot {
            at: at(t),
            nodes: nodes.into_iter().collect(),
        }
    }

    fn changes(recs: &[Record]) -> Vec<String> {
        recs.iter()
            .map(|r| match r {
                Record::Endpoint(e) => format!(
                    "{} {:?} {:?} {:?} {:?}",
                    e.service, e.change, e.endpoint, e.state, e.netns
                ),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn one_record_per_change_over_all_nodes() {
        let (a, b) = ("10.200.11.2:8080", "10.200.12.2:8080");
        let mut c = Catalog::default();
        let r = c.update(snap(
            0.0,
            vec![(1, node(&[a, b], true)), (2, node(&[a, b], false))],
        ));
        assert_eq!(
            changes(&r),
            ["lab/a:http Present None Some(NoLocalEndpoints) Some(1)"]
        );
        // Node 1 synced first: nothing yet; then node 2 too: one removal.
        assert!(c
            .update(snap(
                1.0,
                vec![(1, node(&[b], true)), (2, node(&[a, b], false))]
            ))
            .is_empty());
        let r = c.update(snap(
            2.0,
            vec![(1, node(&[b], false)), (2, node(&[b], false))],
        ));
        assert_eq!(
            changes(&r),
            [
                "lab/a:http Removed Some(10.200.11.2:8080) None None",
                "lab/a:http Left None Some(NoLocalEndpoints) Some(1)"
            ]
        );
        assert_eq!(r[0].time(), Some(at(2.0)));
        assert_eq!(r[0].vip(), "10.200.0.100".parse().ok());
        // A node seen for the first time is a baseline.
        let r = c.update(snap(
            3.0,
            vec![
                (1, node(&[b], false)),
                (2, node(&[b], false)),
                (3, node(&[a], false)),
            ],
        ));
        assert!(r.is_empty(), "{r:?}");
    }

    #[test]
    fn records_get_the_service_and_the_endpoint() {
        let mut c = Catalog::default();
        c.update(snap(0.0, vec![(1, node(&["10.200.11.2:8080"], false))]));
        let mut d = crate::event::record::DropRec {
            proto: Some(crate::event::values::L4Proto::Tcp),
            dst: "10.200.11.2".parse().ok(),
            dport: Some(8080),
            vip: "10.200.0.100".parse().ok(),
            ..Default::default()
        };
        let mut r = Record::Drop(d.clone());
        c.annotate(&mut r);
        let Record::Drop(got) = &r else { panic!() };
        assert_eq!(got.service.as_deref(), Some("lab/a:http"));
        assert_eq!(
            got.endpoint.as_ref().map(|e| e.addr.to_string()),
            Some("10.200.11.2:8080".to_owned())
        );
        d.dst = "10.200.0.100".parse().ok();
        d.dport = Some(80);
        let mut r = Record::Drop(d);
        c.annotate(&mut r);
        let Record::Drop(got) = &r else { panic!() };
        assert_eq!(
            (got.service.as_deref(), got.endpoint.is_none()),
            (Some("lab/a:http"), true)
        );
        assert_eq!(c.load_balancer_ips().count(), 1);
    }
}
