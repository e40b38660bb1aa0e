//! A lab node's rules: kube-proxy's syncs (and the endpoint changes they carry) and the
//! lab's own table (per-VIP counters, the CNI's policy, the scenario's rules).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    time::SystemTime,
};

use anyhow::{Context, Result};

use super::{kubeproxy, topology::*, TCP_PORT, UDP_PORT};

impl Lab {
    /// A kube-proxy sync on every node (its rules rewritten whole, atomically per node and
    /// family), and the lab's table. Counters survive (`flush table` keeps named objects).
    /// Endpoint changes are logged with the time the last node had them.
    pub fn sync(&self) -> Result<()> {
        let started = SystemTime::now();
        for (n, node) in self.nodes.iter().enumerate() {
            node.nft(&self.ruleset(n))
                .with_context(|| format!("the lab's rules on n{n}"))?;
            kubeproxy::sync(self, n).with_context(|| format!("kube-proxy rules on n{n}"))?;
        }
        self.log_endpoint_changes(started);
        Ok(())
    }

    fn log_endpoint_changes(&self, started: SystemTime) {
        let mut now: BTreeMap<String, BTreeSet<SocketAddr>> = BTreeMap::new();
        for svc in &self.services {
            for port in kubeproxy::PORTS {
                let eps = now
                    .entry(kubeproxy::service_port_name(svc.name, &port))
                    .or_default();
                for pod in &svc.endpoints {
                    for &vip in &svc.vips {
                        eps.insert(SocketAddr::new(pod.ip_like(vip), port.target));
                    }
                }
            }
        }
        let (Ok(mut synced), Ok(mut log)) = (self.synced.lock(), self.endpoint_log.lock()) else {
            return;
        };
        let at = SystemTime::now();
        if !synced.is_empty() {
            let none = BTreeSet::new();
            let names: BTreeSet<&String> = synced.keys().chain(now.keys()).collect();
            for name in names {
                let (b, a) = (
                    synced.get(name).unwrap_or(&none),
                    now.get(name).unwrap_or(&none),
                );
                for (set, other, added) in [(a, b, true), (b, a, false)] {
                    for ep in set.difference(other) {
                        log.push(EndpointChange {
                            started,
                            at,
                            service: name.clone(),
                            endpoint: *ep,
                            added,
                        });
                    }
                }
            }
        }
        *synced = now;
    }

    /// The lab's table for node `n`: per-VIP counters (the no-endpoint one counts what
    /// kube-proxy's rules are about to drop: new flows for a VIP without usable endpoint on
    /// the node), the CNI's policy and the scenario's rules.
    pub fn ruleset(&self, n: usize) -> String {
        let mut counters = String::new();
        let mut raw = String::new();
        let mut mangle = String::new();
        let mut noep = String::new();
        for svc in &self.services {
            for &vip in &svc.vips {
                let fam = if vip.is_ipv4() { "ip" } else { "ip6" };
                for c in Counter::ALL {
                    let _ = writeln!(counters, "  counter {} {{ }}", c.name(vip));
                }
                let dst = format!("{fam} daddr {vip}");
                let _ = writeln!(raw, "    {dst} counter name {}", Counter::Arrive.name(vip));
                if svc.owner != Some(n) {
                    let _ = writeln!(raw, "    {dst} counter name {}", Counter::Stray.name(vip));
                }
                let _ = writeln!(
                    mangle,
                    "    {dst} counter name {}",
                    Counter::Tracked.name(vip)
                );
                let ports = [
                    format!("{dst} tcp dport {TCP_PORT}"),
                    format!("{dst} udp dport {UDP_PORT}"),
                ];
                if svc.endpoints_on(n).is_empty() {
                    for m in &ports {
                        let _ = writeln!(
                            noep,
                            "    ct state new {m} counter name {}",
                            Counter::NoEndpoint.name(vip)
                        );
                    }
                }
            }
        }
        // The CNI's network policy, in the same table for brevity: traffic forwarded to a pod
        // that is not allowed yet is dropped, after DNAT.
        let mut policy = String::new();
        for pod in Pod::all().filter(|p| p.node == n) {
            for ip in [IpAddr::from(pod.ip4()), pod.ip6().into()] {
                let name = policy_counter(pod, ip);
                let _ = writeln!(counters, "  counter {name} {{ }}");
                if self.denied.contains(&pod) {
                    let fam = if ip.is_ipv6() { "ip6" } else { "ip" };
                    let _ = writeln!(policy, "    {fam} daddr {ip} counter name {name} drop");
                }
            }
        }
        let chain = |name: &str, hook: &str, prio: &str, body: &str| {
            format!(
                "  chain {name} {{\n    type {hook} priority {prio}; policy accept;\n{body}  }}\n"
            )
        };
        let mut out = format!(
            "add table inet {TABLE}\nflush table inet {TABLE}\ntable inet {TABLE} {{\n{counters}"
        );
        out += &chain("raw-prerouting", "filter hook prerouting", "raw", &raw);
        out += &chain(
            "mangle-prerouting",
            "filter hook prerouting",
            "mangle",
            &mangle,
        );
        // Just before kube-proxy's endpoints check (nftables mode: -110; iptables: 0).
        out += &chain("noep-input", "filter hook input", "-111", &noep);
        out += &chain("noep-forward", "filter hook forward", "-111", &noep);
        out += &chain("filter-forward", "filter hook forward", "filter", &policy);
        // Before kube-proxy's masquerade: a scenario's SNAT here wins.
        out += &chain("nat-postrouting", "nat hook postrouting", "srcnat - 1", "");
        out += "}\n";
        for extra in &self.extra_rules[n] {
            out += extra;
            out += "\n";
        }
        out
    }
}
