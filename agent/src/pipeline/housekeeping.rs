//! Once a second: the kernel's counters and totals for the sinks that want them (metrics), the
//! totals record for a sampled stream, and the NAT map's occupancy now and then.

use std::time::{Duration, Instant};

use super::{services, speakers, Pipeline};
use crate::{
    event::Namer,
    kernel::{btf::DropReasons, conntrack::TablePressure},
    probes::{AggCount, KernelCounters, NatOccupancy, Tracer},
};

/// What sinks get every second.
pub struct Housekeeping<'a> {
    pub counters: &'a KernelCounters,
    /// Exact drop totals per aggregation key (aggregation mode only).
    pub agg: &'a [AggCount],
    /// Symbols for the drop sites of `agg`.
    pub namer: &'a Namer,
    pub tables: &'a TablePressure,
    pub reasons: &'a DropReasons,
    /// The NAT map's occupancy, counted every [`NAT_COUNT_INTERVAL`] once it learned anything.
    pub nat: Option<NatOccupancy>,
    /// kube-proxy's rules, when they are read.
    pub kube: Option<&'a services::Catalog>,
    pub speakers: speakers::SpeakerCounts,
}

/// A NAT map key walk costs about a microsecond per entry: rare enough to stay cheap, more often
/// (every [`NAT_COUNT_BUSY`]) while translations churn through an eighth of the map between
/// counts.
const NAT_COUNT_INTERVAL: Duration = Duration::from_secs(30);
const NAT_COUNT_BUSY: Duration = Duration::from_secs(5);

impl Pipeline<'_> {
    pub(super) fn housekeeping(&mut self, tracer: &mut Tracer) {
        self.sync_vips(tracer);
        let (Ok(counters), Ok(agg)) = (tracer.counters(), tracer.agg_counts()) else {
            return;
        };
        let due = self.nat.is_none_or(|(n, at)| {
            let churn = counters.nat_learned.saturating_sub(n.learned) >= n.capacity / 8;
            at.elapsed() >= NAT_COUNT_INTERVAL || (churn && at.elapsed() >= NAT_COUNT_BUSY)
        });
        if tracer.aggregating && counters.nat_learned > 0 && due {
            match tracer.nat_occupancy(counters.nat_learned) {
                Ok(n) => self.nat = Some((n, Instant::now())),
                Err(e) => tracing::debug!("counting the NAT map: {e}"),
            }
        }
        if tracer.aggregating {
            self.say_totals(&counters, &agg, false);
        }
        let h = Housekeeping {
            counters: &counters,
            agg: &agg,
            namer: &self.namer,
            tables: &self.tables,
            reasons: self.namer.reasons(),
            nat: self.nat.map(|(n, _)| n),
            kube: self.kube.as_ref().map(|k| &k.catalog),
            speakers: self.speakers.counts,
        };
        for s in &mut self.sinks {
            s.housekeeping(&h);
        }
    }
}
