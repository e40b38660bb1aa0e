//! The processes that announce VIPs (speakers), learnt from their own announcements: which
//! VIPs each announced last, which the kernel must report (its maps are kept in step here), and
//! memberlist drops between their nodes.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    time::{Duration, Instant},
};

use crate::{
    event::{
        record::{ArpRec, DropRec},
        speaker::{SpeakerEvent, SpeakerLinkRec, SpeakerRec},
        values::{L4Proto, Name},
    },
    kernel::{netns, rtnl},
    probes::{Added, Tracer, MEMBERLIST_PORT},
};

/// Processes followed at once: the kernel map's size.
const MAX_SPEAKERS: usize = agent_common::SPEAKER_ENTRIES as usize;
/// VIPs remembered per process, most recent first.
const MAX_VIPS: usize = 64;
/// Node addresses are read again at most this often, when an address is not known.
const NODE_RESCAN: Duration = Duration::from_secs(10);

/// What the speaker tracking counted (exposed as metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpeakerCounts {
    /// Every OOM victim the kernel reported, speaker or not.
    pub oom_kills: u64,
    /// OOM victims that were not speakers (not recorded).
    pub oom_others: u64,
    /// Speakers (pids or names) the kernel maps had no room for: not followed.
    pub map_overflow: u64,
}

/// A change the kernel's speaker maps still need.
#[derive(Clone, Debug, PartialEq, Eq)]
enum MapOp {
    AddPid(u32),
    RemovePid(u32),
    AddComm(Name),
}

#[derive(Clone, Debug, Default)]
struct Proc {
    vips: Vec<IpAddr>,
}

/// Speakers seen so far, and the kernel maps' pending changes.
pub struct Speakers {
    /// Drops to or from this port (UDP, TCP) are memberlist evidence; 0: off.
    pub memberlist_port: u16,
    procs: HashMap<u32, Proc>,
    comms: BTreeSet<Name>,
    pending: Vec<MapOp>,
    pub counts: SpeakerCounts,
    nodes: NodeAddrs,
}

impl Default for Speakers {
    fn default() -> Self {
        Self::new(MEMBERLIST_PORT, &[])
    }
}

impl Speakers {
    /// `comms`: names known to be speakers before they announce (already in the kernel's map).
    pub fn new(memberlist_port: u16, comms: &[String]) -> Self {
        Self {
            memberlist_port,
            procs: HashMap::new(),
            comms: comms.iter().map(|c| Name::from(c.as_str())).collect(),
            pending: Vec::new(),
            counts: SpeakerCounts::default(),
            nodes: NodeAddrs::default(),
        }
    }

    /// An announcement from a process's own socket: it announces that VIP.
    pub fn observe_arp(&mut self, a: &ArpRec) {
        let (Some(pid), Some(vip)) = (a.pid, a.announced()) else {
            return;
        };
        if !self.procs.contains_key(&pid) {
            if self.procs.len() >= MAX_SPEAKERS {
                self.counts.map_overflow += 1;
                return;
            }
            self.pending.push(MapOp::AddPid(pid));
        }
        if let Some(comm) = a.comm.as_ref().filter(|c| !self.comms.contains(*c)) {
            if self.comms.len() < MAX_SPEAKERS {
                self.comms.insert(comm.clone());
                self.pending.push(MapOp::AddComm(comm.clone()));
            } else {
                self.counts.map_overflow += 1;
            }
        }
        let p = self.procs.entry(pid).or_default();
        p.vips.retain(|v| *v != vip);
        p.vips.insert(0, vip);
        p.vips.truncate(MAX_VIPS);
    }

    /// Completes a speaker record with the VIPs its process announced; `false` when it is not
    /// a speaker's (an OOM victim of another process: counted only).
    pub fn speaker(&mut self, rec: &mut SpeakerRec) -> bool {
        let known = self.procs.contains_key(&rec.pid) || self.comms.contains(&rec.comm);
        match rec.event {
            SpeakerEvent::OomKill => {
                self.counts.oom_kills += 1;
                if !known {
                    self.counts.oom_others += 1;
                    return false;
                }
            }
            SpeakerEvent::Start => {
                if !self.procs.contains_key(&rec.pid) && self.procs.len() < MAX_SPEAKERS {
                    self.procs.insert(rec.pid, Proc::default());
                    self.pending.push(MapOp::AddPid(rec.pid));
                }
            }
            SpeakerEvent::Exit => {
                if let Some(p) = self.procs.remove(&rec.pid) {
                    rec.vips = p.vips;
                }
                self.pending.push(MapOp::RemovePid(rec.pid));
                return true;
            }
            SpeakerEvent::Signal => {}
        }
        if let Some(p) = self.procs.get(&rec.pid) {
            rec.vips.clone_from(&p.vips);
        }
        true
    }

    /// A drop of memberlist traffic (not attributed to a VIP) as speaker-link evidence.
    pub fn link(&mut self, d: &DropRec) -> Option<SpeakerLinkRec> {
        let port = self.memberlist_port;
        let proto = d
            .proto
            .filter(|p| matches!(p, L4Proto::Tcp | L4Proto::Udp))?;
        if port == 0 || d.vip.is_some() || (d.sport != Some(port) && d.dport != Some(port)) {
            return None;
        }
        let (src, dst) = (d.src?, d.dst?);
        Some(SpeakerLinkRec {
            node: d.node.clone(),
            time: d.time,
            src,
            dst,
            src_node: self.nodes.name(src),
            dst_node: self.nodes.name(dst),
            proto,
            port,
            reason: d.reason.clone(),
            location: d.location.clone(),
            sampled: d.sampled,
        })
    }

