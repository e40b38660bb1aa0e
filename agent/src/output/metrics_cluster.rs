//! The series a cluster-wide view needs, kept apart from the rest of the agent's metrics:
//! Prometheus joins them across nodes (alert rules, dashboard, `diagnose --prometheus`).
//!
//! - `lbtrace_vip_drops_total{vip,reason,path}`: drop records by where on the VIP's path they
//!   happened (`vip`: addressed to the VIP; `backend`: after DNAT; `client`: on the way back).
//!   Counted from records, samples included: exact while the kernel sends every drop (below
//!   the sample limit); `lbtrace_drops_total` is the exact total.
//! - `lbtrace_garps_total{vip}`: gratuitous announcements this node sent for a VIP.
//! - `lbtrace_vip_takeovers_total{vip}`: times this node began announcing a VIP it did not
//!   hold as far as it saw.
//! - `lbtrace_vip_owner_since_timestamp_seconds{vip,mac}` and `lbtrace_vip_owner_garps{vip,mac}`:
//!   when that MAC last began announcing the VIP here (the last owner change onto it), and the
//!   gratuitous announcements it sent since.
//!
//! A node sees only its own announcements, and others' only when they reach it (gratuitous
//! ones are broadcast): it loses a VIP when another MAC's announcement arrives, and takes it
//! over with its own next announcement. Cardinality: the VIP labels of [`super::metrics`], at
//! most [`MAX_MAC_LABELS`] MACs per VIP (older holders are forgotten first), three paths.

use std::{collections::BTreeMap, net::IpAddr};

use crate::event::{
    record::{ArpRec, DropPath, DropRec},
    values::{Direction, Mac, Name, Time},
};

use super::metrics::{Expo, VipLabel, MAX_MAC_LABELS};

#[derive(Clone, Copy, Debug)]
struct Holding {
    since: Time,
    garps: u64,
}

#[derive(Debug, Default)]
struct VipOwnership {
    /// The MAC that announced the VIP last, as far as this node saw.
    holder: Option<Mac>,
    /// This node's MACs that announced the VIP, with their last takeover.
    held: BTreeMap<Mac, Holding>,
    takeovers: u64,
    garps: u64,
}

#[derive(Debug, Default)]
pub(crate) struct ClusterSeries {
    drops: BTreeMap<(VipLabel, Name, DropPath), u64>,
    owners: BTreeMap<VipLabel, VipOwnership>,
}

impl ClusterSeries {
    pub(crate) fn drop(&mut self, label: VipLabel, d: &DropRec) {
        let path = d.vip.map_or(DropPath::Vip, |vip| d.path(vip));
        *self
            .drops
            .entry((label, d.reason.clone(), path))
            .or_default() += 1;
    }

    /// An ARP/NDP record attributed to a VIP (`label`).
    pub(crate) fn arp(&mut self, label: VipLabel, a: &ArpRec) {
        let VipLabel::Vip(vip) = label else {
            return;
        };
        if a.announced() == Some(vip) {
            self.own_announcement(label, a);
        } else if heard_announcement(a, vip) {
            let o = self.owners.entry(label).or_default();
            o.holder = Some(a.sender_mac);
        }
    }

    fn own_announcement(&mut self, label: VipLabel, a: &ArpRec) {
        let o = self.owners.entry(label).or_default();
        let now = a.time.unwrap_or_else(Time::now);
        if o.holder != Some(a.sender_mac) || !o.held.contains_key(&a.sender_mac) {
            o.takeovers += 1;
            if !o.held.contains_key(&a.sender_mac) && o.held.len() >= MAX_MAC_LABELS {
                // Forget the holder that took the VIP over longest ago.
                if let Some(oldest) = o.held.iter().min_by_key(|(_, h)| h.since).map(|(m, _)| *m) {
                    o.held.remove(&oldest);
                }
            }
            o.held.insert(
                a.sender_mac,
                Holding {
                    since: now,
                    garps: 0,
                },
            );
        }
        o.holder = Some(a.sender_mac);
        if a.is_garp() {
            o.garps += 1;
            if let Some(h) = o.held.get_mut(&a.sender_mac) {
                h.garps += 1;
            }
        }
    }

