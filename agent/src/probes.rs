//! Loading the kernel programs and attaching them, with a fallback table chosen at run time.
//!
//! Like retis's collectors: each hook is tried in order of preference; one that cannot run on
//! this kernel is skipped with its reason, and the drop collector as a whole fails only when none
//! of its hooks attaches. Every attempt is kept for `doctor`.

use std::{
    collections::BTreeMap,
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
};

use agent_common::{
    CtEvent, CtStatKey, CtStatValue, HostKey, ProbeConfig, ProbeId, FAMILY_IPV4, FAMILY_IPV6,
    FEATURE_ARP, FEATURE_CT_STATS, FEATURE_NAT_CAPTURE, FILTER_CT_EVENT, FILTER_HOST, FILTER_NETNS,
    FILTER_PORT, FILTER_PROTO, FILTER_REASON, GLOBAL_CONFIG, MAP_CT_COUNTS, MAP_CT_LAST,
    MAP_DROP_COUNTS, MAP_EVENTS, MAP_HOST_FILTER, MAP_REASON_FILTER, MAP_STATS, STAT_ARP,
    STAT_CT_NO_BASELINE, STAT_MATCHED, STAT_NAT_JOINED, STAT_NAT_LEARNED, STAT_NEIGH,
    STAT_READ_ERRORS, STAT_RING_LOST, STAT_SEEN,
};
use aya::{
    maps::{HashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{BtfTracePoint, TracePoint},
    Ebpf, EbpfLoader,
};

use crate::{
    btf::{DropReasons, KernelBtf},
    decode::L4Proto,
    netns,
};

/// The kernel object, built by `agent/build.rs` and embedded so the binary runs on its own.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Btf(#[from] crate::btf::BtfError),
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

/// Which kfree_skb hook to use (`--probe-mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProbeMode {
    /// tp_btf first, the classic tracepoint if that fails.
    Auto,
    /// Only tp_btf/kfree_skb.
    Btf,
    /// Only the classic tracepoint skb/kfree_skb.
    Tracepoint,
}

#[derive(Clone, Copy, Debug)]
enum Hook {
    BtfTracepoint {
        function: &'static str,
    },
    Tracepoint {
        category: &'static str,
        name: &'static str,
    },
}

#[derive(Clone, Copy, Debug)]
struct ProbeSpec {
    id: ProbeId,
    program: &'static str,
    hook: Hook,
}

impl ProbeSpec {
    fn is_btf(&self) -> bool {
        matches!(self.hook, Hook::BtfTracepoint { .. })
    }
}

/// A job done by one of several interchangeable hooks, tried in order of preference.
struct Collector {
    name: &'static str,
    /// Without it lbtrace cannot work; an optional collector is skipped with its reason.
    required: bool,
    probes: &'static [ProbeSpec],
}

const COLLECTORS: &[Collector] = &[
    Collector {
        name: "drops",
        required: true,
        probes: &[
            ProbeSpec {
                id: ProbeId::KfreeSkbBtf,
                program: "kfree_skb_btf",
                hook: Hook::BtfTracepoint {
                    function: "kfree_skb",
                },
            },
            ProbeSpec {
                id: ProbeId::KfreeSkbTracepoint,
                program: "kfree_skb_tp",
                hook: Hook::Tracepoint {
                    category: "skb",
                    name: "kfree_skb",
                },
            },
        ],
    },
    Collector {
        name: "xmit",
        required: false,
        probes: &[
            ProbeSpec {
                id: ProbeId::NetDevXmitBtf,
                program: "net_dev_xmit_btf",
                hook: Hook::BtfTracepoint {
                    function: "net_dev_start_xmit",
                },
            },
            ProbeSpec {
                id: ProbeId::NetDevXmitTracepoint,
                program: "net_dev_xmit_tp",
                hook: Hook::Tracepoint {
                    category: "net",
                    name: "net_dev_start_xmit",
                },
            },
        ],
    },
    Collector {
        name: "rx",
        required: false,
        probes: &[
            ProbeSpec {
                id: ProbeId::NetifReceiveBtf,
                program: "netif_receive_btf",
                hook: Hook::BtfTracepoint {
                    function: "netif_receive_skb",
                },
            },
            ProbeSpec {
                id: ProbeId::NetifReceiveTracepoint,
                program: "netif_receive_tp",
                hook: Hook::Tracepoint {
                    category: "net",
                    name: "netif_receive_skb",
                },
            },
        ],
    },
    Collector {
        name: "neigh",
        required: false,
        probes: &[
            ProbeSpec {
                id: ProbeId::NeighUpdateBtf,
                program: "neigh_update_btf",
                hook: Hook::BtfTracepoint {
                    function: "neigh_update",
                },
            },
            ProbeSpec {
                id: ProbeId::NeighUpdateTracepoint,
                program: "neigh_update_tp",
                hook: Hook::Tracepoint {
                    category: "neigh",
                    name: "neigh_update",
                },
            },
        ],
    },
];

