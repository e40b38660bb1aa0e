//! Outputs: one terminal line or one NDJSON object per event, and the closing summary.

use std::{
    collections::BTreeMap,
    io::{self, Write},
    net::IpAddr,
    time::{Duration, SystemTime},
};

use serde::Serialize;

use crate::{
    btf::DropReasons,
    decode::{DropEvent, Event},
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
struct DropJson<'a> {
    time: String,
    kind: &'static str,
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
    vip: Option<IpAddr>,
}

pub fn drop_json(ctx: &Context<'_>, d: &DropEvent, vip: Option<IpAddr>) -> String {
    let p = &d.packet;
    let j = DropJson {
        time: rfc3339(ctx.clock.wall(d.ts_ns)),
        kind: "drop",
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
    let ifname = d.ifname.as_deref().unwrap_or("-");
    let vip = vip.map(|v| format!(" vip={v}")).unwrap_or_default();
    let (r, b, dm, z) = if colour {
        (RED, BOLD, DIM, RESET)
    } else {
        ("", "", "", "")
    };
    format!(
        "{time} {r}{b}{reason:<16}{z} {proto:<6} {src} -> {dst}{detail} len {len} if {ifname}({ifindex}) netns {netns}{vip} {dm}{loc}{z}",
        reason = ctx.reasons.name(d.reason),
        src = endpoint(p.src, p.sport),
        dst = endpoint(p.dst, p.dport),
        len = p.len,
        ifindex = d.ifindex,
        netns = d.netns,
        loc = ctx.kallsyms.symbolize(d.location),
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
            events_seen: k.matched,
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
