//! Prometheus metrics of the agent, in the text exposition format.
//!
//! Label cardinality is bounded: at most [`MAX_VIP_LABELS`] VIPs get their own label (the rest
//! count under `vip="other"`, and `lbtrace_label_overflow_total` says how many events did), at
//! most [`MAX_MAC_LABELS`] MACs per VIP, and reasons come from the kernel's finite enum.
//! Events attributed to no VIP count under `vip="none"`. A VIP's drops carry the `service`
//! (`ns/name`) kube-proxy's rules give it: one per VIP label, so no more series.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::{self, Write as _},
    io,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
};

mod render;

use super::{metrics_cluster::ClusterSeries, metrics_speakers::SpeakerSeries};
use crate::{
    event::{
        class::classify_packet,
        record::ProbeStatus,
        values::{ConntrackEvent, Mac, Name},
        Namer, Record,
    },
    kernel::btf::DropReasons,
    pipeline::{
        attribution::{own_entry, OTHER},
        services::Catalog,
        Housekeeping, Sink,
    },
    probes::{AggCount, KernelCounters},
};

pub const MAX_VIP_LABELS: usize = 1024;
pub const MAX_MAC_LABELS: usize = 8;

/// The `vip` label of a series. Typed, so that counting an event allocates nothing: text is
/// made at scrape time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum VipLabel {
    Vip(IpAddr),
    /// Past [`MAX_VIP_LABELS`].
    Other,
    /// Attributed to no VIP.
    None,
}

impl fmt::Display for VipLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Vip(ip) => write!(f, "{ip}"),
            Self::Other => f.write_str(OTHER),
            Self::None => f.write_str("none"),
        }
    }
}

/// The `mac` label of an announcement series.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum MacLabel {
    Mac(Mac),
    /// Past [`MAX_MAC_LABELS`] for the VIP.
    Other,
}