pub fn probe_name(id: ProbeId) -> &'static str {
    match id {
        ProbeId::KfreeSkbBtf => "tp_btf/kfree_skb",
        ProbeId::KfreeSkbTracepoint => "tracepoint/skb/kfree_skb",
        ProbeId::NetDevXmitBtf => "tp_btf/net_dev_start_xmit",
        ProbeId::NetDevXmitTracepoint => "tracepoint/net/net_dev_start_xmit",
        ProbeId::NetifReceiveBtf => "tp_btf/netif_receive_skb",
        ProbeId::NetifReceiveTracepoint => "tracepoint/net/netif_receive_skb",
        ProbeId::NeighUpdateBtf => "tp_btf/neigh_update",
        ProbeId::NeighUpdateTracepoint => "tracepoint/neigh/neigh_update",
    }
}

/// Outcome of one attach attempt.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ProbeStatus {
    pub collector: &'static str,
    pub probe: &'static str,
    pub attached: bool,
    /// Why it did not attach, or why it was not tried.
    pub error: Option<String>,
}

const NOT_NEEDED: &str = "not needed: a preferred probe is attached";
const NOT_TRIED: &str = "not tried: --probe-mode";

impl ProbeStatus {
    /// Attached, or tried and failed (not skipped because of `--probe-mode` or a preferred
    /// probe): what `doctor` reports.
    pub fn tried(&self) -> bool {
        self.error
            .as_deref()
            .is_none_or(|e| !e.starts_with(NOT_NEEDED) && !e.starts_with(NOT_TRIED))
    }
}

/// Fault injection for tests (undocumented in `--help`): the probes named in this variable
/// (comma-separated, as `doctor` names them, e.g. `tp_btf/neigh_update`) fail as if the kernel
/// had refused them, so each fallback and each missing collector can be forced.
pub const DISABLE_PROBES_ENV: &str = "LBTRACE_DISABLE_PROBES";

fn disabled_by_env(probe: &str) -> bool {
    std::env::var(DISABLE_PROBES_ENV).is_ok_and(|v| v.split(',').any(|p| p.trim() == probe))
}

/// Kernel-side filters: applied before a record is reserved.
#[derive(Clone, Debug, Default)]
pub struct KernelFilter {
    pub reasons: Vec<u32>,
    /// Addresses matched against the packet and, behind NAT, the flow's original addresses.
    pub hosts: Vec<IpAddr>,
    pub port: Option<u16>,
    pub proto: Option<L4Proto>,
    pub netns: Option<u32>,
    pub ct_events: Vec<CtEvent>,
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
}

/// Counters kept by the kernel independently of the ring buffer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    /// Drops that passed the filters, per reason code.
    pub by_reason: BTreeMap<u32, u64>,
    /// Records that did not fit in the ring buffer, per CPU.
    pub lost_per_cpu: Vec<u64>,
    pub seen: u64,
    pub matched: u64,
    pub read_errors: u64,
    /// Conntrack-caused drops that passed the filters, per event.
    pub ct_events: BTreeMap<&'static str, u64>,
    pub ct_no_baseline: u64,
    pub nat_learned: u64,
    pub nat_joined: u64,
    /// ARP/NDP and neighbour records that passed the filters.
    pub arp: u64,
    pub neigh: u64,
}

