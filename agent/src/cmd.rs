//! The subcommands.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::{self, BufWriter, IsTerminal, Write},
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use aya::maps::{MapData, RingBuf};
use lbtrace::{
    attribution::VipSet,
    btf::{DropReasons, KernelBtf, VMLINUX_BTF},
    decode::{decode, Event},
    kallsyms::Kallsyms,
    metrics::Metrics,
    netns::{self, CtTable},
    output::{self, event_line, Clock, Context, Summary},
    ownership::{Ownership, OwnershipConfig, Update},
    privileges,
    probes::{self, KernelFilter, LoadOptions, ProbeMode, Tracer},
};
use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, SignalKind},
};

use crate::{ColorMode, WatchArgs};

/// An error the user can fix (bad input, missing privileges): exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// How often the reader drains the ring when no wakeup came (records are submitted without a
/// wakeup until the ring fills past a threshold).
const DRAIN_INTERVAL: Duration = Duration::from_millis(50);
/// How often conntrack tables are checked for pressure.
const TABLE_INTERVAL: Duration = Duration::from_secs(5);
/// Warn when a namespace's conntrack table is this full (percent of nf_conntrack_max).
const TABLE_WARN_PERCENT: u64 = 80;

/// Conntrack table pressure per namespace: entries against nf_conntrack_max, and how the
/// per-CPU insert_failed, drop, early_drop and clash_resolve counters moved while watching.
pub(crate) struct TablePressure {
    pub(crate) start: HashMap<u32, CtTable>,
    pub(crate) last: HashMap<u32, CtTable>,
    pub(crate) peak: HashMap<u32, u64>,
    pub(crate) warned: HashSet<u32>,
    pub(crate) max: Option<u64>,
}

impl TablePressure {
    pub(crate) fn start() -> Self {
        let start = netns::all_conntrack_tables();
        Self {
            last: start.clone(),
            peak: start.iter().map(|(n, t)| (*n, t.entries)).collect(),
            start,
            warned: HashSet::new(),
            max: netns::conntrack_max(),
        }
    }

    fn poll(&mut self) {
        self.last = netns::all_conntrack_tables();
        // The limit is a sysctl: it can change while lbtrace runs.
        self.max = netns::conntrack_max();
        for (ns, t) in &self.last {
            let peak = self.peak.entry(*ns).or_default();
            *peak = (*peak).max(t.entries);
            let Some(max) = self.max.filter(|m| *m > 0) else {
                continue;
            };
            let percent = t.entries * 100 / max;
            if percent >= TABLE_WARN_PERCENT {
                if self.warned.insert(*ns) {
                    tracing::warn!(
                        "conntrack table of netns {ns} is {percent}% full ({} of nf_conntrack_max {max})",
                        t.entries
                    );
                }
            } else {
                self.warned.remove(ns);
            }
        }
    }

    /// Namespaces whose conntrack counters moved, or whose table came near full.
    fn finish(&mut self) -> BTreeMap<u32, serde_json::Value> {
        self.poll();
        let mut out = BTreeMap::new();
        for (ns, now) in &self.last {
            let before = self.start.get(ns).cloned().unwrap_or_default();
            let per_cpu = |f: fn(&netns::CtCpuStat) -> u32| -> Vec<u32> {
                now.per_cpu
                    .iter()
                    .enumerate()
                    .map(|(i, r)| f(r).wrapping_sub(before.per_cpu.get(i).map_or(0, f)))
                    .collect()
            };
            let insert_failed = per_cpu(|r| r.insert_failed);
            let drop = per_cpu(|r| r.drop);
            let early_drop = per_cpu(|r| r.early_drop);
            let clash = per_cpu(|r| r.clash_resolve);
            let peak = self.peak.get(ns).copied().unwrap_or(now.entries);
            let near_full = self
                .max
                .is_some_and(|m| m > 0 && peak * 100 / m >= TABLE_WARN_PERCENT);
            let moved = [&insert_failed, &drop, &early_drop, &clash]
                .iter()
                .any(|v| v.iter().any(|n| *n > 0));
            if moved || near_full {
                out.insert(
                    *ns,
                    serde_json::json!({
                        "entries": now.entries,
                        "peak_entries": peak,
                        "max": self.max,
                        "insert_failed_per_cpu": insert_failed,
                        "drop_per_cpu": drop,
                        "early_drop_per_cpu": early_drop,
                        "clash_resolved_per_cpu": clash,
                    }),
                );
            }
        }
        out
    }
}

