//! What the analysis keeps per VIP: its timeline, the drop samples the diagnosis reads, its
//! ownership changes, and how each record updates them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use super::{because::LinkSigns, Timeline, MAX_SAMPLES};
use crate::event::{
    record::{ArpRec, DropRec, EndpointRec, VipOwnerRec},
    values::{ConntrackEvent, Mac, Name},
};

const MAX_CHANGES: usize = 256;

/// One drop (or conntrack-caused drop) kept for the diagnosis.
#[derive(Clone, Debug)]
pub(super) struct Sample {
    pub(super) t: f64,
    pub(super) netns: u64,
    pub(super) reason: Name,
    pub(super) ct_event: Option<ConntrackEvent>,
    pub(super) function: String,
    /// The packet's own destination is not the VIP: it was translated (DNAT) to a backend.
    pub(super) behind_dnat: bool,
    /// The packet travels back to the client that opened the flow (a reply, or an ICMP error
    /// about the flow): no backend is refusing anything.
    pub(super) toward_client: bool,
    /// The packet's destination, as text (empty when it had none).
    pub(super) dst: String,
    /// The backend it was dropped at, from kube-proxy's rules.
    pub(super) endpoint: Option<(std::net::SocketAddr, Name)>,
    pub(super) icmp: Option<(u8, u8)>,
    /// The sender of a packet to the VIP itself: a client.
    pub(super) client: Option<IpAddr>,
    pub(super) src_mac: Option<Mac>,
    /// The MAC the sender addressed the frame to: its view of who holds the VIP.
    pub(super) dst_mac: Option<Mac>,
}

#[derive(Clone, Debug)]
pub(super) struct OwnerChange {
    pub(super) t: f64,
    pub(super) old_mac: Option<Mac>,
    pub(super) old_netns: Option<u32>,
    pub(super) new_mac: Mac,
    pub(super) new_netns: Option<u32>,
    pub(super) garps: u64,
}

#[derive(Debug, Default)]
pub(super) struct VipState {
    pub(super) timeline: Timeline,
    pub(super) samples: Vec<Sample>,
    pub(super) samples_dropped: u64,
    pub(super) changes: Vec<OwnerChange>,
    /// (time, new MAC) of client neighbour updates for the VIP.
    pub(super) neigh: Vec<(f64, Mac)>,
    pub(super) flapping: bool,
    pub(super) split_brain: bool,
    pub(super) split_brain_at: f64,
    /// MACs of hosts seen in the VIP's ARP/NDP packets (a client's, asking for the VIP).
    pub(super) macs: BTreeMap<IpAddr, Mac>,
    /// Service ports seen on the VIP's records.
    pub(super) services: BTreeSet<Name>,
    /// Endpoint changes of the VIP's Services (bounded).
    pub(super) endpoint_changes: Vec<(f64, Box<EndpointRec>)>,
    /// Signs that a host that held the VIP left the LAN.
    pub(super) link_signs: LinkSigns,
}

/// Hosts' MACs kept per VIP.
const MAX_MACS: usize = 1024;

impl VipState {
    pub(super) fn add_service(&mut self, s: &Name) {
        if self.services.len() < super::endpoints::MAX_SERVICES || self.services.contains(s) {
            self.services.insert(s.clone());
        }
    }

