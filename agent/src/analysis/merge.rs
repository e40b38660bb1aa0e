//! Several nodes' recordings as one: events labelled with their node, in time order, with
//! ownership derived again from every node's announcements (each node saw only its own).
//!
//! Namespace inodes are per kernel: the same inode in two nodes' recordings (the initial
//! namespace always has the same one) is two namespaces, so the later node's is renumbered.
//! Clocks are compared through ARP/NDP frames both recordings saw (a broadcast reaches every
//! node at once; a frame one node sent, another received).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use crate::{
    event::{
        record::{ArpRec, Header, FORMAT, FORMAT_VERSION},
        values::{Mac, Name, Time},
        Record,
    },
    pipeline::{
        attribution::VipSet,
        ownership::{Ownership, OwnershipConfig},
    },
};

/// Clocks further apart than this are reported.
pub const CLOCK_TOLERANCE_S: f64 = 1.0;

/// One recording as read.
#[derive(Clone, Debug)]
pub struct Recording {
    /// Its file name, for messages.
    pub name: String,
    pub records: Vec<Record>,
}

impl Recording {
    fn header(&self) -> Option<&Header> {
        self.records.iter().find_map(|r| match r {
            Record::Header(h) => Some(&**h),
            _ => None,
        })
    }

    /// The node its events were seen on: their own label, else the header's host name, else
    /// the file name.
    fn node(&self) -> Name {
        let labelled = self.records.iter().find_map(node_of);
        labelled
            .or_else(|| {
                self.header()
                    .map(|h| h.hostname.as_str())
                    .filter(|h| !h.is_empty())
                    .map(Name::from)
            })
            .unwrap_or_else(|| self.name.as_str().into())
    }

    fn span(&self) -> Option<(f64, f64)> {
        let ts = self
            .records
            .iter()
            .filter_map(|r| r.time())
            .map(Time::as_secs_f64);
        ts.fold(None, |acc, t| match acc {
            None => Some((t, t)),
            Some((a, b)) => Some((a.min(t), b.max(t))),
        })
    }
}

fn node_of(r: &Record) -> Option<Name> {
    match r {
        Record::Drop(d) | Record::Conntrack(d) => d.node.clone(),
        Record::Arp(a) => a.node.clone(),
        Record::Neigh(n) => n.node.clone(),
        _ => None,
    }
}

/// The merged stream, and what the reader should know about it.
#[derive(Debug, Default)]
pub struct Merged {
    pub records: Vec<Record>,
    pub warnings: Vec<String>,
}

/// Merges `recordings`; one recording is returned as it is.
pub fn merge(mut recordings: Vec<Recording>) -> Merged {
    if recordings.len() == 1 {
        let records = recordings.pop().map(|r| r.records).unwrap_or_default();
        return Merged {
            records,
            warnings: Vec::new(),
        };
    }
    let nodes: Vec<Name> = recordings.iter().map(Recording::node).collect();
    let warnings = clock_warnings(&recordings, &nodes);
    let mut renumber = Renumber::default();
    let mut vips: BTreeSet<IpAddr> = BTreeSet::new();
    let mut events = Vec::new();
    for (rec, node) in recordings.iter_mut().zip(&nodes) {
        for r in rec.records.drain(..) {
            match r {
                Record::Header(h) => vips.extend(h.vips.iter().copied()),
                // Each node's view of ownership is partial: derived again below.
                Record::VipOwner(_) | Record::Finding(_) | Record::VipDiscovered(_) => {}
                Record::Status(_) | Record::Summary(_) | Record::Unknown => {}
                mut e => {
                    if node_of(&e).is_none() {
                        e.set_node(node);
                    }
                    renumber.apply(&mut e, node);
                    vips.extend(e.vip());
                    events.push(e);
                }
            }
        }
    }
    // Stable: equal times keep each recording's order.
    events.sort_by(|a, b| {
        let t = |r: &Record| r.time().map_or(0.0, Time::as_secs_f64);
        t(a).total_cmp(&t(b))
    });
    let mut records = vec![Record::Header(Box::new(Header {
        format: FORMAT.to_owned(),
        version: FORMAT_VERSION,
        hostname: nodes
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(","),
        vips: vips.iter().copied().collect(),
        ..Header::default()
    }))];
    records.extend(with_ownership(events, vips));
    Merged { records, warnings }
}

