//! Which records the stream shows (`--vip`, `--all-drops`, `--count`).

use crate::event::Record;

/// What selects records for the stream, and how many.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// Keep only events attributed to a VIP (`--vip`; `--tag-vip` only attributes).
    pub vips_only: bool,
    /// Stop after this many events.
    pub limit: Option<u64>,
    /// Stream drops that are not loss too (benign frees, local noise: `--all-drops`).
    pub all_drops: bool,
}

impl Selection {
    /// Whether the stream shows this record.
    pub(super) fn shows(&self, r: &Record) -> bool {
        let loss = match r {
            Record::Drop(d) | Record::Conntrack(d) => d.is_loss(),
            // Rare, and evidence for every VIP the speakers hold.
            Record::Speaker(_) | Record::SpeakerLink(_) => return true,
            _ => true,
        };
        (!self.vips_only || r.vip().is_some()) && (loss || self.all_drops)
    }
}
