//! Who announces each VIP, and since when: ownership changes, gratuitous ARPs per change,
//! leader flapping and split brain, from the ARP/NDP announcements hosts transmit.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::IpAddr,
    time::Duration,
};

use crate::{
    event::{
        record::{ArpRec, FindingKind, FindingRec, OwnerSource, VipDiscoveredRec, VipOwnerRec},
        values::{Mac, Name, Time},
        Record,
    },
    pipeline::attribution::VipSet,
};

#[derive(Clone, Copy, Debug)]
pub struct OwnershipConfig {
    /// This many ownership changes within `flap_window` make a flapping finding.
    pub flap_changes: usize,
    pub flap_window: Duration,
    /// Ownership going A → B → A within this window is two speakers announcing at once.
    pub split_window: Duration,
}

impl Default for OwnershipConfig {
    fn default() -> Self {
        Self {
            flap_changes: 3,
            flap_window: Duration::from_secs(60),
            split_window: Duration::from_secs(2),
        }
    }
}

/// The host announcing a VIP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub mac: Mac,
    /// 0 when not known (an owner learned from another host's neighbour table).
    pub netns: u32,
    pub ifname: Option<Name>,
}

impl Owner {
    pub fn netns(&self) -> Option<u32> {
        (self.netns != 0).then_some(self.netns)
    }
}

fn discovered(ip: IpAddr, owner: &Owner, note: &str) -> Record {
    Record::VipDiscovered(VipDiscoveredRec {
        node: None,
        vip: ip,
        mac: owner.mac,
        netns: owner.netns,
        ifname: owner.ifname.clone(),
        note: note.to_owned(),
    })
}

#[derive(Clone, Debug)]
pub struct Change {
    pub at: Time,
    pub from: Option<Owner>,
    pub to: Owner,
    /// Gratuitous announcements the new owner sent while it held the VIP.
    pub garps: u32,
}

#[derive(Debug, Default)]
struct VipState {
    owner: Option<Owner>,
    changes: Vec<Change>,
    /// Times of recent changes, for flapping.
    recent: VecDeque<Time>,
    /// Until when findings of each kind are not repeated.
    quiet_until: BTreeMap<FindingKind, Time>,
}

/// Ownership of every VIP seen announced.
#[derive(Debug, Default)]
pub struct Ownership {
    cfg: OwnershipConfig,
    discover: bool,
    vips: BTreeMap<IpAddr, VipState>,
    pub findings: Vec<FindingRec>,
    pub discovered: Vec<IpAddr>,
    /// `--discover-vips`: who first answered for an address that is not a VIP (yet).
    answered: HashMap<IpAddr, Owner>,
}

/// Bound on the changes kept per VIP (older ones are summarized by their count).
const MAX_CHANGES_KEPT: usize = 256;
/// Bound on the addresses remembered for discovery by a second answer.
const MAX_ANSWERED: usize = 4096;

impl Ownership {
    pub fn new(cfg: OwnershipConfig, discover: bool) -> Self {
        Self {
            cfg,
            discover,
            ..Self::default()
        }
    }

    /// Looks at one ARP/NDP record; only a host's own transmitted announcements count (a
    /// bridge's forwarded copies and received ones do not, so each send counts once). Returns
    /// the records of what changed: discoveries, ownership changes, findings.
    pub fn observe(&mut self, a: &ArpRec, vips: &mut VipSet) -> Vec<Record> {
        let mut out = Vec::new();
        let Some(ip) = a.announced() else {
            return out;
        };
        let owner = Owner {
            mac: a.sender_mac,
            netns: a.netns,
            ifname: a.ifname.clone(),
        };
        if vips.of_addr(ip).is_none() {
            let Some(note) = self.discovers(ip, &owner, a.is_garp()) else {
                return out;
            };
            vips.insert(ip);
            self.discovered.push(ip);
            out.push(discovered(ip, &owner, note));
        }
        let now = a.time.unwrap_or_default();
        out.extend(self.claim(ip, owner, a.is_garp(), now, OwnerSource::Announced));
        out
    }

