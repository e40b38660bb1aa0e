//! The stream's header and status records: the host, the kernel, and every probe's outcome.

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

use super::{
    record::{FORMAT, FORMAT_VERSION},
    values::{Name, Time},
};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Header {
    pub format: String,
    pub version: u64,
    pub lbtrace: String,
    pub kernel: String,
    pub hostname: String,
    pub started: Option<Time>,
    pub vips: Vec<IpAddr>,
    /// Reason code → name, as the recording kernel's BTF had them.
    #[serde(with = "super::values::number_keys")]
    pub drop_reasons: BTreeMap<u32, Name>,
}

impl Header {
    pub fn supported(&self) -> bool {
        self.format == FORMAT && self.version == FORMAT_VERSION
    }
}

/// Outcome of one attach attempt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "ProbeStatusJson", from = "ProbeStatusJson")]
pub struct ProbeStatus {
    pub collector: Name,
    pub probe: Name,
    pub state: ProbeState,
}

/// What became of a probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeState {
    Attached,
    /// Tried, and the kernel (or its BTF, or tracefs) refused it.
    Failed(String),
    /// A preferred probe of the same collector is attached.
    NotNeeded,
    /// `--probe-mode` excludes its kind of hook.
    NotTried(String),
    /// Forced off for a test.
    Disabled(String),
}

impl ProbeState {
    pub fn attached(&self) -> bool {
        matches!(self, Self::Attached)
    }

    /// Attached, or tried and failed (forced off counts as failed): what `doctor` reports.
    pub fn tried(&self) -> bool {
        matches!(self, Self::Attached | Self::Failed(_) | Self::Disabled(_))
    }

    /// Why the probe is not attached, as one line.
    pub fn why(&self) -> Option<String> {
        match self {
            Self::Attached => None,
            Self::Failed(e) => Some(e.clone()),
            Self::NotNeeded => Some(NOT_NEEDED.to_owned()),
            Self::NotTried(mode) => Some(format!("{NOT_TRIED} {mode}")),
            Self::Disabled(by) => Some(format!("{DISABLED} {by}")),
        }
    }
}

const NOT_NEEDED: &str = "not needed: a preferred probe is attached";
const NOT_TRIED: &str = "not tried: --probe-mode";
const DISABLED: &str = "disabled by";

/// The contract's form of a probe status: `attached` and `error`.
#[derive(Serialize, Deserialize)]
struct ProbeStatusJson {
    collector: Name,
    probe: Name,
    attached: bool,
    error: Option<String>,
}

impl From<ProbeStatus> for ProbeStatusJson {
    fn from(s: ProbeStatus) -> Self {
        Self {
            collector: s.collector,
            probe: s.probe,
            attached: s.state.attached(),
            error: s.state.why(),
        }
    }
}

impl From<ProbeStatusJson> for ProbeStatus {
    fn from(j: ProbeStatusJson) -> Self {
        let state = match (j.attached, j.error) {
            (true, _) => ProbeState::Attached,
            (false, None) => ProbeState::Failed(String::new()),
            (false, Some(e)) => {
                if e == NOT_NEEDED {
                    ProbeState::NotNeeded
                } else if let Some(mode) = e.strip_prefix(NOT_TRIED) {
                    ProbeState::NotTried(mode.trim().to_owned())
                } else if let Some(by) = e.strip_prefix(DISABLED) {
                    ProbeState::Disabled(by.trim().to_owned())
                } else {
                    ProbeState::Failed(e)
                }
            }
        };
        Self {
            collector: j.collector,
            probe: j.probe,
            state,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Status {
    /// The drop probe in use.
    pub probe: Name,
    pub probes: Vec<ProbeStatus>,
}
