//! Outputs: one terminal line or one NDJSON object per event, and the closing summary.

use std::{
    collections::BTreeMap,
    io::{self, Write},
    net::IpAddr,
    time::{Duration, SystemTime},
};

use agent_common::CtEvent;
use serde::Serialize;

use crate::{
    btf::DropReasons,
    decode::{
        nud_state_name, ArpEvent, DropEvent, Event, Flow, Mac, NeighEvent, NDP_OVERRIDE,
        NDP_ROUTER, NDP_SOLICITED,
    },
    kallsyms::Kallsyms,
    probes::KernelCounters,
};

/// Converts CLOCK_BOOTTIME nanoseconds (what the programs stamp) to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// realtime - boottime, in nanoseconds.
    offset_ns: i128,
}

fn clock_ns(id: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; these clocks always exist on Linux.
    unsafe { libc::clock_gettime(id, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

impl Clock {
    pub fn now() -> Self {
        Self {
            offset_ns: clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_BOOTTIME),
        }
    }

    pub fn wall(&self, boot_ns: u64) -> SystemTime {
        let ns = i128::from(boot_ns) + self.offset_ns;
        let ns = u64::try_from(ns.max(0)).unwrap_or(0);
        SystemTime::UNIX_EPOCH + Duration::from_nanos(ns)
    }

    pub fn boot_now_ns() -> u64 {
        u64::try_from(clock_ns(libc::CLOCK_BOOTTIME)).unwrap_or(0)
    }
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_nanos(t).to_string()
}

/// TCP flags in tcpdump's letters (`S`, `SA`, `FA`, `R`, ...).
pub fn tcp_flags(f: u8) -> String {
    const LETTERS: [(u8, char); 8] = [
        (0x02, 'S'),
        (0x01, 'F'),
        (0x04, 'R'),
        (0x08, 'P'),
        (0x10, 'A'),
        (0x20, 'U'),
        (0x40, 'E'),
        (0x80, 'C'),
    ];
    let s: String = LETTERS
        .iter()
        .filter(|(bit, _)| f & bit != 0)
        .map(|(_, c)| *c)
        .collect();
    if s.is_empty() {
        ".".into()
    } else {
        s
    }
}

/// What turns a decoded event into text.
pub struct Context<'a> {
    pub reasons: &'a DropReasons,
    pub kallsyms: &'a Kallsyms,
    pub clock: Clock,
}

#[derive(Serialize)]
struct FlowJson {
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    proto: String,
}

impl From<&Flow> for FlowJson {
    fn from(f: &Flow) -> Self {
        Self {
            src: f.src,
            sport: f.sport,
            dst: f.dst,
            dport: f.dport,
            proto: f.proto.name(),
        }
    }
}

/// `insert_failed`, `table_full`, `early_drop`, or `unknown-N`.
pub fn ct_event_label(e: &Result<CtEvent, u8>) -> String {
    match e {
        Ok(e) => crate::probes::ct_event_name(*e).to_owned(),
        Err(n) => format!("unknown-{n}"),
    }
}

/// A drop, or (kind `conntrack`) a drop that conntrack caused.
#[derive(Serialize)]
struct DropJson<'a> {
    time: String,
    kind: &'static str,
    event: Option<String>,
    reason: String,
    reason_code: u32,
    location: String,
    cpu: u32,
    netns: u32,
    ifindex: u32,
    ifname: Option<&'a str>,
    family: Option<&'static str>,
    proto: Option<String>,
    src: Option<IpAddr>,
    sport: Option<u16>,
    dst: Option<IpAddr>,
    dport: Option<u16>,
    len: u32,
    tcp_flags: Option<String>,
    icmp_type: Option<u8>,
    icmp_code: Option<u8>,
    orig: Option<FlowJson>,
    reply: Option<FlowJson>,
    /// With `orig` from the NAT map: the namespace where the DNAT happened.
    nat_netns: Option<u32>,
    vip: Option<IpAddr>,
}

