//! Stale ARP/neighbour caches, with or without a move seen.
//!
//! A dropped frame's destination MAC is the client's view of who holds the VIP: packets for the
//! VIP arriving at a MAC that does not (or no longer) hold it prove that this client's cache is
//! stale. Without the MAC (older records), the namespace of the drop stands in for it: a node
//! that held the VIP (announced or configured), dropping its traffic after a move or as "not my
//! address". Reported per client, with the window each one lost traffic in.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{
    diagnosis::{burst_end, netns, reasons, span, Cause, Counts, Evidence, Finding},
    OwnerChange, Sample, VipState,
};
use crate::event::values::{Mac, Time};

/// Fields are in name order: the JSON reads the same as it always has.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StaleArpEvidence {
    pub client_updates_seen: usize,
    /// Per client that sent to the old owner: its window of loss.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<ClientWindow>,
    pub drops_at_old_owner: usize,
    pub garps_sent: u64,
    pub moved_at: Option<Time>,
    pub new_mac: Option<String>,
    pub old_mac: Option<String>,
    pub old_owner_netns: Counts,
    pub reasons: Counts,
    pub window_s: f64,
}

/// One client still using a MAC that no longer holds the VIP.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClientWindow {
    pub client: String,
    /// The client's own MAC, when a frame or an ARP packet showed it.
    pub client_mac: Option<String>,
    pub drops: usize,
    pub first_seen: Time,
    pub last_seen: Time,
    /// The MAC the client kept sending the VIP's traffic to.
    pub stale_mac: Option<String>,
    pub window_s: f64,
}

/// Gap between drops that ends a client's window: longer than TCP's first retransmission.
const BURST_GAP: f64 = 3.0;
/// Clients listed per finding.
const MAX_CLIENTS: usize = 32;

/// The owner at time `t`: the last change up to then.
fn owner_at(st: &VipState, t: f64) -> Option<&OwnerChange> {
    st.changes.iter().rev().find(|c| c.t <= t)
}

/// A unicast MAC: what a client addresses a VIP's packets to.
fn unicast(m: Option<Mac>) -> Option<Mac> {
    m.filter(|m| !m.is_zero() && m.0[0] & 1 == 0)
}

/// Whether a drop of the VIP's own traffic proves the sender's cache stale.
fn is_stale(st: &VipState, moves: &[&OwnerChange], s: &Sample) -> bool {
    let not_mine = &*s.reason == "IP_INADDRERRORS";
    if let Some(mac) = unicast(s.dst_mac) {
        // Sent to a MAC that does not hold the VIP, or that holds it only until a move seen
        // later (a move without a gratuitous ARP shows only when the new owner answers).
        let later_elsewhere = st.changes.iter().any(|c| c.t > s.t && c.new_mac != mac);
        return not_mine || later_elsewhere || owner_at(st, s.t).is_some_and(|o| mac != o.new_mac);
    }
    let Some(o) = owner_at(st, s.t) else {
        return false;
    };
    let moved_on = st
        .changes
        .iter()
        .any(|c| c.t > o.t && c.new_mac != o.new_mac);
    let at_owner = o.new_netns.map(u64::from) == Some(s.netns);
    let at_old = moves
        .iter()
        .any(|c| c.t <= s.t && c.old_netns.map(u64::from) == Some(s.netns));
    (at_owner && (moved_on || not_mine)) || at_old
}

/// The MAC a stale drop was sent to: the frame's, else the owner's whose namespace dropped it.
fn stale_mac(st: &VipState, s: &Sample) -> Option<Mac> {
    unicast(s.dst_mac).or_else(|| {
        st.changes
            .iter()
            .rev()
            .find(|c| c.t <= s.t && c.new_netns.map(u64::from) == Some(s.netns))
            .map(|c| c.new_mac)
            .or_else(|| {
                st.changes
                    .iter()
                    .find(|c| c.old_netns.map(u64::from) == Some(s.netns))
                    .and_then(|c| c.old_mac)
            })
    })
}

/// Per client: its drops at the old owner, first to the end of their first burst.
fn clients(st: &VipState, stale: &[&Sample]) -> Vec<ClientWindow> {
    let mut by_client: BTreeMap<String, Vec<&Sample>> = BTreeMap::new();
    for s in stale {
        let key = s.client.map_or_else(|| "?".to_owned(), |c| c.to_string());
        by_client.entry(key).or_default().push(s);
    }
    let mut out: Vec<ClientWindow> = by_client
        .into_iter()
        .map(|(client, samples)| {
            let (first, last) = span(&samples);
            let end = burst_end(&samples, first, BURST_GAP);
            let mac = samples
                .iter()
                .find_map(|s| unicast(s.src_mac))
                .or_else(|| samples[0].client.and_then(|c| st.macs.get(&c).copied()));
            ClientWindow {
                client,
                client_mac: mac.map(|m| m.to_string()),
                drops: samples.len(),
                first_seen: Time::from_secs_f64(first),
                last_seen: Time::from_secs_f64(last),
                stale_mac: samples
                    .iter()
                    .find_map(|s| stale_mac(st, s))
                    .map(|m| m.to_string()),
                window_s: ((end - first) * 10.0).round() / 10.0,
            }
        })
        .collect();
    out.sort_by(|a, b| b.drops.cmp(&a.drops).then(a.client.cmp(&b.client)));
    out.truncate(MAX_CLIENTS);
    out
}

