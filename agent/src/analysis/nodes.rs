//! Which node a namespace or a MAC belongs to, learnt from records that carry their node, so
//! that findings and timelines name the nodes involved.

use std::collections::BTreeMap;

use super::diagnosis::{Evidence, Finding};
use crate::event::{
    values::{Mac, Name},
    Record,
};

#[derive(Debug, Default)]
pub struct NodeNames {
    netns: BTreeMap<u64, Name>,
    macs: BTreeMap<Mac, Name>,
}

impl NodeNames {
    pub fn learn(&mut self, r: &Record) {
        match r {
            Record::Drop(d) | Record::Conntrack(d) => {
                if let (Some(n), true) = (&d.node, d.netns != 0) {
                    self.netns.insert(u64::from(d.netns), n.clone());
                }
            }
            Record::Arp(a) => {
                if let (Some(n), Some(_)) = (&a.node, a.announced()) {
                    self.macs.insert(a.sender_mac, n.clone());
                    self.netns.insert(u64::from(a.netns), n.clone());
                }
            }
            Record::VipOwner(o) => {
                if let (Some(n), Some(ns)) = (&o.node, o.new_netns) {
                    self.macs.insert(o.new_mac, n.clone());
                    self.netns.insert(u64::from(ns), n.clone());
                }
            }
            _ => {}
        }
    }

    pub fn is_empty(&self) -> bool {
        self.netns.is_empty() && self.macs.is_empty()
    }

    /// The node of a namespace (as the evidence writes it).
    pub fn of_netns(&self, netns: u64) -> Option<&str> {
        self.netns.get(&netns).map(|n| &**n)
    }

    pub fn of_mac(&self, mac: Mac) -> Option<&str> {
        self.macs.get(&mac).map(|n| &**n)
    }

    /// `f` with the nodes its evidence names.
    pub fn name(&self, mut f: Finding) -> Finding {
        let ns = |k: &String| k.parse::<u64>().ok().and_then(|n| self.of_netns(n));
        let mac = |m: &str| m.parse::<Mac>().ok().and_then(|m| self.of_mac(m));
        let found: Vec<&str> = match &f.evidence {
            Evidence::Conntrack(e) => e.netns.keys().filter_map(ns).collect(),
            Evidence::Policy(e) => e.netns.keys().filter_map(ns).collect(),
            Evidence::StaleArp(e) => e
                .old_owner_netns
                .keys()
                .filter_map(ns)
                .chain(e.old_mac.as_deref().and_then(mac))
                .chain(e.new_mac.as_deref().and_then(mac))
                .collect(),
            Evidence::Failover(e) => e.macs.iter().filter_map(|m| mac(m)).collect(),
            Evidence::Mtu(_) | Evidence::Churn(_) => Vec::new(),
        };
        f.nodes.extend(found.into_iter().map(str::to_owned));
        f
    }
}
