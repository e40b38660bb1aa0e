//! Per-VIP timelines and the diagnosis, from [`Record`]s: live ones from the pipeline, or those
//! of a recording. Both go through the same [`Analyzer::add`], so they agree.
//!
//! Memory is bounded: at most [`MAX_VIPS`] VIPs (more fold into `other`, counted), per VIP at
//! most [`FINE_BUCKETS`] one-second buckets (older ones roll up into minute buckets, at most
//! [`COARSE_BUCKETS`]) and [`MAX_SAMPLES`] drop samples for the diagnosis (beyond that only the
//! buckets count them). Bucket totals always equal the records they summarize.

pub mod because;
mod because_evidence;
pub mod diagnosis;
mod endpoints;
#[cfg(test)]
mod fixtures;
pub mod from_metrics;
pub mod merge;
pub mod nodes;
mod speakers;
mod stale;
pub mod timeline;
mod totals;
mod vip_state;

use std::collections::{BTreeMap, BTreeSet};

pub use because::Because;
pub use diagnosis::{Cause, Finding, VipDiagnosis};
pub use timeline::{Bucket, Timeline, COARSE_BUCKETS, FINE_BUCKETS};

use crate::{
    event::{
        record::{EndpointRec, FindingKind},
        values::Mac,
        Record,
    },
    pipeline::{attribution::own_entry, Sink},
};

pub const MAX_VIPS: usize = 64;
/// The neighbour state bit of an entry whose probes went unanswered.
const NUD_FAILED: u8 = 0x20;
pub const MAX_SAMPLES: usize = 20_000;
pub use crate::pipeline::attribution::OTHER;
use vip_state::{OwnerChange, Sample, VipState};

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
    /// Speaker lifecycle and dropped memberlist packets: why VIPs moved.
    speakers: speakers::Speakers,
    /// Drops counted per key of the kernel's totals (sampled records).
    counted: totals::Counted,
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
            Record::Totals(t) => return self.add_totals(t),
            _ => {}
        }
        self.records += 1;
        self.nodes.learn(r);
        if self.speakers.add(r) {
            return;
        }
        let t = r.time().map(|t| t.as_secs_f64());
        if let Some(t) = t {
            self.first = Some(self.first.map_or(t, |f| f.min(t)));
            self.last = Some(self.last.map_or(t, |l| l.max(t)));
        }
        if let Record::Endpoint(e) = r {
            for vip in &e.vips {
                let st = self.state(&vip.to_string());
                st.add_service(&e.service);
                st.add_endpoint(t.unwrap_or(0.0), e);
            }
            return;
        }
        let Some(vip) = r.vip() else {
            return;
        };
        let t = t.unwrap_or(0.0);
        let st = self.state(&vip.to_string());
        if let Some(service) = r.service() {
            st.add_service(service);
        }
        match r {
            Record::Drop(d) | Record::Conntrack(d) => {
                st.add_drop(t, d, vip);
                self.counted.sample(d, vip);
            }
            Record::Arp(a) => st.add_arp(t, a),
            Record::VipOwner(o) => st.add_owner(t, o),
            Record::Neigh(n) => {
                if n.new_state.0 & NUD_FAILED != 0 && !n.old_mac.is_zero() {
                    st.link_signs.failed(t, n.old_mac);
                }
                if n.old_mac != n.new_mac {
                    st.timeline.bucket(t as u64).neigh_changes += 1;
                    st.neigh.push((t, n.new_mac));
                }
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

    /// The Service ports seen on a VIP's records (from kube-proxy's rules).
    pub fn services(&self, vip: &str) -> Vec<String> {
        self.vips
            .get(vip)
            .map(|s| s.services.iter().map(ToString::to_string).collect())
            .unwrap_or_default()
    }

    /// The VIP with its Services, as the text outputs name it.
    pub fn title(&self, vip: &str) -> String {
        diagnosis::vip_title(vip, &self.services(vip))
    }

    /// The endpoint changes of the VIP's Services: (time, change).
    pub fn endpoint_changes(&self, vip: &str) -> &[(f64, Box<EndpointRec>)] {
        self.vips
            .get(vip)
            .map_or(&[], |s| s.endpoint_changes.as_slice())
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

    /// Why each ownership change of a VIP happened: (time, old MAC, new MAC, because).
    pub fn moves(&self, vip: &str) -> Vec<(f64, Option<Mac>, Mac, Because)> {
        let (Some(st), Ok(ip)) = (self.vips.get(vip), vip.parse()) else {
            return Vec::new();
        };
        let ctx = self.speakers.context(&self.nodes);
        st.changes
            .iter()
            .filter(|c| c.old_mac.is_some())
            .map(|c| {
                let b = because::explain(ip, c, &st.link_signs, &ctx);
                (c.t, c.old_mac, c.new_mac, b)
            })
            .collect()
    }

    /// One entry per VIP, findings most likely first.
    pub fn diagnose(&self) -> Vec<VipDiagnosis> {
        let ctx = self.speakers.context(&self.nodes);
        self.vips()
            .into_iter()
            .map(|vip| {
                let findings = self
                    .vips
                    .get(&vip)
                    .map(|s| diagnosis::diagnose_vip(&vip, s, self.last.unwrap_or(0.0), &ctx))
                    .unwrap_or_default()
                    .into_iter()
                    .map(|f| self.nodes.name(f))
                    .collect();
                VipDiagnosis {
                    findings,
                    services: self.services(&vip),
                    vip,
                    limits: Vec::new(),
                }
            })
            .collect()
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
    use super::{
        fixtures::{drop_at, owner},
        *,
    };
    use crate::event::record::read_ndjson;

    fn drop_rec(s: u64, vip: &str, netns: u32, reason: &str, dst: &str) -> Record {
        drop_at(s, vip, netns, reason, dst, "nft_do_chain+0x1")
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