/// Kernel symbols for locations; without them (unreadable, or addresses hidden without
/// CAP_SYSLOG) locations print as raw addresses, with a warning.
pub(crate) fn load_kallsyms() -> Kallsyms {
    match Kallsyms::load() {
        Ok(k) if !k.is_empty() => k,
        Ok(k) => {
            tracing::warn!("/proc/kallsyms hides addresses (needs CAP_SYSLOG or kptr_restrict=0): locations print as addresses");
            k
        }
        Err(e) => {
            tracing::warn!(
                "{}: {e}; locations print as addresses",
                lbtrace::kallsyms::KALLSYMS
            );
            Kallsyms::default()
        }
    }
}

pub(crate) fn load_btf() -> anyhow::Result<KernelBtf> {
    KernelBtf::load(Path::new(VMLINUX_BTF)).context("this kernel does not expose BTF")
}

pub(crate) fn require_privileges() -> anyhow::Result<()> {
    let missing = privileges::missing_for_tracing(privileges::effective());
    if !missing.is_empty() {
        return Err(UsageError(format!(
            "lbtrace needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN) to load its probes; missing {}: run as root or grant them",
            missing.join(", ")
        ))
        .into());
    }
    Ok(())
}

/// Resolves `--reason` names against this kernel's list.
fn reason_codes(reasons: &DropReasons, names: &[String]) -> anyhow::Result<Vec<u32>> {
    names
        .iter()
        .map(|n| {
            reasons.code(n).ok_or_else(|| {
                let valid: Vec<&str> = reasons.iter().map(|(_, n)| n).collect();
                UsageError(format!(
                    "unknown drop reason `{n}`; this kernel has: {}",
                    valid.join(", ")
                ))
                .into()
            })
        })
        .collect()
}

