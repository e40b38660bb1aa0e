//! Why a VIP moved: the one rule that picks, for each ownership change, the evidence that
//! explains it. In order: the previous announcer was OOM-killed, signalled, or exited; the new
//! owner's speaker (re)started and took the VIP back; memberlist traffic between the nodes was
//! dropped; the old owner's node left the LAN; else the announcer changed with nothing else
//! seen (or, when the process collectors could not look, unknown).

use std::{collections::BTreeMap, net::IpAddr};

pub use super::because_evidence::{
    Because, LinkLossEvidence, MemberlistEvidence, ProcessEvidence, Reason,
};
use super::{diagnosis::Counts, nodes::NodeNames, vip_state::OwnerChange};
pub use crate::event::record::OomFigures;
use crate::event::{
    speaker::signal_name,
    values::{Mac, Name, Time},
};

/// How long before a move a speaker's exit (or start) can explain it: longer than any
/// memberlist's failure detection.
const LIFECYCLE_BEFORE: f64 = 30.0;
/// How long before a move dropped memberlist packets or signs of a lost node explain it.
const LINK_BEFORE: f64 = 10.0;
/// Evidence seen this long after the move (records of one instant from different hooks)
/// still counts.
const AFTER: f64 = 1.0;
/// A signal this long before its target's exit is what ended it.
const SIGNAL_TO_EXIT: f64 = 5.0;
/// Kept per analysis (oldest dropped first).
pub(super) const MAX_LIFECYCLE: usize = 4096;
pub(super) const MAX_LINK_DROPS: usize = 20_000;

/// What happened to a speaker process.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum LifeEvent {
    Start,
    Exit {
        code: Option<i32>,
        signal: Option<u32>,
    },
    OomKill(Option<OomFigures>),
    Signal {
        signal: u32,
        sender_pid: u32,
        sender_comm: Name,
    },
}

/// One lifecycle record of a process that announced VIPs.
#[derive(Clone, Debug)]
pub(super) struct Lifecycle {
    pub(super) t: f64,
    pub(super) node: Option<Name>,
    pub(super) netns: u32,
    pub(super) pid: u32,
    pub(super) comm: Name,
    pub(super) event: LifeEvent,
    pub(super) vips: Vec<IpAddr>,
}

/// One dropped memberlist packet.
#[derive(Clone, Debug)]
pub(super) struct LinkDrop {
    pub(super) t: f64,
    pub(super) src: Option<IpAddr>,
    pub(super) dst: Option<IpAddr>,
    pub(super) src_node: Option<Name>,
    pub(super) dst_node: Option<Name>,
    pub(super) reason: Name,
}

/// What the rule looks at besides the VIP's own state.
#[derive(Debug, Default)]
pub(super) struct Context<'a> {
    pub(super) lifecycle: &'a [Lifecycle],
    pub(super) links: &'a [LinkDrop],
    pub(super) nodes: Option<&'a NodeNames>,
    /// The process collectors ran (or nothing says they did not): no lifecycle record means
    /// nothing happened.
    pub(super) lifecycle_seen: bool,
}

/// Signs that a MAC left the LAN, kept per VIP: (time, MAC) of flooded copies and of failed
/// neighbour entries.
#[derive(Debug, Default)]
pub(super) struct LinkSigns {
    pub(super) flooded: Vec<(f64, Mac)>,
    pub(super) neigh_failed: Vec<(f64, Mac)>,
}

/// Each sign list keeps at most this many.
const MAX_SIGNS: usize = 4096;

impl LinkSigns {
    pub(super) fn flooded(&mut self, t: f64, mac: Mac) {
        if self.flooded.len() < MAX_SIGNS {
            self.flooded.push((t, mac));
        }
    }

    pub(super) fn failed(&mut self, t: f64, mac: Mac) {
        if self.neigh_failed.len() < MAX_SIGNS {
            self.neigh_failed.push((t, mac));
        }
    }
}

/// The explanation of `c`, a move of `vip`.
pub(super) fn explain(vip: IpAddr, c: &OwnerChange, signs: &LinkSigns, ctx: &Context) -> Because {
    if let Some(b) = old_announcer_ended(vip, c, ctx) {
        return b;
    }
    if let Some(b) = new_announcer_started(vip, c, ctx) {
        return b;
    }
    if let Some(b) = memberlist(c, ctx) {
        return b;
    }
    if let Some(b) = link_lost(c, signs, ctx) {
        return b;
    }
    if ctx.lifecycle_seen {
        Because::new(
            Reason::AnnouncerChanged,
            None,
            c.t,
            "the announcer changed; no exit, kill, dropped memberlist traffic or lost link was seen".to_owned(),
        )
    } else {
        Because::new(
            Reason::Unknown,
            None,
            c.t,
            "unknown (the speakers' process events were not collected)".to_owned(),
        )
    }
}

