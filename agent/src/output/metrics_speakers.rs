//! Series of the speakers' lifecycle and their election traffic:
//!
//! - `lbtrace_speaker_events_total{comm,event}`: starts, exits, OOM kills and SIGKILL/SIGTERM of
//!   the processes that announce VIPs, by process name (at most [`MAX_COMMS`]; the rest count
//!   under `comm="other"`).
//! - `lbtrace_speaker_link_drops_total{src_node,dst_node,reason}`: dropped memberlist packets,
//!   each end named by its node when known, else its address; at most [`MAX_LINKS`] pairs and
//!   reasons (the rest under `other`). Counted from records, which the kernel sends for every
//!   such drop (never sampled out).
//! - `lbtrace_oom_kills_total`: every OOM victim the kernel reported, speaker or not.
//! - `lbtrace_speaker_map_overflow_total`: speakers the kernel's maps had no room for.

use std::collections::BTreeMap;

use crate::{
    event::{
        speaker::{SpeakerEvent, SpeakerLinkRec, SpeakerRec},
        values::Name,
    },
    pipeline::{attribution::OTHER, speakers::SpeakerCounts},
};

use super::metrics::Expo;

pub const MAX_COMMS: usize = 32;
pub const MAX_LINKS: usize = 256;

#[derive(Debug, Default)]
pub(crate) struct SpeakerSeries {
    events: BTreeMap<(Name, SpeakerEvent), u64>,
    links: BTreeMap<(String, String, Name), u64>,
    counts: SpeakerCounts,
}

impl SpeakerSeries {
    pub(crate) fn speaker(&mut self, s: &SpeakerRec) {
        let comms = self.events.keys().filter(|(c, _)| *c != s.comm).count();
        let known = self.events.keys().any(|(c, _)| *c == s.comm);
        let comm = if known || comms < MAX_COMMS {
            s.comm.clone()
        } else {
            Name::from(OTHER)
        };
        *self.events.entry((comm, s.event)).or_default() += 1;
    }

    pub(crate) fn link(&mut self, l: &SpeakerLinkRec) {
        let end = |n: &Option<Name>, ip: std::net::IpAddr| {
            n.as_ref()
                .map_or_else(|| ip.to_string(), ToString::to_string)
        };
        let mut key = (
            end(&l.src_node, l.src),
            end(&l.dst_node, l.dst),
            l.reason.clone(),
        );
        if !self.links.contains_key(&key) && self.links.len() >= MAX_LINKS {
            key = (OTHER.to_owned(), OTHER.to_owned(), Name::from(OTHER));
        }
        *self.links.entry(key).or_default() += 1;
    }

    pub(crate) fn counts(&mut self, c: SpeakerCounts) {
        self.counts = c;
    }

    pub(crate) fn render(&self, e: &mut Expo) {
        e.family(
            "lbtrace_speaker_events_total",
            "counter",
            "Starts, exits, OOM kills and SIGKILL/SIGTERM of the processes that announce VIPs.",
        );
        for ((comm, event), n) in &self.events {
            let labels = [("comm", &**comm), ("event", event.as_str())];
            e.sample("lbtrace_speaker_events_total", &labels, n);
        }
        e.family(
            "lbtrace_speaker_link_drops_total",
            "counter",
            "Dropped memberlist (leader election) packets between speakers, by node pair and reason.",
        );
        for ((src, dst, reason), n) in &self.links {
            let labels = [
                ("src_node", src.as_str()),
                ("dst_node", dst),
                ("reason", reason),
            ];
            e.sample("lbtrace_speaker_link_drops_total", &labels, n);
        }
        e.family(
            "lbtrace_oom_kills_total",
            "counter",
            "Processes the OOM killer chose (all of them, speakers or not).",
        );
        e.sample("lbtrace_oom_kills_total", &[], self.counts.oom_kills);
        e.family(
            "lbtrace_speaker_map_overflow_total",
            "counter",
            "Speakers (pids or names) the kernel's maps had no room for: not followed.",
        );
        e.sample(
            "lbtrace_speaker_map_overflow_total",
            &[],
            self.counts.map_overflow,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comms_and_links_are_bounded() {
        let mut s = SpeakerSeries::default();
        for i in 0..MAX_COMMS + 5 {
            s.speaker(&SpeakerRec {
                comm: Name::from(format!("p{i}").as_str()),
                event: SpeakerEvent::Exit,
                ..SpeakerRec::default()
            });
        }
        assert_eq!(s.events.len(), MAX_COMMS + 1);
        for i in 0..MAX_LINKS + 5 {
            s.link(&SpeakerLinkRec {
                src: std::net::IpAddr::from([10, 200, (i / 256) as u8, (i % 256) as u8]),
                src_node: None,
                dst_node: Some(Name::from("n1")),
                reason: Name::from("NETFILTER_DROP"),
                ..SpeakerLinkRec::default()
            });
        }
        assert_eq!(s.links.len(), MAX_LINKS + 1);
        let mut e = Expo::new("n0");
        s.render(&mut e);
        let text = e.text();
        assert!(text.contains(
            "lbtrace_speaker_link_drops_total{src_node=\"10.200.0.0\",dst_node=\"n1\",reason=\"NETFILTER_DROP\",node=\"n0\"} 1"
        ));
        assert!(text.contains("lbtrace_oom_kills_total{node=\"n0\"} 0"));
    }
}
