//! `lbtrace agent`: the node daemon. Metrics for Prometheus, health, an optional rotated event
//! file, SIGHUP to reload the VIP list, SIGTERM/SIGINT to detach and exit.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use ipnet::IpNet;
use lbtrace::{
    config::Config,
    event::{Clock, Namer},
    kernel::{btf::DropReasons, kubeproxy, privileges},
    output::{
        http,
        metrics::{Metrics, MetricsSink},
        ndjson::{EventFileSink, RotatingFile},
    },
    pipeline::{
        attribution::VipSet,
        ownership::{Ownership, OwnershipConfig},
        Pipeline, Sink, Stop,
    },
    probes::{
        probe_name, release_freed_memory, Aggregation, KernelFilter, LoadOptions, Prepared,
        ProbeMode,
    },
};

use super::{
    common::{
        agg_entries, default_node, load_btf, load_kallsyms, log_probes, require_privileges,
        UsageError,
    },
    AgentArgs, LogFormat,
};

/// The default keeps metrics on the node itself; all interfaces must be asked for.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";
const DEFAULT_EVENTS_MAX_BYTES: u64 = 64 << 20;

/// Flags (and their `LBTRACE_*` variables) over the config file over defaults.
struct Settings {
    vips: Vec<IpNet>,
    metrics_addr: SocketAddr,
    node: String,
    netns: Vec<u32>,
    log_json: bool,
    events_file: Option<PathBuf>,
    events_max_bytes: u64,
    probe_mode: ProbeMode,
    ring_size: u32,
    arp: bool,
    arp_rx: bool,
    discover_vips: bool,
    sample_limit: u32,
    max_vips: u32,
    nat_entries: u32,
    kube_proxy_interval: std::time::Duration,
    speaker_comms: Vec<String>,
    memberlist_port: u16,
}

/// Samples per key, CPU and second: enough for a recording to show every flow of an incident,
/// few enough that a flood costs the daemon nothing.
pub const DEFAULT_SAMPLE_LIMIT: u32 = 100;
/// 50k new connections/s kept attributable for about 2.6 s; about 14 MiB of kernel memory.
pub const DEFAULT_NAT_ENTRIES: u32 = 1 << 17;

/// The config file's `node_netns` list, resolved to inodes.
fn node_netns(f: &lbtrace::config::FileConfig) -> Result<Vec<u32>, UsageError> {
    f.node_netns
        .iter()
        .flatten()
        .map(|n| {
            lbtrace::kernel::netns::inode_of(n).map_err(|e| UsageError(format!("node_netns: {e}")))
        })
        .collect()
}

fn settings(args: &AgentArgs) -> anyhow::Result<Settings> {
    let file = match &args.config {
        Some(p) => Config::load(p).map_err(|e| UsageError(e.to_string()))?,
        None => Config::default(),
    };
    let f = &file.file;
    let mut vips = args.vips.clone();
    if vips.is_empty() {
        vips = file.vips.clone();
    }
    let metrics_addr = match (&args.metrics_addr, file.metrics_addr) {
        (Some(a), _) => *a,
        (None, Some(a)) => a,
        (None, None) => DEFAULT_METRICS_ADDR.parse()?,
    };
    let probe_mode = match (args.probe_mode, f.probe_mode.as_deref()) {
        (Some(m), _) => m,
        (None, Some(m)) => m.parse().map_err(UsageError)?,
        (None, None) => ProbeMode::Auto,
    };
    Ok(Settings {
        vips,
        metrics_addr,
        node: args
            .node_name
            .clone()
            .or_else(|| f.node_name.clone())
            .unwrap_or_else(default_node),
        netns: if args.netns.is_empty() {
            f.netns.iter().copied().chain(node_netns(f)?).collect()
        } else {
            args.netns.clone()
        },
        log_json: match args.log_format {
            Some(l) => l == LogFormat::Json,
            None => f.log_format.as_deref() == Some("json"),
        },
        events_file: args
            .events_file
            .clone()
            .or_else(|| f.events_file.as_ref().map(PathBuf::from)),
        events_max_bytes: args
            .events_max_bytes
            .or(f.events_max_bytes)
            .unwrap_or(DEFAULT_EVENTS_MAX_BYTES),
        probe_mode,
        ring_size: args.ring_size.or(f.ring_size).unwrap_or(4 << 20),
        arp: !(args.no_arp || f.no_arp == Some(true)),
        arp_rx: args.arp_rx || f.arp_rx == Some(true),
        discover_vips: args.discover_vips || f.discover_vips == Some(true),
        sample_limit: args
            .sample_limit
            .or(f.sample_limit)
            .unwrap_or(DEFAULT_SAMPLE_LIMIT),
        max_vips: args
            .max_vips
            .or(f.max_vips)
            .unwrap_or(agent_common::VIP_ENTRIES),
        nat_entries: args
            .nat_entries
            .or(f.nat_entries)
            .unwrap_or(DEFAULT_NAT_ENTRIES),
        kube_proxy_interval: match args.kube_proxy_interval {
            Some(i) => i,
            None => f
                .kube_proxy_interval
                .map(kubeproxy::interval)
                .transpose()
                .map_err(anyhow::Error::msg)?
                .unwrap_or(kubeproxy::DEFAULT_INTERVAL),
        },
        speaker_comms: if args.speaker_comms.is_empty() {
            f.speaker_comms.clone().unwrap_or_default()
        } else {
            args.speaker_comms.clone()
        },
        memberlist_port: args
            .memberlist_port
            .or(f.memberlist_port)
            .unwrap_or(lbtrace::probes::MEMBERLIST_PORT),
    })
}