impl KernelCounters {
    pub fn lost(&self) -> u64 {
        self.lost_per_cpu.iter().sum()
    }
}

/// What this kernel lets lbtrace do beyond the drop probe itself.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Features {
    /// Conntrack-caused drops are classified (insert_failed, table_full, early_drop).
    pub conntrack_events: Result<(), String>,
    /// DNAT translations are learned to attribute drops behind them.
    pub nat_attribution: Result<(), String>,
    /// ARP and IPv6 neighbour discovery are seen on transmit and receive.
    pub arp: Result<(), String>,
    /// Neighbour-cache updates are seen.
    pub neighbours: Result<(), String>,
}

impl Features {
    pub fn list(&self) -> [(&'static str, &Result<(), String>); 4] {
        [
            ("conntrack drop classification", &self.conntrack_events),
            ("DNAT attribution", &self.nat_attribution),
            ("ARP/NDP", &self.arp),
            ("neighbour updates", &self.neighbours),
        ]
    }
}

pub struct Tracer {
    ebpf: Ebpf,
    pub statuses: Vec<ProbeStatus>,
    /// The drop probe in use.
    pub active: ProbeId,
    pub features: Features,
}

/// Tracefs mount points, in the order the kernel documents them.
const TRACEFS: &[&str] = &["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

pub fn tracefs_root() -> Option<PathBuf> {
    TRACEFS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("events").is_dir())
}

/// Why tracefs cannot be used: not mounted, or not readable by this process.
pub fn tracefs_problem() -> String {
    for p in TRACEFS {
        if let Err(e) = fs::read_dir(Path::new(p).join("events")) {
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                return format!("{p}: permission denied (tracefs is readable by root only)");
            }
        }
    }
    "not mounted: mount -t tracefs nodev /sys/kernel/tracing".to_owned()
}

/// Offsets of `fields` in a tracefs `format` file.
pub fn tracepoint_offsets(format: &str, fields: &[&str]) -> Result<BTreeMap<String, u32>, String> {
    let mut found = BTreeMap::new();
    for line in format.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let mut decl = "";
        let mut offset = None;
        for part in rest.split(';') {
            let part = part.trim();
            if let Some(v) = part.strip_prefix("offset:") {
                offset = v.trim().parse::<u32>().ok();
            } else if decl.is_empty() {
                decl = part;
            }
        }
        let name = decl
            .rsplit(|c: char| c.is_whitespace() || c == '*')
            .next()
            .unwrap_or("")
            .split('[')
            .next()
            .unwrap_or("");
        if let (true, Some(off)) = (fields.contains(&name), offset) {
            found.insert(name.to_owned(), off);
        }
    }
    for f in fields {
        if !found.contains_key(*f) {
            return Err(format!("field `{f}` missing from the tracepoint format"));
        }
    }
    Ok(found)
}

/// Offsets of `fields` in the tracefs format of `category/name`.
fn tracepoint_fields(
    category: &str,
    name: &str,
    fields: &[&str],
) -> Result<BTreeMap<String, u32>, String> {
    let root = tracefs_root()
        .ok_or("tracefs is not mounted (mount -t tracefs nodev /sys/kernel/tracing)")?;
    let path = root.join("events").join(category).join(name).join("format");
    let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    tracepoint_offsets(&text, fields)
}

