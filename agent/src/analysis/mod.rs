//! Per-VIP timelines and the diagnosis, from [`Record`]s: live ones from the pipeline, or those
//! of a recording. Both go through the same [`Analyzer::add`], so they agree.
//!
//! Memory is bounded: at most [`MAX_VIPS`] VIPs (more fold into `other`, counted), per VIP at
//! most [`FINE_BUCKETS`] one-second buckets (older ones roll up into minute buckets, at most
//! [`COARSE_BUCKETS`]) and [`MAX_SAMPLES`] drop samples for the diagnosis (beyond that only the
//! buckets count them). Bucket totals always equal the records they summarize.

pub mod diagnosis;
pub mod from_metrics;
pub mod merge;
pub mod nodes;
mod stale;
pub mod timeline;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

pub use diagnosis::{Cause, Finding, VipDiagnosis};
pub use timeline::{Bucket, Timeline, COARSE_BUCKETS, FINE_BUCKETS};

use crate::{
    event::{
        record::{ArpRec, DropRec, FindingKind, VipOwnerRec},
        values::{ConntrackEvent, Mac, Name},
        Record,
    },
    pipeline::{attribution::own_entry, Sink},
};

pub const MAX_VIPS: usize = 64;
pub const MAX_SAMPLES: usize = 20_000;
const MAX_CHANGES: usize = 256;
pub use crate::pipeline::attribution::OTHER;

/// One drop (or conntrack-caused drop) kept for the diagnosis.
#[derive(Clone, Debug)]
struct Sample {
    t: f64,
    netns: u64,
    reason: Name,
    ct_event: Option<ConntrackEvent>,
    function: String,
    /// The packet's own destination is not the VIP: it was translated (DNAT) to a backend.
    behind_dnat: bool,
    /// The packet travels back to the client that opened the flow (a reply, or an ICMP error
    /// about the flow): no backend is refusing anything.
    toward_client: bool,
    /// The packet's destination, as text (empty when it had none).
    dst: String,
    icmp: Option<(u8, u8)>,
    /// The sender of a packet to the VIP itself: a client.
    client: Option<IpAddr>,
    src_mac: Option<Mac>,
    /// The MAC the sender addressed the frame to: its view of who holds the VIP.
    dst_mac: Option<Mac>,
}

#[derive(Clone, Debug)]
struct OwnerChange {
    t: f64,
    old_mac: Option<Mac>,
    old_netns: Option<u32>,
    new_mac: Mac,
    new_netns: Option<u32>,
    garps: u64,
}

#[derive(Debug, Default)]
struct VipState {
    timeline: Timeline,
    samples: Vec<Sample>,
    samples_dropped: u64,
    changes: Vec<OwnerChange>,
    /// (time, new MAC) of client neighbour updates for the VIP.
    neigh: Vec<(f64, Mac)>,
    flapping: bool,
    split_brain: bool,
    split_brain_at: f64,
    /// MACs of hosts seen in the VIP's ARP/NDP packets (a client's, asking for the VIP).
    macs: BTreeMap<IpAddr, Mac>,
}

/// Hosts' MACs kept per VIP.
const MAX_MACS: usize = 1024;

#[derive(Debug, Default)]
pub struct Analyzer {
    vips: BTreeMap<String, VipState>,
    watched: BTreeSet<String>,
    pub first: Option<f64>,
    pub last: Option<f64>,
    /// Records attributed to VIPs past the bound.
    pub folded: u64,
    pub records: u64,
    /// Which node each namespace and MAC belongs to, when records say.
    pub nodes: nodes::NodeNames,
}

impl Analyzer {
    /// `watched`: VIPs that get an entry even when nothing happened to them.
    pub fn new(watched: impl IntoIterator<Item = String>) -> Self {
        Self {
            watched: watched.into_iter().collect(),
            ..Self::default()
        }
    }

    pub fn watch(&mut self, vip: &str) {
        self.watched.insert(vip.to_owned());
    }

    fn state(&mut self, vip: &str) -> &mut VipState {
        let key = if own_entry(self.vips.contains_key(vip), self.vips.len(), MAX_VIPS) {
            vip.to_owned()
        } else {
            self.folded += 1;
            OTHER.to_owned()
        };
        self.vips.entry(key).or_default()
    }

