//! Sampled drop records and the kernel's exact totals: each sampled record counts as it comes,
//! and each totals record tops the buckets up to the exact count, so a live view (and a
//! recording with totals) counts every drop, not every sample.

use std::{collections::BTreeMap, net::IpAddr};

use super::Analyzer;
use crate::event::{
    record::DropRec,
    totals::{TotalsRec, VipTotal},
    values::{ConntrackEvent, Name},
};

/// Node, VIP, reason, conntrack event and whether it is loss.
type Key = (Option<Name>, IpAddr, Name, Option<ConntrackEvent>, bool);

/// Per key, the drops the buckets hold so far (samples, then top-ups).
#[derive(Debug, Default)]
pub(super) struct Counted(BTreeMap<Key, u64>);

impl Counted {
    /// A sampled drop record, already counted in its bucket.
    pub(super) fn sample(&mut self, d: &DropRec, vip: IpAddr) {
        if d.sampled {
            let key = (d.node.clone(), vip, d.reason.clone(), d.event, d.is_loss());
            *self.0.entry(key).or_default() += 1;
        }
    }

    /// How many drops under `t` the buckets lack; from now on they hold `t.count`. Samples
    /// that arrive after the totals that counted them are absorbed by the next totals.
    fn missing(&mut self, node: Option<&Name>, t: &VipTotal) -> u64 {
        let key = (
            node.cloned(),
            t.vip,
            t.reason.clone(),
            t.event,
            t.class.is_loss(),
        );
        let counted = self.0.entry(key).or_default();
        let missing = t.count.saturating_sub(*counted);
        *counted = (*counted).max(t.count);
        missing
    }
}

impl Analyzer {
    /// Tops each VIP's buckets up to the kernel's exact counts at the totals' time.
    pub(super) fn add_totals(&mut self, totals: &TotalsRec) {
        let t = totals
            .time
            .map_or(self.last.unwrap_or(0.0), |t| t.as_secs_f64());
        for v in &totals.vips {
            let n = self.counted.missing(totals.node.as_ref(), v);
            if n > 0 {
                let st = self.state(&v.vip.to_string());
                st.add_counted(t, &v.reason, v.event, v.class.is_loss(), n);
            }
        }
    }
}