/// Whether lifecycle record `l` is of the process that announced `vip` from the namespace
/// `netns` (when known; else from anywhere but `not_netns`).
fn announcer_of(l: &Lifecycle, vip: IpAddr, netns: Option<u32>, not_netns: Option<u32>) -> bool {
    match netns {
        Some(ns) => l.netns == ns,
        None => l.vips.contains(&vip) && Some(l.netns) != not_netns,
    }
}

fn old_announcer_ended(vip: IpAddr, c: &OwnerChange, ctx: &Context) -> Option<Because> {
    let window = |l: &&Lifecycle| l.t >= c.t - LIFECYCLE_BEFORE && l.t <= c.t + AFTER;
    let old: Vec<&Lifecycle> = ctx
        .lifecycle
        .iter()
        .filter(window)
        .filter(|l| announcer_of(l, vip, c.old_netns, c.new_netns))
        .collect();
    // The last ending before (or just after) the move: an OOM kill, else an exit.
    let end = old
        .iter()
        .rev()
        .find(|l| matches!(l.event, LifeEvent::OomKill(_)))
        .or_else(|| {
            old.iter()
                .rev()
                .find(|l| matches!(l.event, LifeEvent::Exit { .. }))
        })?;
    let signal = old.iter().rev().find(|l| {
        l.pid == end.pid
            && l.t <= end.t + AFTER
            && end.t - l.t <= SIGNAL_TO_EXIT
            && matches!(l.event, LifeEvent::Signal { .. })
    });
    let exit = old
        .iter()
        .find(|l| l.pid == end.pid && matches!(l.event, LifeEvent::Exit { .. }));
    let mut p = process(end, ctx);
    if let Some(LifeEvent::Exit { code, signal }) = exit.map(|e| &e.event) {
        (p.exit_code, p.signal) = (*code, *signal);
    }
    p.restarted_after_s = ctx
        .lifecycle
        .iter()
        .find(|l| l.netns == end.netns && l.t > end.t && l.event == LifeEvent::Start)
        .map(|l| ((l.t - end.t) * 1000.0).round() / 1000.0);
    let who = speaker_name(&p);
    let (reason, at, what) = how_it_ended(end, signal.copied(), &mut p);
    let mut b = Because::new(
        reason,
        Some(at),
        c.t,
        format!(
            "the previous announcer, {who}, {what} {}",
            relative(c.t - at)
        ),
    );
    b.process = Some(p);
    Some(b)
}

/// Why the process of `end` ended, when (the signal's time for a signalled one) and in words;
/// `p` gets the figures.
fn how_it_ended(
    end: &Lifecycle,
    signal: Option<&Lifecycle>,
    p: &mut ProcessEvidence,
) -> (Reason, f64, String) {
    match (&end.event, signal) {
        (LifeEvent::OomKill(m), _) => {
            p.oom = *m;
            let rss = m
                .as_ref()
                .map(|m| format!(" (anon-rss {} kB)", m.anon_rss_kb))
                .unwrap_or_default();
            (
                Reason::AnnouncerOomKilled,
                end.t,
                format!("was OOM-killed{rss}"),
            )
        }
        (
            _,
            Some(Lifecycle {
                t,
                event:
                    LifeEvent::Signal {
                        signal,
                        sender_pid,
                        sender_comm,
                    },
                ..
            }),
        ) => {
            p.signal = Some(*signal);
            p.sender = Some(format!("{sender_pid} {sender_comm}"));
            (
                Reason::AnnouncerSignalled,
                *t,
                format!(
                    "got {} from {sender_comm} ({sender_pid})",
                    signal_name(*signal)
                ),
            )
        }
        _ => {
            let how = match (p.exit_code, p.signal) {
                (_, Some(s)) => format!("was killed by {}", signal_name(s)),
                (Some(code), None) => format!("exited with code {code}"),
                (None, None) => "exited".to_owned(),
            };
            (Reason::AnnouncerExited, end.t, how)
        }
    }
}

/// The new owner's speaker started shortly before the move and took the VIP (back).
fn new_announcer_started(vip: IpAddr, c: &OwnerChange, ctx: &Context) -> Option<Because> {
    let start = ctx.lifecycle.iter().rev().find(|l| {
        l.t >= c.t - LINK_BEFORE
            && l.t <= c.t + AFTER
            && l.event == LifeEvent::Start
            && announcer_of(l, vip, c.new_netns, c.old_netns)
    })?;
    let p = process(start, ctx);
    let mut b = Because::new(
        Reason::AnnouncerRestarted,
        Some(start.t),
        c.t,
        format!(
            "the new owner's {} started {} and took the VIP",
            speaker_name(&p),
            relative(c.t - start.t)
        ),
    );
    b.process = Some(p);
    Some(b)
}