/// Stale ARP: the VIP's traffic reaching a MAC that does not hold it (or, without the MAC, a
/// node that held it, dropping after a move or as "not my address").
pub(super) fn stale_arp(vip: &str, st: &VipState, all: &[&Sample]) -> Option<Finding> {
    let moves: Vec<&OwnerChange> = st.changes.iter().filter(|c| c.old_mac.is_some()).collect();
    let stale: Vec<&Sample> = all
        .iter()
        .copied()
        .filter(|s| s.ct_event.is_none() && !s.behind_dnat && s.dst == vip)
        .filter(|s| is_stale(st, &moves, s))
        .collect();
    if stale.is_empty() {
        return None;
    }
    let (first, last) = span(&stale);
    // The move these drops follow, or the one that ended them.
    let change = moves
        .iter()
        .rev()
        .find(|c| c.t <= first)
        .or_else(|| moves.iter().find(|c| c.t >= first))
        .copied();
    // Until the move, or until the end of the first burst of drops at the old owner when a
    // client still used its MAC after the move was seen (an IPv6 owner answers others'
    // solicitations before the client asks).
    let window = match change {
        Some(c) if c.t > first => c.t.max(burst_end(&stale, first, BURST_GAP)) - first,
        Some(c) => last - c.t,
        None => last - first,
    };
    let garps = change.map_or(0, |c| c.garps);
    let updated = change.map_or(0, |c| {
        st.neigh
            .iter()
            .filter(|(t, mac)| *t >= c.t && *mac == c.new_mac)
            .count()
    });
    let confidence = if garps == 0 || window > 3.0 {
        0.9
    } else {
        0.45
    };
    let evidence = Evidence::StaleArp(StaleArpEvidence {
        client_updates_seen: updated,
        clients: clients(st, &stale),
        drops_at_old_owner: stale.len(),
        garps_sent: garps,
        moved_at: change.map(|c| Time::from_secs_f64(c.t)),
        new_mac: change.map(|c| c.new_mac.to_string()),
        old_mac: change
            .and_then(|c| c.old_mac)
            .or_else(|| stale.iter().find_map(|s| stale_mac(st, s)))
            .map(|m| m.to_string()),
        old_owner_netns: netns(&stale),
        reasons: reasons(&stale),
        window_s: (window * 10.0).round() / 10.0,
    });
    Some(Finding::new(
        Cause::StaleArp,
        confidence,
        (first, last),
        evidence,
        "clients kept the old owner's MAC after the VIP moved: make the speaker send gratuitous ARP / unsolicited NA on failover, lower the clients' neighbour timers (base_reachable_time_ms, gc_stale_time), or let the old node forward (externalTrafficPolicy: Cluster)",
    ))
}

#[cfg(test)]
mod tests {
    use crate::{
        analysis::{
            fixtures::{drop_at, owner},
            Analyzer,
        },
        event::{values::Mac, Record},
    };

    fn drop_rec(s: u64, vip: &str, netns: u32, reason: &str, dst: &str) -> Record {
        drop_at(s, vip, netns, reason, dst, "ip_error+0x1")
    }

    #[test]
    fn started_mid_incident_the_frames_name_the_stale_mac_per_client() {
        // No owner known: a client sends A's traffic to MAC 0a (dropped as not that host's
        // address) from 2 s to 11 s; at 12 s 0b answers. That is a move, and stale ARP.
        let vip = "10.200.0.100";
        let mut a = Analyzer::new([vip.to_owned()]);
        for s in 2..=11 {
            let Record::Drop(mut d) = drop_rec(s, vip, 11, "IP_INADDRERRORS", vip) else {
                unreachable!()
            };
            d.src = "10.200.0.1".parse().ok();
            d.src_mac = Some(Mac([2, 0, 0, 0, 0, 1]));
            d.dst_mac = Some(Mac([0xaa, 0, 0, 0, 0, 0xa]));
            a.add(&Record::Drop(d));
        }
        a.add(&owner(12, vip, None, (0xb, 12)));
        assert_eq!(
            a.changes(vip).len(),
            1,
            "the first owner after drops elsewhere is a move"
        );
        let d = a.diagnose();
        let f = &d[0].findings[0];
        let crate::analysis::diagnosis::Evidence::StaleArp(e) = &f.evidence else {
            panic!("{f:?}")
        };
        assert_eq!(e.old_mac.as_deref(), Some("aa:00:00:00:00:0a"));
        assert_eq!(e.clients.len(), 1);
        let c = &e.clients[0];
        assert_eq!(c.client, "10.200.0.1");
        assert_eq!(c.client_mac.as_deref(), Some("02:00:00:00:00:01"));
        assert_eq!((c.drops, c.window_s), (10, 9.0));
    }

    #[test]
    fn benign_frees_are_in_no_view() {
        let vip = "10.200.0.101";
        let mut a = Analyzer::new([vip.to_owned()]);
        for s in 0..10 {
            let Record::Drop(mut d) = drop_rec(s, vip, 11, "NOT_SPECIFIED", vip) else {
                unreachable!()
            };
            d.location = "tcp_rcv_state_process+0x1d2".into();
            a.add(&Record::Drop(d));
        }
        let total = a.timeline(vip).unwrap().total();
        assert_eq!((total.drops, total.not_loss), (0, 10));
        assert!(a.diagnose()[0].findings.is_empty());
    }
}
