//! The one event loop: ring buffer → decode → records with names → attribution → ownership →
//! sinks. `watch`, `record`, `top`, live `diagnose` and `agent` differ only in their sinks.

pub mod attribution;
pub mod holders;
mod housekeeping;
pub mod ownership;
mod selection;
pub mod services;
pub mod speakers;
mod stop;
mod totals;

use std::{
    io,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
pub use housekeeping::Housekeeping;
pub use selection::Selection;
use speakers::Speakers;
pub use stop::Stop;
use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, SignalKind},
};

use crate::{
    event::{decode::decode, values::Name, Namer, Record},
    kernel::conntrack::TablePressure,
    output::summary::{Summary, VipCounts},
    probes::{NatOccupancy, Tracer},
};
use attribution::VipSet;
use ownership::Ownership;
use services::KubeProxy;

/// How often the reader drains the ring when no wakeup came (records are submitted without a
/// wakeup until the ring fills past a threshold).
const DRAIN_INTERVAL: Duration = Duration::from_millis(50);
/// How often conntrack tables are checked for pressure.
const TABLE_INTERVAL: Duration = Duration::from_secs(5);
/// How often sinks that want them get the kernel's counters.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);

/// Where records go. Stream sinks see the records the user selected, up to `--count`; sinks
/// that want everything (metrics) see every record.
pub trait Sink {
    /// One record. An error ends a stream (its reader went away).
    fn record(&mut self, r: &Record) -> io::Result<()>;

    /// After each drain: push buffered output out.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// Whether this sink sees every record, whatever `--vip` and `--count` select.
    fn wants_all(&self) -> bool {
        false
    }

    /// The kernel's own counters and the conntrack tables, every second.
    fn housekeeping(&mut self, _h: &Housekeeping<'_>) {}
}

/// Re-reads the VIP list (SIGHUP).
pub type Reload = Box<dyn FnMut() -> anyhow::Result<VipSet>>;

/// Counts of what went through.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    pub delivered: u64,
    pub printed: u64,
    pub decode_errors: u64,
}

