//! Records of the processes that announce VIPs (speakers) and of their election traffic: part
//! of the JSON contract of [`super::record::Record`], kept here so that file stays readable.

use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};

use super::values::{L4Proto, Name, Time};

/// What happened to a speaker process.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum SpeakerEvent {
    /// A process with a speaker's name started (exec): a restart has a new pid.
    #[default]
    Start,
    /// The process (its whole thread group) exited.
    Exit,
    /// The OOM killer chose it (`oom:mark_victim`).
    OomKill,
    /// SIGKILL or SIGTERM was sent to it.
    Signal,
}

impl SpeakerEvent {
    pub const ALL: [Self; 4] = [Self::Start, Self::Exit, Self::OomKill, Self::Signal];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Exit => "exit",
            Self::OomKill => "oom-kill",
            Self::Signal => "signal",
        }
    }
}

/// The memory figures `oom:mark_victim` gives for its victim, in kB as the tracepoint has them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct OomFigures {
    pub total_vm_kb: u64,
    pub anon_rss_kb: u64,
    pub file_rss_kb: u64,
    pub shmem_rss_kb: u64,
    pub pgtables_kb: u64,
    pub oom_score_adj: i16,
}

impl OomFigures {
    /// Resident memory when it was chosen: anonymous + file + shared.
    pub fn rss_kb(&self) -> u64 {
        self.anon_rss_kb
            .saturating_add(self.file_rss_kb)
            .saturating_add(self.shmem_rss_kb)
    }
}

/// A start, exit, OOM kill or SIGKILL/SIGTERM of a process that announces VIPs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SpeakerRec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<Name>,
    pub time: Option<Time>,
    /// The thread-group id (what user space calls the pid).
    pub pid: u32,
    pub comm: Name,
    /// The inode of the task's network namespace.
    pub netns: u32,
    pub event: SpeakerEvent,
    /// exit: the code given to `exit()` (when not ended by a signal).
    pub exit_code: Option<i32>,
    /// exit: the terminating signal; signal: the signal sent.
    pub signal: Option<u32>,
    /// signal: who sent it.
    pub sender_pid: Option<u32>,
    pub sender_comm: Option<Name>,
    /// oom-kill: the victim's memory.
    pub oom: Option<OomFigures>,
    /// The VIPs this process announced last (empty when none).
    pub vips: Vec<IpAddr>,
}

impl SpeakerRec {
    /// The process is gone or going: an exit, an OOM kill, or a SIGKILL sent to it.
    pub fn is_death(&self) -> bool {
        match self.event {
            SpeakerEvent::Exit | SpeakerEvent::OomKill => true,
            SpeakerEvent::Signal => self.signal == Some(SIGKILL),
            SpeakerEvent::Start => false,
        }
    }

    /// An exit not asked for: by a signal, or with a non-zero code.
    pub fn is_abnormal_exit(&self) -> bool {
        self.event == SpeakerEvent::Exit
            && (self.signal.is_some() || self.exit_code.is_some_and(|c| c != 0))
    }

    /// Whether it announced `vip` last.
    pub fn announced(&self, vip: IpAddr) -> bool {
        self.vips.contains(&vip)
    }

    /// One phrase: `exited with code 1`, `killed by signal 9`, `OOM-killed`, `sent SIGTERM`,
    /// `started`.
    pub fn what(&self) -> String {
        match self.event {
            SpeakerEvent::Start => "started".to_owned(),
            SpeakerEvent::OomKill => "OOM-killed".to_owned(),
            SpeakerEvent::Exit => match (self.signal, self.exit_code) {
                (Some(s), _) => format!("killed by {}", signal_name(s)),
                (None, Some(c)) => format!("exited with code {c}"),
                (None, None) => "exited".to_owned(),
            },
            SpeakerEvent::Signal => match self.signal {
                Some(s) => format!("sent {}", signal_name(s)),
                None => "sent a signal".to_owned(),
            },
        }
    }
}

pub const SIGKILL: u32 = 9;
pub const SIGTERM: u32 = 15;

/// `SIGKILL`, `SIGTERM`, or `signal N`.
pub fn signal_name(sig: u32) -> String {
    match sig {
        SIGKILL => "SIGKILL".to_owned(),
        SIGTERM => "SIGTERM".to_owned(),
        n => format!("signal {n}"),
    }
}

/// One dropped memberlist (leader-election) packet between speakers; a sample of many when the
/// agent samples (then the exact counts are in its metrics).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SpeakerLinkRec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<Name>,
    pub time: Option<Time>,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// The nodes these addresses belong to, when lbtrace knows them.
    pub src_node: Option<Name>,
    pub dst_node: Option<Name>,
    pub proto: L4Proto,
    /// The memberlist port (the packet's source or destination port).
    pub port: u16,
    pub reason: Name,
    pub location: Name,
    pub sampled: bool,
}

impl Default for SpeakerLinkRec {
    fn default() -> Self {
        Self {
            node: None,
            time: None,
            src: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            dst: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            src_node: None,
            dst_node: None,
            proto: L4Proto::Udp,
            port: 0,
            reason: Name::from(""),
            location: Name::from(""),
            sampled: false,
        }
    }
}

impl SpeakerLinkRec {
    /// The two ends, as node names where known, else addresses, in a stable order (a pair's
    /// key whichever way the packet went).
    pub fn pair(&self) -> (String, String) {
        let a = end_name(self.src_node.as_ref(), self.src);
        let b = end_name(self.dst_node.as_ref(), self.dst);
        if a <= b {
            (a, b)
        } else {
            (b, a)
        }
    }

    /// The function part of `location`.
    pub fn function(&self) -> &str {
        self.location.split('+').next().unwrap_or("")
    }
}

fn end_name(node: Option<&Name>, ip: IpAddr) -> String {
    node.map_or_else(|| ip.to_string(), |n| n.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deaths_and_phrases() {
        let mut r = SpeakerRec {
            event: SpeakerEvent::Exit,
            exit_code: Some(3),
            ..SpeakerRec::default()
        };
        assert!(r.is_death() && r.is_abnormal_exit());
        assert_eq!(r.what(), "exited with code 3");
        r.signal = Some(SIGKILL);
        assert_eq!(r.what(), "killed by SIGKILL");
        r.event = SpeakerEvent::Signal;
        r.signal = Some(SIGTERM);
        assert!(!r.is_death());
        assert_eq!(r.what(), "sent SIGTERM");
        r.event = SpeakerEvent::Start;
        assert!(!r.is_death());
    }

    #[test]
    fn link_pair_is_ordered() {
        let r = SpeakerLinkRec {
            src: "10.200.0.2".parse().unwrap(),
            dst: "10.200.0.1".parse().unwrap(),
            src_node: Some(Name::from("n1")),
            ..SpeakerLinkRec::default()
        };
        assert_eq!(r.pair(), ("10.200.0.1".to_owned(), "n1".to_owned()));
    }
}