    pub(super) fn add_drop(&mut self, t: f64, d: &DropRec, vip: IpAddr) {
        // Benign frees and local noise are no part of any per-VIP view.
        if !d.is_loss() {
            self.timeline.bucket(t as u64).not_loss += 1;
            // A frame for another host: the bridge flooded it, so it no longer knows where
            // that MAC is.
            if &*d.reason == "OTHERHOST" {
                if let Some(m) = d.dst_mac.filter(|m| !m.is_zero() && m.0[0] & 1 == 0) {
                    self.link_signs.flooded(t, m);
                }
            }
            return;
        }
        let reason: Name = if d.reason.is_empty() {
            "UNKNOWN".into()
        } else {
            d.reason.clone()
        };
        let b = self.timeline.bucket(t as u64);
        b.drops += 1;
        *b.drops_by_reason.entry(reason.to_string()).or_default() += 1;
        *b.drops_by_netns.entry(u64::from(d.netns)).or_default() += 1;
        if let Some(e) = &d.event {
            *b.conntrack.entry(e.to_string()).or_default() += 1;
        }
        if self.samples.len() >= MAX_SAMPLES {
            self.samples_dropped += 1;
            return;
        }
        self.samples.push(Sample {
            t,
            netns: u64::from(d.netns),
            reason,
            ct_event: d.event,
            function: d.function().to_owned(),
            behind_dnat: d.behind_dnat(vip),
            toward_client: d.toward_client(),
            dst: d.dst.map(|a| a.to_string()).unwrap_or_default(),
            endpoint: d.endpoint.as_ref().map(|e| (e.addr, e.service.clone())),
            icmp: d.icmp_type.map(|ty| (ty, d.icmp_code.unwrap_or(0))),
            client: d.src.filter(|_| d.dst == Some(vip)),
            src_mac: d.src_mac,
            dst_mac: d.dst_mac,
        });
    }

    /// Drops the kernel counted that no record showed (over the sample limit, or lost).
    pub(super) fn add_counted(
        &mut self,
        t: f64,
        reason: &Name,
        event: Option<ConntrackEvent>,
        loss: bool,
        n: u64,
    ) {
        let b = self.timeline.bucket(t as u64);
        if !loss {
            b.not_loss += n;
            return;
        }
        b.drops += n;
        *b.drops_by_reason.entry(reason.to_string()).or_default() += n;
        if let Some(e) = event {
            *b.conntrack.entry(e.to_string()).or_default() += n;
        }
    }

    pub(super) fn add_arp(&mut self, t: f64, a: &ArpRec) {
        if let Some(ip) = a.sender_ip {
            if self.macs.len() < MAX_MACS && !a.sender_mac.is_zero() {
                self.macs.insert(ip, a.sender_mac);
            }
        }
        if a.announced().is_none() {
            return;
        }
        let b = self.timeline.bucket(t as u64);
        b.announcements += 1;
        if a.is_garp() {
            b.garps += 1;
            if let Some(c) = self.changes.last_mut() {
                if a.sender_mac == c.new_mac {
                    c.garps += 1;
                }
            }
        }
    }

    pub(super) fn add_owner(&mut self, t: f64, o: &VipOwnerRec) {
        // First sighting of an owner (no old MAC) is not a change, unless clients were seen
        // sending the VIP's traffic to another MAC before: then that MAC held it. The
        // announcement that made a change follows this record and counts then.
        let (old_mac, old_netns) = match o.old_mac {
            Some(m) => (Some(m), o.old_netns),
            None => self.held_before(t, o.new_mac),
        };
        if old_mac.is_some() {
            self.timeline.bucket(t as u64).owner_changes += 1;
        }
        self.changes.push(OwnerChange {
            t,
            old_mac,
            old_netns: old_mac.and(old_netns),
            new_mac: o.new_mac,
            new_netns: o.new_netns,
            garps: 0,
        });
        if self.changes.len() > MAX_CHANGES {
            self.changes.remove(0);
        }
    }
}

impl VipState {
    /// Before the first owner is known: the MAC (and namespace) the last dropped frame for
    /// the VIP itself was addressed to, if not `new`.
    fn held_before(&self, t: f64, new: Mac) -> (Option<Mac>, Option<u32>) {
        if !self.changes.is_empty() {
            return (None, None);
        }
        self.samples
            .iter()
            .rev()
            .filter(|s| s.t <= t && s.client.is_some() && !s.behind_dnat)
            .find_map(|s| {
                let m = s
                    .dst_mac
                    .filter(|m| *m != new && !m.is_zero() && m.0[0] & 1 == 0)?;
                Some((Some(m), u32::try_from(s.netns).ok()))
            })
            .unwrap_or((None, None))
    }
}