    /// Whether `--discover-vips` learns `ip` from this announcement, and why: a gratuitous
    /// one, or an address answered for by a second host (a floating address: node and client
    /// addresses never move). The first host is then its owner before the move.
    fn discovers(&mut self, ip: IpAddr, owner: &Owner, garp: bool) -> Option<&'static str> {
        if !self.discover {
            return None;
        }
        if garp {
            return Some("learned from a gratuitous announcement (--discover-vips)");
        }
        match self.answered.get(&ip) {
            Some(first) if first.mac != owner.mac => {
                let first = first.clone();
                self.vips.entry(ip).or_default().owner = Some(first);
                Some("answered for by a second host: a floating address (--discover-vips)")
            }
            Some(_) => None,
            None => {
                if self.answered.len() < MAX_ANSWERED {
                    self.answered.insert(ip, owner.clone());
                }
                None
            }
        }
    }

    /// `owner` holds `ip` from `now` on: a change when it is not the current owner (with the
    /// finding it makes, if any); else one more gratuitous announcement of the current one.
    pub fn claim(
        &mut self,
        ip: IpAddr,
        owner: Owner,
        garp: bool,
        now: Time,
        source: OwnerSource,
    ) -> Vec<Record> {
        let mut out = Vec::new();
        let cfg = self.cfg;
        let st = self.vips.entry(ip).or_default();
        if st.owner.as_ref().is_some_and(|o| o.mac == owner.mac) {
            if garp {
                if let Some(c) = st.changes.last_mut() {
                    c.garps += 1;
                }
            }
            return out;
        }
        let previous = st.owner.replace(owner.clone());
        let change = Change {
            at: now,
            from: previous.clone(),
            to: owner,
            garps: u32::from(garp),
        };
        if let Some(f) = st.finding(&cfg, ip, &change) {
            self.findings.push(f.clone());
            out.push(Record::Finding(f));
        }
        if st.changes.len() >= MAX_CHANGES_KEPT {
            st.changes.remove(0);
        }
        out.push(Record::VipOwner(Box::new(VipOwnerRec {
            node: None,
            time: Some(now),
            vip: ip,
            old_mac: change.from.as_ref().map(|o| o.mac),
            old_netns: change.from.as_ref().and_then(|o| o.netns()),
            new_mac: change.to.mac,
            new_netns: change.to.netns(),
            ifname: change.to.ifname.clone(),
            source: Some(source),
            service: None,
        })));
        st.changes.push(change);
        out
    }

    /// A finding made outside the announcements (a VIP configured on two hosts at once).
    /// The same VIP's split brain seen again in its announcements is not a second finding.
    pub fn found(&mut self, f: FindingRec) -> Record {
        let now = f.time.unwrap_or_else(Time::now);
        let window = self.cfg.flap_window;
        self.vips
            .entry(f.vip)
            .or_default()
            .hush(f.finding, now, window);
        self.findings.push(f.clone());
        Record::Finding(f)
    }

    /// Learns a VIP found configured (`--discover-vips`).
    pub fn discover_configured(
        &mut self,
        ip: IpAddr,
        owner: &Owner,
        vips: &mut VipSet,
    ) -> Option<Record> {
        if !self.discover || vips.of_addr(ip).is_some() {
            return None;
        }
        vips.insert(ip);
        self.discovered.push(ip);
        Some(discovered(
            ip,
            owner,
            "configured on an interface next to an address of its subnet (--discover-vips)",
        ))
    }

    /// Whether VIPs are learned (`--discover-vips`).
    pub fn discovers_vips(&self) -> bool {
        self.discover
    }

    /// Current owner and changes per VIP.
    pub fn owners(&self) -> impl Iterator<Item = (IpAddr, Option<&Owner>, &[Change])> {
        self.vips
            .iter()
            .map(|(ip, st)| (*ip, st.owner.as_ref(), st.changes.as_slice()))
    }
}

impl VipState {
    /// The finding a change makes, if any: back to the owner before last within the split
    /// window is two speakers at once; enough changes within the flap window is flapping.
    fn finding(&mut self, cfg: &OwnershipConfig, ip: IpAddr, c: &Change) -> Option<FindingRec> {
        let now = c.at;
        let back_and_forth = self.changes.last().is_some_and(|last| {
            now.since(last.at) <= cfg.split_window
                && last.from.as_ref().is_some_and(|f| f.mac == c.to.mac)
        });
        if c.from.is_some() {
            self.recent.push_back(now);
            while self
                .recent
                .front()
                .is_some_and(|t| now.since(*t) > cfg.flap_window)
            {
                self.recent.pop_front();
            }
        }
        let from_mac = c.from.as_ref().map_or(c.to.mac, |p| p.mac);
        if back_and_forth && !self.quiet(FindingKind::SplitBrain, now) {
            // A split brain already reported (from the announcements or the configured
            // addresses): its alternations are neither a second finding nor flapping.
            self.hush(FindingKind::Flapping, now, cfg.flap_window);
            return None;
        }
        let (finding, macs, detail) = if back_and_forth {
            // Alternations of a split brain are not also counted as flapping.
            self.hush(FindingKind::Flapping, now, cfg.flap_window);
            self.hush(FindingKind::SplitBrain, now, cfg.flap_window);
            let detail = format!(
                "two hosts announce {ip} within {:?}: {from_mac} and {}",
                cfg.split_window, c.to.mac
            );
            (FindingKind::SplitBrain, vec![from_mac, c.to.mac], detail)
        } else if self.recent.len() >= cfg.flap_changes && self.quiet(FindingKind::Flapping, now) {
            self.hush(FindingKind::Flapping, now, cfg.flap_window);
            let mut macs: Vec<Mac> = self.changes.iter().map(|c| c.to.mac).collect();
            macs.push(c.to.mac);
            macs.sort();
            macs.dedup();
            let detail = format!(
                "{} ownership changes within {:?}",
                self.recent.len(),
                cfg.flap_window
            );
            (FindingKind::Flapping, macs, detail)
        } else {
            return None;
        };
        Some(FindingRec {
            node: None,
            time: Some(now),
            finding,
            vip: ip,
            macs,
            changes: self.recent.len(),
            detail,
        })
    }