/// Record layouts of the classic tracepoints (the fallback hooks).
fn tracepoint_layouts(cfg: &mut ProbeConfig) -> BTreeMap<&'static str, Result<(), String>> {
    let mut out = BTreeMap::new();
    out.insert(
        "skb/kfree_skb",
        tracepoint_fields("skb", "kfree_skb", &["skbaddr", "location", "reason"]).map(|o| {
            cfg.tp_skbaddr = o["skbaddr"];
            cfg.tp_location = o["location"];
            cfg.tp_reason = o["reason"];
        }),
    );
    out.insert(
        "net/net_dev_start_xmit",
        tracepoint_fields("net", "net_dev_start_xmit", &["skbaddr"]).map(|o| {
            cfg.tp_xmit_skbaddr = o["skbaddr"];
        }),
    );
    out.insert(
        "net/netif_receive_skb",
        tracepoint_fields("net", "netif_receive_skb", &["skbaddr"]).map(|o| {
            cfg.tp_rx_skbaddr = o["skbaddr"];
        }),
    );
    const NEIGH: &[&str] = &[
        "family",
        "dev",
        "lladdr",
        "nud_state",
        "primary_key4",
        "primary_key6",
        "new_lladdr",
        "new_state",
        "update_flags",
    ];
    out.insert(
        "neigh/neigh_update",
        tracepoint_fields("neigh", "neigh_update", NEIGH).map(|o| {
            cfg.tp_neigh_family = o["family"];
            cfg.tp_neigh_dev = o["dev"];
            cfg.tp_neigh_lladdr = o["lladdr"];
            cfg.tp_neigh_nud_state = o["nud_state"];
            cfg.tp_neigh_key4 = o["primary_key4"];
            cfg.tp_neigh_key6 = o["primary_key6"];
            cfg.tp_neigh_new_lladdr = o["new_lladdr"];
            cfg.tp_neigh_new_state = o["new_state"];
            cfg.tp_neigh_update_flags = o["update_flags"];
        }),
    );
    out
}

/// Struct offsets the drop programs need, from this kernel's BTF.
pub fn kernel_offsets(btf: &KernelBtf, cfg: &mut ProbeConfig) -> Result<(), crate::btf::BtfError> {
    cfg.skb_head = btf.member_offset("sk_buff", "head")?;
    cfg.skb_len = btf.member_offset("sk_buff", "len")?;
    cfg.skb_protocol = btf.member_offset("sk_buff", "protocol")?;
    cfg.skb_network_header = btf.member_offset("sk_buff", "network_header")?;
    cfg.skb_dev = btf.member_offset("sk_buff", "dev")?;
    cfg.skb_sk = btf.member_offset("sk_buff", "sk")?;
    cfg.dev_ifindex = btf.member_offset("net_device", "ifindex")?;
    // possible_net_t is a typedef of an anonymous struct: walk through it by member name.
    cfg.dev_nd_net = btf.member_offset("net_device", "nd_net.net")?;
    cfg.dev_name = btf.member_offset("net_device", "name")?;
    cfg.sk_net = btf.member_offset("sock", "__sk_common.skc_net.net")?;
    cfg.net_inum = btf.member_offset("net", "ns.inum")?;
    Ok(())
}

/// Offsets for conntrack: the entry an skb carries and its tuples. Absent when conntrack is not
/// built in (its types then live in a module's BTF).
pub fn conntrack_offsets(
    btf: &KernelBtf,
    cfg: &mut ProbeConfig,
) -> Result<(), crate::btf::BtfError> {
    cfg.skb_nfct = btf.member_offset("sk_buff", "_nfct")?;
    cfg.ct_status = btf.member_offset("nf_conn", "status")?;
    let hash = btf.member_offset("nf_conn", "tuplehash")?;
    let tuple_in_hash = btf.member_offset("nf_conntrack_tuple_hash", "tuple")?;
    cfg.ct_tuple_orig = hash + tuple_in_hash;
    cfg.ct_tuple_reply = cfg.ct_tuple_orig + btf.struct_size("nf_conntrack_tuple_hash")?;
    cfg.tuple_src_addr = btf.member_offset("nf_conntrack_tuple", "src.u3")?;
    cfg.tuple_src_port = btf.member_offset("nf_conntrack_tuple", "src.u")?;
    cfg.tuple_l3num = btf.member_offset("nf_conntrack_tuple", "src.l3num")?;
    cfg.tuple_dst_addr = btf.member_offset("nf_conntrack_tuple", "dst.u3")?;
    cfg.tuple_dst_port = btf.member_offset("nf_conntrack_tuple", "dst.u")?;
    cfg.tuple_protonum = btf.member_offset("nf_conntrack_tuple", "dst.protonum")?;
    Ok(())
}