    /// Takes one record. Records without a VIP only move the observed time span.
    pub fn add(&mut self, r: &Record) {
        match r {
            Record::Header(h) => {
                for v in &h.vips {
                    self.watch(&v.to_string());
                }
                return;
            }
            Record::Summary(_) => return,
            _ => {}
        }
        self.records += 1;
        self.nodes.learn(r);
        let t = r.time().map(|t| t.as_secs_f64());
        if let Some(t) = t {
            self.first = Some(self.first.map_or(t, |f| f.min(t)));
            self.last = Some(self.last.map_or(t, |l| l.max(t)));
        }
        let Some(vip) = r.vip() else {
            return;
        };
        let t = t.unwrap_or(0.0);
        let st = self.state(&vip.to_string());
        match r {
            Record::Drop(d) | Record::Conntrack(d) => st.add_drop(t, d, vip),
            Record::Arp(a) => st.add_arp(t, a),
            Record::VipOwner(o) => st.add_owner(t, o),
            Record::Neigh(n) if n.old_mac != n.new_mac => {
                st.timeline.bucket(t as u64).neigh_changes += 1;
                st.neigh.push((t, n.new_mac));
            }
            Record::Finding(f) => match f.finding {
                FindingKind::Flapping => st.flapping = true,
                FindingKind::SplitBrain => {
                    if !st.split_brain {
                        st.split_brain_at = t;
                    }
                    st.split_brain = true;
                }
            },
            _ => {}
        }
    }

    pub fn timeline(&self, vip: &str) -> Option<&Timeline> {
        self.vips.get(vip).map(|s| &s.timeline)
    }

    /// Every VIP watched or seen, in order.
    pub fn vips(&self) -> Vec<String> {
        let mut all: BTreeSet<String> = self.watched.clone();
        all.extend(self.vips.keys().cloned());
        all.into_iter().collect()
    }

    /// The MAC that last announced the VIP.
    pub fn owner(&self, vip: &str) -> Option<Mac> {
        self.vips.get(vip)?.changes.last().map(|c| c.new_mac)
    }