    fn quiet(&self, kind: FindingKind, now: Time) -> bool {
        self.quiet_until
            .get(&kind)
            .is_none_or(|until| now >= *until)
    }

    fn hush(&mut self, kind: FindingKind, now: Time, d: Duration) {
        self.quiet_until.insert(kind, now.plus(d));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::values::{ArpOp, Direction};

    fn garp(t_s: u64, mac: u8, ip: &str) -> ArpRec {
        ArpRec {
            time: Some(Time::from_secs_f64(t_s as f64)),
            op: ArpOp::Request,
            direction: Direction::Tx,
            gratuitous: true,
            sender_ip: ip.parse().ok(),
            sender_mac: Mac([2, 0, 0, 0, 0, mac]),
            target_ip: ip.parse().ok(),
            netns: u32::from(mac),
            ifindex: 2,
            ..ArpRec::default()
        }
    }

    fn kinds(u: &[Record]) -> Vec<&'static str> {
        u.iter()
            .map(|u| match u {
                Record::VipDiscovered(_) => "discovered",
                Record::VipOwner(_) => "changed",
                Record::Finding(f) if f.finding == FindingKind::Flapping => "flapping",
                Record::Finding(_) => "split-brain",
                _ => "other",
            })
            .collect()
    }

    #[test]
    fn move_counts_garps_and_flapping_fires_once() {
        let vip = "10.200.0.100";
        let mut vips = VipSet::new(vec![vip.parse().unwrap()]);
        let mut o = Ownership::new(OwnershipConfig::default(), false);
        assert_eq!(
            kinds(&o.observe(&garp(0, 0xa, vip), &mut vips)),
            ["changed"]
        );
        assert!(o.observe(&garp(1, 0xa, vip), &mut vips).is_empty());
        // Five moves, 6 s apart: one flapping finding, at the third change.
        let mut all = Vec::new();
        for (i, mac) in [0xb, 0xa, 0xb, 0xa, 0xb].into_iter().enumerate() {
            let t = 10 + 6 * i as u64;
            all.extend(kinds(&o.observe(&garp(t, mac, vip), &mut vips)));
            o.observe(&garp(t + 1, mac, vip), &mut vips);
            o.observe(&garp(t + 2, mac, vip), &mut vips);
        }
        assert_eq!(all.iter().filter(|k| **k == "flapping").count(), 1);
        assert_eq!(all.iter().filter(|k| **k == "split-brain").count(), 0);
        let (_, owner, changes) = o.owners().next().unwrap();
        assert_eq!(owner.unwrap().mac, Mac([2, 0, 0, 0, 0, 0xb]));
        assert_eq!(changes.len(), 6);
        assert_eq!(changes[1].garps, 3, "three GARPs after the first move");
    }

    #[test]
    fn two_announcers_at_once_are_split_brain_not_flapping() {
        let vip = "10.200.0.100";
        let mut vips = VipSet::new(vec![vip.parse().unwrap()]);
        let mut o = Ownership::new(OwnershipConfig::default(), false);
        let mut all = Vec::new();
        for t in 0..3 {
            all.extend(kinds(&o.observe(&garp(t, 0xa, vip), &mut vips)));
            all.extend(kinds(&o.observe(&garp(t, 0xb, vip), &mut vips)));
        }
        assert_eq!(all.iter().filter(|k| **k == "split-brain").count(), 1);
        assert_eq!(all.iter().filter(|k| **k == "flapping").count(), 0);
    }

    #[test]
    fn timestamps_at_the_end_of_time_do_not_overflow_the_windows() {
        let vip = "10.200.0.100";
        let mut vips = VipSet::new(vec![vip.parse().unwrap()]);
        let mut o = Ownership::new(OwnershipConfig::default(), false);
        for mac in [0xa, 0xb, 0xa, 0xb, 0xa] {
            let mut a = garp(0, mac, vip);
            a.time = Some(Time::from_secs_f64(f64::MAX));
            o.observe(&a, &mut vips);
        }
        assert_eq!(o.findings.len(), 1);
        // Each owner keeps its own netns: two announcers are not merged into one.
        let (_, _, changes) = o.owners().next().unwrap();
        assert!(changes
            .iter()
            .all(|c| c.to.netns == u32::from(c.to.mac.0[5])));
    }

