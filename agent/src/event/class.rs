//! Loss or not: what a freed packet means, by its drop reason and the function that freed it.
//!
//! The kernel frees packets that did their job, and packets of sockets being torn down, through
//! the same drop path as lost ones. [`classify`] is the one rule every view asks (watch, the
//! summary, the analysis, the report, `top`, `diagnose`, metrics); its table is
//! `classes.tsv` beside this file, with the evidence for each row and the kernels it was
//! measured on. A row for another kernel's variant is one more line there.

use std::{collections::HashMap, sync::OnceLock};

use serde::{Deserialize, Serialize};

/// What a drop stands for.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Class {
    /// A packet that did not reach where it was going: what per-VIP views count.
    #[default]
    Loss,
    /// Consumed, or freed while its socket was torn down: not loss.
    Benign,
    /// The host's own housekeeping (ping replies, IGMP, MLD), or a flooded copy of a frame for
    /// another host: not a loss of this host.
    LocalNoise,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Loss => "loss",
            Self::Benign => "benign",
            Self::LocalNoise => "local-noise",
        }
    }

    pub fn is_loss(self) -> bool {
        self == Self::Loss
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "loss" => Some(Self::Loss),
            "benign" => Some(Self::Benign),
            "local-noise" => Some(Self::LocalNoise),
            _ => None,
        }
    }
}

impl std::fmt::Display for Class {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The table with its evidence (tab-separated: class, reason, function, packet, kernels,
/// evidence). `classes-measure.sh` beside it re-measures a kernel.
pub const TABLE: &str = include_str!("classes.tsv");

/// What a row needs of the packet besides reason and function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PacketRule {
    Any,
    /// Only packets to a multicast address: unicast (a VIP's traffic) stays loss.
    Multicast,
}

/// One row of [`TABLE`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub class: Class,
    pub reason: &'static str,
    pub function: &'static str,
    pub packet: PacketRule,
    pub kernels: &'static str,
    pub evidence: &'static str,
}

/// The rows of [`TABLE`]; a malformed line is a bug caught by the unit test, and skipped.
pub fn rows() -> impl Iterator<Item = Row> {
    TABLE
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let mut f = l.split('\t');
            Some(Row {
                class: Class::parse(f.next()?)?,
                reason: f.next()?,
                function: f.next()?,
                packet: match f.next()? {
                    "any" => PacketRule::Any,
                    "multicast" => PacketRule::Multicast,
                    _ => return None,
                },
                kernels: f.next()?,
                evidence: f.next()?,
            })
        })
}

type Table = HashMap<(&'static str, &'static str), (PacketRule, Class)>;

fn table() -> &'static Table {
    static T: OnceLock<Table> = OnceLock::new();
    T.get_or_init(|| {
        rows()
            .map(|r| ((r.reason, r.function), (r.packet, r.class)))
            .collect()
    })
}

/// The class of a drop by its reason name and the function that freed it (a bare symbol, or
/// `symbol+0xoff`), for a unicast packet (what a VIP's counters hold). One hash lookup: cheap
/// enough per event and per metrics scrape.
pub fn classify(reason: &str, function: &str) -> Class {
    classify_packet(reason, function, false)
}

/// [`classify`], knowing whether the packet went to a multicast address.
pub fn classify_packet(reason: &str, function: &str, multicast: bool) -> Class {
    let function = function.split('+').next().unwrap_or(function);
    match table().get(&(reason, function)) {
        Some((PacketRule::Any, c)) => *c,
        Some((PacketRule::Multicast, c)) if multicast => *c,
        _ => Class::Loss,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_line_of_the_table_reads() {
        let lines = TABLE
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .count();
        assert_eq!(rows().count(), lines, "a malformed line in classes.tsv");
        assert!(
            rows().all(|r| r.class != Class::Loss),
            "loss is the default"
        );
    }

    #[test]
    fn the_lab_s_benign_frees_are_not_loss_and_real_drops_are() {
        assert_eq!(
            classify("NOT_SPECIFIED", "tcp_rcv_state_process+0x1d2"),
            Class::Benign
        );
        assert_eq!(
            classify("QUEUE_PURGE", "sk_stream_kill_queues"),
            Class::Benign
        );
        assert_eq!(classify("NO_SOCKET", "ping_rcv"), Class::LocalNoise);
        // A backend killed mid-stream frees at tcp_v4_rcv: loss.
        assert_eq!(classify("NOT_SPECIFIED", "tcp_v4_rcv+0x9"), Class::Loss);
        assert_eq!(classify("IP_INADDRERRORS", "ip_error"), Class::Loss);
        assert_eq!(classify("NO_SOCKET", "0xffffffff81000000"), Class::Loss);
        // IPv6 off: neighbour discovery is noise, a VIP's own packet is loss.
        assert_eq!(
            classify_packet("IPV6DISABLED", "ip6_rcv_core+0x36f", true),
            Class::LocalNoise
        );
        assert_eq!(classify("IPV6DISABLED", "ip6_rcv_core+0x36f"), Class::Loss);
    }
}