/// Offsets for ARP/NDP frames and neighbour entries.
pub fn arp_offsets(btf: &KernelBtf, cfg: &mut ProbeConfig) -> Result<(), crate::btf::BtfError> {
    cfg.skb_data = btf.member_offset("sk_buff", "data")?;
    cfg.skb_mac_header = btf.member_offset("sk_buff", "mac_header")?;
    cfg.dev_type = btf.member_offset("net_device", "type")?;
    cfg.dev_priv_flags = btf.member_offset("net_device", "priv_flags")?;
    cfg.priv_flag_bridge_port = btf
        .enum_values("netdev_priv_flags")?
        .into_iter()
        .find(|(_, n)| n == "IFF_BRIDGE_PORT")
        .and_then(|(v, _)| u32::try_from(v).ok())
        .unwrap_or(0);
    cfg.neigh_dev = btf.member_offset("neighbour", "dev")?;
    cfg.neigh_tbl = btf.member_offset("neighbour", "tbl")?;
    cfg.tbl_family = btf.member_offset("neigh_table", "family")?;
    cfg.neigh_primary_key = btf.member_offset("neighbour", "primary_key")?;
    cfg.neigh_ha = btf.member_offset("neighbour", "ha")?;
    cfg.neigh_nud_state = btf.member_offset("neighbour", "nud_state")?;
    Ok(())
}

/// Offsets for the per-CPU conntrack statistics of a namespace.
pub fn ct_stat_offsets(btf: &KernelBtf, cfg: &mut ProbeConfig) -> Result<(), crate::btf::BtfError> {
    cfg.net_ct_stat = btf.member_offset("net", "ct.stat")?;
    cfg.stat_insert_failed = btf.member_offset("ip_conntrack_stat", "insert_failed")?;
    cfg.stat_drop = btf.member_offset("ip_conntrack_stat", "drop")?;
    cfg.stat_early_drop = btf.member_offset("ip_conntrack_stat", "early_drop")?;
    cfg.array_pptrs = btf.member_offset("bpf_array", "pptrs")?;
    Ok(())
}

fn host_key(addr: IpAddr) -> HostKey {
    let mut key = HostKey::default();
    match addr {
        IpAddr::V4(a) => {
            key.addr[..4].copy_from_slice(&a.octets());
            key.family = FAMILY_IPV4;
        }
        IpAddr::V6(a) => {
            key.addr = a.octets();
            key.family = FAMILY_IPV6;
        }
    }
    key
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> ProbeError {
    move |source| ProbeError::Map { name, source }
}

pub fn ct_event_name(e: CtEvent) -> &'static str {
    match e {
        CtEvent::InsertFailed => "insert_failed",
        CtEvent::TableFull => "table_full",
        CtEvent::EarlyDrop => "early_drop",
    }
}