    #[test]
    fn discovery_learns_only_from_gratuitous_announcements() {
        let mut vips = VipSet::default();
        let mut o = Ownership::new(OwnershipConfig::default(), true);
        let mut reply = garp(0, 0xa, "10.200.0.7");
        reply.gratuitous = false;
        reply.op = ArpOp::Reply;
        assert!(o.observe(&reply, &mut vips).is_empty());
        let u = o.observe(&garp(1, 0xa, "10.200.0.100"), &mut vips);
        assert_eq!(kinds(&u), ["discovered", "changed"]);
        assert_eq!(vips.addrs(), ["10.200.0.100".parse::<IpAddr>().unwrap()]);
    }

    /// A speaker's announcement of `ip` from `mac` at `t` ms, in one of the shapes real
    /// speakers send.
    fn shaped(shape: &str, t_ms: u64, mac: u8, ip: &str) -> ArpRec {
        let mut a = garp(0, mac, ip);
        a.time = Some(Time::from_secs_f64(t_ms as f64 / 1000.0));
        match shape {
            "request" => {}
            // An ARP reply to the broadcast address with sender = target = the VIP.
            "reply" => a.op = ArpOp::Reply,
            // Unsolicited NA with override, from the interface's link-local address.
            "na" => {
                a.op = ArpOp::Advertisement;
                a.family = crate::event::values::Family::Ipv6;
                a.sender_ip = "fe80::1".parse().ok();
                a.ndp_flags = Some(crate::event::record::NdpFlags::from_wire(
                    crate::event::record::NDP_OVERRIDE,
                ));
            }
            _ => unreachable!(),
        }
        a
    }

    #[test]
    fn every_shape_of_announcement_counts_one_move_per_real_move() {
        for (shape, vip) in [
            ("request", "10.200.0.100"),
            ("reply", "10.200.0.100"),
            ("na", "fd00:200::100"),
        ] {
            let mut vips = VipSet::new(vec![vip.parse().unwrap()]);
            let mut o = Ownership::new(OwnershipConfig::default(), false);
            let mut recs = Vec::new();
            // A holds the VIP and re-announces it every 10 s, as MetalLB does.
            for t in (0..30_000).step_by(10_000) {
                recs.extend(o.observe(&shaped(shape, t, 0xa, vip), &mut vips));
            }
            // The move: B sends a burst of 3, 20 ms apart, again 2 s later, then re-announces
            // every 10 s for two minutes; a bridge's copies and the receivers' are not counted.
            for burst in [30_000, 32_000] {
                for i in 0..3 {
                    let mut a = shaped(shape, burst + 20 * i, 0xb, vip);
                    recs.extend(o.observe(&a, &mut vips));
                    a.bridged = true;
                    recs.extend(o.observe(&a, &mut vips));
                    a.bridged = false;
                    a.direction = Direction::Rx;
                    recs.extend(o.observe(&a, &mut vips));
                }
            }
            for t in (40_000..160_000).step_by(10_000) {
                recs.extend(o.observe(&shaped(shape, t, 0xb, vip), &mut vips));
            }
            let k = kinds(&recs);
            assert_eq!(
                k,
                ["changed", "changed"],
                "{shape}: first owner, then one move"
            );
            let (_, _, changes) = o.owners().next().unwrap();
            assert!(changes[1].from.is_some(), "{shape}");
            assert_eq!(
                changes[1].garps,
                6 + 12,
                "{shape}: every announcement of B counted once"
            );
        }
    }

    #[test]
    fn discovery_learns_an_address_answered_for_by_a_second_host() {
        let mut vips = VipSet::default();
        let mut o = Ownership::new(OwnershipConfig::default(), true);
        let mut reply = garp(0, 0xa, "10.200.0.100");
        reply.gratuitous = false;
        reply.op = ArpOp::Reply;
        assert!(
            o.observe(&reply, &mut vips).is_empty(),
            "one host: a node's own address"
        );
        assert!(o.observe(&reply, &mut vips).is_empty());
        reply.sender_mac = Mac([2, 0, 0, 0, 0, 0xb]);
        let u = o.observe(&reply, &mut vips);
        assert_eq!(kinds(&u), ["discovered", "changed"]);
        let (_, _, changes) = o.owners().next().unwrap();
        assert_eq!(
            changes[0].from.as_ref().unwrap().mac,
            Mac([2, 0, 0, 0, 0, 0xa])
        );
    }
}