pub fn drop_json(ctx: &Context<'_>, d: &DropEvent, vip: Option<IpAddr>) -> String {
    let p = &d.packet;
    let j = DropJson {
        time: rfc3339(ctx.clock.wall(d.ts_ns)),
        kind: if d.ct.event.is_some() {
            "conntrack"
        } else {
            "drop"
        },
        event: d.ct.event.as_ref().map(ct_event_label),
        reason: ctx.reasons.name(d.reason),
        reason_code: d.reason,
        location: ctx.kallsyms.symbolize(d.location),
        cpu: d.cpu,
        netns: d.netns,
        ifindex: d.ifindex,
        ifname: d.ifname.as_deref(),
        family: p.family(),
        proto: p.proto.map(|x| x.name()),
        src: p.src,
        sport: p.sport,
        dst: p.dst,
        dport: p.dport,
        len: p.len,
        tcp_flags: p.tcp_flags.map(tcp_flags),
        icmp_type: p.icmp.map(|(t, _)| t),
        icmp_code: p.icmp.map(|(_, c)| c),
        orig: d.ct.orig.as_ref().map(FlowJson::from),
        reply: d.ct.reply.as_ref().map(FlowJson::from),
        nat_netns: d.ct.nat_netns,
        vip,
    };
    serde_json::to_string(&j).unwrap_or_default()
}

fn endpoint(addr: Option<IpAddr>, port: Option<u16>) -> String {
    match (addr, port) {
        (Some(IpAddr::V6(a)), Some(p)) => format!("[{a}]:{p}"),
        (Some(a), Some(p)) => format!("{a}:{p}"),
        (Some(a), None) => a.to_string(),
        (None, _) => "-".into(),
    }
}

const RED: &str = "\x1b[31m";
const DIM: &str = "\x1b[2m";
const BOLD: &str = "\x1b[1m";
const RESET: &str = "\x1b[0m";

pub fn drop_line(ctx: &Context<'_>, d: &DropEvent, vip: Option<IpAddr>, colour: bool) -> String {
    let p = &d.packet;
    let time = rfc3339(ctx.clock.wall(d.ts_ns));
    // HH:MM:SS.micro of the RFC 3339 stamp
    let time = time.get(11..26).unwrap_or(&time);
    let proto = match p.proto {
        Some(x) => x.name(),
        None => format!("eth-{:#06x}", p.l3_proto),
    };
    let mut detail = String::new();
    if let Some(f) = p.tcp_flags {
        detail.push_str(&format!(" [{}]", tcp_flags(f)));
    }
    if let Some((t, c)) = p.icmp {
        detail.push_str(&format!(" type {t} code {c}"));
    }
    if let Some(o) = &d.ct.orig {
        if Some(o.dst) != p.dst {
            detail.push_str(&format!(
                " (orig dst {})",
                endpoint(Some(o.dst), Some(o.dport))
            ));
        }
    }
    let ifname = d.ifname.as_deref().unwrap_or("-");
    let reason = match &d.ct.event {
        Some(e) => format!("CT:{}", ct_event_label(e)),
        None => ctx.reasons.name(d.reason),
    };
    let vip = vip_tag(vip);
    let (r, b, dm, z) = if colour {
        (RED, BOLD, DIM, RESET)
    } else {
        ("", "", "", "")
    };
    format!(
        "{time} {r}{b}{reason:<16}{z} {proto:<6} {src} -> {dst}{detail} len {len} if {ifname}({ifindex}) netns {netns}{vip} {dm}{loc}{z}",
        src = endpoint(p.src, p.sport),
        dst = endpoint(p.dst, p.dport),
        len = p.len,
        ifindex = d.ifindex,
        netns = d.netns,
        loc = ctx.kallsyms.symbolize(d.location),
    )
}

#[derive(Serialize)]
struct NdpFlagsJson {
    router: bool,
    solicited: bool,
    #[serde(rename = "override")]
    override_: bool,
}

/// ARP and NDP share kind `arp`; `family` tells them apart.
#[derive(Serialize)]
struct ArpJson<'a> {
    time: String,
    kind: &'static str,
    family: &'static str,
    op: String,
    gratuitous: bool,
    direction: &'static str,
    bridged: bool,
    sender_ip: Option<IpAddr>,
    sender_mac: Mac,
    target_ip: Option<IpAddr>,
    target_mac: Mac,
    ndp_flags: Option<NdpFlagsJson>,
    ifname: Option<&'a str>,
    ifindex: u32,
    netns: u32,
    vip: Option<IpAddr>,
}