impl Tracer {
    /// Loads the object with this kernel's offsets and the filters, then attaches, per collector,
    /// the first probe that works (as `mode` allows).
    pub fn load(
        btf: &KernelBtf,
        reasons: &DropReasons,
        opts: &LoadOptions,
    ) -> Result<Self, ProbeError> {
        let mut cfg = ProbeConfig::zeroed();
        kernel_offsets(btf, &mut cfg)?;
        let layouts = tracepoint_layouts(&mut cfg);
        let conntrack = conntrack_offsets(btf, &mut cfg).map_err(|e| e.to_string());
        let ct_stats = match (&conntrack, reasons.code("NETFILTER_DROP")) {
            (Err(e), _) => Err(e.clone()),
            (Ok(()), None) => Err("this kernel has no NETFILTER_DROP reason".to_owned()),
            (Ok(()), Some(code)) => {
                cfg.reason_netfilter_drop = code;
                ct_stat_offsets(btf, &mut cfg).map_err(|e| e.to_string())
            }
        };
        if ct_stats.is_ok() {
            cfg.features |= FEATURE_CT_STATS;
        }
        if conntrack.is_ok() {
            cfg.features |= FEATURE_NAT_CAPTURE;
        }
        let arp = if opts.arp {
            arp_offsets(btf, &mut cfg).map_err(|e| e.to_string())
        } else {
            Err("disabled (--no-arp)".to_owned())
        };
        if arp.is_ok() {
            cfg.features |= FEATURE_ARP;
        }
        let f = &opts.filter;
        if !f.reasons.is_empty() {
            cfg.filter_flags |= FILTER_REASON;
        }
        if !f.hosts.is_empty() {
            cfg.filter_flags |= FILTER_HOST;
        }
        if let Some(p) = f.port {
            cfg.filter_flags |= FILTER_PORT;
            cfg.filter_port = p;
        }
        if let Some(p) = f.proto {
            cfg.filter_flags |= FILTER_PROTO;
            cfg.filter_proto = p.number();
        }
        if let Some(n) = f.netns {
            cfg.filter_flags |= FILTER_NETNS;
            cfg.filter_netns = n;
        }
        if !f.ct_events.is_empty() {
            cfg.filter_flags |= FILTER_CT_EVENT;
            for e in &f.ct_events {
                cfg.filter_ct_events |= 1 << (*e as u32);
            }
        }
        cfg.wakeup_bytes = opts.wakeup_bytes;

        let aya_btf = aya::Btf::from_sys_fs().ok();
        let mut ebpf = EbpfLoader::new()
            .btf(aya_btf.as_ref())
            .override_global(GLOBAL_CONFIG, &cfg, true)
            .map_max_entries(MAP_EVENTS, opts.ring_bytes)
            .load(EBPF_OBJECT)?;

        // Filters and baselines go in before anything attaches.
        fill_set(&mut ebpf, MAP_REASON_FILTER, f.reasons.iter().copied())?;
        fill_set(
            &mut ebpf,
            MAP_HOST_FILTER,
            f.hosts.iter().map(|h| host_key(*h)),
        )?;
        if ct_stats.is_ok() {
            seed_ct_baselines(&mut ebpf)?;
        }

        let mut statuses = Vec::new();
        let mut active = BTreeMap::new();
        for collector in COLLECTORS {
            for spec in collector.probes {
                let name = probe_name(spec.id);
                let allowed = match opts.mode {
                    ProbeMode::Auto => true,
                    ProbeMode::Btf => spec.is_btf(),
                    ProbeMode::Tracepoint => !spec.is_btf(),
                };
                let skip = if active.contains_key(collector.name) {
                    Some(NOT_NEEDED.to_owned())
                } else if !allowed {
                    Some(format!("{NOT_TRIED} {:?}", opts.mode).to_lowercase())
                } else if disabled_by_env(name) {
                    Some(format!("disabled by {DISABLE_PROBES_ENV}"))
                } else {
                    None
                };
                let result = match skip {
                    Some(reason) => Err(reason),
                    None => match spec.hook {
                        Hook::BtfTracepoint { function } => match aya_btf.as_ref() {
                            Some(kbtf) => attach_btf(&mut ebpf, spec.program, function, kbtf),
                            None => Err("kernel BTF unavailable to the loader".to_owned()),
                        },
                        Hook::Tracepoint { category, name } => {
                            match layouts.get(format!("{category}/{name}").as_str()) {
                                Some(Err(e)) => Err(e.clone()),
                                _ => attach_tracepoint(&mut ebpf, spec.program, category, name),
                            }
                        }
                    },
                };
                if result.is_ok() {
                    active.insert(collector.name, spec.id);
                }
                statuses.push(ProbeStatus {
                    collector: collector.name,
                    probe: name,
                    attached: result.is_ok(),
                    error: result.err(),
                });
            }
            if collector.required && !active.contains_key(collector.name) {
                let why = statuses
                    .iter()
                    .filter(|s| s.collector == collector.name)
                    .filter_map(|s| s.error.as_ref().map(|e| format!("{}: {e}", s.probe)))
                    .collect::<Vec<_>>()
                    .join("; ");
                return Err(ProbeError::NoProbe(why));
            }
        }
        let needs = |base: &Result<(), String>, collectors: &[&str]| match base {
            Err(e) => Err(e.clone()),
            Ok(()) => match collectors.iter().find(|c| !active.contains_key(**c)) {
                Some(c) => Err(format!("no {c} probe attached")),
                None => Ok(()),
            },
        };
        let nat_attribution = needs(&conntrack, &["xmit"]);
        let arp_tx_rx = needs(&arp, &["xmit", "rx"]);
        let neigh = needs(&arp, &["neigh"]);
        Ok(Self {
            ebpf,
            statuses,
            active: active["drops"],
            features: Features {
                conntrack_events: ct_stats,
                nat_attribution,
                arp: arp_tx_rx,
                neighbours: neigh,
            },
        })
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
                _ => {}
            }
        }
    }

    fn per_cpu_array(&self, name: &'static str) -> Result<Vec<Vec<u64>>, ProbeError> {
        let map = self.ebpf.map(name).ok_or(ProbeError::MissingMap(name))?;
        let arr: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map).map_err(map_err(name))?;
        arr.iter()
            .map(|v| v.map(|per_cpu| per_cpu.to_vec()).map_err(map_err(name)))
            .collect()
    }

    pub fn counters(&self) -> Result<KernelCounters, ProbeError> {
        let mut out = KernelCounters::default();
        let map = self
            .ebpf
            .map(MAP_DROP_COUNTS)
            .ok_or(ProbeError::MissingMap(MAP_DROP_COUNTS))?;
        let counts: PerCpuHashMap<&MapData, u32, u64> =
            PerCpuHashMap::try_from(map).map_err(map_err(MAP_DROP_COUNTS))?;
        for item in counts.iter() {
            let (reason, per_cpu) = item.map_err(map_err(MAP_DROP_COUNTS))?;
            out.by_reason.insert(reason, per_cpu.iter().sum());
        }
        let stats = self.per_cpu_array(MAP_STATS)?;
        let total = |idx: u32| stats.get(idx as usize).map_or(0, |v| v.iter().sum());
        out.lost_per_cpu = stats
            .get(STAT_RING_LOST as usize)
            .cloned()
            .unwrap_or_default();
        out.seen = total(STAT_SEEN);
        out.matched = total(STAT_MATCHED);
        out.read_errors = total(STAT_READ_ERRORS);
        out.ct_no_baseline = total(STAT_CT_NO_BASELINE);
        out.nat_learned = total(STAT_NAT_LEARNED);
        out.nat_joined = total(STAT_NAT_JOINED);
        out.arp = total(STAT_ARP);
        out.neigh = total(STAT_NEIGH);
        for (idx, per_cpu) in self.per_cpu_array(MAP_CT_COUNTS)?.iter().enumerate() {
            let event = u8::try_from(idx)
                .ok()
                .and_then(|i| CtEvent::try_from(i).ok());
            if let Some(e) = event {
                out.ct_events.insert(ct_event_name(e), per_cpu.iter().sum());
            }
        }
        Ok(out)
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

/// Puts `keys` into the hash map `name`, used as a set.
fn fill_set<K: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    keys: impl Iterator<Item = K>,
) -> Result<(), ProbeError> {
    let map = ebpf.map_mut(name).ok_or(ProbeError::MissingMap(name))?;
    let mut set: HashMap<&mut MapData, K, u8> = HashMap::try_from(map).map_err(map_err(name))?;
    for k in keys {
        set.insert(k, 1, 0).map_err(map_err(name))?;
    }
    Ok(())
}

