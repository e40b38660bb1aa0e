//! What the analysis keeps of the speakers: their processes' lifecycle and the memberlist
//! packets dropped between them (bounded), the inputs of [`super::because`].

use super::{
    because::{Context, LifeEvent, Lifecycle, LinkDrop, MAX_LIFECYCLE, MAX_LINK_DROPS},
    nodes::NodeNames,
};
use crate::event::record::{ProbeState, Record, SpeakerEvent, SpeakerRec};

#[derive(Debug, Default)]
pub(super) struct Speakers {
    lifecycle: Vec<Lifecycle>,
    links: Vec<LinkDrop>,
    /// Records past the bounds (the oldest are kept: a move is explained by what came first).
    pub(super) dropped: u64,
    /// A speaker record was seen, or the process collectors were attached.
    lifecycle_seen: bool,
    /// A status record (a recording's) listed the probes.
    status_seen: bool,
}

/// Collectors whose records say a speaker process started or ended (probes/speakers.rs).
fn lifecycle_collector(name: &str) -> bool {
    matches!(name, "exit" | "exec")
}

impl Speakers {
    /// Takes what it keeps of `r`; true when `r` is a speaker's record (nothing else to do).
    pub(super) fn add(&mut self, r: &Record) -> bool {
        match r {
            Record::Speaker(s) => {
                self.lifecycle_seen = true;
                if self.lifecycle.len() < MAX_LIFECYCLE {
                    self.lifecycle.push(lifecycle(s));
                } else {
                    self.dropped += 1;
                }
                true
            }
            Record::SpeakerLink(l) => {
                if self.links.len() >= MAX_LINK_DROPS {
                    self.dropped += 1;
                    return true;
                }
                self.links.push(LinkDrop {
                    t: l.time.map_or(0.0, |t| t.as_secs_f64()),
                    src: Some(l.src),
                    dst: Some(l.dst),
                    src_node: l.src_node.clone(),
                    dst_node: l.dst_node.clone(),
                    reason: l.reason.clone(),
                });
                true
            }
            Record::Status(s) => {
                let attached = s
                    .probes
                    .iter()
                    .any(|p| lifecycle_collector(&p.collector) && p.state == ProbeState::Attached);
                self.lifecycle_seen |= attached;
                self.status_seen = true;
                false
            }
            _ => false,
        }
    }

    /// What [`super::because::explain`] looks at, in time order.
    pub(super) fn context<'a>(&'a self, nodes: &'a NodeNames) -> Context<'a> {
        Context {
            lifecycle: &self.lifecycle,
            links: &self.links,
            nodes: Some(nodes),
            // Blind only when the probes are known and none of them sees processes (a stream
            // without a status record, `watch --json`, ran with the defaults).
            lifecycle_seen: self.lifecycle_seen || !self.status_seen,
        }
    }
}

fn lifecycle(s: &SpeakerRec) -> Lifecycle {
    let event = match s.event {
        SpeakerEvent::Start => LifeEvent::Start,
        SpeakerEvent::Exit => LifeEvent::Exit {
            code: s.exit_code,
            signal: s.signal,
        },
        SpeakerEvent::OomKill => LifeEvent::OomKill(s.oom),
        SpeakerEvent::Signal => LifeEvent::Signal {
            signal: s.signal.unwrap_or(0),
            sender_pid: s.sender_pid.unwrap_or(0),
            sender_comm: s.sender_comm.clone().unwrap_or_default(),
        },
    };
    Lifecycle {
        t: s.time.map_or(0.0, |t| t.as_secs_f64()),
        node: s.node.clone(),
        netns: s.netns,
        pid: s.pid,
        comm: s.comm.clone(),
        event,
        vips: s.vips.clone(),
    }
}
