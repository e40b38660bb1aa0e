//! Loading the kernel programs and attaching them, with a fallback table chosen at run time.
//!
//! Like retis's collectors: each hook is tried in order of preference; one that cannot run on
//! this kernel is skipped with its reason, and the drop collector as a whole fails only when none
//! of its hooks attaches. Every attempt is kept for `doctor`.

mod aggregate;
mod attach;
mod collectors;
mod counters;
mod filters;
mod misses;
pub mod offsets;
mod speakers;

use std::collections::{BTreeMap, BTreeSet};

use agent_common::{
    ProbeConfig, ProbeId, FEATURE_AGGREGATE, FEATURE_AGG_FAST, FEATURE_ARP, FEATURE_CT_STATS,
    FEATURE_NAT_CAPTURE, FILTER_HOST, FILTER_PACKET, GLOBAL_CONFIG, MAP_AGG, MAP_EVENTS,
    MAP_HOST_FILTER, MAP_NAT, MAP_NETNS_FILTER, MAP_REASON_FILTER, MAP_VIPS4, MAP_VIPS6,
    MAP_VIP_ADDRS4, MAP_VIP_ADDRS6,
};
pub use aggregate::{AggCount, Aggregation};
use attach::attach_all;
use aya::{
    maps::{MapData, RingBuf},
    Ebpf, EbpfLoader,
};
pub use collectors::error_chain;
pub use collectors::{probe_name, ProbeMode, DISABLE_PROBES_ENV};
pub use counters::{KernelCounters, NatOccupancy};
pub use filters::KernelFilter;
use filters::{fill_set, host_key, seed_ct_baselines};
use offsets::{
    arp_offsets, conntrack_offsets, ct_stat_offsets, kernel_offsets, tracepoint_layouts,
};
pub use speakers::{comm_key, Added, MEMBERLIST_PORT};

use crate::{
    event::record::ProbeStatus,
    kernel::btf::{DropReasons, KernelBtf},
    pipeline::attribution::VipSet,
};

/// The collector that hooks every received packet.
const RX_COLLECTOR: &str = "rx";

/// The kernel object, built by `agent/build.rs` and embedded so the binary runs on its own.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Btf(#[from] crate::kernel::btf::BtfError),
    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("no drop probe could attach: {0}")]
    NoProbe(String),
}

#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub mode: ProbeMode,
    pub filter: KernelFilter,
    /// Ring buffer size in bytes: a power of two, a multiple of the page size.
    pub ring_bytes: u32,
    /// Wake the reader when this many bytes wait (0: on every record).
    pub wakeup_bytes: u64,
    /// Record ARP/NDP and neighbour updates.
    pub arp: bool,
    /// Also hook every received packet for ARP/NDP received (not needed for ownership, which
    /// comes from what each node transmits; every healthy packet pays this hook).
    pub arp_rx: bool,
    /// Count drops in the kernel and send only samples (the agent).
    pub aggregate: Option<Aggregation>,
    /// VIPs and pools the kernel can attribute to (aggregation).
    pub vip_entries: u32,
    /// DNAT translations remembered for attribution behind kube-proxy.
    pub nat_entries: u32,
    /// Speakers' election port (memberlist, UDP and TCP); 0: off.
    pub memberlist_port: u16,
    /// Process names (`comm`) known to be speakers before they announce (`--speaker-comm`).
    pub speaker_comms: Vec<String>,
    /// The VIPs (and pools) the kernel attributes to from the start (aggregation).
    pub vips: VipSet,
}

impl LoadOptions {
    /// Defaults for everything but the probe mode and filters.
    pub fn new(mode: ProbeMode, filter: KernelFilter) -> Self {
        Self {
            mode,
            filter,
            ring_bytes: 4 << 20,
            wakeup_bytes: 1 << 20,
            arp: true,
            arp_rx: true,
            aggregate: None,
            vip_entries: agent_common::VIP_ENTRIES,
            nat_entries: agent_common::NAT_ENTRIES,
            memberlist_port: MEMBERLIST_PORT,
            speaker_comms: Vec::new(),
            vips: VipSet::default(),
        }
    }
}