/// Memberlist packets dropped shortly before the move (between the two owners' nodes, when
/// both are known by name).
fn memberlist(c: &OwnerChange, ctx: &Context) -> Option<Because> {
    let owners: Vec<&str> = [c.old_netns, c.new_netns]
        .into_iter()
        .flatten()
        .filter_map(|ns| ctx.nodes.and_then(|n| n.of_netns(u64::from(ns))))
        .collect();
    let between = |d: &LinkDrop| match (&d.src_node, &d.dst_node) {
        (Some(a), Some(b)) if owners.len() == 2 => owners.contains(&&**a) && owners.contains(&&**b),
        _ => true,
    };
    let drops: Vec<&LinkDrop> = ctx
        .links
        .iter()
        .filter(|d| d.t >= c.t - LINK_BEFORE && d.t <= c.t + AFTER && between(d))
        .collect();
    let first = drops.first()?;
    let last = drops.last().map_or(first.t, |d| d.t);
    let mut reasons: Counts = BTreeMap::new();
    for d in &drops {
        *reasons.entry(d.reason.to_string()).or_default() += 1;
    }
    let end = |ip: Option<IpAddr>, n: &Option<Name>| match (ip, n) {
        (Some(ip), Some(n)) => format!("{ip} ({n})"),
        (Some(ip), None) => ip.to_string(),
        (None, Some(n)) => n.to_string(),
        (None, None) => "?".to_owned(),
    };
    let pair = vec![
        end(first.src, &first.src_node),
        end(first.dst, &first.dst_node),
    ];
    let reason_text: Vec<String> = reasons.iter().map(|(r, n)| format!("{r} {n}")).collect();
    let mut b = Because::new(
        Reason::MemberlistDropped,
        Some(first.t),
        c.t,
        format!(
            "memberlist packets between {} and {} were dropped ({}, {}) from {}",
            pair[0],
            pair[1],
            drops.len(),
            reason_text.join(", "),
            relative(c.t - first.t)
        ),
    );
    b.memberlist = Some(MemberlistEvidence {
        between: pair,
        drops: drops.len() as u64,
        reasons,
        last: Time::from_secs_f64(last),
    });
    Some(b)
}

/// The old owner's MAC left the LAN: frames to it flooded to everyone (the bridge forgot
/// it); clients' neighbour entries for it that failed are counted with it.
fn link_lost(c: &OwnerChange, signs: &LinkSigns, ctx: &Context) -> Option<Because> {
    let mac = c.old_mac?;
    let near = |v: &[(f64, Mac)]| -> Vec<f64> {
        v.iter()
            .filter(|(t, m)| *m == mac && *t >= c.t - LINK_BEFORE && *t <= c.t + AFTER)
            .map(|(t, _)| *t)
            .collect()
    };
    let (flooded, failed) = (near(&signs.flooded), near(&signs.neigh_failed));
    // Failed entries alone only say that the MAC stopped answering for the VIP (a planned
    // move without GARP does that too); flooding says the LAN no longer knows the MAC.
    let first = flooded.iter().copied().fold(f64::INFINITY, f64::min);
    if !first.is_finite() {
        return None;
    }
    let node = ctx.nodes.and_then(|n| n.of_mac(mac)).map(str::to_owned);
    let name = node
        .as_ref()
        .map_or(mac.to_string(), |n| format!("{n} ({mac})"));
    let mut b = Because::new(
        Reason::NodeLinkLost,
        Some(first),
        c.t,
        format!(
            "the old owner {name} left the LAN {}: {} frames to it flooded and dropped by other hosts, {} neighbour entries failed",
            relative(c.t - first),
            flooded.len(),
            failed.len()
        ),
    );
    b.link = Some(LinkLossEvidence {
        mac: mac.to_string(),
        node,
        flooded: flooded.len() as u64,
        neigh_failed: failed.len() as u64,
    });
    Some(b)
}

fn process(l: &Lifecycle, ctx: &Context) -> ProcessEvidence {
    ProcessEvidence {
        pid: l.pid,
        comm: l.comm.to_string(),
        netns: l.netns,
        node: l.node.as_ref().map(ToString::to_string).or_else(|| {
            let n = ctx.nodes?.of_netns(u64::from(l.netns))?;
            Some(n.to_owned())
        }),
        exit_code: None,
        signal: None,
        sender: None,
        oom: None,
        restarted_after_s: None,
    }
}

/// `speaker 1234 on n0` (or `in netns N`).
pub(super) fn speaker_name(p: &ProcessEvidence) -> String {
    match &p.node {
        Some(n) => format!("{} {} on {n}", p.comm, p.pid),
        None => format!("{} {} in netns {}", p.comm, p.pid, p.netns),
    }
}