/// Ownership from every node's announcements, inserted before the announcement that made it
/// (as the pipeline does live).
fn with_ownership(events: Vec<Record>, vips: BTreeSet<IpAddr>) -> Vec<Record> {
    let mut set = VipSet::new(vips.into_iter().collect());
    let mut own = Ownership::new(OwnershipConfig::default(), false);
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        if let Record::Arp(a) = &e {
            for mut u in own.observe(a, &mut set) {
                if let Some(n) = &a.node {
                    u.set_node(n);
                }
                out.push(u);
            }
        }
        out.push(e);
    }
    out
}

/// Gives a namespace inode seen on a second node a number of its own.
#[derive(Default)]
struct Renumber {
    owner: BTreeMap<u32, Name>,
    renamed: BTreeMap<(Name, u32), u32>,
    next: u32,
}

impl Renumber {
    fn map(&mut self, node: &Name, ns: u32) -> u32 {
        if ns == 0 {
            return 0;
        }
        let owner = self.owner.entry(ns).or_insert_with(|| node.clone());
        if owner == node {
            return ns;
        }
        let next = &mut self.next;
        *self.renamed.entry((node.clone(), ns)).or_insert_with(|| {
            *next += 1;
            u32::MAX - *next
        })
    }

    fn apply(&mut self, r: &mut Record, node: &Name) {
        match r {
            Record::Drop(d) | Record::Conntrack(d) => {
                d.netns = self.map(node, d.netns);
                d.nat_netns = d.nat_netns.map(|n| self.map(node, n));
            }
            Record::Arp(a) => a.netns = self.map(node, a.netns),
            Record::Neigh(n) => n.netns = n.netns.map(|ns| self.map(node, ns)),
            _ => {}
        }
    }
}

type FrameKey = (String, Mac, Option<IpAddr>, Option<IpAddr>);

fn frame_key(a: &ArpRec) -> FrameKey {
    (
        format!("{:?}", a.op),
        a.sender_mac,
        a.sender_ip,
        a.target_ip,
    )
}

fn frames(r: &Recording) -> BTreeMap<FrameKey, Vec<f64>> {
    let mut out: BTreeMap<FrameKey, Vec<f64>> = BTreeMap::new();
    for rec in &r.records {
        if let Record::Arp(a) = rec {
            if let (false, Some(t)) = (a.bridged, a.time) {
                out.entry(frame_key(a)).or_default().push(t.as_secs_f64());
            }
        }
    }
    out
}

/// How far `b`'s clock is ahead of `a`'s, from the frames both saw (median of the nearest
/// matches within a minute); `None` without a shared frame.
pub fn clock_offset(a: &Recording, b: &Recording) -> Option<f64> {
    let fb = frames(b);
    let mut offsets: Vec<f64> = Vec::new();
    for (key, ts) in frames(a) {
        let Some(other) = fb.get(&key) else {
            continue;
        };
        for t in ts {
            let nearest = other
                .iter()
                .map(|u| u - t)
                .min_by(|x, y| x.abs().total_cmp(&y.abs()));
            offsets.extend(nearest.filter(|d| d.abs() <= 60.0));
        }
    }
    if offsets.is_empty() {
        return None;
    }
    offsets.sort_by(f64::total_cmp);
    Some(offsets[offsets.len() / 2])
}

