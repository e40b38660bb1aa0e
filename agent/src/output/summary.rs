//! The closing summary of a run: the kernel's exact counters next to what was delivered, drops
//! per VIP, conntrack table pressure, ownership and findings.

use std::{
    collections::BTreeMap,
    io::{self, Write},
    net::IpAddr,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    event::{
        record::FindingRec,
        totals::VipTotal,
        values::{ConntrackEvent, Mac, Name, Time},
        Record,
    },
    kernel::conntrack::TableReport,
    pipeline::{services::KubeProxyStats, Pipeline},
    probes::{probe_name, KernelCounters, Tracer},
};

/// What a drop counts under in the summary: its reason, or the conntrack event behind it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum DropLabel {
    Reason(Name),
    Conntrack(ConntrackEvent),
}

impl std::fmt::Display for DropLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Reason(r) => f.write_str(r),
            Self::Conntrack(e) => write!(f, "conntrack:{e}"),
        }
    }
}

/// Delivered drops per VIP and reason (or conntrack event), loss only, and per VIP the drops
/// that were not loss; counting allocates nothing once a VIP and label were seen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VipCounts {
    loss: BTreeMap<IpAddr, BTreeMap<DropLabel, u64>>,
    not_loss: BTreeMap<IpAddr, u64>,
}

impl VipCounts {
    pub fn add(&mut self, r: &Record) {
        let (Record::Drop(d) | Record::Conntrack(d)) = r else {
            return;
        };
        // A sample is one of the kernel's exact counts, added by `add_totals`.
        let (Some(vip), false) = (d.vip, d.sampled) else {
            return;
        };
        self.count(vip, &d.reason, d.event, d.is_loss(), 1);
    }

    fn count(
        &mut self,
        vip: IpAddr,
        reason: &Name,
        event: Option<ConntrackEvent>,
        loss: bool,
        n: u64,
    ) {
        if !loss {
            *self.not_loss.entry(vip).or_default() += n;
            return;
        }
        let label = match event {
            Some(e) => DropLabel::Conntrack(e),
            None => DropLabel::Reason(reason.clone()),
        };
        *self.loss.entry(vip).or_default().entry(label).or_default() += n;
    }

    /// The kernel's exact counts (aggregation), which the sampled records stand for.
    pub fn add_totals(&mut self, totals: &[VipTotal]) {
        for t in totals {
            self.count(t.vip, &t.reason, t.event, t.class.is_loss(), t.count);
        }
    }

    /// Per VIP, the drops that were not loss (benign, local noise).
    pub fn not_loss_text(&self) -> BTreeMap<String, u64> {
        self.not_loss
            .iter()
            .map(|(v, n)| (v.to_string(), *n))
            .collect()
    }

    /// As the summary writes them: VIP → label → count.
    pub fn into_text(self) -> BTreeMap<String, BTreeMap<String, u64>> {
        self.loss
            .into_iter()
            .map(|(vip, labels)| {
                let labels = labels.into_iter().map(|(l, n)| (l.to_string(), n));
                (vip.to_string(), labels.collect())
            })
            .collect()
    }
}

/// One ownership change of a VIP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerChange {
    pub from: Option<Mac>,
    pub garps: u32,
    pub time: Time,
    pub to: Mac,
    pub to_netns: u32,
}