impl fmt::Display for MacLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Mac(m) => write!(f, "{m}"),
            Self::Other => f.write_str(OTHER),
        }
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub node: String,
    /// VIPs with a label of their own; the rest count as `other`.
    max_vips: usize,
    vip_labels: BTreeSet<IpAddr>,
    overflow: u64,
    /// Drops counted from records: every drop, unless the kernel aggregates (then only those
    /// its full map could not count).
    drops: BTreeMap<(VipLabel, Name), u64>,
    conntrack: BTreeMap<(VipLabel, ConntrackEvent), u64>,
    /// Drops the kernel counted itself (aggregation), replaced by each read of its totals.
    kernel_drops: BTreeMap<(VipLabel, Name), u64>,
    kernel_conntrack: BTreeMap<(VipLabel, ConntrackEvent), u64>,
    kernel_overflow: u64,
    announcements: BTreeMap<(VipLabel, MacLabel), u64>,
    owner_changes: BTreeMap<VipLabel, u64>,
    owners: BTreeMap<VipLabel, (Mac, u32)>,
    events: BTreeMap<&'static str, u64>,
    kernel: KernelCounters,
    nat: Option<crate::probes::NatOccupancy>,
    reason_names: BTreeMap<u32, String>,
    probes: Vec<ProbeStatus>,
    conntrack_entries: BTreeMap<u32, u64>,
    conntrack_max: Option<u64>,
    maps_bytes: u64,
    /// Series for the cluster-wide view (alert rules, `diagnose --prometheus`).
    cluster: ClusterSeries,
    /// Speakers' lifecycle and memberlist drops.
    speakers: SpeakerSeries,
    /// The Services of each labelled VIP, and the rules skipped, from kube-proxy's rules.
    services: BTreeMap<IpAddr, String>,
    kube_skipped: Option<u64>,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    pub fn new(node: String, probes: Vec<ProbeStatus>, maps_bytes: u64) -> Self {
        Self {
            node,
            probes,
            maps_bytes,
            max_vips: MAX_VIP_LABELS,
            ..Self::default()
        }
    }

    /// At most `n` VIPs get a label of their own.
    #[must_use]
    pub fn with_max_vips(mut self, n: usize) -> Self {
        self.max_vips = n;
        self
    }

    /// Collectors none of whose probes attached, each with why (for `/healthz`): the agent
    /// runs without them.
    pub fn missing_collectors(&self) -> Vec<String> {
        let mut missing: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for p in &self.probes {
            missing.entry(&p.collector).or_default();
        }
        for p in &self.probes {
            if p.state.attached() {
                missing.remove(&*p.collector);
            } else if let (Some(why), Some(m)) = (p.state.why(), missing.get_mut(&*p.collector)) {
                m.push(format!("{}: {why}", p.probe));
            }
        }
        missing
            .into_iter()
            .map(|(c, why)| format!("{c} ({})", why.join("; ")))
            .collect()
    }

    /// The label for `vip`, folding VIPs past the bound into `other`.
    fn vip_label(&mut self, vip: Option<IpAddr>) -> VipLabel {
        let label = self.label_of(vip);
        if label == VipLabel::Other {
            self.overflow += 1;
        }
        label
    }

    /// The label for `vip`, taking a label of its own while there is room.
    fn label_of(&mut self, vip: Option<IpAddr>) -> VipLabel {
        let Some(vip) = vip else {
            return VipLabel::None;
        };
        let known = self.vip_labels.contains(&vip);
        if own_entry(known, self.vip_labels.len(), self.max_vips) {
            if !known {
                self.vip_labels.insert(vip);
            }
            return VipLabel::Vip(vip);
        }
        VipLabel::Other
    }

    /// The kernel's exact totals per aggregation key (agent): they replace the last read.
    pub fn aggregated(&mut self, agg: &[AggCount], namer: &Namer) {
        let reasons = namer.reasons();
        self.kernel_drops.clear();
        self.kernel_conntrack.clear();
        self.kernel_overflow = 0;
        for a in agg {
            let label = self.label_of(a.vip);
            if label == VipLabel::Other {
                self.kernel_overflow += a.count;
            }
            let name = self
                .reason_names
                .entry(a.reason)
                .or_insert_with(|| reasons.name(a.reason));
            let name: Name = name.as_str().into();
            // Benign frees and local noise stay out of lbtrace_drops_total, as for records.
            let function = namer.function(a.location).unwrap_or_default();
            if !classify_packet(&name, function, a.multicast).is_loss() {
                continue;
            }
            *self.kernel_drops.entry((label, name)).or_default() += a.count;
            if let Some(e) = a.event {
                *self
                    .kernel_conntrack
                    .entry((label, ConntrackEvent(e)))
                    .or_default() += a.count;
            }
        }
    }

    pub fn record(&mut self, r: &Record) {
        match r {
            // A sample is already in the kernel's totals.
            Record::Drop(d) | Record::Conntrack(d) if d.sampled => {
                *self.events.entry("drop").or_default() += 1;
                if d.is_loss() {
                    let label = self.label_of(d.vip);
                    self.cluster.drop(label, d);
                }
            }
            Record::Drop(d) | Record::Conntrack(d) => {
                let label = self.vip_label(d.vip);
                *self.events.entry("drop").or_default() += 1;
                if let Some(ev) = d.event {
                    *self.conntrack.entry((label, ev)).or_default() += 1;
                }
                // issue 15: benign frees and local noise stay out of lbtrace_drops_total (one
                // rule: event::class::classify, cheap enough to call at scrape time too).
                if d.is_loss() {
                    *self.drops.entry((label, d.reason.clone())).or_default() += 1;
                    self.cluster.drop(label, d);
                }
            }
            Record::Arp(a) => {
                let label = self.vip_label(a.vip);
                *self.events.entry("arp").or_default() += 1;
                self.cluster.arp(label, a);
                if a.announced().is_some() && a.vip.is_some() {
                    self.announcement(label, a.sender_mac);
                }
            }
            Record::Neigh(n) => {
                self.vip_label(n.vip);
                *self.events.entry("neigh").or_default() += 1;
            }
            Record::VipOwner(o) => {
                let label = self.vip_label(Some(o.vip));
                if o.old_mac.is_some() {
                    *self.owner_changes.entry(label).or_default() += 1;
                }
                self.owners
                    .insert(label, (o.new_mac, o.new_netns.unwrap_or_default()));
            }
            Record::Endpoint(_) => *self.events.entry("endpoint").or_default() += 1,
            Record::Speaker(s) => {
                *self.events.entry("speaker").or_default() += 1;
                self.speakers.speaker(s);
            }
            Record::SpeakerLink(l) => {
                *self.events.entry("speaker_link").or_default() += 1;
                self.speakers.link(l);
            }
            _ => {}
        }
    }

    fn announcement(&mut self, label: VipLabel, mac: Mac) {
        let macs = self
            .announcements
            .keys()
            .filter(|(v, _)| *v == label)
            .count();
        let known = self
            .announcements
            .contains_key(&(label, MacLabel::Mac(mac)));
        let key = if own_entry(known, macs, MAX_MAC_LABELS) {
            (label, MacLabel::Mac(mac))
        } else {
            self.overflow += 1;
            (label, MacLabel::Other)
        };
        *self.announcements.entry(key).or_default() += 1;
    }

    /// Counters the kernel keeps on its own (exact even when the ring overflows).
    pub fn kernel(&mut self, k: &KernelCounters, reasons: &DropReasons) {
        for code in k.by_reason.keys() {
            self.reason_names
                .entry(*code)
                .or_insert_with(|| reasons.name(*code));
        }
        self.kernel = k.clone();
    }

    /// The VIPs' Services in kube-proxy's rules (for VIPs with a label of their own only).
    pub fn kube_proxy(&mut self, c: &Catalog) {
        self.services = self
            .vip_labels
            .iter()
            .map(|v| (*v, c.vip_services(*v).join(",")))
            .filter(|(_, s)| !s.is_empty())
            .collect();
        self.kube_skipped = Some(c.stats().rules_skipped);
    }

    pub fn conntrack_tables(&mut self, entries: BTreeMap<u32, u64>, max: Option<u64>) {
        self.conntrack_entries = entries;
        self.conntrack_max = max;
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut e = Expo::new(&self.node);
        e.family("lbtrace_build_info", "gauge", "Version of this lbtrace.");
        e.sample(
            "lbtrace_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1,
        );
        e.family(
            "lbtrace_drops_total",
            "counter",
            "Lost packets delivered, by VIP and kernel drop reason (benign frees and local noise not counted).",
        );
        let mut drops = self.drops.clone();
        for (k, n) in &self.kernel_drops {
            *drops.entry(k.clone()).or_default() += n;
        }
        for ((vip, reason), n) in &drops {
            let service = match vip {
                VipLabel::Vip(ip) => self.services.get(ip),
                _ => None,
            };
            let vip = vip.to_string();
            let mut labels = vec![("vip", vip.as_str()), ("reason", reason)];
            labels.extend(service.map(|s| ("service", s.as_str())));
            e.sample("lbtrace_drops_total", &labels, n);
        }
        e.family(
            "lbtrace_kernel_drops_total",
            "counter",
            "Drops counted in the kernel per reason (exact, independent of the ring buffer).",
        );
        for (code, n) in &self.kernel.by_reason {
            let name = self
                .reason_names
                .get(code)
                .cloned()
                .unwrap_or_else(|| code.to_string());
            e.sample("lbtrace_kernel_drops_total", &[("reason", &name)], n);
        }
        e.family(
            "lbtrace_conntrack_events_total",
            "counter",
            "Drops caused by conntrack, by VIP and event.",
        );
        let mut conntrack = self.conntrack.clone();
        for (k, n) in &self.kernel_conntrack {
            *conntrack.entry(*k).or_default() += n;
        }
        for ((vip, event), n) in &conntrack {
            let (vip, event) = (vip.to_string(), event.to_string());
            let labels = [("vip", vip.as_str()), ("event", event.as_str())];
            e.sample("lbtrace_conntrack_events_total", &labels, n);
        }
        self.render_ownership(&mut e);
        self.render_health(&mut e);
        self.cluster.render(&mut e);
        self.speakers.render(&mut e);
        e.o
    }

    fn render_ownership(&self, e: &mut Expo) {
        e.family(
            "lbtrace_arp_announcements_total",
            "counter",
            "ARP replies, gratuitous ARPs and neighbour advertisements a host sent for a VIP.",
        );
        for ((vip, mac), n) in &self.announcements {
            let (vip, mac) = (vip.to_string(), mac.to_string());
            let labels = [("vip", vip.as_str()), ("mac", mac.as_str())];
            e.sample("lbtrace_arp_announcements_total", &labels, n);
        }
        e.family(
            "lbtrace_vip_owner_changes_total",
            "counter",
            "Times the MAC announcing a VIP changed.",
        );
        for (vip, n) in &self.owner_changes {
            let vip = vip.to_string();
            e.sample("lbtrace_vip_owner_changes_total", &[("vip", &vip)], n);
        }
        e.family(
            "lbtrace_vip_owner_info",
            "gauge",
            "The MAC (and its netns) announcing each VIP, as seen from this node.",
        );
        for (vip, (mac, netns)) in &self.owners {
            let (vip, mac, netns) = (vip.to_string(), mac.to_string(), netns.to_string());
            let labels = [
                ("vip", vip.as_str()),
                ("mac", mac.as_str()),
                ("netns", &netns),
            ];
            e.sample("lbtrace_vip_owner_info", &labels, 1);
        }
        e.family(
            "lbtrace_conntrack_entries",
            "gauge",
            "Conntrack entries per network namespace.",
        );
        for (ns, n) in &self.conntrack_entries {
            e.sample(
                "lbtrace_conntrack_entries",
                &[("netns", &ns.to_string())],
                n,
            );
        }
        if let Some(max) = self.conntrack_max {
            e.family(
                "lbtrace_conntrack_entries_max",
                "gauge",
                "nf_conntrack_max (one limit, compared with each namespace's count).",
            );
            e.sample("lbtrace_conntrack_entries_max", &[], max);
        }
    }
}

