//! Who announces each VIP, and since when: ownership changes, gratuitous ARPs per change,
//! leader flapping and split brain, from the ARP/NDP announcements hosts transmit.

use std::{
    collections::{BTreeMap, VecDeque},
    net::IpAddr,
    time::Duration,
};

use serde::Serialize;

use crate::{
    attribution::VipSet,
    decode::{ArpEvent, Mac},
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Owner {
    pub mac: Mac,
    pub netns: u32,
    pub ifname: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Change {
    /// CLOCK_BOOTTIME nanoseconds.
    #[serde(skip)]
    pub at_ns: u64,
    pub from: Option<Owner>,
    pub to: Owner,
    /// Gratuitous announcements the new owner sent while it held the VIP.
    pub garps: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FindingKind {
    Flapping,
    SplitBrain,
}

#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    pub finding: FindingKind,
    pub vip: IpAddr,
    #[serde(skip)]
    pub at_ns: u64,
    /// The MACs involved.
    pub macs: Vec<Mac>,
    pub changes: usize,
    pub detail: String,
}

/// What an announcement changed.
#[derive(Clone, Debug)]
pub enum Update {
    Discovered { vip: IpAddr, owner: Owner },
    Changed { vip: IpAddr, change: Change },
    Found(Finding),
}

#[derive(Debug, Default)]
struct VipState {
    owner: Option<Owner>,
    changes: Vec<Change>,
    /// Times of recent changes, for flapping.
    recent: VecDeque<u64>,
    /// Until when findings of each kind are not repeated.
    quiet_until: BTreeMap<&'static str, u64>,
}

/// Ownership of every VIP seen announced.
#[derive(Debug, Default)]
pub struct Ownership {
    cfg: OwnershipConfig,
    discover: bool,
    vips: BTreeMap<IpAddr, VipState>,
    pub findings: Vec<Finding>,
    pub discovered: Vec<IpAddr>,
}

/// Bound on the changes kept per VIP (older ones are summarized by their count).
const MAX_CHANGES_KEPT: usize = 256;

impl Ownership {
    pub fn new(cfg: OwnershipConfig, discover: bool) -> Self {
        Self {
            cfg,
            discover,
            ..Self::default()
        }
    }

    /// Looks at one ARP/NDP event; only a host's own transmitted announcements count (a
    /// bridge's forwarded copies and received ones do not, so each send counts once).
    pub fn observe(&mut self, a: &ArpEvent, vips: &mut VipSet) -> Vec<Update> {
        let mut out = Vec::new();
        if !a.tx || a.bridged {
            return out;
        }
        let Some(ip) = a.announced() else {
            return out;
        };
        let owner = Owner {
            mac: a.sender_mac,
            netns: a.netns,
            ifname: a.ifname.clone(),
        };
        if vips.of_addr(ip).is_none() {
            if !(self.discover && a.gratuitous) {
                return out;
            }
            vips.insert(ip);
            self.discovered.push(ip);
            out.push(Update::Discovered {
                vip: ip,
                owner: owner.clone(),
            });
        }
        let cfg = self.cfg;
        let st = self.vips.entry(ip).or_default();
        let same = st.owner.as_ref().is_some_and(|o| o.mac == owner.mac);
        if same {
            if a.gratuitous {
                if let Some(c) = st.changes.last_mut() {
                    c.garps += 1;
                }
            }
            return out;
        }
        let previous = st.owner.replace(owner.clone());
        let change = Change {
            at_ns: a.ts_ns,
            from: previous.clone(),
            to: owner.clone(),
            garps: u32::from(a.gratuitous),
        };
        // Split brain: back to the owner before last, within a short window.
        let back_and_forth = st.changes.last().is_some_and(|last| {
            a.ts_ns.saturating_sub(last.at_ns) <= as_ns(cfg.split_window)
                && last.from.as_ref().is_some_and(|f| f.mac == owner.mac)
        });
        if previous.is_some() {
            st.recent.push_back(a.ts_ns);
            while st
                .recent
                .front()
                .is_some_and(|t| a.ts_ns.saturating_sub(*t) > as_ns(cfg.flap_window))
            {
                st.recent.pop_front();
            }
        }
        if back_and_forth && quiet(st, "split", a.ts_ns) {
            let macs = vec![previous.as_ref().map_or(owner.mac, |p| p.mac), owner.mac];
            // Alternations of a split brain are not also counted as flapping.
            st.quiet_until
                .insert("flap", a.ts_ns.saturating_add(as_ns(cfg.flap_window)));
            st.quiet_until
                .insert("split", a.ts_ns.saturating_add(as_ns(cfg.flap_window)));
            out.push(Update::Found(Finding {
                finding: FindingKind::SplitBrain,
                vip: ip,
                at_ns: a.ts_ns,
                macs,
                changes: st.recent.len(),
                detail: format!(
                    "two hosts announce {ip} within {:?}: {} and {}",
                    cfg.split_window,
                    previous.as_ref().map_or(owner.mac, |p| p.mac),
                    owner.mac
                ),
            }));
        } else if st.recent.len() >= cfg.flap_changes && quiet(st, "flap", a.ts_ns) {
            st.quiet_until
                .insert("flap", a.ts_ns.saturating_add(as_ns(cfg.flap_window)));
            let mut macs: Vec<Mac> = st.changes.iter().map(|c| c.to.mac).collect();
            macs.push(owner.mac);
            macs.sort();
            macs.dedup();
            out.push(Update::Found(Finding {
                finding: FindingKind::Flapping,
                vip: ip,
                at_ns: a.ts_ns,
                macs,
                changes: st.recent.len(),
                detail: format!(
                    "{} ownership changes within {:?}",
                    st.recent.len(),
                    cfg.flap_window
                ),
            }));
        }
        if st.changes.len() >= MAX_CHANGES_KEPT {
            st.changes.remove(0);
        }
        st.changes.push(change.clone());
        out.push(Update::Changed { vip: ip, change });
        for u in &out {
            if let Update::Found(f) = u {
                self.findings.push(f.clone());
            }
        }
        out
    }

    /// Current owner and changes per VIP.
    pub fn owners(&self) -> impl Iterator<Item = (IpAddr, Option<&Owner>, &[Change])> {
        self.vips
            .iter()
            .map(|(ip, st)| (*ip, st.owner.as_ref(), st.changes.as_slice()))
    }
}

fn quiet(st: &VipState, key: &str, now: u64) -> bool {
    st.quiet_until.get(key).is_none_or(|until| now >= *until)
}

fn as_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::ArpOp;

    fn garp(t_s: u64, mac: u8, ip: &str) -> ArpEvent {
        ArpEvent {
            ts_ns: t_s * 1_000_000_000,
            cpu: 0,
            probe: Err(0),
            netns: u32::from(mac),
            ifindex: 2,
            ifname: None,
            op: ArpOp::Request,
            tx: true,
            bridged: false,
            sender_ip: ip.parse().ok(),
            sender_mac: Mac([2, 0, 0, 0, 0, mac]),
            target_ip: ip.parse().ok(),
            target_mac: Mac::default(),
            eth_dst: Mac([0xff; 6]),
            ndp_flags: None,
            gratuitous: true,
        }
    }

    fn kinds(u: &[Update]) -> Vec<&'static str> {
        u.iter()
            .map(|u| match u {
                Update::Discovered { .. } => "discovered",
                Update::Changed { .. } => "changed",
                Update::Found(f) if f.finding == FindingKind::Flapping => "flapping",
                Update::Found(_) => "split-brain",
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
        for (i, mac) in [0xa, 0xb, 0xa, 0xb, 0xa].into_iter().enumerate() {
            let mut a = garp(0, mac, vip);
            a.ts_ns = u64::MAX - 10 + i as u64;
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
}
