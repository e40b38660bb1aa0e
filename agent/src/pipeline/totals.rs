//! The kernel's exact totals next to sampled records: a [`TotalsRec`] every second while
//! drops are sampled out or lost, and one at the end, so that every output says when it
//! sampled and what the records stand for.

use std::collections::BTreeMap;

use super::Pipeline;
use crate::{
    event::{
        class::classify_packet,
        totals::{TotalsRec, VipTotal},
        values::{ConntrackEvent, Time},
        Record,
    },
    probes::{AggCount, KernelCounters},
};

/// What the last totals record said: one is sent only when something moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Said {
    seen: u64,
    sampled_out: u64,
    lost: u64,
}

impl Pipeline<'_> {
    /// Per VIP, reason and conntrack event, the kernel's counts (keys differing only by the
    /// drop site are summed; drops with no VIP are in the per-reason totals only).
    pub(super) fn vip_totals(&mut self, agg: &[AggCount]) -> Vec<VipTotal> {
        let mut sums: BTreeMap<_, u64> = BTreeMap::new();
        for a in agg {
            let Some(vip) = a.vip else {
                continue;
            };
            let reason = self.namer.reason(a.reason);
            let function = self.namer.function(a.location).unwrap_or_default();
            let class = classify_packet(&reason, function, a.multicast);
            let event = a.event.map(ConntrackEvent);
            *sums.entry((vip, reason, event, class)).or_default() += a.count;
        }
        sums.into_iter()
            .map(|((vip, reason, event, class), count)| VipTotal {
                vip,
                reason,
                event,
                class,
                count,
            })
            .collect()
    }

    /// The totals record of this moment.
    pub(super) fn totals(&mut self, k: &KernelCounters, agg: &[AggCount]) -> TotalsRec {
        let reasons = self.namer.reasons();
        TotalsRec {
            time: Some(Time::now()),
            node: self.node.clone(),
            drops_by_reason: k.drops_by_reason(reasons),
            events_seen: k.events_seen(),
            events_delivered: self.counts.delivered,
            events_lost: k.lost(),
            events_sampled_out: k.sampled_out,
            vips: self.vip_totals(agg),
        }
    }

    /// Streams the totals when the records no longer show every drop and something moved
    /// since the last ones (`last`: at the end, whatever moved).
    pub(super) fn say_totals(&mut self, k: &KernelCounters, agg: &[AggCount], last: bool) {
        let now = Said {
            seen: k.events_seen(),
            sampled_out: k.sampled_out,
            lost: k.lost(),
        };
        if now.sampled_out + now.lost == 0 || (now == self.said && !last) {
            return;
        }
        self.said = now;
        let r = Record::Totals(Box::new(self.totals(k, agg)));
        self.emit(&r, true);
    }
}
