//! [`TotalsRec`]: the kernel's exact drop counts while it samples. Sampled drop records are a
//! bounded selection; this record says what they stand for, so no drop goes uncounted.

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

use super::{
    class::Class,
    values::{ConntrackEvent, Name, Time},
};

/// Cumulative counts since the start of the run, each from the kernel's own counters.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TotalsRec {
    pub time: Option<Time>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<Name>,
    /// Drops that passed the filters, per reason.
    pub drops_by_reason: BTreeMap<String, u64>,
    pub events_seen: u64,
    pub events_delivered: u64,
    /// Records the ring buffer had no room for (their drops are still counted above).
    pub events_lost: u64,
    /// Drops counted but not sent as records: over the sample limit.
    pub events_sampled_out: u64,
    /// Per VIP, reason and conntrack event: the exact count the sampled records stand for.
    pub vips: Vec<VipTotal>,
}

/// One VIP's exact drop count under one reason (and conntrack event).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipTotal {
    pub vip: IpAddr,
    pub reason: Name,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<ConntrackEvent>,
    #[serde(default)]
    pub class: Class,
    pub count: u64,
}

impl TotalsRec {
    /// The terminal's line: exact totals, and how many drops no record shows.
    pub fn line(&self) -> String {
        let total: u64 = self.drops_by_reason.values().sum();
        let mut by_count: Vec<_> = self.drops_by_reason.iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let reasons: Vec<String> = by_count.iter().map(|(r, n)| format!("{r} {n}")).collect();
        let mut not_shown = Vec::new();
        if self.events_sampled_out > 0 {
            not_shown.push(format!(
                "{} not shown (over --sample-limit)",
                self.events_sampled_out
            ));
        }
        if self.events_lost > 0 {
            not_shown.push(format!("{} lost (ring buffer full)", self.events_lost));
        }
        format!(
            "TOTALS {total} drops counted exactly ({}); {}",
            reasons.join(", "),
            not_shown.join(", ")
        )
    }
}