    /// Ownership changes of a VIP: (time, old MAC, new MAC).
    pub fn changes(&self, vip: &str) -> Vec<(f64, Option<Mac>, Mac)> {
        self.vips
            .get(vip)
            .map(|s| {
                s.changes
                    .iter()
                    .filter(|c| c.old_mac.is_some())
                    .map(|c| (c.t, c.old_mac, c.new_mac))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// One entry per VIP, findings most likely first.
    pub fn diagnose(&self) -> Vec<VipDiagnosis> {
        self.vips()
            .into_iter()
            .map(|vip| {
                let findings = self
                    .vips
                    .get(&vip)
                    .map(|s| diagnosis::diagnose_vip(&vip, s, self.last.unwrap_or(0.0)))
                    .unwrap_or_default()
                    .into_iter()
                    .map(|f| self.nodes.name(f))
                    .collect();
                VipDiagnosis {
                    findings,
                    vip,
                    limits: Vec::new(),
                }
            })
            .collect()
    }
}

impl VipState {
    fn add_drop(&mut self, t: f64, d: &DropRec, vip: IpAddr) {
        // Benign frees and local noise are no part of any per-VIP view.
        if !d.is_loss() {
            self.timeline.bucket(t as u64).not_loss += 1;
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
            icmp: d.icmp_type.map(|ty| (ty, d.icmp_code.unwrap_or(0))),
            client: d.src.filter(|_| d.dst == Some(vip)),
            src_mac: d.src_mac,
            dst_mac: d.dst_mac,
        });
    }

    fn add_arp(&mut self, t: f64, a: &ArpRec) {
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

    fn add_owner(&mut self, t: f64, o: &VipOwnerRec) {
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

/// Feeds the analysis live (`top`, live `diagnose`).
impl Sink for Analyzer {
    fn record(&mut self, r: &Record) -> std::io::Result<()> {
        self.add(r);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{
        record::{read_ndjson, DropRec, VipOwnerRec},
        values::Time,
    };

    fn at(s: u64) -> Option<Time> {
        Some(Time::from_secs_f64(1_800_000_000.0 + s as f64))
    }

    fn drop_rec(s: u64, vip: &str, netns: u32, reason: &str, dst: &str) -> Record {
        Record::Drop(DropRec {
            time: at(s),
            reason: reason.into(),
            location: "nft_do_chain+0x1".into(),
            netns,
            dst: dst.parse().ok(),
            src: "10.200.0.2".parse().ok(),
            vip: vip.parse().ok(),
            ..DropRec::default()
        })
    }

    fn owner(s: u64, vip: &str, old: Option<(u8, u32)>, new: (u8, u32)) -> Record {
        Record::VipOwner(Box::new(VipOwnerRec {
            node: None,
            time: at(s),
            vip: vip.parse().unwrap(),
            old_mac: old.map(|(m, _)| Mac([0xaa, 0, 0, 0, 0, m])),
            old_netns: old.map(|(_, n)| n),
            new_mac: Mac([0xaa, 0, 0, 0, 0, new.0]),
            new_netns: Some(new.1),
            ifname: None,
            source: None,
        }))
    }

    #[test]
    fn buckets_total_the_records_even_when_rolled_up() {
        let mut a = Analyzer::new([]);
        let n = FINE_BUCKETS as u64 + 500;
        for s in 0..n {
            a.add(&drop_rec(s, "10.200.0.100", 1, "NO_SOCKET", "10.200.0.100"));
        }
        let tl = a.timeline("10.200.0.100").unwrap();
        assert!(tl.fine.len() <= FINE_BUCKETS);
        assert!(!tl.coarse.is_empty());
        assert_eq!(tl.total().drops, n);
        assert_eq!(tl.total().drops_by_reason["NO_SOCKET"], n);
    }

    #[test]
    fn vips_past_the_bound_fold_into_other() {
        let mut a = Analyzer::new([]);
        for i in 0..(MAX_VIPS + 3) {
            let vip = format!("10.200.9.{i}");
            a.add(&drop_rec(0, &vip, 1, "NO_SOCKET", "10.200.77.7"));
        }
        assert_eq!(a.folded, 3);
        assert_eq!(a.timeline(OTHER).unwrap().total().drops, 3);
    }

    #[test]
    fn stale_arp_is_named_first_with_its_window() {
        let vip = "10.200.0.100";
        let mut a = Analyzer::new([vip.to_owned(), "10.200.0.101".to_owned()]);
        a.add(&owner(0, vip, None, (0xa, 11)));
        a.add(&owner(10, vip, Some((0xa, 11)), (0xb, 12)));
        for s in 10..22 {
            a.add(&drop_rec(s, vip, 11, "NETFILTER_DROP", vip));
        }
        let d = a.diagnose();
        assert_eq!(d.len(), 2);
        let f = &d[0].findings;
        assert_eq!(f[0].cause, Cause::StaleArp);
        let diagnosis::Evidence::StaleArp(e) = &f[0].evidence else {
            panic!("{:?}", f[0].evidence)
        };
        assert_eq!((e.window_s, e.garps_sent), (11.0, 0));
        assert_eq!(f[1].cause, Cause::SpeakerFailover);
        assert!(d[1].findings.is_empty(), "the control VIP has none");
    }

    #[test]
    fn the_stale_window_lasts_while_the_old_owner_gets_the_clients_packets() {
        // The new owner's advertisement is seen at 14 s, but the client keeps sending to the
        // old owner until 21 s (IPv6: the new owner answered someone else first). A later,
        // unrelated burst at the old owner does not stretch the window.
        let vip = "fd00:200::100";
        let mut a = Analyzer::new([vip.to_owned()]);
        a.add(&owner(0, vip, None, (0xa, 11)));
        a.add(&owner(14, vip, Some((0xa, 11)), (0xb, 12)));
        for s in (10..=21).chain(40..45) {
            a.add(&drop_rec(s, vip, 11, "IP_INADDRERRORS", vip));
        }
        let d = a.diagnose();
        let f = &d[0].findings[0];
        let diagnosis::Evidence::StaleArp(e) = &f.evidence else {
            panic!("{f:?}")
        };
        assert_eq!(e.window_s, 11.0);
    }

    #[test]
    fn churn_and_policy_race_are_told_apart() {
        let vip = "10.200.0.100";
        let mut a = Analyzer::new([vip.to_owned()]);
        for s in [1, 2, 8, 9] {
            a.add(&drop_rec(s, vip, 30, "NO_SOCKET", "10.200.11.2"));
        }
        let d = a.diagnose();
        assert_eq!(d[0].findings[0].cause, Cause::EndpointChurn);
        assert!(matches!(
            &d[0].findings[0].evidence,
            diagnosis::Evidence::Churn(e) if e.bursts == 2
        ));
        let mut a = Analyzer::new([vip.to_owned()]);
        for s in 1..5 {
            a.add(&drop_rec(s, vip, 30, "NETFILTER_DROP", "10.200.11.3"));
        }
        a.add(&drop_rec(20, "", 1, "NO_SOCKET", "10.200.77.1"));
        let d = a.diagnose();
        assert_eq!(d[0].findings[0].cause, Cause::PolicyRace);
        assert!(matches!(
            &d[0].findings[0].evidence,
            diagnosis::Evidence::Policy(e) if e.stopped
        ));
    }

    #[test]
    fn churn_behind_a_node_that_masquerades_as_the_vip() {
        // IPv6, Cluster policy: the node rewrote the source to the VIP and the destination to
        // the backend; the pod has no listener.
        let line = r#"{"kind":"drop","time":"2027-01-15T08:00:01Z","reason":"NO_SOCKET","netns":9,"proto":"tcp","src":"fd00:200::100","sport":44596,"dst":"fd00:200::11:2","dport":8080,"orig":{"src":"fd00:200::1","sport":44596,"dst":"fd00:200::100","dport":80,"proto":"tcp"},"vip":"fd00:200::100"}"#;
        let (recs, bad) = read_ndjson(&format!("{line}\n{}", line.replace("08:00:01", "08:00:09")));
        assert_eq!((recs.len(), bad), (2, 0));
        let mut a = Analyzer::new([]);
        for r in &recs {
            a.add(r);
        }
        assert_eq!(a.diagnose()[0].findings[0].cause, Cause::EndpointChurn);
    }

    #[test]
    fn drops_on_the_way_back_to_the_client_are_not_a_policy_race() {
        let vip = "10.200.0.102";
        let (recs, bad) = read_ndjson(
            r#"{"kind":"drop","time":"2027-01-15T08:00:01Z","reason":"NETFILTER_DROP","netns":7,"proto":"icmp","src":"10.200.1.1","dst":"10.200.0.1","orig":{"src":"10.200.0.1","sport":4000,"dst":"10.200.0.102","dport":80,"proto":"tcp"},"vip":"10.200.0.102"}
{"kind":"drop","time":"2027-01-15T08:00:02Z","reason":"NETFILTER_DROP","netns":7,"proto":"tcp","src":"10.200.11.3","dst":"10.200.0.1","orig":{"src":"10.200.0.1","sport":4001,"dst":"10.200.0.102","dport":80,"proto":"tcp"},"vip":"10.200.0.102"}"#,
        );
        assert_eq!((recs.len(), bad), (2, 0));
        let mut a = Analyzer::new([vip.to_owned()]);
        for r in &recs {
            a.add(r);
        }
        assert!(a.diagnose()[0].findings.is_empty(), "{:?}", a.diagnose());
    }

    #[test]
    fn one_announcement_rule_for_every_reader() {
        // A bridged copy and a received reply are not announcements; a host's own reply is.
        let (recs, bad) = read_ndjson(
            r#"{"kind":"vip_owner","time":"2027-01-15T08:00:00Z","vip":"10.200.0.100","new_mac":"02:00:00:00:00:0a","new_netns":1}
{"kind":"arp","time":"2027-01-15T08:00:01Z","vip":"10.200.0.100","op":"reply","direction":"tx","bridged":true,"gratuitous":true,"sender_ip":"10.200.0.100","sender_mac":"02:00:00:00:00:0a"}
{"kind":"arp","time":"2027-01-15T08:00:01Z","vip":"10.200.0.100","op":"reply","direction":"rx","gratuitous":true,"sender_ip":"10.200.0.100","sender_mac":"02:00:00:00:00:0a"}
{"kind":"arp","time":"2027-01-15T08:00:01Z","vip":"10.200.0.100","op":"op-7","direction":"tx","gratuitous":true,"sender_ip":"10.200.0.100","sender_mac":"02:00:00:00:00:0a"}
{"kind":"arp","time":"2027-01-15T08:00:01Z","vip":"10.200.0.100","op":"reply","direction":"tx","gratuitous":true,"sender_ip":"10.200.0.100","sender_mac":"02:00:00:00:00:0a"}"#,
        );
        assert_eq!((recs.len(), bad), (5, 0));
        let mut a = Analyzer::new([]);
        for r in &recs {
            a.add(r);
        }
        let total = a.timeline("10.200.0.100").unwrap().total();
        assert_eq!((total.announcements, total.garps), (1, 1));
    }
}