pub(crate) struct Reader<'a, W: Write> {
    pub(crate) ctx: Context<'a>,
    pub(crate) vips: VipSet,
    /// Keep only events attributed to a VIP (`--vip`; `--tag-vip` only attributes).
    pub(crate) select_vips: bool,
    pub(crate) out: W,
    pub(crate) json: bool,
    pub(crate) colour: bool,
    pub(crate) limit: Option<u64>,
    pub(crate) delivered: u64,
    pub(crate) printed: u64,
    pub(crate) decode_errors: u64,
    /// The reader of our output went away (a closed pipe): keep counting, stop printing.
    pub(crate) out_closed: bool,
    /// Delivered drops per VIP and reason (or conntrack event).
    pub(crate) by_vip: BTreeMap<String, BTreeMap<String, u64>>,
    pub(crate) tables: TablePressure,
    pub(crate) ownership: Ownership,
    /// Added to every JSON record (`--node-name`).
    pub(crate) node: Option<String>,
    pub(crate) metrics: Option<Arc<Mutex<Metrics>>>,
    /// Unix seconds of the last drain, for `/healthz`.
    pub(crate) last_drain: Arc<AtomicU64>,
    /// SIGHUP: re-reads the VIP list.
    pub(crate) reload: Option<Box<dyn FnMut() -> anyhow::Result<VipSet>>>,
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl<W: Write> Reader<'_, W> {
    /// Ownership changes, findings and discoveries go in the same stream as the events.
    fn print_update(&mut self, u: &Update) {
        let json = match u {
            Update::Discovered { vip, owner } => serde_json::json!({
                "kind": "vip_discovered", "vip": vip, "mac": owner.mac,
                "netns": owner.netns, "ifname": owner.ifname,
                "note": "learned from a gratuitous announcement (--discover-vips)",
            }),
            Update::Changed { vip, change } => serde_json::json!({
                "time": output::rfc3339(self.ctx.clock.wall(change.at_ns)),
                "kind": "vip_owner", "vip": vip,
                "old_mac": change.from.as_ref().map(|o| o.mac),
                "old_netns": change.from.as_ref().map(|o| o.netns),
                "new_mac": change.to.mac, "new_netns": change.to.netns,
                "ifname": change.to.ifname,
            }),
            Update::Found(f) => serde_json::json!({
                "time": output::rfc3339(self.ctx.clock.wall(f.at_ns)),
                "kind": "finding", "finding": f.finding, "vip": f.vip, "macs": f.macs,
                "changes": f.changes, "detail": f.detail,
            }),
        };
        let line = if self.json {
            json.to_string()
        } else {
            match u {
                Update::Discovered { vip, owner } => {
                    format!("lbtrace: discovered VIP {vip} (announced by {})", owner.mac)
                }
                Update::Changed { vip, change } => format!(
                    "{} OWNER            vip {vip}: {} -> {} (netns {})",
                    output::rfc3339(self.ctx.clock.wall(change.at_ns)),
                    change
                        .from
                        .as_ref()
                        .map_or("none".to_owned(), |o| o.mac.to_string()),
                    change.to.mac,
                    change.to.netns
                ),
                Update::Found(f) => format!("FINDING {:?} vip {}: {}", f.finding, f.vip, f.detail),
            }
        };
        if writeln!(self.out, "{line}").is_err() {
            self.out_closed = true;
        }
    }

    /// Ownership per VIP for the summary.
    fn owners_summary(&self) -> BTreeMap<String, serde_json::Value> {
        self.ownership
            .owners()
            .map(|(vip, owner, changes)| {
                let changes: Vec<_> = changes
                    .iter()
                    .filter(|c| c.from.is_some())
                    .map(|c| {
                        serde_json::json!({
                            "time": output::rfc3339(self.ctx.clock.wall(c.at_ns)),
                            "from": c.from.as_ref().map(|o| o.mac),
                            "to": c.to.mac,
                            "to_netns": c.to.netns,
                            "garps": c.garps,
                        })
                    })
                    .collect();
                (
                    vip.to_string(),
                    serde_json::json!({
                        "mac": owner.map(|o| o.mac),
                        "netns": owner.map(|o| o.netns),
                        "ifname": owner.and_then(|o| o.ifname.clone()),
                        "garps_total": self.ownership_garps(vip),
                        "changes": changes,
                    }),
                )
            })
            .collect()
    }

    fn ownership_garps(&self, vip: std::net::IpAddr) -> u32 {
        self.ownership
            .owners()
            .filter(|(v, _, _)| *v == vip)
            .flat_map(|(_, _, c)| c.iter().map(|c| c.garps))
            .sum()
    }
    fn done(&self) -> bool {
        self.limit.is_some_and(|n| self.printed >= n)
    }

    /// Reads everything in the ring now; prints what passes the userspace filters.
    pub(crate) fn drain(&mut self, ring: &mut RingBuf<MapData>) {
        while let Some(item) = ring.next() {
            self.delivered += 1;
            let event = match decode(&item) {
                Ok(e) => e,
                Err(e) => {
                    self.decode_errors += 1;
                    tracing::debug!("undecodable record: {e}");
                    continue;
                }
            };
            drop(item);
            let updates = match &event {
                Event::Arp(a) => self.ownership.observe(a, &mut self.vips),
                _ => Vec::new(),
            };
            let vip = self.vips.of_event(&event);
            if let Some(m) = &self.metrics {
                let mut m = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                m.record(&event, vip, self.ctx.reasons);
                for u in &updates {
                    m.ownership(u);
                }
            }
            if self.done() || self.out_closed {
                continue;
            }
            for u in &updates {
                self.print_update(u);
            }
            if self.select_vips && vip.is_none() {
                continue;
            }
            if let (Some(vip), Event::Drop(d)) = (vip, &event) {
                let label = match &d.ct.event {
                    Some(e) => format!("conntrack:{}", output::ct_event_label(e)),
                    None => self.ctx.reasons.name(d.reason),
                };
                *self
                    .by_vip
                    .entry(vip.to_string())
                    .or_default()
                    .entry(label)
                    .or_default() += 1;
            }
            let mut line = event_line(&self.ctx, &event, vip, self.json, self.colour);
            if let (true, Some(node)) = (self.json, &self.node) {
                line = with_node(&line, node);
            }
            if writeln!(self.out, "{line}").is_err() {
                self.out_closed = true;
            }
            self.printed += 1;
        }
        if self.out.flush().is_err() {
            self.out_closed = true;
        }
        self.last_drain.store(unix_now(), Ordering::Relaxed);
    }
}