pub struct Pipeline<'s> {
    pub namer: Namer,
    pub vips: VipSet,
    pub ownership: Ownership,
    pub selection: Selection,
    /// Labels every record (the agent's node name).
    pub node: Option<Name>,
    pub sinks: Vec<&'s mut dyn Sink>,
    pub reload: Option<Reload>,
    /// Unix seconds of the last drain, for `/healthz`.
    pub last_drain: Arc<AtomicU64>,
    pub tables: TablePressure,
    pub counts: Counts,
    /// Service names and endpoint changes from kube-proxy's rules.
    pub kube: Option<KubeProxy>,
    /// The processes that announce VIPs, and memberlist drops.
    pub speakers: Speakers,
    by_vip: VipCounts,
    /// The VIP set changed (reload, discovery) since the kernel's copy was made.
    vips_changed: bool,
    /// The NAT map's last count, and when it was made.
    nat: Option<(NatOccupancy, Instant)>,
    /// A stream's reader went away: keep counting, stop streaming.
    closed: bool,
    /// Set by [`Pipeline::learn_holders`]: the namespace filter of the periodic re-scan.
    holders_scope: Option<Vec<u32>>,
    split_brains: holders::SplitBrains,
    /// What the last totals record said.
    said: totals::Said,
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl<'s> Pipeline<'s> {
    pub fn new(namer: Namer, vips: VipSet, ownership: Ownership) -> Self {
        Self {
            namer,
            vips,
            ownership,
            selection: Selection::default(),
            node: None,
            sinks: Vec::new(),
            reload: None,
            last_drain: Arc::new(AtomicU64::new(unix_now())),
            tables: TablePressure::empty(),
            counts: Counts::default(),
            kube: None,
            speakers: Speakers::default(),
            by_vip: VipCounts::default(),
            vips_changed: true,
            nat: None,
            closed: false,
            holders_scope: None,
            split_brains: holders::SplitBrains::default(),
            said: totals::Said::default(),
        }
    }

    pub fn sink(mut self, s: &'s mut dyn Sink) -> Self {
        self.sinks.push(s);
        self
    }

    fn done(&self) -> bool {
        self.closed
            || self
                .selection
                .limit
                .is_some_and(|n| self.counts.printed >= n)
    }

    /// Sends a record to the sinks: `stream` ones only while the stream runs.
    fn emit(&mut self, r: &Record, stream: bool) {
        let streaming = stream && !self.done();
        for s in &mut self.sinks {
            if !(streaming || s.wants_all()) {
                continue;
            }
            if s.record(r).is_err() && !s.wants_all() {
                self.closed = true;
            }
        }
    }

    /// Sends a record that is not from the ring (header, status) to every sink.
    pub fn announce(&mut self, r: &Record) {
        self.emit(r, true);
    }

    /// Learns who holds each VIP now, from what the host's namespaces know (configured
    /// addresses, neighbour tables; only namespace `only` when given), and streams what that
    /// says.
    pub fn learn_holders(&mut self, only: &[u32]) {
        self.holders_scope = Some(only.to_vec());
        let views = holders::scan(only);
        let now = crate::event::values::Time::now();
        let recs = holders::learn(
            &views,
            &mut self.ownership,
            &mut self.vips,
            &mut self.split_brains,
            now,
        );
        self.emit_learned(recs);
    }

    /// Reads the configured addresses again (every [`holders::RESCAN_INTERVAL`]): a speaker
    /// that dies later leaves its VIP behind too.
    fn rescan_holders(&mut self) {
        let Some(only) = &self.holders_scope else {
            return;
        };
        let views = holders::scan(only);
        let now = crate::event::values::Time::now();
        let recs = holders::rescan(
            &views,
            &mut self.ownership,
            &self.vips,
            &mut self.split_brains,
            now,
        );
        self.emit_learned(recs);
    }

    fn emit_learned(&mut self, recs: Vec<Record>) {
        for mut r in recs {
            if let Some(node) = &self.node {
                r.set_node(node);
            }
            if let Some(k) = &self.kube {
                k.catalog.annotate(&mut r);
            }
            self.emit(&r, true);
        }
    }

    /// Handles one record read from the ring.
    pub fn process(&mut self, bytes: &[u8]) {
        self.counts.delivered += 1;
        let event = match decode(bytes) {
            Ok(e) => e,
            Err(e) => {
                self.counts.decode_errors += 1;
                tracing::debug!("undecodable record: {e}");
                return;
            }
        };
        let mut rec = self.namer.record(&event);
        if let Some(node) = &self.node {
            rec.set_node(node);
        }
        if let Record::Speaker(s) = &mut rec {
            if !self.speakers.speaker(s) {
                return;
            }
        }
        let updates = match &rec {
            Record::Arp(a) => {
                self.speakers.observe_arp(a);
                let before = self.vips.addrs().len();
                let u = self.ownership.observe(a, &mut self.vips);
                self.vips_changed |= self.vips.addrs().len() != before;
                u
            }
            _ => Vec::new(),
        };
        self.vips.attribute(&mut rec);
        if let Some(link) = match &rec {
            Record::Drop(d) => self.speakers.link(d),
            _ => None,
        } {
            rec = Record::SpeakerLink(link);
        }
        for mut u in updates {
            if let Some(node) = &self.node {
                u.set_node(node);
            }
            if let Some(k) = &self.kube {
                k.catalog.annotate(&mut u);
            }
            self.emit(&u, true);
        }
        if let Some(k) = &self.kube {
            k.catalog.annotate(&mut rec);
        }
        self.by_vip.add(&rec);
        if self.selection.shows(&rec) && !self.done() {
            self.emit(&rec, true);
            self.counts.printed += 1;
        } else {
            self.emit(&rec, false);
        }
    }

    /// Takes in what kube-proxy's rules say now: endpoint changes, LoadBalancer IPs to
    /// discover.
    fn kube_proxy(&mut self) {
        let Some(k) = self.kube.as_mut() else {
            return;
        };
        let mut out = k.poll();
        if k.discover {
            let new: Vec<_> = k
                .catalog
                .load_balancer_ips()
                .map(|(ip, _)| *ip)
                .filter(|ip| self.vips.of_addr(*ip).is_none())
                .collect();
            for ip in new {
                self.vips.insert(ip);
                self.ownership.discovered.push(ip);
                out.push(k.catalog.discovered(ip));
            }
        }
        for mut r in out {
            if let Some(node) = &self.node {
                r.set_node(node);
            }
            let selected = match &r {
                Record::Endpoint(e) if self.selection.vips_only => {
                    e.vips.iter().any(|v| self.vips.of_addr(*v).is_some())
                }
                _ => true,
            };
            self.emit(&r, selected);
        }
    }

    /// Reads everything in the ring now.
    pub fn drain(&mut self, ring: &mut RingBuf<MapData>) {
        self.kube_proxy();
        while let Some(item) = ring.next() {
            self.process(&item);
        }
        self.flush();
        self.last_drain.store(unix_now(), Ordering::Relaxed);
    }

    fn flush(&mut self) {
        for s in &mut self.sinks {
            if s.flush().is_err() && !s.wants_all() {
                self.closed = true;
            }
        }
    }

    /// Gives the kernel the current VIP set when it changed, and the speakers it must follow.
    fn sync_vips(&mut self, tracer: &mut Tracer) {
        self.speakers.sync(tracer);
        if !self.vips_changed {
            return;
        }
        match tracer.set_vips(&self.vips) {
            Ok(()) => self.vips_changed = false,
            Err(e) => tracing::warn!("updating the kernel's VIP set: {e}"),
        }
    }

    fn reload(&mut self) {
        let Some(reload) = self.reload.as_mut() else {
            return;
        };
        match reload() {
            Ok(vips) => {
                tracing::info!("SIGHUP: configuration reloaded");
                self.vips = vips;
                self.vips_changed = true;
            }
            Err(e) => tracing::error!("SIGHUP: keeping the old configuration: {e:#}"),
        }
    }

    /// Streams until the duration passes, a signal or `stop` comes, `--count` is reached or a
    /// stream's reader goes away. Then detaches the programs, reads what is left, and
    /// summarizes with the kernel's counters: both then describe the same drops.
    pub fn run(
        mut self,
        tracer: &mut Tracer,
        duration: Option<Duration>,
        stop: &Stop,
        ready: impl FnOnce(),
    ) -> anyhow::Result<(Summary, bool)> {
        let ring = tracer.take_ring()?;
        self.sync_vips(tracer);
        self.tables = TablePressure::start();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| anyhow::anyhow!("starting the event loop: {e}"))?;
        let started = Instant::now();
        let mut ring = rt.block_on(self.stream(ring, duration, tracer, stop, ready))?;
        tracer.detach();
        std::thread::sleep(Duration::from_millis(20));
        self.drain(&mut ring);
        let counters = tracer.counters()?;
        let agg = tracer.agg_counts()?;
        if tracer.aggregating {
            // Nothing runs any more: these totals and the records read are final.
            self.say_totals(&counters, &agg, true);
            self.flush();
        }
        let totals = self.vip_totals(&agg);
        let summary = Summary::build(&mut self, tracer, &counters, &totals, started.elapsed());
        Ok((summary, self.closed))
    }

    /// Parts of the summary only the pipeline knows.
    pub(crate) fn take_vip_counts(&mut self) -> VipCounts {
        std::mem::take(&mut self.by_vip)
    }

    async fn stream(
        &mut self,
        ring: RingBuf<MapData>,
        duration: Option<Duration>,
        tracer: &mut Tracer,
        stop: &Stop,
        ready: impl FnOnce(),
    ) -> anyhow::Result<RingBuf<MapData>> {
        // SAFETY: the ring buffer owns its fd and stays inside the AsyncFd until into_inner below.
        let mut afd = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("registering the ring buffer with the event loop: {e}"))?;
        let mut tick = tokio::time::interval(DRAIN_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut table_tick = tokio::time::interval(TABLE_INTERVAL);
        table_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING_INTERVAL);
        let first = tokio::time::Instant::now() + holders::RESCAN_INTERVAL;
        let mut rescan = tokio::time::interval_at(first, holders::RESCAN_INTERVAL);
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        // Sampling, the stream gets the kernel's totals every second too.
        let wants_housekeeping = tracer.aggregating || self.sinks.iter().any(|s| s.wants_all());
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        // Only the agent reloads on SIGHUP; anything else keeps the default (a closed terminal
        // ends `watch` and `top`).
        let mut sighup = match self.reload {
            Some(_) => Some(signal(SignalKind::hangup())?),
            None => None,
        };
        // Only now can Ctrl-C stop it cleanly: what says "ready" must come after this.
        ready();
        let deadline =
            tokio::time::sleep(duration.unwrap_or(Duration::from_secs(u64::from(u32::MAX))));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                guard = afd.readable_mut() => {
                    let mut guard = guard?;
                    self.drain(guard.get_inner_mut());
                    guard.clear_ready();
                }
                _ = tick.tick() => self.drain(afd.get_mut()),
                _ = table_tick.tick() => self.tables.poll(),
                _ = rescan.tick() => self.rescan_holders(),
                _ = housekeeping.tick(), if wants_housekeeping => self.housekeeping(tracer),
                Some(_) = async { sighup.as_mut()?.recv().await }, if sighup.is_some() => {
                    self.reload();
                }
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
                () = stop.wait() => break,
                () = &mut deadline => break,
            }
            self.sync_vips(tracer);
            if self.done() {
                break;
            }
        }
        Ok(afd.into_inner())
    }
}
