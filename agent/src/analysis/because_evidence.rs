//! What a `because` says ([`super::because`]): its reason and evidence, part of the
//! diagnosis' JSON.

use serde::{Deserialize, Serialize};

use super::diagnosis::Counts;
use crate::event::{record::OomFigures, values::Time};

/// Why a move happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    AnnouncerOomKilled,
    AnnouncerSignalled,
    AnnouncerExited,
    AnnouncerRestarted,
    MemberlistDropped,
    NodeLinkLost,
    AnnouncerChanged,
    Unknown,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AnnouncerOomKilled => "announcer-oom-killed",
            Self::AnnouncerSignalled => "announcer-signalled",
            Self::AnnouncerExited => "announcer-exited",
            Self::AnnouncerRestarted => "announcer-restarted",
            Self::MemberlistDropped => "memberlist-dropped",
            Self::NodeLinkLost => "node-link-lost",
            Self::AnnouncerChanged => "announcer-changed",
            Self::Unknown => "unknown",
        }
    }

    /// A failure behind the move (not a planned or unexplained one).
    pub fn is_failure(self) -> bool {
        !matches!(self, Self::AnnouncerChanged | Self::Unknown)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProcessEvidence {
    pub pid: u32,
    pub comm: String,
    pub netns: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<u32>,
    /// `pid comm` of the task that sent the signal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom: Option<OomFigures>,
    /// A new process started in the same place this long after the exit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarted_after_s: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemberlistEvidence {
    /// The two ends, as `address (node)` when known.
    pub between: Vec<String>,
    pub drops: u64,
    pub reasons: Counts,
    pub last: Time,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinkLossEvidence {
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Frames to the MAC the bridge flooded to other hosts, who dropped them (OTHERHOST).
    pub flooded: u64,
    /// Neighbour entries for the VIP pointing at the MAC that failed.
    pub neigh_failed: u64,
}

/// Why one ownership change happened, with its evidence.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Because {
    pub reason: Reason,
    /// When the evidence began (the kill, the first dropped packet, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<Time>,
    /// Seconds from `at` to the move (negative: seen after it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before_move_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessEvidence>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memberlist: Option<MemberlistEvidence>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<LinkLossEvidence>,
    /// The sentence the text outputs show.
    pub says: String,
}

impl Because {
    pub(super) fn new(reason: Reason, at: Option<f64>, move_t: f64, says: String) -> Self {
        Self {
            reason,
            at: at.map(Time::from_secs_f64),
            before_move_s: at.map(|a| ((move_t - a) * 1000.0).round() / 1000.0),
            process: None,
            memberlist: None,
            link: None,
            says,
        }
    }
}