/// Whether a feature works on this kernel, and why not.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(into = "Result<(), String>")]
pub enum Feature {
    On,
    Off(String),
}

impl From<Feature> for Result<(), String> {
    fn from(f: Feature) -> Self {
        match f {
            Feature::On => Ok(()),
            Feature::Off(why) => Err(why),
        }
    }
}

impl<E: std::fmt::Display> From<Result<(), E>> for Feature {
    fn from(r: Result<(), E>) -> Self {
        match r {
            Ok(()) => Self::On,
            Err(e) => Self::Off(e.to_string()),
        }
    }
}

impl Feature {
    pub fn is_on(&self) -> bool {
        matches!(self, Self::On)
    }

    /// On only when `self` is and every collector it needs has a probe attached.
    fn needs(&self, active: &BTreeMap<&str, ProbeId>, collectors: &[&str]) -> Self {
        match (self, collectors.iter().find(|c| !active.contains_key(**c))) {
            (Self::Off(why), _) => Self::Off(why.clone()),
            (Self::On, Some(c)) => Self::Off(format!("no {c} probe attached")),
            (Self::On, None) => Self::On,
        }
    }
}

/// What this kernel lets lbtrace do beyond the drop probe itself.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Features {
    /// Conntrack-caused drops are classified (insert_failed, table_full, early_drop).
    pub conntrack_events: Feature,
    /// DNAT translations are learned to attribute drops behind them.
    pub nat_attribution: Feature,
    /// ARP and IPv6 neighbour discovery are seen on transmit and receive.
    pub arp: Feature,
    /// Neighbour-cache updates are seen.
    pub neighbours: Feature,
    /// Starts, exits, OOM kills and signals of the processes that announce VIPs.
    pub speakers: Feature,
}