fn arp_json(ctx: &Context<'_>, a: &ArpEvent, vip: Option<IpAddr>) -> String {
    let j = ArpJson {
        time: rfc3339(ctx.clock.wall(a.ts_ns)),
        kind: "arp",
        family: if a.sender_ip.is_some_and(|i| i.is_ipv6()) {
            "ipv6"
        } else {
            "ipv4"
        },
        op: a.op.name(),
        gratuitous: a.gratuitous,
        direction: if a.tx { "tx" } else { "rx" },
        bridged: a.bridged,
        sender_ip: a.sender_ip,
        sender_mac: a.sender_mac,
        target_ip: a.target_ip,
        target_mac: a.target_mac,
        ndp_flags: a.ndp_flags.map(|f| NdpFlagsJson {
            router: f & NDP_ROUTER != 0,
            solicited: f & NDP_SOLICITED != 0,
            override_: f & NDP_OVERRIDE != 0,
        }),
        ifname: a.ifname.as_deref(),
        ifindex: a.ifindex,
        netns: a.netns,
        vip,
    };
    serde_json::to_string(&j).unwrap_or_default()
}

#[derive(Serialize)]
struct NeighJson<'a> {
    time: String,
    kind: &'static str,
    ip: Option<IpAddr>,
    old_mac: Mac,
    new_mac: Mac,
    old_state: String,
    new_state: String,
    ifname: Option<&'a str>,
    ifindex: u32,
    netns: Option<u32>,
    vip: Option<IpAddr>,
}

fn neigh_json(ctx: &Context<'_>, n: &NeighEvent, vip: Option<IpAddr>) -> String {
    let j = NeighJson {
        time: rfc3339(ctx.clock.wall(n.ts_ns)),
        kind: "neigh",
        ip: n.ip,
        old_mac: n.old_mac,
        new_mac: n.new_mac,
        old_state: nud_state_name(n.old_state),
        new_state: nud_state_name(n.new_state),
        ifname: n.ifname.as_deref(),
        ifindex: n.ifindex,
        netns: n.netns,
        vip,
    };
    serde_json::to_string(&j).unwrap_or_default()
}

fn short_time(ctx: &Context<'_>, ts_ns: u64) -> String {
    let t = rfc3339(ctx.clock.wall(ts_ns));
    t.get(11..26).unwrap_or(&t).to_owned()
}

fn opt_ip(ip: Option<IpAddr>) -> String {
    ip.map_or_else(|| "-".to_owned(), |i| i.to_string())
}

fn vip_tag(vip: Option<IpAddr>) -> String {
    vip.map(|v| format!(" vip={v}")).unwrap_or_default()
}

fn arp_line(ctx: &Context<'_>, a: &ArpEvent, vip: Option<IpAddr>, colour: bool) -> String {
    let (b, z) = if colour { (BOLD, RESET) } else { ("", "") };
    let what = if a.gratuitous { "GARP" } else { "ARP" };
    format!(
        "{time} {b}{what:<16}{z} {dir} {op} {sip} is-at {smac} (target {tip} {tmac}){bridged} if {ifname} netns {netns}{vip}",
        time = short_time(ctx, a.ts_ns),
        dir = if a.tx { "tx" } else { "rx" },
        op = a.op.name(),
        sip = opt_ip(a.sender_ip),
        smac = a.sender_mac,
        tip = opt_ip(a.target_ip),
        tmac = a.target_mac,
        bridged = if a.bridged { " bridged" } else { "" },
        ifname = a.ifname.as_deref().unwrap_or("-"),
        netns = a.netns,
        vip = vip_tag(vip),
    )
}

fn neigh_line(ctx: &Context<'_>, n: &NeighEvent, vip: Option<IpAddr>) -> String {
    format!(
        "{time} NEIGH            {ip} {old_mac} {old_state} -> {new_mac} {new_state} if {ifname} netns {netns}{vip}",
        time = short_time(ctx, n.ts_ns),
        ip = opt_ip(n.ip),
        old_mac = n.old_mac,
        old_state = nud_state_name(n.old_state),
        new_mac = n.new_mac,
        new_state = nud_state_name(n.new_state),
        ifname = n.ifname.as_deref().unwrap_or("-"),
        netns = n.netns.map_or_else(|| "?".to_owned(), |n| n.to_string()),
        vip = vip_tag(vip),
    )
}

pub fn event_line(
    ctx: &Context<'_>,
    e: &Event,
    vip: Option<IpAddr>,
    json: bool,
    colour: bool,
) -> String {
    match e {
        Event::Drop(d) if json => drop_json(ctx, d, vip),
        Event::Drop(d) => drop_line(ctx, d, vip, colour),
        Event::Arp(a) if json => arp_json(ctx, a, vip),
        Event::Arp(a) => arp_line(ctx, a, vip, colour),
        Event::Neigh(n) if json => neigh_json(ctx, n, vip),
        Event::Neigh(n) => neigh_line(ctx, n, vip),
    }
}

