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
    HostKey, ProbeConfig, ProbeId, FAMILY_IPV4, FAMILY_IPV6, FILTER_HOST, FILTER_NETNS,
    FILTER_PORT, FILTER_PROTO, FILTER_REASON, GLOBAL_CONFIG, MAP_DROP_COUNTS, MAP_EVENTS,
    MAP_HOST_FILTER, MAP_REASON_FILTER, MAP_STATS, STAT_COUNT, STAT_MATCHED, STAT_READ_ERRORS,
    STAT_RING_LOST, STAT_SEEN,
};
use aya::{
    maps::{HashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{BtfTracePoint, TracePoint},
    Ebpf, EbpfLoader,
};

use crate::{btf::KernelBtf, decode::L4Proto};

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

/// Drop probes in order of preference.
const DROP_PROBES: &[ProbeSpec] = &[
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
];

pub fn probe_name(id: ProbeId) -> &'static str {
    match id {
        ProbeId::KfreeSkbBtf => "tp_btf/kfree_skb",
        ProbeId::KfreeSkbTracepoint => "tracepoint/skb/kfree_skb",
    }
}

/// Outcome of one attach attempt.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ProbeStatus {
    pub probe: &'static str,
    pub attached: bool,
    /// Why it did not attach, or why it was not tried.
    pub error: Option<String>,
}

/// Kernel-side filters: applied before a record is reserved.
#[derive(Clone, Debug, Default)]
pub struct KernelFilter {
    pub reasons: Vec<u32>,
    pub hosts: Vec<IpAddr>,
    pub port: Option<u16>,
    pub proto: Option<L4Proto>,
    pub netns: Option<u32>,
}

#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub mode: ProbeMode,
    pub filter: KernelFilter,
    /// Ring buffer size in bytes: a power of two, a multiple of the page size.
    pub ring_bytes: u32,
    /// Wake the reader when this many bytes wait (0: on every record).
    pub wakeup_bytes: u64,
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
}

impl KernelCounters {
    pub fn lost(&self) -> u64 {
        self.lost_per_cpu.iter().sum()
    }
}

pub struct Tracer {
    ebpf: Ebpf,
    pub statuses: Vec<ProbeStatus>,
    pub active: ProbeId,
}