impl Features {
    pub fn list(&self) -> [(&'static str, &Feature); 5] {
        [
            ("conntrack drop classification", &self.conntrack_events),
            ("DNAT attribution", &self.nat_attribution),
            ("ARP/NDP", &self.arp),
            ("neighbour updates", &self.neighbours),
            ("speaker lifecycle", &self.speakers),
        ]
    }
}

/// What the configuration found this kernel offers, before anything attaches.
struct Offered {
    layouts: BTreeMap<&'static str, Result<(), String>>,
    conntrack: Feature,
    ct_stats: Feature,
    arp: Feature,
    process: Feature,
}

/// Fills `cfg` with this kernel's offsets, the features it allows, and the filters.
fn configure(
    btf: &KernelBtf,
    reasons: &DropReasons,
    opts: &LoadOptions,
    cfg: &mut ProbeConfig,
) -> Result<Offered, ProbeError> {
    kernel_offsets(btf, cfg)?;
    let mut layouts = tracepoint_layouts(cfg);
    offsets::btf_prototypes(btf, &mut layouts);
    let conntrack = Feature::from(conntrack_offsets(btf, cfg));
    let ct_stats = match (&conntrack, reasons.code("NETFILTER_DROP")) {
        (Feature::Off(e), _) => Feature::Off(e.clone()),
        (Feature::On, None) => Feature::Off("this kernel has no NETFILTER_DROP reason".into()),
        (Feature::On, Some(code)) => {
            cfg.reason_netfilter_drop = code;
            Feature::from(ct_stat_offsets(btf, cfg))
        }
    };
    let arp = if opts.arp {
        Feature::from(arp_offsets(btf, cfg))
    } else {
        Feature::Off("disabled (--no-arp)".to_owned())
    };
    for (feature, bit) in [
        (&ct_stats, FEATURE_CT_STATS),
        (&conntrack, FEATURE_NAT_CAPTURE),
        (&arp, FEATURE_ARP),
    ] {
        if feature.is_on() {
            cfg.features |= bit;
        }
    }
    let process = Feature::from(offsets::process_offsets(btf, cfg));
    if opts.memberlist_port != 0 {
        cfg.features |= agent_common::FEATURE_MEMBERLIST;
        cfg.memberlist_port = opts.memberlist_port;
    }
    cfg.wakeup_bytes = opts.wakeup_bytes;
    if let Some(a) = opts.aggregate {
        cfg.features |= FEATURE_AGGREGATE;
        cfg.sample_limit = a.sample_limit;
        cfg.window_shift = aggregate::window_shift(aggregate::kernel_hz());
    }
    opts.filter.configure(cfg, opts.aggregate.is_some());
    if cfg.features & FEATURE_AGGREGATE != 0 && cfg.filter_flags & FILTER_PACKET == 0 {
        cfg.features |= FEATURE_AGG_FAST;
    }
    Ok(Offered {
        layouts,
        conntrack,
        ct_stats,
        arp,
        process,
    })
}

pub struct Tracer {
    ebpf: Ebpf,
    pub statuses: Vec<ProbeStatus>,
    /// The drop probe in use.
    pub active: ProbeId,
    pub features: Features,
    /// Drops are counted in `AGG`; records are samples.
    pub aggregating: bool,
    /// What the kernel's VIP trie holds.
    vips_in_kernel: BTreeSet<ipnet::IpNet>,
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> ProbeError {
    move |source| ProbeError::Map { name, source }
}

/// The programs' configuration, made from the kernel's BTF: what remains to load them once
/// that BTF (tens of MB parsed) is freed.
pub struct Prepared {
    cfg: ProbeConfig,
    offered: Offered,
    opts: LoadOptions,
}

impl Prepared {
    /// Reads what the programs need from this kernel's BTF and tracefs.
    pub fn new(
        btf: &KernelBtf,
        reasons: &DropReasons,
        opts: &LoadOptions,
    ) -> Result<Self, ProbeError> {
        let mut cfg = ProbeConfig::zeroed();
        let offered = configure(btf, reasons, opts, &mut cfg)?;
        Ok(Self {
            cfg,
            offered,
            opts: opts.clone(),
        })
    }

