//! The NAT and health families of the exposition.

use super::{Expo, Metrics};

impl Metrics {
    pub(super) fn render_nat(&self, e: &mut Expo) {
        e.family(
            "lbtrace_nat_learned_total",
            "counter",
            "DNAT translations learned (one per new translated connection).",
        );
        e.sample("lbtrace_nat_learned_total", &[], self.kernel.nat_learned);
        e.family(
            "lbtrace_nat_joined_total",
            "counter",
            "Drops attributed to a VIP through a learned translation.",
        );
        e.sample("lbtrace_nat_joined_total", &[], self.kernel.nat_joined);
        let Some(n) = self.nat else {
            return;
        };
        e.family(
            "lbtrace_nat_entries",
            "gauge",
            "Translations the NAT map holds (counted every 30 s), of lbtrace_nat_capacity.",
        );
        e.sample("lbtrace_nat_entries", &[], n.entries);
        e.family(
            "lbtrace_nat_capacity",
            "gauge",
            "Size of the NAT map (--nat-entries).",
        );
        e.sample("lbtrace_nat_capacity", &[], n.capacity);
        e.family(
            "lbtrace_nat_evictions_total",
            "counter",
            "Translations learned but no longer held at the last count (every 30 s; evicted by newer ones): drops of those flows behind DNAT go unattributed. Raise --nat-entries when it grows.",
        );
        e.sample("lbtrace_nat_evictions_total", &[], n.evicted());
    }

    pub(super) fn render_health(&self, e: &mut Expo) {
        e.family(
            "lbtrace_events_total",
            "counter",
            "Records delivered from the kernel, by kind.",
        );
        for (kind, n) in &self.events {
            e.sample("lbtrace_events_total", &[("kind", kind)], n);
        }
        e.family(
            "lbtrace_events_lost_total",
            "counter",
            "Records that did not fit in the ring buffer, per CPU.",
        );
        for (cpu, n) in self.kernel.lost_per_cpu.iter().enumerate() {
            e.sample("lbtrace_events_lost_total", &[("cpu", &cpu.to_string())], n);
        }
        self.render_nat(e);
        e.family(
            "lbtrace_events_sampled_out_total",
            "counter",
            "Drops counted exactly in the kernel but not sent as records (over the sample limit).",
        );
        e.sample(
            "lbtrace_events_sampled_out_total",
            &[],
            self.kernel.sampled_out,
        );
        e.family(
            "lbtrace_aggregation_full_total",
            "counter",
            "Drops whose key did not fit the kernel's counters (sent and counted as records).",
        );
        e.sample("lbtrace_aggregation_full_total", &[], self.kernel.agg_full);
        e.family(
            "lbtrace_program_missed_runs_total",
            "counter",
            "Runs the kernel skipped because the program was already running on that CPU \
             (recursion_misses): events no program saw.",
        );
        for (program, n) in &self.kernel.missed {
            e.sample(
                "lbtrace_program_missed_runs_total",
                &[("program", program)],
                n,
            );
        }
        e.family(
            "lbtrace_probe_attached",
            "gauge",
            "1 when the probe is attached.",
        );
        for p in &self.probes {
            let labels = [("probe", &*p.probe), ("collector", &*p.collector)];
            e.sample(
                "lbtrace_probe_attached",
                &labels,
                u8::from(p.state.attached()),
            );
        }
        if let Some(n) = self.kube_skipped {
            e.family(
                "lbtrace_kube_proxy_rules_skipped",
                "gauge",
                "Rules in kube-proxy's tables of a shape lbtrace does not know (skipped).",
            );
            e.sample("lbtrace_kube_proxy_rules_skipped", &[], n);
        }
        e.family(
            "lbtrace_label_overflow_total",
            "counter",
            "Events counted under vip=\"other\" or mac=\"other\" because of the label bounds.",
        );
        e.sample(
            "lbtrace_label_overflow_total",
            &[],
            self.overflow + self.kernel_overflow,
        );
        e.family(
            "lbtrace_bpf_maps_bytes",
            "gauge",
            "Bytes of the BPF maps lbtrace created.",
        );
        e.sample("lbtrace_bpf_maps_bytes", &[], self.maps_bytes);
    }
}
