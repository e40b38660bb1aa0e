//! Ring-buffer bytes → typed [`decode::Event`]s → [`Record`]s with names and wall-clock times.

pub mod class;
pub mod decode;
pub mod decode_proc;
mod endpoint;
mod header;
pub mod record;
pub mod speaker;
pub mod totals;
pub mod values;

use std::{collections::HashMap, sync::Arc};

pub use record::Record;
use record::{ArpRec, DropRec, Flow, NdpFlags, NeighRec};
use speaker::{SpeakerEvent, SpeakerRec};
use values::{ConntrackEvent, Direction, Name, NudState, TcpFlags, Time};

use crate::kernel::{btf::DropReasons, kallsyms::Kallsyms};
use decode::{ArpEvent, DropEvent, Event, IfName, NeighEvent};

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

    pub fn wall(&self, boot_ns: u64) -> Time {
        let ns = i128::from(boot_ns) + self.offset_ns;
        let ns = u64::try_from(ns.max(0)).unwrap_or(0);
        Time::from_system(std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns))
    }

    pub fn boot_now_ns() -> u64 {
        u64::try_from(clock_ns(libc::CLOCK_BOOTTIME)).unwrap_or(0)
    }
}

/// Names for what the kernel hands over as numbers: reason names and symbols, each made once
/// and shared after (no allocation per event for them).
pub struct Namer {
    reasons: DropReasons,
    kallsyms: Kallsyms,
    pub clock: Clock,
    reason_names: HashMap<u32, Name>,
    symbols: HashMap<u64, Name>,
    ifnames: HashMap<IfName, Name>,
}

/// Symbols kept before the cache starts over (locations are few: a bound against surprises).
const MAX_CACHED: usize = 4096;

impl Namer {
    pub fn new(reasons: DropReasons, kallsyms: Kallsyms, clock: Clock) -> Self {
        Self {
            reasons,
            kallsyms,
            clock,
            reason_names: HashMap::new(),
            symbols: HashMap::new(),
            ifnames: HashMap::new(),
        }
    }

    pub fn reasons(&self) -> &DropReasons {
        &self.reasons
    }

    pub fn reason(&mut self, code: u32) -> Name {
        if self.reason_names.len() >= MAX_CACHED && !self.reason_names.contains_key(&code) {
            self.reason_names.clear();
        }
        let reasons = &self.reasons;
        self.reason_names
            .entry(code)
            .or_insert_with(|| Arc::from(reasons.name(code)))
            .clone()
    }

    /// The function at a kernel text address, when symbols are readable.
    pub fn function(&self, addr: u64) -> Option<&str> {
        self.kallsyms.function(addr)
    }

    fn symbol(&mut self, addr: u64) -> Name {
        if self.symbols.len() >= MAX_CACHED && !self.symbols.contains_key(&addr) {
            self.symbols.clear();
        }
        let k = &self.kallsyms;
        self.symbols
            .entry(addr)
            .or_insert_with(|| Arc::from(k.symbolize(addr)))
            .clone()
    }

    fn ifname(&mut self, name: Option<IfName>) -> Option<Name> {
        let name = name?;
        if self.ifnames.len() >= MAX_CACHED && !self.ifnames.contains_key(&name) {
            self.ifnames.clear();
        }
        Some(
            self.ifnames
                .entry(name)
                .or_insert_with(|| Arc::from(name.to_text()))
                .clone(),
        )
    }

    /// The record of an event, not yet attributed to a VIP.
    pub fn record(&mut self, e: &Event) -> Record {
        match e {
            Event::Drop(d) => {
                let rec = self.drop_rec(d);
                if rec.event.is_some() {
                    Record::Conntrack(rec)
                } else {
                    Record::Drop(rec)
                }
            }
            Event::Arp(a) => Record::Arp(self.arp_rec(a)),
            Event::Neigh(n) => Record::Neigh(self.neigh_rec(n)),
            Event::Proc(p) => Record::Speaker(self.speaker_rec(p)),
        }
    }