/// `{"node":NODE,...}` from a JSON object line.
fn with_node(line: &str, node: &str) -> String {
    match line.strip_prefix('{') {
        Some(rest) => format!("{{\"node\":{},{rest}", serde_json::Value::from(node)),
        None => line.to_owned(),
    }
}

pub fn watch(args: WatchArgs) -> anyhow::Result<()> {
    let json = args.json;
    let out = BufWriter::with_capacity(1 << 16, io::stdout().lock());
    let (summary, mut out, closed) = run_watch(&args, out, json, None)?;
    if closed {
        return Ok(());
    }
    if json {
        summary.write(&mut out, true)?;
        out.flush().ok();
    } else {
        // The summary goes where a person reads it even when events are piped away.
        let _ = out.flush();
        summary.write(&mut io::stderr(), false)?;
    }
    Ok(())
}

/// Header line of a recording: what `diagnose`, `timeline` and `report` need to know.
fn header(args: &WatchArgs, reasons: &DropReasons) -> serde_json::Value {
    serde_json::json!({
        "kind": "header",
        "format": "lbtrace-ndjson",
        "version": 1,
        "lbtrace": env!("CARGO_PKG_VERSION"),
        "kernel": probes::read_opt(Path::new("/proc/sys/kernel/osrelease")).unwrap_or_default().trim(),
        "hostname": probes::read_opt(Path::new("/proc/sys/kernel/hostname")).unwrap_or_default().trim(),
        "started": output::rfc3339(std::time::SystemTime::now()),
        "vips": args.vips.iter().chain(&args.tag_vips).map(ToString::to_string).collect::<Vec<_>>(),
        "drop_reasons": reasons.iter().map(|(c, n)| (c.to_string(), n)).collect::<BTreeMap<_, _>>(),
    })
}