    pub(crate) fn render(&self, e: &mut Expo) {
        e.family(
            "lbtrace_vip_drops_total",
            "counter",
            "Drop records delivered (samples included), by VIP, reason and path (vip: addressed to the VIP; backend: after DNAT; client: on the way back); lbtrace_drops_total is the exact total.",
        );
        for ((vip, reason, path), n) in &self.drops {
            let vip = vip.to_string();
            let labels = [
                ("vip", vip.as_str()),
                ("reason", reason),
                ("path", path.as_str()),
            ];
            e.sample("lbtrace_vip_drops_total", &labels, n);
        }
        let owned = || self.owners.iter().map(|(v, o)| (v.to_string(), o));
        e.family(
            "lbtrace_garps_total",
            "counter",
            "Gratuitous ARPs and unsolicited neighbour advertisements this node sent for a VIP.",
        );
        for (vip, o) in owned() {
            e.sample("lbtrace_garps_total", &[("vip", &vip)], o.garps);
        }
        e.family(
            "lbtrace_vip_takeovers_total",
            "counter",
            "Times this node began announcing a VIP it did not hold as far as it saw.",
        );
        for (vip, o) in owned() {
            e.sample("lbtrace_vip_takeovers_total", &[("vip", &vip)], o.takeovers);
        }
        e.family(
            "lbtrace_vip_owner_since_timestamp_seconds",
            "gauge",
            "Unix time at which this node's MAC last began announcing the VIP (the last owner change onto it).",
        );
        e.family(
            "lbtrace_vip_owner_garps",
            "gauge",
            "Gratuitous announcements this node's MAC sent for the VIP since it last began announcing it.",
        );
        for (vip, o) in owned() {
            for (mac, h) in &o.held {
                let mac = mac.to_string();
                let labels = [("vip", vip.as_str()), ("mac", mac.as_str())];
                e.sample(
                    "lbtrace_vip_owner_since_timestamp_seconds",
                    &labels,
                    format_args!("{:.3}", h.since.as_secs_f64()),
                );
                e.sample("lbtrace_vip_owner_garps", &labels, h.garps);
            }
        }
    }
}

/// Another host's announcement of `vip` that reached this node: received, not a bridge's copy.
fn heard_announcement(a: &ArpRec, vip: IpAddr) -> bool {
    a.direction == Direction::Rx && !a.bridged && a.announces() == Some(vip)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::values::ArpOp;

    fn arp(t: f64, mac: u8, dir: Direction, garp: bool) -> ArpRec {
        ArpRec {
            time: Some(Time::from_secs_f64(t)),
            op: if garp { ArpOp::Request } else { ArpOp::Reply },
            gratuitous: garp,
            direction: dir,
            sender_ip: "10.200.0.100".parse().ok(),
            target_ip: "10.200.0.100".parse().ok(),
            sender_mac: Mac([2, 0, 0, 0, 0, mac]),
            vip: "10.200.0.100".parse().ok(),
            ..ArpRec::default()
        }
    }

    #[test]
    fn a_node_takes_over_again_only_after_hearing_another_owner() {
        let label = VipLabel::Vip("10.200.0.100".parse().unwrap());
        let mut c = ClusterSeries::default();
        c.arp(label, &arp(10.0, 0xa, Direction::Tx, false));
        c.arp(label, &arp(11.0, 0xa, Direction::Tx, false));
        c.arp(label, &arp(20.0, 0xb, Direction::Rx, true));
        c.arp(label, &arp(30.0, 0xa, Direction::Tx, true));
        c.arp(label, &arp(30.1, 0xa, Direction::Tx, true));
        let o = &c.owners[&label];
        assert_eq!((o.takeovers, o.garps), (2, 2));
        let h = o.held[&Mac([2, 0, 0, 0, 0, 0xa])];
        assert_eq!((h.since.as_secs_f64(), h.garps), (30.0, 2));
        let mut e = Expo::new("n1");
        c.render(&mut e);
        assert!(e.text().contains(
            "lbtrace_vip_owner_since_timestamp_seconds{vip=\"10.200.0.100\",mac=\"02:00:00:00:00:0a\",node=\"n1\"} 30.000"
        ));
    }
}
