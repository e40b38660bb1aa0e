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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{class::Class, values::Time, Record};

    fn at(s: u64) -> Option<Time> {
        Some(Time::from_secs_f64(1_800_000_000.0 + s as f64))
    }

    fn sample(s: u64) -> Record {
        Record::Drop(DropRec {
            time: at(s),
            reason: "NO_SOCKET".into(),
            location: "__udp4_lib_rcv+0x1".into(),
            vip: "10.200.0.100".parse().ok(),
            sampled: true,
            ..DropRec::default()
        })
    }

    fn totals(s: u64, count: u64) -> Record {
        Record::Totals(Box::new(TotalsRec {
            time: at(s),
            vips: vec![VipTotal {
                vip: "10.200.0.100".parse().unwrap(),
                reason: "NO_SOCKET".into(),
                event: None,
                class: Class::Loss,
                count,
            }],
            ..TotalsRec::default()
        }))
    }

    #[test]
    fn sampled_buckets_are_topped_up_to_the_kernels_counts_never_past_them() {
        let mut a = Analyzer::new([]);
        for s in [0, 0, 1] {
            a.add(&sample(s));
        }
        a.add(&totals(1, 1000));
        // A sample the totals already counted, then the next totals absorb it.
        a.add(&sample(1));
        a.add(&totals(2, 1500));
        let tl = a.timeline("10.200.0.100").unwrap();
        assert_eq!(tl.total().drops, 1500);
        assert_eq!(tl.total().drops_by_reason["NO_SOCKET"], 1500);
        // Totals that did not move add nothing.
        a.add(&totals(3, 1500));
        assert_eq!(a.timeline("10.200.0.100").unwrap().total().drops, 1500);
    }
}