/// Streams events into `out` (with a recording header when `record` is set) until the watch
/// ends; returns the summary, the writer, and whether the writer's reader went away.
pub(crate) fn run_watch<W: Write>(
    args: &WatchArgs,
    mut out: W,
    json: bool,
    record: Option<()>,
) -> anyhow::Result<(Summary, W, bool)> {
    require_privileges()?;
    privileges::raise_memlock();
    let btf = load_btf()?;
    let reasons = DropReasons::from_btf(&btf)?;
    let filter = KernelFilter {
        reasons: reason_codes(&reasons, &args.reasons)?,
        // --vip keeps drops from or to a VIP; with --host the VIP check happens in userspace.
        hosts: if args.hosts.is_empty() {
            args.vips.clone()
        } else {
            args.hosts.clone()
        },
        port: args.port,
        proto: args.proto,
        netns: args.netns,
        ct_events: args.events.clone(),
    };
    if record.is_some() {
        writeln!(out, "{}", header(args, &reasons))?;
    }
    let kallsyms = load_kallsyms();
    let opts = LoadOptions {
        mode: args.probe_mode,
        filter,
        ring_bytes: args.ring_size,
        wakeup_bytes: u64::from(args.ring_size / 4),
        arp: !args.no_arp,
    };
    let mut tracer = Tracer::load(&btf, &reasons, &opts)?;
    // The parsed BTF is tens of MB; everything needed from it is in the programs now.
    drop(btf);
    for s in &tracer.statuses {
        match &s.error {
            None => tracing::info!("probe {} attached", s.probe),
            Some(e) => tracing::info!("probe {} not attached: {e}", s.probe),
        }
    }
    for (what, r) in tracer.features.list() {
        if let Err(e) = r {
            tracing::warn!("{what} unavailable: {e}");
        }
    }
    let colour = match args.color {
        ColorMode::Always => true,
        ColorMode::Never => false,
        ColorMode::Auto => !json && io::stdout().is_terminal(),
    };
    let ring = tracer.take_ring()?;
    if record.is_some() {
        let status = serde_json::json!({
            "kind": "status",
            "probe": probes::probe_name(tracer.active),
            "probes": tracer.statuses,
        });
        writeln!(out, "{status}")?;
    }
    let banner = format!(
        "lbtrace: tracing drops with {} (ring buffer {} KiB); Ctrl-C to stop",
        probes::probe_name(tracer.active),
        args.ring_size / 1024
    );
    let reader = Reader {
        ctx: Context {
            reasons: &reasons,
            kallsyms: &kallsyms,
            clock: Clock::now(),
        },
        vips: VipSet::new(args.vips.iter().chain(&args.tag_vips).copied().collect()),
        select_vips: !args.vips.is_empty(),
        out,
        json,
        colour,
        limit: args.count,
        delivered: 0,
        printed: 0,
        decode_errors: 0,
        out_closed: false,
        by_vip: BTreeMap::new(),
        tables: TablePressure::start(),
        ownership: Ownership::new(OwnershipConfig::default(), args.discover_vips),
        node: None,
        metrics: None,
        last_drain: Arc::new(AtomicU64::new(unix_now())),
        reload: None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the event loop")?;
    let started = Instant::now();
    let ready = || eprintln!("{banner}");
    let (mut reader, mut ring) =
        rt.block_on(stream(reader, ring, args.duration, &tracer, ready))?;
    // Detach first, then collect what is still in the ring: afterwards the kernel counters and
    // the records read describe the same drops.
    tracer.detach();
    std::thread::sleep(Duration::from_millis(20));
    reader.drain(&mut ring);
    let counters = tracer.counters()?;
    let mut summary = Summary::new(
        &reader.ctx,
        probes::probe_name(tracer.active),
        started.elapsed(),
        &counters,
        reader.delivered,
        reader.printed,
        reader.decode_errors,
    );
    summary.drops_by_vip = std::mem::take(&mut reader.by_vip);
    summary.conntrack_tables = reader.tables.finish();
    summary.vip_owners = reader.owners_summary();
    summary.findings = reader
        .ownership
        .findings
        .iter()
        .map(|f| serde_json::to_value(f).unwrap_or_default())
        .collect();
    summary.discovered_vips = reader
        .ownership
        .discovered
        .iter()
        .map(ToString::to_string)
        .collect();
    Ok((summary, reader.out, reader.out_closed))
}

pub(crate) async fn stream<'a, W: Write>(
    mut reader: Reader<'a, W>,
    ring: RingBuf<MapData>,
    duration: Option<Duration>,
    tracer: &Tracer,
    ready: impl FnOnce(),
) -> anyhow::Result<(Reader<'a, W>, RingBuf<MapData>)> {
    // SAFETY: the ring buffer owns its fd and stays inside the AsyncFd until into_inner below.
    let mut afd = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("registering the ring buffer with the event loop: {e}"))?;
    let mut tick = tokio::time::interval(DRAIN_INTERVAL);
    let mut table_tick = tokio::time::interval(TABLE_INTERVAL);
    table_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    // Only the agent reloads on SIGHUP; anything else keeps the default (a closed terminal
    // ends `watch` and `top`).
    let mut sighup = match reader.reload {
        Some(_) => Some(signal(SignalKind::hangup())?),
        None => None,
    };
    // Only now can Ctrl-C stop it cleanly: what says "ready" must come after this.
    ready();
    let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
    let deadline = tokio::time::sleep(duration.unwrap_or(Duration::from_secs(u64::from(u32::MAX))));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            guard = afd.readable_mut() => {
                let mut guard = guard?;
                reader.drain(guard.get_inner_mut());
                guard.clear_ready();
            }
            _ = tick.tick() => reader.drain(afd.get_mut()),
            _ = table_tick.tick() => {
                reader.tables.poll();
                if let Some(m) = &reader.metrics {
                    let entries = reader.tables.last.iter().map(|(ns, t)| (*ns, t.entries)).collect();
                    m.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .conntrack_tables(entries, reader.tables.max);
                }
            }
            _ = housekeeping.tick(), if reader.metrics.is_some() => {
                let counters = tracer.counters();
                if let (Some(m), Ok(k)) = (&reader.metrics, counters) {
                    m.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .kernel(k, reader.ctx.reasons);
                }
            }
            Some(_) = async { sighup.as_mut()?.recv().await }, if sighup.is_some() => {
                if let Some(reload) = reader.reload.as_mut() {
                    match reload() {
                        Ok(vips) => {
                            tracing::info!("SIGHUP: configuration reloaded");
                            reader.vips = vips;
                        }
                        Err(e) => tracing::error!("SIGHUP: keeping the old configuration: {e:#}"),
                    }
                }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            () = &mut deadline => break,
        }
        if reader.done() || reader.out_closed {
            break;
        }
    }
    Ok((reader, afd.into_inner()))
}