/// Who announces a VIP now, and how it got there.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct OwnerSummary {
    pub changes: Vec<OwnerChange>,
    pub garps_total: u32,
    pub ifname: Option<Name>,
    pub mac: Option<Mac>,
    pub netns: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Summary {
    pub duration_s: f64,
    pub probe: Name,
    /// From the kernel's exact per-reason counters, not from delivered records.
    pub drops_by_reason: BTreeMap<String, u64>,
    pub events_seen: u64,
    pub events_delivered: u64,
    pub events_lost: u64,
    /// Drops counted exactly but not sent as records (the agent's sampling):
    /// `seen = delivered + lost + sampled_out`. Absent when nothing was sampled.
    #[serde(skip_serializing_if = "is_zero")]
    pub events_sampled_out: u64,
    pub lost_by_cpu: BTreeMap<String, u64>,
    /// Per program, runs the kernel skipped because it was already running on that CPU:
    /// events no program saw, so in no count above. Absent when there were none.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub missed_by_program: BTreeMap<String, u64>,
    pub events_printed: u64,
    pub decode_errors: u64,
    /// Conntrack-caused drops per event, from the kernel's exact counters.
    pub conntrack_by_event: BTreeMap<String, u64>,
    /// DNAT translations learned, and drops attributed through them.
    pub nat_learned: u64,
    pub nat_joined: u64,
    /// Lost packets per VIP (drop records delivered, attributed and classed as loss).
    pub drops_by_vip: BTreeMap<String, BTreeMap<String, u64>>,
    /// Per VIP, drop records that were not loss (benign frees, local noise): not counted above.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub not_loss_by_vip: BTreeMap<String, u64>,
    /// Per netns: conntrack table pressure and per-CPU counter movement while watching.
    #[serde(with = "crate::event::values::number_keys")]
    pub conntrack_tables: BTreeMap<u32, TableReport>,
    /// ARP/NDP and neighbour records seen by the kernel (included in `events_seen`).
    pub arp_events: u64,
    pub neigh_events: u64,
    /// Who announces each VIP, its ownership changes and findings.
    pub vip_owners: BTreeMap<String, OwnerSummary>,
    pub findings: Vec<FindingRec>,
    /// VIPs learned from gratuitous announcements or kube-proxy's rules (`--discover-vips`).
    pub discovered_vips: Vec<String>,
    /// What kube-proxy's rules gave (absent when they were not read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kube_proxy: Option<KubeProxyStats>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Summary {
    /// The summary of a finished run.
    pub fn build(
        p: &mut Pipeline<'_>,
        tracer: &Tracer,
        k: &KernelCounters,
        totals: &[VipTotal],
        duration: Duration,
    ) -> Self {
        let mut vip_counts = p.take_vip_counts();
        vip_counts.add_totals(totals);
        let reasons = p.namer.reasons();
        let counts = p.counts;
        Self {
            duration_s: (duration.as_secs_f64() * 1000.0).round() / 1000.0,
            probe: probe_name(tracer.active).into(),
            drops_by_reason: k.drops_by_reason(reasons),
            events_seen: k.events_seen(),
            events_delivered: counts.delivered,
            events_lost: k.lost(),
            events_sampled_out: k.sampled_out,
            lost_by_cpu: k
                .lost_per_cpu
                .iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(|(c, n)| (c.to_string(), *n))
                .collect(),
            missed_by_program: k
                .missed
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(p, n)| (p.clone(), *n))
                .collect(),
            events_printed: counts.printed,
            decode_errors: counts.decode_errors,
            conntrack_by_event: k
                .ct_events
                .iter()
                .map(|(e, n)| (e.as_str().to_owned(), *n))
                .collect(),
            nat_learned: k.nat_learned,
            nat_joined: k.nat_joined,
            not_loss_by_vip: vip_counts.not_loss_text(),
            drops_by_vip: vip_counts.into_text(),
            conntrack_tables: p.tables.finish(),
            arp_events: k.arp,
            neigh_events: k.neigh,
            vip_owners: owners(p),
            findings: p
                .ownership
                .findings
                .iter()
                .map(|f| FindingRec {
                    time: None,
                    ..f.clone()
                })
                .collect(),
            discovered_vips: p
                .ownership
                .discovered
                .iter()
                .map(ToString::to_string)
                .collect(),
            kube_proxy: p.kube.as_ref().map(|k| k.catalog.stats()),
        }
    }

    /// The summary for a person.
    pub fn write_text(&self, out: &mut dyn Write) -> io::Result<()> {
        writeln!(
            out,
            "--- lbtrace summary ({:.1}s, probe {}) ---",
            self.duration_s, self.probe
        )?;
        let mut by_count: Vec<_> = self.drops_by_reason.iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (reason, n) in by_count {
            writeln!(out, "{n:>10}  {reason}")?;
        }
        for (event, n) in self.conntrack_by_event.iter().filter(|(_, n)| **n > 0) {
            writeln!(out, "{n:>10}  conntrack {event}")?;
        }
        for (vip, owner) in &self.vip_owners {
            writeln!(
                out,
                "vip {vip}: announced by {} (netns {}), {} ownership change(s)",
                owner.mac.map_or("?".to_owned(), |m| m.to_string()),
                owner.netns.map_or("null".to_owned(), |n| n.to_string()),
                owner.changes.len()
            )?;
        }
        for f in &self.findings {
            writeln!(
                out,
                "finding: {} for vip {}: {}",
                f.finding.as_str(),
                f.vip,
                f.detail
            )?;
        }
        for (vip, reasons) in &self.drops_by_vip {
            let total: u64 = reasons.values().sum();
            let detail: Vec<String> = reasons.iter().map(|(r, n)| format!("{r} {n}")).collect();
            writeln!(out, "vip {vip}: {total} drops ({})", detail.join(", "))?;
        }
        for (vip, n) in &self.not_loss_by_vip {
            writeln!(
                out,
                "vip {vip}: {n} benign frees or local noise, not loss (--all-drops shows them)"
            )?;
        }
        if let Some(k) = &self.kube_proxy {
            let modes: Vec<&str> = k.modes.iter().map(|m| m.as_str()).collect();
            writeln!(
                out,
                "kube-proxy: rules in {} namespace(s) ({}), {} Service ports, {} endpoint changes, {} rules of an unknown shape skipped",
                k.namespaces,
                if modes.is_empty() { "none".to_owned() } else { modes.join(", ") },
                k.service_ports,
                k.endpoint_changes,
                k.rules_skipped
            )?;
        }
        writeln!(
            out,
            "events: {} seen by the kernel, {} delivered, {} lost (ring buffer full){}{}",
            self.events_seen,
            self.events_delivered,
            self.events_lost,
            if self.events_sampled_out > 0 {
                format!(
                    ", {} not sent (sampled; counted exactly)",
                    self.events_sampled_out
                )
            } else {
                String::new()
            },
            if self.decode_errors > 0 {
                format!(", {} undecodable", self.decode_errors)
            } else {
                String::new()
            }
        )
    }
}

/// Ownership per VIP for the summary.
fn owners(p: &Pipeline<'_>) -> BTreeMap<String, OwnerSummary> {
    p.ownership
        .owners()
        .map(|(vip, owner, changes)| {
            let summary = OwnerSummary {
                changes: changes
                    .iter()
                    .filter_map(|c| {
                        Some(OwnerChange {
                            from: Some(c.from.as_ref()?.mac),
                            garps: c.garps,
                            time: c.at,
                            to: c.to.mac,
                            to_netns: c.to.netns,
                        })
                    })
                    .collect(),
                garps_total: changes.iter().map(|c| c.garps).sum(),
                ifname: owner.and_then(|o| o.ifname.clone()),
                mac: owner.map(|o| o.mac),
                netns: owner.map(|o| o.netns),
            };
            (vip.to_string(), summary)
        })
        .collect()
}