/// Seeds `CT_LAST` with every namespace's current per-CPU conntrack statistics, so that history
/// from before lbtrace started is not mistaken for a conntrack drop. Namespaces created later
/// start from zero, which is what the programs assume for an unknown one.
fn seed_ct_baselines(ebpf: &mut Ebpf) -> Result<(), ProbeError> {
    let map = ebpf
        .map_mut(MAP_CT_LAST)
        .ok_or(ProbeError::MissingMap(MAP_CT_LAST))?;
    let mut last: HashMap<&mut MapData, CtStatKey, CtStatValue> =
        HashMap::try_from(map).map_err(map_err(MAP_CT_LAST))?;
    let mut denied = 0;
    for (inode, path) in netns::namespaces() {
        let table = match netns::conntrack_stats(&path) {
            Ok(Some(t)) => t,
            Ok(None) => continue,
            Err(e) => {
                if e.kind() == std::io::ErrorKind::PermissionDenied {
                    denied += 1;
                }
                continue;
            }
        };
        for (cpu, row) in table.per_cpu.iter().enumerate() {
            let key = CtStatKey {
                netns: inode,
                cpu: u32::try_from(cpu).unwrap_or(u32::MAX),
            };
            let value = CtStatValue {
                insert_failed: row.insert_failed,
                drop: row.drop,
                early_drop: row.early_drop,
                _pad0: 0,
            };
            // A full LRU only means a namespace is classified from zero: not fatal.
            if let Err(e) = last.insert(key, value, 0) {
                tracing::debug!("seeding conntrack baseline for netns {inode}: {e}");
            }
        }
    }
    if denied > 0 {
        tracing::warn!(
            "cannot enter {denied} network namespaces (setns needs CAP_SYS_ADMIN): their conntrack history is unknown, so their first NETFILTER_DROP per CPU may be mislabelled as a conntrack event"
        );
    }
    Ok(())
}