pub fn reasons(json: bool) -> anyhow::Result<()> {
    let btf = load_btf()?;
    let reasons = DropReasons::from_btf(&btf)?;
    let mut out = io::stdout().lock();
    if json {
        let list: Vec<_> = reasons
            .iter()
            .map(|(code, name)| serde_json::json!({"code": code, "name": name}))
            .collect();
        let subsys: Vec<_> = reasons
            .subsystems()
            .map(|(id, name)| serde_json::json!({"id": id, "name": name}))
            .collect();
        writeln!(
            out,
            "{}",
            serde_json::json!({"reasons": list, "subsystems": subsys})
        )?;
    } else {
        for (code, name) in reasons.iter() {
            writeln!(out, "{code:>5}  {name}")?;
        }
        for (id, name) in reasons.subsystems() {
            writeln!(out, "subsystem {id} ({name}): codes {:#x}..", id << 16)?;
        }
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct Doctor {
    kernel: String,
    btf: Check,
    tracefs: Check,
    kallsyms: Check,
    capabilities: Vec<&'static str>,
    missing_capabilities: Vec<&'static str>,
    drop_reasons: usize,
    probes: Vec<probes::ProbeStatus>,
    features: Option<probes::Features>,
}

#[derive(serde::Serialize)]
struct Check {
    ok: bool,
    detail: String,
}

impl Check {
    fn from<T, E: std::fmt::Display>(r: Result<T, E>, ok: impl FnOnce(T) -> String) -> Self {
        match r {
            Ok(v) => Self {
                ok: true,
                detail: ok(v),
            },
            Err(e) => Self {
                ok: false,
                detail: e.to_string(),
            },
        }
    }
}

pub fn doctor(json: bool) -> anyhow::Result<()> {
    let kernel = probes::read_opt(Path::new("/proc/sys/kernel/osrelease"))
        .unwrap_or_default()
        .trim()
        .to_owned();
    let caps = privileges::effective();
    let missing = privileges::missing_for_tracing(caps);
    let btf = load_btf();
    let mut reasons_n = 0;
    let btf_check = match &btf {
        Ok(b) => {
            let mut cfg = agent_common::ProbeConfig::zeroed();
            let offsets = probes::kernel_offsets(b, &mut cfg);
            reasons_n = DropReasons::from_btf(b)
                .map(|r| r.iter().count())
                .unwrap_or(0);
            Check::from(offsets, |()| {
                format!("{VMLINUX_BTF}: struct offsets resolved, {reasons_n} drop reasons")
            })
        }
        Err(e) => Check {
            ok: false,
            detail: format!("{e:#}"),
        },
    };
    let tracefs = Check::from(
        probes::tracefs_root().ok_or_else(probes::tracefs_problem),
        |p| p.display().to_string(),
    );
    let kallsyms = Check::from(Kallsyms::load(), |k| {
        if k.is_empty() {
            "readable, but addresses are hidden (kptr_restrict): locations print as addresses"
                .to_owned()
        } else {
            "readable: locations are symbolized".to_owned()
        }
    });
    let mut statuses = Vec::new();
    let mut features = None;
    if let (Ok(b), true) = (&btf, missing.is_empty()) {
        privileges::raise_memlock();
        // Each hook on its own, so doctor shows every fallback, not just the first that works.
        for mode in [ProbeMode::Btf, ProbeMode::Tracepoint] {
            let opts = LoadOptions {
                mode,
                filter: KernelFilter::default(),
                ring_bytes: 1 << 16,
                wakeup_bytes: 0,
                arp: true,
            };
            let reasons = DropReasons::from_btf(b).unwrap_or_default();
            match Tracer::load(b, &reasons, &opts) {
                Ok(mut t) => {
                    statuses.extend(t.statuses.iter().filter(|s| s.tried()).cloned());
                    if features.is_none() {
                        features = Some(t.features.clone());
                    }
                    t.detach();
                }
                Err(e) => statuses.push(probes::ProbeStatus {
                    collector: "drops",
                    probe: match mode {
                        ProbeMode::Btf => probes::probe_name(agent_common::ProbeId::KfreeSkbBtf),
                        _ => probes::probe_name(agent_common::ProbeId::KfreeSkbTracepoint),
                    },
                    attached: false,
                    error: Some(probes::error_chain(&e)),
                }),
            }
        }
    }
    let report = Doctor {
        kernel,
        btf: btf_check,
        tracefs,
        kallsyms,
        capabilities: privileges::describe(caps),
        missing_capabilities: missing.clone(),
        drop_reasons: reasons_n,
        probes: statuses,
        features,
    };
    let mut out = io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        let mark = |ok: bool| if ok { "ok  " } else { "FAIL" };
        writeln!(out, "kernel        {}", report.kernel)?;
        writeln!(
            out,
            "{} BTF      {}",
            mark(report.btf.ok),
            report.btf.detail
        )?;
        writeln!(
            out,
            "{} tracefs  {}",
            mark(report.tracefs.ok),
            report.tracefs.detail
        )?;
        writeln!(
            out,
            "{} kallsyms {}",
            mark(report.kallsyms.ok),
            report.kallsyms.detail
        )?;
        writeln!(
            out,
            "{} caps     {}",
            mark(missing.is_empty()),
            if missing.is_empty() {
                report.capabilities.join(" ")
            } else {
                format!("missing {}", missing.join(", "))
            }
        )?;
        for s in &report.probes {
            match &s.error {
                None => writeln!(out, "ok   probe    {} ({}): attached", s.probe, s.collector)?,
                Some(e) => writeln!(out, "FAIL probe    {} ({}): {e}", s.probe, s.collector)?,
            }
        }
        if let Some(f) = &report.features {
            for (what, r) in f.list() {
                match r {
                    Ok(()) => writeln!(out, "ok   feature  {what}")?,
                    Err(e) => writeln!(out, "FAIL feature  {what}: {e}")?,
                }
            }
        }
    }
    if !missing.is_empty() {
        bail!(UsageError(format!(
            "cannot test the probes without {}",
            missing.join(", ")
        )));
    }
    if !report.probes.iter().any(|s| s.attached) {
        bail!("no drop probe attaches on this kernel");
    }
    Ok(())
}