/// Tracefs mount points, in the order the kernel documents them.
const TRACEFS: &[&str] = &["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

pub fn tracefs_root() -> Option<PathBuf> {
    TRACEFS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("events").is_dir())
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

fn kfree_skb_tp_offsets(cfg: &mut ProbeConfig) -> Result<(), String> {
    let root = tracefs_root()
        .ok_or("tracefs is not mounted (mount -t tracefs nodev /sys/kernel/tracing)")?;
    let path = root.join("events/skb/kfree_skb/format");
    let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let offs = tracepoint_offsets(&text, &["skbaddr", "location", "reason"])?;
    cfg.tp_skbaddr = offs["skbaddr"];
    cfg.tp_location = offs["location"];
    cfg.tp_reason = offs["reason"];
    Ok(())
}

/// Struct offsets the programs need, from this kernel's BTF.
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

impl Tracer {
    /// Loads the object with this kernel's offsets and the filters, then attaches the first drop
    /// probe that works (as `mode` allows).
    pub fn load(btf: &KernelBtf, opts: &LoadOptions) -> Result<Self, ProbeError> {
        let mut cfg = ProbeConfig::zeroed();
        kernel_offsets(btf, &mut cfg)?;
        let tp_format = kfree_skb_tp_offsets(&mut cfg);
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
        cfg.wakeup_bytes = opts.wakeup_bytes;

        let aya_btf = aya::Btf::from_sys_fs().ok();
        let mut ebpf = EbpfLoader::new()
            .btf(aya_btf.as_ref())
            .override_global(GLOBAL_CONFIG, &cfg, true)
            .map_max_entries(MAP_EVENTS, opts.ring_bytes)
            .load(EBPF_OBJECT)?;

        // Filters go in before anything attaches, so no unfiltered record slips out.
        {
            let map = ebpf
                .map_mut(MAP_REASON_FILTER)
                .ok_or(ProbeError::MissingMap(MAP_REASON_FILTER))?;
            let mut reasons: HashMap<&mut MapData, u32, u8> =
                HashMap::try_from(map).map_err(|source| ProbeError::Map {
                    name: MAP_REASON_FILTER,
                    source,
                })?;
            for r in &f.reasons {
                reasons.insert(r, 1, 0).map_err(|source| ProbeError::Map {
                    name: MAP_REASON_FILTER,
                    source,
                })?;
            }
        }
        {
            let map = ebpf
                .map_mut(MAP_HOST_FILTER)
                .ok_or(ProbeError::MissingMap(MAP_HOST_FILTER))?;
            let mut hosts: HashMap<&mut MapData, HostKey, u8> =
                HashMap::try_from(map).map_err(|source| ProbeError::Map {
                    name: MAP_HOST_FILTER,
                    source,
                })?;
            for h in &f.hosts {
                hosts
                    .insert(host_key(*h), 1, 0)
                    .map_err(|source| ProbeError::Map {
                        name: MAP_HOST_FILTER,
                        source,
                    })?;
            }
        }

        let btf_for_tp = aya_btf.as_ref();
        let mut statuses = Vec::new();
        let mut active = None;
        for spec in DROP_PROBES {
            let name = probe_name(spec.id);
            let allowed = match opts.mode {
                ProbeMode::Auto => true,
                ProbeMode::Btf => spec.id == ProbeId::KfreeSkbBtf,
                ProbeMode::Tracepoint => spec.id == ProbeId::KfreeSkbTracepoint,
            };
            let skip = if active.is_some() {
                Some("not needed: a preferred probe is attached".to_owned())
            } else if !allowed {
                Some(format!("not tried: --probe-mode {:?}", opts.mode).to_lowercase())
            } else {
                None
            };
            if let Some(reason) = skip {
                statuses.push(ProbeStatus {
                    probe: name,
                    attached: false,
                    error: Some(reason),
                });
                continue;
            }
            let result = match spec.hook {
                Hook::BtfTracepoint { function } => match btf_for_tp {
                    Some(kbtf) => attach_btf(&mut ebpf, spec.program, function, kbtf),
                    None => Err("kernel BTF unavailable to the loader".to_owned()),
                },
                Hook::Tracepoint { category, name } => match &tp_format {
                    Ok(()) => attach_tracepoint(&mut ebpf, spec.program, category, name),
                    Err(e) => Err(e.clone()),
                },
            };
            match result {
                Ok(()) => {
                    active = Some(spec.id);
                    statuses.push(ProbeStatus {
                        probe: name,
                        attached: true,
                        error: None,
                    });
                }
                Err(e) => statuses.push(ProbeStatus {
                    probe: name,
                    attached: false,
                    error: Some(e),
                }),
            }
        }
        let Some(active) = active else {
            let why = statuses
                .iter()
                .filter_map(|s| s.error.as_ref().map(|e| format!("{}: {e}", s.probe)))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(ProbeError::NoProbe(why));
        };
        Ok(Self {
            ebpf,
            statuses,
            active,
        })
    }

    /// Takes the ring buffer for the reader.
    pub fn take_ring(&mut self) -> Result<RingBuf<MapData>, ProbeError> {
        let map = self
            .ebpf
            .take_map(MAP_EVENTS)
            .ok_or(ProbeError::MissingMap(MAP_EVENTS))?;
        RingBuf::try_from(map).map_err(|source| ProbeError::Map {
            name: MAP_EVENTS,
            source,
        })
    }

    /// Detaches every program (links are owned by the programs; dropping them detaches).
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

    pub fn counters(&self) -> Result<KernelCounters, ProbeError> {
        let mut out = KernelCounters::default();
        let map = self
            .ebpf
            .map(MAP_DROP_COUNTS)
            .ok_or(ProbeError::MissingMap(MAP_DROP_COUNTS))?;
        let counts: PerCpuHashMap<&MapData, u32, u64> =
            PerCpuHashMap::try_from(map).map_err(|source| ProbeError::Map {
                name: MAP_DROP_COUNTS,
                source,
            })?;
        for item in counts.iter() {
            let (reason, per_cpu) = item.map_err(|source| ProbeError::Map {
                name: MAP_DROP_COUNTS,
                source,
            })?;
            out.by_reason.insert(reason, per_cpu.iter().sum());
        }
        let map = self
            .ebpf
            .map(MAP_STATS)
            .ok_or(ProbeError::MissingMap(MAP_STATS))?;
        let stats: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(|source| ProbeError::Map {
                name: MAP_STATS,
                source,
            })?;
        for idx in 0..STAT_COUNT {
            let per_cpu = stats.get(&idx, 0).map_err(|source| ProbeError::Map {
                name: MAP_STATS,
                source,
            })?;
            match idx {
                STAT_RING_LOST => out.lost_per_cpu = per_cpu.iter().copied().collect(),
                STAT_SEEN => out.seen = per_cpu.iter().sum(),
                STAT_MATCHED => out.matched = per_cpu.iter().sum(),
                STAT_READ_ERRORS => out.read_errors = per_cpu.iter().sum(),
                _ => {}
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
                    | aya::maps::Map::Array(d) => d,
                    _ => return None,
                };
                let info = d.info().ok()?;
                Some(u64::from(info.max_entries()) * u64::from(info.value_size().max(1)))
            })
            .sum()
    }
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
