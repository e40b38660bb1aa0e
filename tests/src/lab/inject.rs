//! How scenarios break the lab (a node taken out, a node lost) and the nft counters and times
//! that go with it.

use std::{fmt::Write as _, net::IpAddr, time::Duration};

use anyhow::Result;

use super::{
    scenarios::{LOST_TABLE, OUT_TABLE},
    topology::{pod_net4, pod_net6, Lab, TABLE, VIP_A, VIP_A6},
    verdict::mac_of,
};

/// Takes node `n` out for `vips` as a node being shut down is: no forwarding, and kube-proxy
/// no longer handles them (their packets skip conntrack, so no DNAT): packets still sent there
/// are dropped as not the node's address (IP_INADDRERRORS), as kernel-notes.md measured. Their
/// TCP and UDP packets are counted first (`out4`, `out6` of [`OUT_TABLE`], made in `prepare`).
pub(super) fn take_out(lab: &mut Lab, n: usize, vips: &[IpAddr]) -> Result<()> {
    let mut rules = String::new();
    for v in vips {
        let (fam, f) = if v.is_ipv4() { ("ip", 4) } else { ("ip6", 6) };
        let _ = writeln!(
            rules,
            "add rule inet {OUT_TABLE} raw {fam} daddr {v} meta l4proto {{ tcp, udp }} counter name out{f}\nadd rule inet {OUT_TABLE} raw {fam} daddr {v} notrack"
        );
        if f == 6 {
            let _ = writeln!(
                rules,
                "add rule inet {OUT_TABLE} raw ip6 daddr {v} icmpv6 type nd-neighbor-solicit counter name probes6"
            );
        }
    }
    lab.nodes[n].nft(&rules)?;
    lab.nodes[n].sysctl("net.ipv4.ip_forward", "0")?;
    lab.nodes[n].sysctl("net.ipv6.conf.all.forwarding", "0")
}

/// Node `n` is lost: its bridge port goes down, as when a node dies or its cable is pulled.
/// The bridge forgets its MAC and floods frames still sent there to every other host; from
/// now on those frames (A's TCP/UDP, per family) are counted on the way in.
pub(super) fn lose_node(lab: &mut Lab, n: usize) -> Result<()> {
    let mac = mac_of(&lab.nodes[n])?;
    let mut rules = String::new();
    for v in [VIP_A, VIP_A6] {
        let (fam, f) = if v.is_ipv4() { ("ip", 4) } else { ("ip6", 6) };
        let _ = writeln!(
            rules,
            "add rule bridge {LOST_TABLE} pre ether daddr {mac} {fam} daddr {v} meta l4proto {{ tcp, udp }} counter name lost{f}"
        );
    }
    lab.lan.nft(&rules)?;
    lab.lan.ip(&["link", "set", &format!("n{n}"), "down"])?;
    Ok(())
}

/// 4 or 6.
pub(super) fn family(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        4
    } else {
        6
    }
}

/// A pod's RSTs sent, per family (endpoint-churn).
pub(super) fn rst_counters() -> String {
    "table inet lbtest {\n counter rst4 { }\n counter rst6 { }\n chain out {\n  type filter hook output priority 0; policy accept;\n  meta nfproto ipv4 tcp flags & rst == rst counter name rst4\n  meta nfproto ipv6 tcp flags & rst == rst counter name rst6\n }\n}".to_owned()
}

/// Per family, what n0 passes towards node `n`'s pods after NAT (before conntrack confirms it)
/// and what reaches node `n` (conntrack-snat): the difference is what confirm dropped.
pub(super) fn snat_counters(n: usize) -> (String, String) {
    let (p4, p6) = (pod_net4(n), pod_net6(n));
    let table = |chain: &str, hook: &str, prio: i32, what: &str| {
        format!(
            "table inet {TABLE} {{\n counter {what}4 {{ }}\n counter {what}6 {{ }}\n chain {chain} {{\n  type filter hook {hook} priority {prio}; policy accept;\n  ip daddr {p4} counter name {what}4\n  ip6 daddr {p6} counter name {what}6\n }}\n}}"
        )
    };
    (
        table("ct-left", "postrouting", 150, "ctleft"),
        table("ct-arrived", "prerouting", -350, "ctarrived"),
    )
}

/// Times `first`, `first + period`, … of a periodic change, stopping 2 s before the end of the
/// run so that the last change's effect is seen.
pub(super) fn every(first: f64, period: f64, duration: Duration) -> impl Iterator<Item = f64> {
    let last = duration.as_secs_f64() - 2.0;
    (0..)
        .map(move |i| first + period * f64::from(i))
        .take_while(move |t| *t <= last)
}
