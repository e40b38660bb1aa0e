//! The fallback table: each job (collector) and the hooks that can do it, in order of
//! preference, and how one hook is attached.

use std::{fmt, str::FromStr};

use agent_common::ProbeId;
use aya::{
    programs::{BtfTracePoint, TracePoint},
    Ebpf,
};

/// Which kfree_skb hook to use (`--probe-mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProbeMode {
    /// tp_btf first, the classic tracepoint if that fails.
    #[default]
    Auto,
    /// Only tp_btf/kfree_skb.
    Btf,
    /// Only the classic tracepoint skb/kfree_skb.
    Tracepoint,
}

impl ProbeMode {
    pub const NAMES: [&'static str; 3] = ["auto", "btf", "tracepoint"];

    /// Whether this mode lets a hook of this kind be tried.
    pub(crate) fn allows(self, spec: &ProbeSpec) -> bool {
        match self {
            Self::Auto => true,
            Self::Btf => spec.is_btf(),
            Self::Tracepoint => !spec.is_btf(),
        }
    }
}

impl fmt::Display for ProbeMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Btf => "btf",
            Self::Tracepoint => "tracepoint",
        })
    }
}

impl FromStr for ProbeMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "btf" => Ok(Self::Btf),
            "tracepoint" => Ok(Self::Tracepoint),
            other => Err(format!("`{other}` is not auto, btf or tracepoint")),
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Hook {
    BtfTracepoint {
        function: &'static str,
    },
    Tracepoint {
        category: &'static str,
        name: &'static str,
    },
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct ProbeSpec {
    pub(crate) id: ProbeId,
    pub(crate) program: &'static str,
    pub(crate) hook: Hook,
}

impl ProbeSpec {
    pub(crate) fn is_btf(&self) -> bool {
        matches!(self.hook, Hook::BtfTracepoint { .. })
    }
}

/// A job done by one of several interchangeable hooks, tried in order of preference.
pub(crate) struct Collector {
    pub(crate) name: &'static str,
    /// Without it lbtrace cannot work; an optional collector is skipped with its reason.
    pub(crate) required: bool,
    pub(crate) probes: &'static [ProbeSpec],
}

pub(crate) const COLLECTORS: &[Collector] = &[
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

/// Fault injection for tests (undocumented in `--help`): the probes named in this variable
/// (comma-separated, as `doctor` names them, e.g. `tp_btf/neigh_update`) fail as if the kernel
/// had refused them, so each fallback and each missing collector can be forced.
pub const DISABLE_PROBES_ENV: &str = "LBTRACE_DISABLE_PROBES";

pub(crate) fn disabled_by_env(probe: &str) -> bool {
    std::env::var(DISABLE_PROBES_ENV).is_ok_and(|v| v.split(',').any(|p| p.trim() == probe))
}

pub(crate) fn attach_btf(
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
    prog.load(function, btf)
        .map_err(|e| verifier_refused(program, &e))?;
    prog.attach().map_err(|e| error_chain(&e))?;
    Ok(())
}

/// The first line of a load error for the status; the whole verifier log at debug level
/// (`LBTRACE_LOG=debug`), where a person looking into it wants every line.
fn verifier_refused(program: &str, e: &aya::programs::ProgramError) -> String {
    tracing::debug!("{program} refused: {e:#?}");
    error_chain(e)
}

pub(crate) fn attach_tracepoint(
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
    prog.load().map_err(|e| verifier_refused(program, &e))?;
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