/// The text exposition being written: every sample gets the node label last.
pub(crate) struct Expo {
    o: String,
    node: String,
}

impl Expo {
    pub(crate) fn new(node: &str) -> Self {
        Self {
            o: String::with_capacity(4096),
            node: escape(node),
        }
    }

    #[cfg(test)]
    pub(crate) fn text(&self) -> &str {
        &self.o
    }

    pub(crate) fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    pub(crate) fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl fmt::Display) {
        let _ = write!(self.o, "{name}{{");
        for (k, v) in labels {
            let _ = write!(self.o, "{k}=\"{}\",", escape(v));
        }
        let _ = writeln!(self.o, "node=\"{}\"}} {value}", self.node);
    }
}

/// The agent's metrics, fed every record.
pub struct MetricsSink(pub Arc<Mutex<Metrics>>);

impl MetricsSink {
    fn lock(&self) -> std::sync::MutexGuard<'_, Metrics> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Sink for MetricsSink {
    fn record(&mut self, r: &Record) -> io::Result<()> {
        self.lock().record(r);
        Ok(())
    }

    fn wants_all(&self) -> bool {
        true
    }

    fn housekeeping(&mut self, h: &Housekeeping<'_>) {
        let mut m = self.lock();
        m.kernel(h.counters, h.reasons);
        m.aggregated(h.agg, h.namer);
        if h.nat.is_some() {
            m.nat = h.nat;
        }
        m.conntrack_tables(h.tables.entries(), h.tables.max);
        if let Some(c) = h.kube {
            m.kube_proxy(c);
        }
        m.speakers.counts(h.speakers);
    }
}

#[cfg(test)]
mod tests;
