//! What the tracing subcommands share: privileges, loading the kernel's facts and programs,
//! and running the pipeline with the sinks a subcommand chose.

use std::{
    io::{self, IsTerminal},
    path::Path,
};

use anyhow::Context as _;
use lbtrace::{
    event::{
        record::{Header, Status, FORMAT, FORMAT_VERSION},
        values::Time,
        Clock, Namer, Record,
    },
    kernel::{
        btf::{DropReasons, KernelBtf, VMLINUX_BTF},
        kallsyms::{Kallsyms, KALLSYMS},
        privileges,
        tracefs::read_opt,
    },
    output::summary::Summary,
    pipeline::{
        attribution::VipSet,
        ownership::{Ownership, OwnershipConfig},
        services::KubeProxy,
        speakers::Speakers,
        Pipeline, Selection, Sink, Stop,
    },
    probes::{
        probe_name, release_freed_memory, Aggregation, KernelFilter, LoadOptions, Prepared, Tracer,
    },
};

use super::{ColorMode, WatchArgs};

/// Keys of the kernel's drop counters: each VIP (and "none") with a few reasons and drop sites.
pub(crate) fn agg_entries(max_vips: u32) -> u32 {
    (max_vips + 1).saturating_mul(16).max(4096)
}

/// An error the user can fix (bad input, missing privileges): exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

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
            tracing::warn!("{KALLSYMS}: {e}; locations print as addresses");
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

/// The node name when none is given: `$NODE_NAME` (the DaemonSet sets it from the downward
/// API), else the hostname.
pub(crate) fn default_node() -> String {
    std::env::var("NODE_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| match proc_text("/proc/sys/kernel/hostname") {
            h if h.is_empty() => "unknown".to_owned(),
            h => h,
        })
}

/// A file under /proc, trimmed (empty when unreadable).
pub(crate) fn proc_text(path: &str) -> String {
    read_opt(Path::new(path))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// First line of a recording: what `diagnose`, `timeline` and `report` need to know.
fn header(args: &WatchArgs, reasons: &DropReasons) -> Record {
    Record::Header(Box::new(Header {
        format: FORMAT.to_owned(),
        version: FORMAT_VERSION,
        lbtrace: env!("CARGO_PKG_VERSION").to_owned(),
        kernel: proc_text("/proc/sys/kernel/osrelease"),
        hostname: proc_text("/proc/sys/kernel/hostname"),
        started: Some(Time::now()),
        vips: args.vips.iter().chain(&args.tag_vips).copied().collect(),
        drop_reasons: reasons.iter().map(|(c, n)| (c, n.into())).collect(),
    }))
}

/// Logs which probes attached and which features are missing.
pub(crate) fn log_probes(tracer: &Tracer) {
    for s in &tracer.statuses {
        match s.state.why() {
            None => tracing::info!("probe {} attached", s.probe),
            Some(e) => tracing::info!("probe {} not attached: {e}", s.probe),
        }
    }
    for (what, f) in tracer.features.list() {
        if let lbtrace::probes::Feature::Off(e) = f {
            tracing::warn!("{what} unavailable: {e}");
        }
    }
}

/// The kube-proxy rules reader, unless turned off (interval 0) or it cannot start.
pub(crate) fn kube_proxy(interval: std::time::Duration, discover: bool) -> Option<KubeProxy> {
    if interval.is_zero() {
        return None;
    }
    KubeProxy::start(interval, discover)
        .inspect_err(|e| tracing::warn!("kube-proxy's rules are not read: {e}"))
        .ok()
}

/// Whether the terminal stream is coloured.
pub(crate) fn colour(args: &WatchArgs) -> bool {
    match args.color {
        ColorMode::Always => true,
        ColorMode::Never => false,
        ColorMode::Auto => !args.json && io::stdout().is_terminal(),
    }
}

/// Loads the programs with `args`' filters and runs the pipeline into `sinks` until the watch
/// ends. With `recording`, the sinks first get the header and status records. Returns the
/// summary and whether a stream's reader went away.
pub(crate) fn trace(
    args: &WatchArgs,
    sinks: Vec<&mut dyn Sink>,
    recording: bool,
    stop: &Stop,
) -> anyhow::Result<(Summary, bool)> {
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
        // Then the kernel's attribution is the filter: its VIP set never changes.
        hosts_are_vips: args.hosts.is_empty()
            && !args.vips.is_empty()
            && args.tag_vips.is_empty()
            && !args.discover_vips,
        port: args.port,
        proto: args.proto,
        netns: args.netns.clone(),
        ct_events: args.events.clone(),
    };
    let header = recording.then(|| header(args, &reasons));
    let vips = VipSet::new(args.vips.iter().chain(&args.tag_vips).copied().collect());
    let opts = LoadOptions {
        ring_bytes: args.ring_size,
        wakeup_bytes: u64::from(args.ring_size / 4),
        arp: !args.no_arp,
        memberlist_port: args.memberlist_port,
        speaker_comms: args.speaker_comms.clone(),
        // Counted in the kernel, samples through the ring; 0: every drop as a record.
        aggregate: (args.sample_limit > 0).then(|| Aggregation {
            sample_limit: args.sample_limit,
            entries: agg_entries(agent_common::VIP_ENTRIES),
        }),
        vips: vips.clone(),
        ..LoadOptions::new(args.probe_mode, filter)
    };
    let prepared = Prepared::new(&btf, &reasons, &opts)?;
    // The parsed BTF is tens of MB: freed before the loader parses its own.
    drop(btf);
    release_freed_memory();
    let mut tracer = prepared.load()?;
    log_probes(&tracer);
    let namer = Namer::new(reasons, load_kallsyms(), Clock::now());
    let mut p = Pipeline::new(
        namer,
        vips,
        Ownership::new(OwnershipConfig::default(), args.discover_vips),
    );
    p.selection = Selection {
        vips_only: !args.vips.is_empty(),
        limit: args.count,
        // A recording keeps everything: its readers class each drop themselves.
        all_drops: args.all_drops || recording,
    };
    p.sinks = sinks;
    // Recordings say where each event was seen, so that several nodes' can be merged.
    p.node = match &args.node {
        Some(n) => Some(n.as_str().into()),
        None => recording.then(|| default_node().into()),
    };
    p.kube = kube_proxy(args.kube_proxy_interval, args.discover_vips);
    p.speakers = Speakers::new(args.memberlist_port, &args.speaker_comms);
    p.speakers.set_node(p.node.clone());
    if let Some(h) = header {
        p.announce(&h);
        p.announce(&Record::Status(Status {
            probe: probe_name(tracer.active).into(),
            probes: tracer.statuses.clone(),
        }));
    }
    p.learn_holders(&args.netns);
    let banner = format!(
        "lbtrace: tracing drops with {} (ring buffer {} KiB); Ctrl-C to stop",
        probe_name(tracer.active),
        args.ring_size / 1024
    );
    p.run(&mut tracer, args.duration, stop, || eprintln!("{banner}"))
}
