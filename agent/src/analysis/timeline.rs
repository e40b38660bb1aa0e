//! A VIP's history in time buckets: one-second buckets, rolled up into minutes when old.

use std::collections::BTreeMap;

use serde::Serialize;

/// One-second buckets kept per VIP before the oldest roll up into minutes.
pub const FINE_BUCKETS: usize = 3600;
/// Minute buckets kept per VIP.
pub const COARSE_BUCKETS: usize = 1440;

/// Counts of one time bucket.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Bucket {
    pub drops: u64,
    pub drops_by_reason: BTreeMap<String, u64>,
    pub drops_by_netns: BTreeMap<u64, u64>,
    pub conntrack: BTreeMap<String, u64>,
    pub announcements: u64,
    pub garps: u64,
    pub owner_changes: u64,
    pub neigh_changes: u64,
    /// Drop records that were not loss (benign frees, local noise): in no other count.
    pub not_loss: u64,
}

impl Bucket {
    fn merge(&mut self, o: &Bucket) {
        self.drops += o.drops;
        for (k, v) in &o.drops_by_reason {
            *self.drops_by_reason.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.drops_by_netns {
            *self.drops_by_netns.entry(*k).or_default() += v;
        }
        for (k, v) in &o.conntrack {
            *self.conntrack.entry(k.clone()).or_default() += v;
        }
        self.announcements += o.announcements;
        self.garps += o.garps;
        self.owner_changes += o.owner_changes;
        self.neigh_changes += o.neigh_changes;
        self.not_loss += o.not_loss;
    }
}

/// A VIP's history: one-second buckets, rolled up into minutes when old.
#[derive(Clone, Debug, Default)]
pub struct Timeline {
    /// Unix second → bucket.
    pub fine: BTreeMap<u64, Bucket>,
    /// Unix minute start (seconds) → bucket.
    pub coarse: BTreeMap<u64, Bucket>,
}

impl Timeline {
    pub(crate) fn bucket(&mut self, sec: u64) -> &mut Bucket {
        if self.fine.len() >= FINE_BUCKETS && !self.fine.contains_key(&sec) {
            if let Some((old, b)) = self.fine.pop_first() {
                self.coarse.entry(old - old % 60).or_default().merge(&b);
                while self.coarse.len() > COARSE_BUCKETS {
                    self.coarse.pop_first();
                }
            }
        }
        self.fine.entry(sec).or_default()
    }

    /// All buckets, minutes first, as `(start second, width seconds, bucket)`.
    pub fn buckets(&self) -> impl Iterator<Item = (u64, u64, &Bucket)> {
        self.coarse
            .iter()
            .map(|(s, b)| (*s, 60, b))
            .chain(self.fine.iter().map(|(s, b)| (*s, 1, b)))
    }

    pub fn total(&self) -> Bucket {
        let mut t = Bucket::default();
        for (_, _, b) in self.buckets() {
            t.merge(b);
        }
        t
    }
}