pub fn agent(args: AgentArgs) -> anyhow::Result<()> {
    let s = settings(&args)?;
    crate::init_logging(s.log_json, "info");
    require_privileges()?;
    // Bind before loading anything: a taken port is a usage error, with nothing left behind.
    let listener = std::net::TcpListener::bind(s.metrics_addr).map_err(|e| {
        UsageError(format!(
            "cannot listen on {} for metrics: {e}",
            s.metrics_addr
        ))
    })?;
    listener.set_nonblocking(true)?;
    privileges::raise_memlock();
    let btf = load_btf()?;
    let reasons = DropReasons::from_btf(&btf)?;
    let filter = KernelFilter {
        netns: s.netns.clone(),
        ..KernelFilter::default()
    };
    let vips = VipSet::from_nets(s.vips.clone());
    let opts = LoadOptions {
        ring_bytes: s.ring_size,
        wakeup_bytes: u64::from(s.ring_size / 4),
        arp: s.arp,
        arp_rx: s.arp_rx,
        aggregate: Some(Aggregation {
            sample_limit: s.sample_limit,
            entries: agg_entries(s.max_vips),
        }),
        vip_entries: s.max_vips,
        nat_entries: s.nat_entries,
        memberlist_port: s.memberlist_port,
        speaker_comms: s.speaker_comms.clone(),
        vips: vips.clone(),
        ..LoadOptions::new(s.probe_mode, filter)
    };
    let prepared = Prepared::new(&btf, &reasons, &opts)?;
    // The parsed BTF is tens of MB: freed before the loader parses its own.
    drop(btf);
    release_freed_memory();
    let mut tracer = prepared.load()?;
    log_probes(&tracer);
    let metrics = Arc::new(Mutex::new(
        Metrics::new(s.node.clone(), tracer.statuses.clone(), tracer.maps_bytes())
            .with_max_vips(s.max_vips as usize),
    ));
    let mut metrics_sink = MetricsSink(metrics.clone());
    let mut events = match &s.events_file {
        Some(p) => Some(EventFileSink::new(
            RotatingFile::open(p, s.events_max_bytes)
                .with_context(|| format!("opening the event file {}", p.display()))?,
        )),
        None => None,
    };
    let mut sinks: Vec<&mut dyn Sink> = vec![&mut metrics_sink];
    if let Some(e) = events.as_mut() {
        sinks.push(e);
    }
    let namer = Namer::new(reasons, load_kallsyms(), Clock::now());
    let mut p = Pipeline::new(
        namer,
        vips,
        Ownership::new(OwnershipConfig::default(), s.discover_vips),
    );
    p.sinks = sinks;
    p.node = Some(s.node.as_str().into());
    p.kube = super::common::kube_proxy(s.kube_proxy_interval, s.discover_vips);
    p.speakers = lbtrace::pipeline::speakers::Speakers::new(s.memberlist_port, &s.speaker_comms);
    p.speakers.set_node(p.node.clone());
    p.reload = Some(reload(&args));
    p.learn_holders(&s.netns);
    let health = http::Health {
        last_drain: p.last_drain.clone(),
        ready: Arc::default(),
    };
    serve_on_a_thread(listener, metrics, health.clone());
    let probe = probe_name(tracer.active);
    let (node, addr, vips) = (s.node.clone(), s.metrics_addr, s.vips.len());
    // Ready (and said so) only once stopping detaches cleanly: signals are handled from here.
    let ready = move || {
        health
            .ready
            .store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(node = %node, metrics = %addr, probe, vips, "lbtrace agent running");
    };
    let (summary, _) = p.run(&mut tracer, None, &Stop::new(), ready)?;
    tracing::info!(
        delivered = summary.events_delivered,
        "lbtrace agent stopped; programs detached"
    );
    Ok(())
}

/// The HTTP endpoints run on a thread of their own: the pipeline's loop owns the main one. The
/// thread ends with the process.
fn serve_on_a_thread(
    listener: std::net::TcpListener,
    metrics: Arc<Mutex<Metrics>>,
    health: http::Health,
) {
    std::thread::spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => return tracing::error!("metrics endpoint: {e}"),
        };
        rt.block_on(async {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => http::serve(l, metrics, health).await,
                Err(e) => tracing::error!("metrics endpoint: {e}"),
            }
        });
    });
}

/// SIGHUP: VIPs given as flags win, as at start; otherwise the file is read again.
fn reload(args: &AgentArgs) -> lbtrace::pipeline::Reload {
    let config_path = args.config.clone();
    let flag_vips = args.vips.clone();
    Box::new(move || {
        if !flag_vips.is_empty() {
            return Ok(VipSet::from_nets(flag_vips.clone()));
        }
        let vips = match &config_path {
            Some(p) => Config::load(p)?.vips,
            None => Vec::new(),
        };
        Ok(VipSet::from_nets(vips))
    })
}