    /// A process event as a speaker record, without its VIPs (the pipeline knows them). A kind
    /// from another version reads as a start.
    fn speaker_rec(&mut self, p: &decode_proc::ProcEvent) -> SpeakerRec {
        let event = p.event.unwrap_or_default();
        let (exit_code, signal) = match event {
            SpeakerEvent::Exit => p.exit(),
            SpeakerEvent::Signal => (None, Some(p.signal)),
            _ => (None, None),
        };
        let signal_event = event == SpeakerEvent::Signal;
        SpeakerRec {
            node: None,
            time: Some(self.clock.wall(p.ts_ns)),
            pid: p.pid,
            comm: self.ifname(p.comm).unwrap_or_else(|| Name::from("")),
            netns: p.netns,
            event,
            exit_code,
            signal,
            sender_pid: signal_event.then_some(p.sender_pid),
            sender_comm: if signal_event {
                self.ifname(p.sender_comm)
            } else {
                None
            },
            oom: (event == SpeakerEvent::OomKill).then_some(p.oom),
            vips: Vec::new(),
        }
    }

    fn drop_rec(&mut self, d: &DropEvent) -> DropRec {
        let p = &d.packet;
        let flow = |f: &decode::Flow| Flow {
            src: f.src,
            sport: f.sport,
            dst: f.dst,
            dport: f.dport,
            proto: f.proto,
        };
        DropRec {
            node: None,
            time: Some(self.clock.wall(d.ts_ns)),
            event: d.ct.event.map(ConntrackEvent),
            reason: self.reason(d.reason),
            reason_code: d.reason,
            location: self.symbol(d.location),
            cpu: d.cpu,
            netns: d.netns,
            ifindex: d.ifindex,
            ifname: self.ifname(d.ifname),
            family: p.family(),
            proto: p.proto,
            src: p.src,
            sport: p.sport,
            dst: p.dst,
            dport: p.dport,
            len: p.len,
            l3_proto: p.l3_proto,
            tcp_flags: p.tcp_flags.map(TcpFlags),
            icmp_type: p.icmp.map(|(t, _)| t),
            icmp_code: p.icmp.map(|(_, c)| c),
            orig: d.ct.orig.as_ref().map(flow),
            reply: d.ct.reply.as_ref().map(flow),
            nat_netns: d.ct.nat_netns,
            vip: None,
            src_mac: d.eth.map(|(s, _)| s),
            dst_mac: d.eth.map(|(_, d)| d),
            sampled: d.sampled,
            class: None,
            service: None,
            endpoint: None,
        }
        .classified()
    }

    fn arp_rec(&mut self, a: &ArpEvent) -> ArpRec {
        ArpRec {
            node: None,
            time: Some(self.clock.wall(a.ts_ns)),
            family: a.sender_ip.map(values::Family::of).unwrap_or_default(),
            op: a.op,
            gratuitous: a.gratuitous,
            direction: if a.tx { Direction::Tx } else { Direction::Rx },
            bridged: a.bridged,
            sender_ip: a.sender_ip,
            sender_mac: a.sender_mac,
            target_ip: a.target_ip,
            target_mac: a.target_mac,
            ndp_flags: a.ndp_flags.map(NdpFlags::from_wire),
            ifname: self.ifname(a.ifname),
            ifindex: a.ifindex,
            netns: a.netns,
            vip: None,
            service: None,
            pid: a.sender_task.map(|(pid, _)| pid),
            comm: a.sender_task.and_then(|(_, c)| self.ifname(c)),
        }
    }

    fn neigh_rec(&mut self, n: &NeighEvent) -> NeighRec {
        NeighRec {
            node: None,
            time: Some(self.clock.wall(n.ts_ns)),
            ip: n.ip,
            old_mac: n.old_mac,
            new_mac: n.new_mac,
            old_state: NudState(n.old_state),
            new_state: NudState(n.new_state),
            ifname: self.ifname(n.ifname),
            ifindex: n.ifindex,
            netns: n.netns,
            vip: None,
            service: None,
        }
    }
}
