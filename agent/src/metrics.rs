//! Prometheus metrics of the agent, in the text exposition format.
//!
//! Label cardinality is bounded: at most [`MAX_VIP_LABELS`] VIPs get their own label (the rest
//! count under `vip="other"`, and `lbtrace_label_overflow_total` says how many events did), at
//! most [`MAX_MAC_LABELS`] MACs per VIP, and reasons come from the kernel's finite enum.
//! Events attributed to no VIP count under `vip="none"`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::IpAddr,
};

use crate::{
    btf::DropReasons,
    decode::Event,
    output::ct_event_label,
    ownership::Update,
    probes::{KernelCounters, ProbeStatus},
};

pub const MAX_VIP_LABELS: usize = 64;
pub const MAX_MAC_LABELS: usize = 8;

#[derive(Debug, Default)]
pub struct Metrics {
    pub node: String,
    vip_labels: BTreeSet<String>,
    overflow: u64,
    drops: BTreeMap<(String, String), u64>,
    conntrack: BTreeMap<(String, String), u64>,
    announcements: BTreeMap<(String, String), u64>,
    owner_changes: BTreeMap<String, u64>,
    owners: BTreeMap<String, (String, u32)>,
    events: BTreeMap<&'static str, u64>,
    kernel: KernelCounters,
    reason_names: BTreeMap<u32, String>,
    probes: Vec<ProbeStatus>,
    conntrack_entries: BTreeMap<u32, u64>,
    conntrack_max: Option<u64>,
    maps_bytes: u64,
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
            ..Self::default()
        }
    }

    /// Collectors none of whose probes attached, each with why (for `/healthz`): the agent
    /// runs without them.
    pub fn missing_collectors(&self) -> Vec<String> {
        let mut missing: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for p in &self.probes {
            missing.entry(p.collector).or_default();
        }
        for p in &self.probes {
            if p.attached {
                missing.remove(p.collector);
            } else if let (Some(why), Some(m)) = (&p.error, missing.get_mut(p.collector)) {
                m.push(format!("{}: {why}", p.probe));
            }
        }
        missing
            .into_iter()
            .map(|(c, why)| format!("{c} ({})", why.join("; ")))
            .collect()
    }

    /// The label for `vip`, folding VIPs past the bound into `other`.
    fn vip_label(&mut self, vip: Option<IpAddr>) -> String {
        let Some(vip) = vip else {
            return "none".into();
        };
        let v = vip.to_string();
        if self.vip_labels.contains(&v) {
            return v;
        }
        if self.vip_labels.len() < MAX_VIP_LABELS {
            self.vip_labels.insert(v.clone());
            return v;
        }
        self.overflow += 1;
        "other".into()
    }

    pub fn record(&mut self, e: &Event, vip: Option<IpAddr>, reasons: &DropReasons) {
        let label = self.vip_label(vip);
        match e {
            Event::Drop(d) => {
                *self.events.entry("drop").or_default() += 1;
                if let Some(ev) = &d.ct.event {
                    *self
                        .conntrack
                        .entry((label.clone(), ct_event_label(ev)))
                        .or_default() += 1;
                }
                *self
                    .drops
                    .entry((label, reasons.name(d.reason)))
                    .or_default() += 1;
            }
            Event::Arp(a) => {
                *self.events.entry("arp").or_default() += 1;
                if a.tx && !a.bridged && a.announced().is_some() && vip.is_some() {
                    let macs = self
                        .announcements
                        .keys()
                        .filter(|(v, _)| *v == label)
                        .count();
                    let mac = a.sender_mac.to_string();
                    let key = if macs >= MAX_MAC_LABELS
                        && !self
                            .announcements
                            .contains_key(&(label.clone(), mac.clone()))
                    {
                        self.overflow += 1;
                        (label, "other".to_owned())
                    } else {
                        (label, mac)
                    };
                    *self.announcements.entry(key).or_default() += 1;
                }
            }
            Event::Neigh(_) => *self.events.entry("neigh").or_default() += 1,
        }
    }

    pub fn ownership(&mut self, u: &Update) {
        if let Update::Changed { vip, change } = u {
            let label = self.vip_label(Some(*vip));
            if change.from.is_some() {
                *self.owner_changes.entry(label.clone()).or_default() += 1;
            }
            self.owners
                .insert(label, (change.to.mac.to_string(), change.to.netns));
        }
    }

    /// Counters the kernel keeps on its own (exact even when the ring overflows).
    pub fn kernel(&mut self, k: KernelCounters, reasons: &DropReasons) {
        for code in k.by_reason.keys() {
            self.reason_names
                .entry(*code)
                .or_insert_with(|| reasons.name(*code));
        }
        self.kernel = k;
    }

    pub fn conntrack_tables(&mut self, entries: BTreeMap<u32, u64>, max: Option<u64>) {
        self.conntrack_entries = entries;
        self.conntrack_max = max;
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut o = String::with_capacity(4096);
        let node = escape(&self.node);
        let family = |o: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        family(
            &mut o,
            "lbtrace_build_info",
            "gauge",
            "Version of this lbtrace.",
        );
        let _ = writeln!(
            o,
            "lbtrace_build_info{{version=\"{}\",node=\"{node}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        family(
            &mut o,
            "lbtrace_drops_total",
            "counter",
            "Dropped packets delivered, by VIP and kernel drop reason.",
        );
        for ((vip, reason), n) in &self.drops {
            let _ = writeln!(
                o,
                "lbtrace_drops_total{{vip=\"{}\",reason=\"{}\",node=\"{node}\"}} {n}",
                escape(vip),
                escape(reason)
            );
        }
        family(
            &mut o,
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
            let _ = writeln!(
                o,
                "lbtrace_kernel_drops_total{{reason=\"{}\",node=\"{node}\"}} {n}",
                escape(&name)
            );
        }
        family(
            &mut o,
            "lbtrace_conntrack_events_total",
            "counter",
            "Drops caused by conntrack, by VIP and event.",
        );
        for ((vip, event), n) in &self.conntrack {
            let _ = writeln!(
                o,
                "lbtrace_conntrack_events_total{{vip=\"{}\",event=\"{}\",node=\"{node}\"}} {n}",
                escape(vip),
                escape(event)
            );
        }
        family(
            &mut o,
            "lbtrace_arp_announcements_total",
            "counter",
            "ARP replies, gratuitous ARPs and neighbour advertisements a host sent for a VIP.",
        );
        for ((vip, mac), n) in &self.announcements {
            let _ = writeln!(
                o,
                "lbtrace_arp_announcements_total{{vip=\"{}\",mac=\"{}\",node=\"{node}\"}} {n}",
                escape(vip),
                escape(mac)
            );
        }
        family(
            &mut o,
            "lbtrace_vip_owner_changes_total",
            "counter",
            "Times the MAC announcing a VIP changed.",
        );
        for (vip, n) in &self.owner_changes {
            let _ = writeln!(
                o,
                "lbtrace_vip_owner_changes_total{{vip=\"{}\",node=\"{node}\"}} {n}",
                escape(vip)
            );
        }
        family(
            &mut o,
            "lbtrace_vip_owner_info",
            "gauge",
            "The MAC (and its netns) announcing each VIP, as seen from this node.",
        );
        for (vip, (mac, netns)) in &self.owners {
            let _ = writeln!(o, "lbtrace_vip_owner_info{{vip=\"{}\",mac=\"{}\",netns=\"{netns}\",node=\"{node}\"}} 1", escape(vip), escape(mac));
        }
        family(
            &mut o,
            "lbtrace_conntrack_entries",
            "gauge",
            "Conntrack entries per network namespace.",
        );
        for (ns, n) in &self.conntrack_entries {
            let _ = writeln!(
                o,
                "lbtrace_conntrack_entries{{netns=\"{ns}\",node=\"{node}\"}} {n}"
            );
        }
        if let Some(max) = self.conntrack_max {
            family(
                &mut o,
                "lbtrace_conntrack_entries_max",
                "gauge",
                "nf_conntrack_max (one limit, compared with each namespace's count).",
            );
            let _ = writeln!(o, "lbtrace_conntrack_entries_max{{node=\"{node}\"}} {max}");
        }
        family(
            &mut o,
            "lbtrace_events_total",
            "counter",
            "Records delivered from the kernel, by kind.",
        );
        for (kind, n) in &self.events {
            let _ = writeln!(
                o,
                "lbtrace_events_total{{kind=\"{kind}\",node=\"{node}\"}} {n}"
            );
        }
        family(
            &mut o,
            "lbtrace_events_lost_total",
            "counter",
            "Records that did not fit in the ring buffer, per CPU.",
        );
        for (cpu, n) in self.kernel.lost_per_cpu.iter().enumerate() {
            let _ = writeln!(
                o,
                "lbtrace_events_lost_total{{cpu=\"{cpu}\",node=\"{node}\"}} {n}"
            );
        }
        family(
            &mut o,
            "lbtrace_probe_attached",
            "gauge",
            "1 when the probe is attached.",
        );
        for p in &self.probes {
            let _ = writeln!(
                o,
                "lbtrace_probe_attached{{probe=\"{}\",collector=\"{}\",node=\"{node}\"}} {}",
                p.probe,
                p.collector,
                u8::from(p.attached)
            );
        }
        family(
            &mut o,
            "lbtrace_label_overflow_total",
            "counter",
            "Events counted under vip=\"other\" or mac=\"other\" because of the label bounds.",
        );
        let _ = writeln!(
            o,
            "lbtrace_label_overflow_total{{node=\"{node}\"}} {}",
            self.overflow
        );
        family(
            &mut o,
            "lbtrace_bpf_maps_bytes",
            "gauge",
            "Bytes of the BPF maps lbtrace created.",
        );
        let _ = writeln!(
            o,
            "lbtrace_bpf_maps_bytes{{node=\"{node}\"}} {}",
            self.maps_bytes
        );
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vip_labels_are_bounded() {
        let mut m = Metrics::new("n".into(), Vec::new(), 0);
        for i in 0..(MAX_VIP_LABELS + 5) {
            let ip: IpAddr = format!("10.200.{}.{}", i / 200, i % 200 + 1)
                .parse()
                .unwrap();
            m.vip_label(Some(ip));
        }
        assert_eq!(m.vip_labels.len(), MAX_VIP_LABELS);
        assert_eq!(m.overflow, 5);
        assert_eq!(m.vip_label(None), "none");
        let text = m.render();
        assert!(text.contains("lbtrace_label_overflow_total{node=\"n\"} 5"));
        assert!(text.contains("# TYPE lbtrace_drops_total counter"));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
