//! One terminal line per record, as `watch` prints them (colour optional).

use std::{
    io::{self, Write},
    net::IpAddr,
};

use crate::{
    event::{
        record::{
            ArpRec, DropRec, EndpointRec, FindingRec, NeighRec, SpeakerLinkRec, SpeakerRec,
            VipDiscoveredRec, VipOwnerRec,
        },
        values::Time,
        Record,
    },
    pipeline::Sink,
};

const RED: &str = "\x1b[31m";
const DIM: &str = "\x1b[2m";
const BOLD: &str = "\x1b[1m";
const RESET: &str = "\x1b[0m";

/// `addr:port`, `[addr]:port`, `addr` or `-`.
pub fn endpoint(addr: Option<IpAddr>, port: Option<u16>) -> String {
    match (addr, port) {
        (Some(IpAddr::V6(a)), Some(p)) => format!("[{a}]:{p}"),
        (Some(a), Some(p)) => format!("{a}:{p}"),
        (Some(a), None) => a.to_string(),
        (None, _) => "-".into(),
    }
}

fn opt_ip(ip: Option<IpAddr>) -> String {
    ip.map_or_else(|| "-".to_owned(), |i| i.to_string())
}

fn vip_tag(vip: Option<IpAddr>) -> String {
    vip.map(|v| format!(" vip={v}")).unwrap_or_default()
}

/// ` svc=ns/name:port backend=IP:port`: the names kube-proxy's rules give a drop.
fn names_tag(d: &DropRec) -> String {
    let mut s = d
        .service
        .as_ref()
        .map(|n| format!(" svc={n}"))
        .unwrap_or_default();
    if let Some(e) = &d.endpoint {
        s.push_str(&format!(" backend={}", e.addr));
    }
    s
}

fn clock(t: Option<Time>) -> String {
    t.unwrap_or_default().clock_micros()
}

pub fn drop_line(d: &DropRec, colour: bool) -> String {
    let proto = match d.proto {
        Some(x) => x.to_string(),
        None => format!("eth-{:#06x}", d.l3_proto),
    };
    let mut detail = String::new();
    if let Some(f) = d.tcp_flags {
        detail.push_str(&format!(" [{f}]"));
    }
    if let (Some(t), Some(c)) = (d.icmp_type, d.icmp_code) {
        detail.push_str(&format!(" type {t} code {c}"));
    }
    if let Some(o) = &d.orig {
        if Some(o.dst) != d.dst {
            detail.push_str(&format!(
                " (orig dst {})",
                endpoint(Some(o.dst), Some(o.dport))
            ));
        }
    }
    let (r, b, dm, z) = if colour {
        (RED, BOLD, DIM, RESET)
    } else {
        ("", "", "", "")
    };
    format!(
        "{time} {r}{b}{reason:<16}{z} {proto:<6} {src} -> {dst}{detail} len {len} if {ifname}({ifindex}) netns {netns}{vip} {dm}{loc}{z}",
        time = clock(d.time),
        reason = d.label(),
        src = endpoint(d.src, d.sport),
        dst = endpoint(d.dst, d.dport),
        len = d.len,
        ifname = d.ifname.as_deref().unwrap_or("-"),
        ifindex = d.ifindex,
        netns = d.netns,
        vip = vip_tag(d.vip) + &names_tag(d),
        loc = d.location,
    )
}

fn arp_line(a: &ArpRec, colour: bool) -> String {
    let (b, z) = if colour { (BOLD, RESET) } else { ("", "") };
    let what = if a.gratuitous { "GARP" } else { "ARP" };
    format!(
        "{time} {b}{what:<16}{z} {dir} {op} {sip} is-at {smac} (target {tip} {tmac}){bridged} if {ifname} netns {netns}{vip}",
        time = clock(a.time),
        dir = a.direction,
        op = a.op,
        sip = opt_ip(a.sender_ip),
        smac = a.sender_mac,
        tip = opt_ip(a.target_ip),
        tmac = a.target_mac,
        bridged = if a.bridged { " bridged" } else { "" },
        ifname = a.ifname.as_deref().unwrap_or("-"),
        netns = a.netns,
        vip = vip_tag(a.vip),
    )
}

fn neigh_line(n: &NeighRec) -> String {
    format!(
        "{time} NEIGH            {ip} {old_mac} {old_state} -> {new_mac} {new_state} if {ifname} netns {netns}{vip}",
        time = clock(n.time),
        ip = opt_ip(n.ip),
        old_mac = n.old_mac,
        old_state = n.old_state,
        new_mac = n.new_mac,
        new_state = n.new_state,
        ifname = n.ifname.as_deref().unwrap_or("-"),
        netns = n.netns.map_or_else(|| "?".to_owned(), |n| n.to_string()),
        vip = vip_tag(n.vip),
    )
}

fn owner_line(o: &VipOwnerRec) -> String {
    format!(
        "{} OWNER            vip {}: {} -> {} (netns {})",
        o.time.unwrap_or_default(),
        o.vip,
        o.old_mac.map_or("none".to_owned(), |m| m.to_string()),
        o.new_mac,
        o.new_netns.map_or("?".to_owned(), |n| n.to_string())
    )
}

fn discovered_line(d: &VipDiscoveredRec) -> String {
    if d.mac.is_zero() {
        return format!("lbtrace: discovered VIP {} ({})", d.vip, d.note);
    }
    format!("lbtrace: discovered VIP {} (announced by {})", d.vip, d.mac)
}