    /// Labels the host's own addresses with this node name.
    pub fn set_node(&mut self, node: Option<Name>) {
        self.nodes.own = node;
    }

    /// Applies the pending changes to the kernel's maps.
    pub fn sync(&mut self, tracer: &mut Tracer) {
        for op in std::mem::take(&mut self.pending) {
            let r = match &op {
                MapOp::AddPid(pid) => tracer.add_speaker_pid(*pid),
                MapOp::AddComm(c) => tracer.add_speaker_comm(c),
                MapOp::RemovePid(pid) => tracer.remove_speaker_pid(*pid).map(|()| Added::Yes),
            };
            match r {
                Ok(Added::Yes) => {}
                Ok(Added::Full) => self.counts.map_overflow += 1,
                Err(e) => tracing::warn!("speaker map ({op:?}): {e}"),
            }
        }
    }
}

/// Which node an address belongs to: the `ip netns` name of the namespace that has it
/// configured, or this node's name for the host's own addresses.
#[derive(Default)]
struct NodeAddrs {
    own: Option<Name>,
    by_ip: HashMap<IpAddr, Name>,
    scanned: Option<Instant>,
}

impl NodeAddrs {
    fn name(&mut self, ip: IpAddr) -> Option<Name> {
        if !self.by_ip.contains_key(&ip) && self.scanned.is_none_or(|t| t.elapsed() > NODE_RESCAN) {
            self.scan();
        }
        self.by_ip.get(&ip).cloned()
    }

    fn scan(&mut self) {
        self.scanned = Some(Instant::now());
        self.by_ip.clear();
        if let (Some(own), Ok(addrs)) = (&self.own, rtnl::addresses()) {
            for a in addrs.iter().filter(|a| !a.ip.is_loopback()) {
                self.by_ip.insert(a.ip, own.clone());
            }
        }
        let Ok(dir) = std::fs::read_dir("/run/netns") else {
            return;
        };
        for e in dir.flatten() {
            let name = Name::from(e.file_name().to_string_lossy().as_ref());
            match netns::in_netns(&e.path(), rtnl::addresses) {
                Ok(Ok(addrs)) => {
                    for a in addrs.iter().filter(|a| !a.ip.is_loopback()) {
                        self.by_ip.entry(a.ip).or_insert_with(|| name.clone());
                    }
                }
                Ok(Err(err)) | Err(err) => tracing::debug!("{}: {err}", e.path().display()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::values::{ArpOp, Direction};

    fn garp(pid: u32, vip: &str) -> ArpRec {
        ArpRec {
            op: ArpOp::Request,
            gratuitous: true,
            direction: Direction::Tx,
            sender_ip: Some(vip.parse().unwrap()),
            target_ip: Some(vip.parse().unwrap()),
            pid: Some(pid),
            comm: Some(Name::from("speaker")),
            ..ArpRec::default()
        }
    }

    #[test]
    fn an_announcer_is_learnt_and_its_exit_carries_its_vips() {
        let mut s = Speakers::new(7946, &[]);
        s.observe_arp(&garp(42, "10.200.0.100"));
        s.observe_arp(&garp(42, "10.200.0.101"));
        s.observe_arp(&garp(42, "10.200.0.100"));
        assert_eq!(
            s.pending,
            vec![MapOp::AddPid(42), MapOp::AddComm(Name::from("speaker"))]
        );
        let mut exit = SpeakerRec {
            pid: 42,
            event: SpeakerEvent::Exit,
            ..SpeakerRec::default()
        };
        assert!(s.speaker(&mut exit));
        let v: Vec<IpAddr> = vec![
            "10.200.0.100".parse().unwrap(),
            "10.200.0.101".parse().unwrap(),
        ];
        assert_eq!(exit.vips, v);
        assert_eq!(s.pending.last(), Some(&MapOp::RemovePid(42)));
    }

    #[test]
    fn oom_victims_other_than_speakers_are_only_counted() {
        let mut s = Speakers::new(7946, &["speaker".to_owned()]);
        let mut other = SpeakerRec {
            pid: 7,
            comm: Name::from("stress"),
            event: SpeakerEvent::OomKill,
            ..SpeakerRec::default()
        };
        assert!(!s.speaker(&mut other));
        let mut ours = SpeakerRec {
            comm: Name::from("speaker"),
            ..other.clone()
        };
        assert!(s.speaker(&mut ours));
        assert_eq!((s.counts.oom_kills, s.counts.oom_others), (2, 1));
    }

    #[test]
    fn memberlist_drops_without_a_vip_are_links() {
        let mut s = Speakers::new(7946, &[]);
        s.nodes.scanned = Some(Instant::now());
        let d = DropRec {
            proto: Some(L4Proto::Udp),
            src: Some("10.200.0.1".parse().unwrap()),
            dst: Some("10.200.0.2".parse().unwrap()),
            sport: Some(7946),
            dport: Some(7946),
            reason: Name::from("NETFILTER_DROP"),
            ..DropRec::default()
        };
        let l = s.link(&d).expect("a link drop");
        assert_eq!((l.port, l.proto, l.src_node), (7946, L4Proto::Udp, None));
        let other = DropRec {
            dport: Some(53),
            sport: Some(40000),
            ..d.clone()
        };
        assert!(s.link(&other).is_none());
        s.memberlist_port = 0;
        assert!(s.link(&d).is_none());
    }
}