fn clock_warnings(recordings: &[Recording], nodes: &[Name]) -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..recordings.len() {
        for j in i + 1..recordings.len() {
            let (a, b) = (&recordings[i], &recordings[j]);
            let overlap = match (a.span(), b.span()) {
                (Some(x), Some(y)) => x.0 <= y.1 && y.0 <= x.1,
                _ => false,
            };
            if !overlap {
                continue;
            }
            if let Some(d) = clock_offset(a, b).filter(|d| d.abs() > CLOCK_TOLERANCE_S) {
                out.push(format!(
                    "{} ({}) and {} ({}) overlap but their clocks disagree by {:.1} s (frames both saw): events of the two are misordered by that much; sync the nodes' clocks (NTP)",
                    a.name, nodes[i], b.name, nodes[j], d
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{record::read_ndjson, values::Direction};

    fn rec(name: &str, text: &str) -> Recording {
        let (records, bad) = read_ndjson(text);
        assert_eq!(bad, 0);
        Recording {
            name: name.to_owned(),
            records,
        }
    }

    const A: &str = r#"{"kind":"header","format":"lbtrace-ndjson","version":1,"hostname":"a","vips":["10.200.0.100"]}
{"kind":"arp","node":"n0","time":"2027-01-15T08:00:00Z","vip":"10.200.0.100","op":"reply","direction":"tx","sender_ip":"10.200.0.100","sender_mac":"02:00:00:00:00:0a","netns":5}
{"kind":"arp","node":"n0","time":"2027-01-15T08:00:12Z","op":"request","direction":"rx","sender_ip":"10.200.0.1","sender_mac":"02:00:00:00:00:01","target_ip":"10.200.0.100","netns":5}
{"kind":"drop","node":"n0","time":"2027-01-15T08:00:13Z","reason":"NETFILTER_DROP","netns":5,"dst":"10.200.0.100","vip":"10.200.0.100"}"#;

    #[test]
    fn two_nodes_make_one_ordered_stream_with_ownership_from_both() {
        let b = r#"{"kind":"header","format":"lbtrace-ndjson","version":1,"hostname":"b"}
{"kind":"arp","node":"n1","time":"2027-01-15T08:00:12.2Z","op":"request","direction":"rx","sender_ip":"10.200.0.1","sender_mac":"02:00:00:00:00:01","target_ip":"10.200.0.100","netns":5}
{"kind":"arp","node":"n1","time":"2027-01-15T08:00:12.3Z","vip":"10.200.0.100","op":"reply","direction":"tx","sender_ip":"10.200.0.100","sender_mac":"02:00:00:00:00:0b","netns":6}"#;
        let m = merge(vec![rec("a", A), rec("b", b)]);
        assert!(m.warnings.is_empty(), "{:?}", m.warnings);
        let owners: Vec<_> = m
            .records
            .iter()
            .filter_map(|r| match r {
                Record::VipOwner(o) => Some((o.node.clone(), o.old_mac.is_some())),
                _ => None,
            })
            .collect();
        assert_eq!(
            owners,
            [(Some("n0".into()), false), (Some("n1".into()), true)]
        );
        // Inode 5 is two namespaces: n1's gets a number of its own.
        let n1_rx = m.records.iter().find_map(|r| match r {
            Record::Arp(a) if a.node.as_deref() == Some("n1") && a.direction == Direction::Rx => {
                Some(a.netns)
            }
            _ => None,
        });
        assert_ne!(n1_rx, Some(5));
        let times: Vec<f64> = m
            .records
            .iter()
            .filter_map(|r| r.time())
            .map(Time::as_secs_f64)
            .collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn clocks_that_disagree_are_reported() {
        let b = r#"{"kind":"arp","node":"n1","time":"2027-01-15T08:00:15Z","op":"request","direction":"rx","sender_ip":"10.200.0.1","sender_mac":"02:00:00:00:00:01","target_ip":"10.200.0.100","netns":7}
{"kind":"drop","node":"n1","time":"2027-01-15T08:00:10Z","reason":"NO_SOCKET","netns":7}"#;
        let m = merge(vec![rec("a.ndjson", A), rec("b.ndjson", b)]);
        assert_eq!(m.warnings.len(), 1, "{:?}", m.warnings);
        assert!(
            m.warnings[0].contains("disagree by 3.0 s"),
            "{}",
            m.warnings[0]
        );
        let one = merge(vec![rec("a", A)]);
        assert!(one.warnings.is_empty());
        assert!(matches!(&one.records[1], Record::Arp(_)));
    }
}