/// `ns/svc:port added 10.0.0.2:8080`, `ns/svc:port entered no local endpoints (netns N)`.
pub fn endpoint_change(e: &EndpointRec) -> String {
    let what = match (e.endpoint, e.state) {
        (Some(ep), _) => ep.to_string(),
        (None, Some(s)) => format!("{} (netns {})", s.as_str(), e.netns.unwrap_or(0)),
        (None, None) => "-".to_owned(),
    };
    format!("{} {} {what}", e.service, e.change.as_str())
}

fn endpoint_line(e: &EndpointRec) -> String {
    let vips: Vec<String> = e.vips.iter().map(ToString::to_string).collect();
    format!(
        "{} ENDPOINT         {} vips {}",
        clock(e.time),
        endpoint_change(e),
        vips.join(",")
    )
}

fn finding_line(f: &FindingRec) -> String {
    format!("FINDING {} vip {}: {}", f.finding.as_str(), f.vip, f.detail)
}

/// `SPEAKER speaker[4242] oom-kill: OOM-killed (rss 51200 kB) netns N vips 10.0.0.1`.
fn speaker_line(s: &SpeakerRec) -> String {
    let mut what = s.what();
    if let Some(o) = &s.oom {
        what.push_str(&format!(
            " (rss {} kB, total-vm {} kB, oom_score_adj {})",
            o.rss_kb(),
            o.total_vm_kb,
            o.oom_score_adj
        ));
    }
    if let (Some(pid), Some(comm)) = (s.sender_pid, &s.sender_comm) {
        what.push_str(&format!(" by {comm}[{pid}]"));
    }
    let vips: Vec<String> = s.vips.iter().map(ToString::to_string).collect();
    format!(
        "{} SPEAKER          {}[{}] {}: {what} netns {} vips {}",
        clock(s.time),
        s.comm,
        s.pid,
        s.event.as_str(),
        s.netns,
        if vips.is_empty() {
            "-".to_owned()
        } else {
            vips.join(",")
        }
    )
}

/// `SPEAKER-LINK     memberlist udp/7946 n0 (10.200.0.1) -> n1 (10.200.0.2) dropped NETFILTER_DROP`.
fn speaker_link_line(l: &SpeakerLinkRec) -> String {
    let end = |n: Option<&crate::event::values::Name>, ip: IpAddr| match n {
        Some(n) => format!("{n} ({ip})"),
        None => ip.to_string(),
    };
    format!(
        "{} SPEAKER-LINK     memberlist {}/{} {} -> {} dropped {} at {}{}",
        clock(l.time),
        l.proto,
        l.port,
        end(l.src_node.as_ref(), l.src),
        end(l.dst_node.as_ref(), l.dst),
        l.reason,
        l.location,
        if l.sampled { " (sample)" } else { "" }
    )
}

/// The line of a record; `None` for what a terminal stream does not show.
pub fn line(r: &Record, colour: bool) -> Option<String> {
    Some(match r {
        Record::Drop(d) | Record::Conntrack(d) => drop_line(d, colour),
        Record::Arp(a) => arp_line(a, colour),
        Record::Neigh(n) => neigh_line(n),
        Record::VipOwner(o) => owner_line(o),
        Record::VipDiscovered(d) => discovered_line(d),
        Record::Endpoint(e) => endpoint_line(e),
        Record::Finding(f) => finding_line(f),
        Record::Speaker(s) => speaker_line(s),
        Record::SpeakerLink(l) => speaker_link_line(l),
        Record::Totals(t) => t.line(),
        Record::Header(_) | Record::Status(_) | Record::Summary(_) | Record::Unknown => {
            return None
        }
    })
}

/// The terminal stream of `watch`.
pub struct TextSink<W: Write> {
    pub out: W,
    pub colour: bool,
}

impl<W: Write> Sink for TextSink<W> {
    fn record(&mut self, r: &Record) -> io::Result<()> {
        match line(r, self.colour) {
            Some(l) => writeln!(self.out, "{l}"),
            None => Ok(()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{
        speaker::{OomFigures, SpeakerEvent},
        values::{L4Proto, Name},
    };

    #[test]
    fn speaker_lines_say_what_happened_to_whom() {
        let s = SpeakerRec {
            pid: 4242,
            comm: Name::from("speaker"),
            netns: 7,
            event: SpeakerEvent::OomKill,
            oom: Some(OomFigures {
                anon_rss_kb: 1000,
                file_rss_kb: 24,
                ..OomFigures::default()
            }),
            vips: vec!["10.200.0.100".parse().unwrap()],
            ..SpeakerRec::default()
        };
        let l = line(&Record::Speaker(s), false).unwrap();
        assert!(
            l.ends_with("SPEAKER          speaker[4242] oom-kill: OOM-killed (rss 1024 kB, total-vm 0 kB, oom_score_adj 0) netns 7 vips 10.200.0.100"),
            "{l}"
        );
        let link = SpeakerLinkRec {
            src: "10.200.0.1".parse().unwrap(),
            dst: "10.200.0.2".parse().unwrap(),
            src_node: Some(Name::from("n0")),
            proto: L4Proto::Udp,
            port: 7946,
            reason: Name::from("NETFILTER_DROP"),
            location: Name::from("nf_hook_slow+0x91"),
            ..SpeakerLinkRec::default()
        };
        let l = line(&Record::SpeakerLink(link), false).unwrap();
        assert!(
            l.ends_with("memberlist udp/7946 n0 (10.200.0.1) -> 10.200.0.2 dropped NETFILTER_DROP at nf_hook_slow+0x91"),
            "{l}"
        );
    }
}