fn relative(before: f64) -> String {
    if before >= 0.0 {
        format!("{before:.1} s before the move")
    } else {
        format!("{:.1} s after the move", -before)
    }
}

/// For a VIP that keeps moving: the failure behind most of its moves, as a sentence ("speaker
/// 812 on n1 was OOM-killed 3 times in 40 s"), and what to change.
pub(super) fn behind_flapping(moves: &[&Because]) -> Option<(String, &'static str)> {
    let mut by: BTreeMap<(Reason, String), Vec<&Because>> = BTreeMap::new();
    for b in moves.iter().filter(|b| b.reason.is_failure()) {
        let place = match (&b.process, &b.memberlist, &b.link) {
            (Some(p), _, _) => p
                .node
                .clone()
                .unwrap_or_else(|| format!("netns {}", p.netns)),
            (_, Some(m), _) => {
                // Either direction: one pair.
                let mut ends = m.between.clone();
                ends.sort();
                ends.join(" and ")
            }
            (_, _, Some(l)) => l.node.clone().unwrap_or_else(|| l.mac.clone()),
            _ => String::new(),
        };
        by.entry((b.reason, place)).or_default().push(b);
    }
    // A restart that takes a VIP back follows the failure that moved it away: name the
    // failure; among equals, the first reason in order.
    let ((reason, place), list) = by.into_iter().max_by_key(|((r, _), v)| {
        (
            *r != Reason::AnnouncerRestarted,
            v.len(),
            std::cmp::Reverse(*r),
        )
    })?;
    let times = || list.iter().filter_map(|b| b.at.map(Time::as_secs_f64));
    let span = times().fold(f64::NEG_INFINITY, f64::max) - times().fold(f64::INFINITY, f64::min);
    let span = if span >= 120.0 {
        format!("{:.0} minutes", span / 60.0)
    } else {
        format!("{:.0} s", span.max(0.0))
    };
    // A process counts once however many VIPs (moves) it took with it.
    let mut pids: Vec<u32> = list
        .iter()
        .filter_map(|b| Some(b.process.as_ref()?.pid))
        .collect();
    pids.sort_unstable();
    pids.dedup();
    let times_in = match pids.len() {
        0 | 1 => "once".to_owned(),
        n => format!("{n} times in {span}"),
    };
    let moves = list.len();
    let (what, hint) = match reason {
        Reason::AnnouncerOomKilled => (
            format!("speaker on {place} was OOM-killed {times_in}"),
            "the speaker is OOM-killed: raise its memory limit (resources.limits.memory of the speaker DaemonSet) or find what makes it grow",
        ),
        Reason::AnnouncerSignalled => (
            format!("speaker on {place} was signalled {times_in}"),
            "the speaker is being stopped (SIGTERM/SIGKILL): look at who sends it (rollouts, evictions, failing liveness probes) and at the sender named in the evidence",
        ),
        Reason::AnnouncerExited => (
            format!("speaker on {place} exited {times_in}"),
            "the speaker keeps exiting: read its logs and exit codes (crash loop)",
        ),
        Reason::AnnouncerRestarted => (
            format!("speaker on {place} started and took the VIP back {times_in}"),
            "the speaker restarts and reclaims the VIP: find why it restarts; each restart moves the VIP twice",
        ),
        Reason::MemberlistDropped => (
            memberlist_summary(&place, &list),
            "the speakers' memberlist traffic (UDP and TCP 7946 by default) is dropped: allow the memberlist port between the nodes in network policies and host firewalls",
        ),
        Reason::NodeLinkLost => (
            format!("node {place} lost its link, behind {moves} move(s)"),
            "a node keeps leaving the LAN: check its NIC, cabling or virtual switch port, and node readiness",
        ),
        Reason::AnnouncerChanged | Reason::Unknown => return None,
    };
    Some((what, hint))
}

/// "memberlist packets between n0 and n1 dropped (108, NETFILTER_DROP 108), behind 12 moves":
/// the most any move's window held.
fn memberlist_summary(place: &str, list: &[&Because]) -> String {
    let most = list
        .iter()
        .filter_map(|b| b.memberlist.as_ref())
        .max_by_key(|m| m.drops);
    let (drops, reasons) = most.map_or((0, String::new()), |m| {
        let r: Vec<String> = m.reasons.iter().map(|(r, n)| format!("{r} {n}")).collect();
        (m.drops, r.join(", "))
    });
    format!(
        "memberlist packets between {place} dropped ({drops}, {reasons}), behind {} move(s)",
        list.len()
    )
}

#[cfg(test)]
#[path = "because_tests.rs"]
mod tests;