    /// Loads the object with this configuration, then attaches, per collector, the first
    /// probe that works (as the probe mode allows). The loader parses the kernel's BTF again
    /// to attach tp_btf programs: drop the caller's parse first, and the two never coexist.
    pub fn load(self) -> Result<Tracer, ProbeError> {
        let Self { cfg, offered, opts } = self;
        // No kernel BTF for the loader: Rust eBPF has no CO-RE relocations for it to apply, and
        // its relocation index would double the memory peak. Attaching tp_btf programs needs
        // the kernel's BTF, parsed after the object is loaded.
        let mut ebpf = EbpfLoader::new()
            .btf(None)
            .override_global(GLOBAL_CONFIG, &cfg, true)
            .map_max_entries(MAP_EVENTS, opts.ring_bytes)
            .map_max_entries(MAP_VIPS4, opts.vip_entries.max(1))
            .map_max_entries(MAP_VIPS6, opts.vip_entries.max(1))
            .map_max_entries(MAP_VIP_ADDRS4, opts.vip_entries.max(1))
            .map_max_entries(MAP_VIP_ADDRS6, opts.vip_entries.max(1))
            .map_max_entries(MAP_NAT, opts.nat_entries.max(1))
            .map_max_entries(MAP_AGG, opts.aggregate.map_or(1, |a| a.entries.max(1)))
            .load(EBPF_OBJECT)?;
        release_freed_memory();
        let aya_btf = aya::Btf::from_sys_fs().ok();

        // Filters and baselines go in before anything attaches.
        let f = &opts.filter;
        fill_set(&mut ebpf, MAP_REASON_FILTER, f.reasons.iter().copied())?;
        fill_set(&mut ebpf, MAP_NETNS_FILTER, f.netns.iter().copied())?;
        if cfg.filter_flags & FILTER_HOST != 0 {
            fill_set(
                &mut ebpf,
                MAP_HOST_FILTER,
                f.hosts.iter().map(|h| host_key(*h)),
            )?;
        }
        // The first VIPs too: drops from the start are attributed (and pass a VIP filter).
        let vips_in_kernel = if opts.aggregate.is_some() {
            let want = aggregate::prefixes(&opts.vips);
            aggregate::write_vips(&mut ebpf, &BTreeSet::new(), &want)?;
            want
        } else {
            BTreeSet::new()
        };
        if offered.ct_stats.is_on() {
            seed_ct_baselines(&mut ebpf)?;
        }
        speakers::fill_comms(&mut ebpf, &opts.speaker_comms)?;
        let (statuses, active) = attach_all(&mut ebpf, aya_btf.as_ref(), &opts, &offered)?;
        drop(aya_btf);
        release_freed_memory();
        let tracer = Tracer {
            ebpf,
            statuses,
            active: active["drops"],
            features: Features {
                nat_attribution: offered.conntrack.needs(&active, &["xmit"]),
                arp: if opts.arp && opts.arp_rx {
                    offered.arp.needs(&active, &["xmit", RX_COLLECTOR])
                } else {
                    offered.arp.needs(&active, &["xmit"])
                },
                neighbours: offered.arp.needs(&active, &["neigh"]),
                speakers: offered.process.needs(&active, speakers::COLLECTORS),
                conntrack_events: offered.ct_stats,
            },
            aggregating: opts.aggregate.is_some(),
            vips_in_kernel,
        };
        for (name, insns) in tracer.verified_insns() {
            tracing::debug!("{name}: the verifier walked {insns} instructions (limit 1000000)");
        }
        Ok(tracer)
    }
}

/// Hands memory freed after a large parse back to the system: the allocator would otherwise
/// keep the peak as resident memory for the daemon's whole life.
pub fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

impl Tracer {
    /// Loads and attaches with `btf` kept alive throughout (`doctor`, tests); the daemon uses
    /// [`Prepared`] so that the two BTF parses never coexist.
    pub fn load(
        btf: &KernelBtf,
        reasons: &DropReasons,
        opts: &LoadOptions,
    ) -> Result<Self, ProbeError> {
        Prepared::new(btf, reasons, opts)?.load()
    }

    /// Takes the ring buffer for the reader.
    pub fn take_ring(&mut self) -> Result<RingBuf<MapData>, ProbeError> {
        let map = self
            .ebpf
            .take_map(MAP_EVENTS)
            .ok_or(ProbeError::MissingMap(MAP_EVENTS))?;
        RingBuf::try_from(map).map_err(map_err(MAP_EVENTS))
    }

    /// Detaches and unloads every program.
    pub fn detach(&mut self) {
        for (_, prog) in self.ebpf.programs_mut() {
            match prog {
                aya::programs::Program::BtfTracePoint(p) => {
                    let _ = p.unload();
                }
                aya::programs::Program::TracePoint(p) => {
                    let _ = p.unload();
                }
                aya::programs::Program::KProbe(p) => {
                    let _ = p.unload();
                }
                _ => {}
            }
        }
    }

    /// Total bytes of the maps this tracer created.
    pub fn maps_bytes(&self) -> u64 {
        self.ebpf
            .maps()
            .filter_map(|(_, m)| {
                let d = match m {
                    aya::maps::Map::RingBuf(d)
                    | aya::maps::Map::PerCpuHashMap(d)
                    | aya::maps::Map::PerCpuArray(d)
                    | aya::maps::Map::HashMap(d)
                    | aya::maps::Map::LruHashMap(d)
                    | aya::maps::Map::Array(d) => d,
                    _ => return None,
                };
                let info = d.info().ok()?;
                Some(u64::from(info.max_entries()) * u64::from(info.value_size().max(1)))
            })
            .sum()
    }
}