fn attach_btf(
    ebpf: &mut Ebpf,
    program: &str,
    function: &str,
    btf: &aya::Btf,
) -> Result<(), String> {
    let prog: &mut BtfTracePoint = ebpf
        .program_mut(program)
        .ok_or_else(|| format!("program {program} missing from the object"))?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    prog.load(function, btf).map_err(|e| error_chain(&e))?;
    prog.attach().map_err(|e| error_chain(&e))?;
    Ok(())
}

fn attach_tracepoint(
    ebpf: &mut Ebpf,
    program: &str,
    category: &str,
    name: &str,
) -> Result<(), String> {
    let prog: &mut TracePoint = ebpf
        .program_mut(program)
        .ok_or_else(|| format!("program {program} missing from the object"))?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    prog.load().map_err(|e| error_chain(&e))?;
    prog.attach(category, name).map_err(|e| error_chain(&e))?;
    Ok(())
}

/// An error with its sources, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = inner.source();
    }
    // The verifier log can run to pages; its first line says enough for a status.
    s.lines().next().unwrap_or_default().to_owned()
}

/// Reads `path` only if it exists (for `doctor`).
pub fn read_opt(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tracefs_format() {
        let fmt = "name: kfree_skb\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\n\tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;\n\tfield:void * location;\toffset:16;\tsize:8;\tsigned:0;\n\tfield:enum skb_drop_reason reason;\toffset:36;\tsize:4;\tsigned:0;\n\tfield:u8 lladdr[32];\toffset:40;\tsize:32;\tsigned:0;\n";
        let o = tracepoint_offsets(fmt, &["skbaddr", "location", "reason", "lladdr"]).unwrap();
        assert_eq!(o["skbaddr"], 8);
        assert_eq!(o["location"], 16);
        assert_eq!(o["reason"], 36);
        assert_eq!(o["lladdr"], 40);
        assert!(tracepoint_offsets(fmt, &["rx_sk"])
            .unwrap_err()
            .contains("rx_sk"));
    }
}