/// The closing summary of a `watch`.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub kind: &'static str,
    pub duration_s: f64,
    pub probe: &'static str,
    /// From the kernel's exact per-reason counters, not from delivered records.
    pub drops_by_reason: BTreeMap<String, u64>,
    pub events_seen: u64,
    pub events_delivered: u64,
    pub events_lost: u64,
    pub lost_by_cpu: BTreeMap<String, u64>,
    pub events_printed: u64,
    pub decode_errors: u64,
    /// Conntrack-caused drops per event, from the kernel's exact counters.
    pub conntrack_by_event: BTreeMap<&'static str, u64>,
    /// DNAT translations learned, and drops attributed through them.
    pub nat_learned: u64,
    pub nat_joined: u64,
    /// Drops per VIP (records delivered and attributed).
    pub drops_by_vip: BTreeMap<String, BTreeMap<String, u64>>,
    /// Per netns: conntrack table pressure and per-CPU counter movement while watching.
    pub conntrack_tables: BTreeMap<u32, serde_json::Value>,
    /// ARP/NDP and neighbour records seen by the kernel (included in `events_seen`).
    pub arp_events: u64,
    pub neigh_events: u64,
    /// Who announces each VIP, its ownership changes and findings.
    pub vip_owners: BTreeMap<String, serde_json::Value>,
    pub findings: Vec<serde_json::Value>,
    /// VIPs learned from gratuitous announcements (`--discover-vips`).
    pub discovered_vips: Vec<String>,
}

impl Summary {
    pub fn new(
        ctx: &Context<'_>,
        probe: &'static str,
        duration: Duration,
        k: &KernelCounters,
        delivered: u64,
        printed: u64,
        decode_errors: u64,
    ) -> Self {
        Self {
            kind: "summary",
            duration_s: (duration.as_secs_f64() * 1000.0).round() / 1000.0,
            probe,
            drops_by_reason: k
                .by_reason
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(r, n)| (ctx.reasons.name(*r), *n))
                .collect(),
            events_seen: k.matched + k.arp + k.neigh,
            events_delivered: delivered,
            events_lost: k.lost(),
            lost_by_cpu: k
                .lost_per_cpu
                .iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(|(c, n)| (c.to_string(), *n))
                .collect(),
            events_printed: printed,
            decode_errors,
            conntrack_by_event: k.ct_events.clone(),
            nat_learned: k.nat_learned,
            nat_joined: k.nat_joined,
            drops_by_vip: BTreeMap::new(),
            conntrack_tables: BTreeMap::new(),
            arp_events: k.arp,
            neigh_events: k.neigh,
            vip_owners: BTreeMap::new(),
            findings: Vec::new(),
            discovered_vips: Vec::new(),
        }
    }

    pub fn write(&self, out: &mut impl Write, json: bool) -> io::Result<()> {
        if json {
            return writeln!(out, "{}", serde_json::to_string(self).unwrap_or_default());
        }
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
                owner["mac"].as_str().unwrap_or("?"),
                owner["netns"],
                owner["changes"].as_array().map_or(0, Vec::len)
            )?;
        }
        for f in &self.findings {
            writeln!(
                out,
                "finding: {} for vip {}: {}",
                f["finding"].as_str().unwrap_or("?"),
                f["vip"].as_str().unwrap_or("?"),
                f["detail"].as_str().unwrap_or("")
            )?;
        }
        for (vip, reasons) in &self.drops_by_vip {
            let total: u64 = reasons.values().sum();
            let detail: Vec<String> = reasons.iter().map(|(r, n)| format!("{r} {n}")).collect();
            writeln!(out, "vip {vip}: {total} drops ({})", detail.join(", "))?;
        }
        writeln!(
            out,
            "events: {} seen by the kernel, {} delivered, {} lost (ring buffer full){}",
            self.events_seen,
            self.events_delivered,
            self.events_lost,
            if self.decode_errors > 0 {
                format!(", {} undecodable", self.decode_errors)
            } else {
                String::new()
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_flags_read_like_tcpdump() {
        assert_eq!(tcp_flags(0x02), "S");
        assert_eq!(tcp_flags(0x12), "SA");
        assert_eq!(tcp_flags(0x14), "RA");
        assert_eq!(tcp_flags(0), ".");
    }
}
