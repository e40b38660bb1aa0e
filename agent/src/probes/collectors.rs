//! The fallback table: each job (collector) and the hooks that can do it, in order of
//! preference, and how one hook is attached.

use std::{fmt, str::FromStr};

use agent_common::ProbeId;
use aya::{
    programs::{BtfTracePoint, KProbe, TracePoint},
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

    /// Whether this mode lets a hook of this kind be tried. The mode chooses between the
    /// tracepoint kinds: the conntrack hooks are tried in every mode.
    pub(crate) fn allows(self, spec: &ProbeSpec) -> bool {
        match (self, spec.hook) {
            (Self::Auto, _) | (_, Hook::Kprobes { .. } | Hook::Statistics) => true,
            (Self::Btf, _) => spec.is_btf(),
            (Self::Tracepoint, _) => !spec.is_btf(),
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
    /// (program, function) pairs, every one of which must attach; a program's section says
    /// whether it is a kprobe or a kretprobe.
    Kprobes {
        attach: &'static [(&'static str, &'static str)],
    },
    /// No hook: the drop program reads the kernel's statistics (always there when the
    /// feature is).
    Statistics,
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
    Collector {
        name: "exit",
        required: false,
        probes: &[
            ProbeSpec {
                id: ProbeId::ProcessExitBtf,
                program: "process_exit_btf",
                hook: Hook::BtfTracepoint {
                    function: "sched_process_exit",
                },
            },
            ProbeSpec {
                id: ProbeId::ProcessExitTracepoint,
                program: "process_exit_tp",
                hook: Hook::Tracepoint {
                    category: "sched",
                    name: "sched_process_exit",
                },
            },
        ],
    },
    Collector {
        name: "exec",
        required: false,
        probes: &[
            ProbeSpec {
                id: ProbeId::ProcessExecBtf,
                program: "process_exec_btf",
                hook: Hook::BtfTracepoint {
                    function: "sched_process_exec",
                },
            },
            ProbeSpec {
                id: ProbeId::ProcessExecTracepoint,
                program: "process_exec_tp",
                hook: Hook::Tracepoint {
                    category: "sched",
                    name: "sched_process_exec",
                },
            },
        ],
    },
    Collector {
        name: "oom",
        required: false,
        probes: &[
            ProbeSpec {
                id: ProbeId::OomVictimBtf,
                program: "oom_victim_btf",
                hook: Hook::BtfTracepoint {
                    function: "mark_victim",
                },
            },
            ProbeSpec {
                id: ProbeId::OomVictimTracepoint,
                program: "oom_victim_tp",
                hook: Hook::Tracepoint {
                    category: "oom",
                    name: "mark_victim",
                },
            },
        ],
    },
    Collector {
        name: "signal",
        required: false,
        probes: &[
            ProbeSpec {
                id: ProbeId::SignalBtf,
                program: "signal_btf",
                hook: Hook::BtfTracepoint {
                    function: "signal_generate",
                },
            },
            ProbeSpec {
                id: ProbeId::SignalTracepoint,
                program: "signal_tp",
                hook: Hook::Tracepoint {
                    category: "signal",
                    name: "signal_generate",
                },
            },
        ],
    },
    // How NETFILTER_DROPs are classified as conntrack events: from conntrack's own verdicts
    // where kprobes are allowed, else from its per-CPU statistics.
    Collector {
        name: CONNTRACK_COLLECTOR,
        required: false,
        probes: &[
            ProbeSpec {
                id: ProbeId::CtVerdictKprobes,
                program: "ct_confirm",
                hook: Hook::Kprobes {
                    attach: &[
                        ("ct_confirm", "__nf_conntrack_confirm"),
                        ("ct_confirm_ret", "__nf_conntrack_confirm"),
                        ("ct_alloc", "__nf_conntrack_alloc"),
                        ("ct_alloc_ret", "__nf_conntrack_alloc"),
                    ],
                },
            },
            ProbeSpec {
                id: ProbeId::CtStatistics,
                // The drop program itself, whichever attached.
                program: "kfree_skb",
                hook: Hook::Statistics,
            },
        ],
    },
];

/// The collector that classifies conntrack drops.
pub(crate) const CONNTRACK_COLLECTOR: &str = "conntrack";

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
        ProbeId::ProcessExitBtf => "tp_btf/sched_process_exit",
        ProbeId::ProcessExitTracepoint => "tracepoint/sched/sched_process_exit",
        ProbeId::ProcessExecBtf => "tp_btf/sched_process_exec",
        ProbeId::ProcessExecTracepoint => "tracepoint/sched/sched_process_exec",
        ProbeId::OomVictimBtf => "tp_btf/mark_victim",
        ProbeId::OomVictimTracepoint => "tracepoint/oom/mark_victim",
        ProbeId::SignalBtf => "tp_btf/signal_generate",
        ProbeId::SignalTracepoint => "tracepoint/signal/signal_generate",
        ProbeId::CtVerdictKprobes => "kretprobe/__nf_conntrack_confirm+__nf_conntrack_alloc",
        ProbeId::CtStatistics => "stats/nf_conntrack",
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

/// The verifier's reason for the status; the whole log at debug level (`LBTRACE_LOG=debug`),
/// where a person looking into it wants every line.
fn verifier_refused(program: &str, e: &aya::programs::ProgramError) -> String {
    tracing::debug!("{program} refused: {e:#?}");
    match e {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => match verifier_reason(&verifier_log.to_string()) {
            Some(reason) => {
                format!("the BPF_PROG_LOAD syscall returned {io_error}. Verifier: {reason}")
            }
            None => error_chain(e),
        },
        _ => error_chain(e),
    }
}

/// The line of a verifier log that says why it refused: the last before the statistics. The
/// first line can be a note the verifier goes on past (6.1 starts with `reg type unsupported
/// for arg#0` for any `void *ctx`).
fn verifier_reason(log: &str) -> Option<&str> {
    const STATS: [&str; 3] = ["verification time", "stack depth", "processed "];
    log.lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !STATS.iter().any(|s| l.starts_with(s)))
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

/// Where the kernel exposes kprobes to perf (what aya attaches through).
const KPROBE_PMU: &str = "/sys/bus/event_source/devices/kprobe";

/// Loads and attaches every (program, function) pair, or none: one that fails unloads those
/// before it.
pub(crate) fn attach_kprobes(
    ebpf: &mut Ebpf,
    attach: &[(&'static str, &'static str)],
) -> Result<(), String> {
    if !std::path::Path::new(KPROBE_PMU).exists() {
        return Err(format!(
            "this kernel offers no kprobes ({KPROBE_PMU} is missing)"
        ));
    }
    let mut done = Vec::new();
    let mut result = Ok(());
    for &(program, function) in attach {
        result = attach_kprobe(ebpf, program, function);
        if result.is_err() {
            break;
        }
        done.push(program);
    }
    if result.is_err() {
        for program in done {
            if let Some(Ok(p)) = ebpf.program_mut(program).map(<&mut KProbe>::try_from) {
                let _ = p.unload();
            }
        }
    }
    result
}

fn attach_kprobe(ebpf: &mut Ebpf, program: &str, function: &str) -> Result<(), String> {
    let prog: &mut KProbe = ebpf
        .program_mut(program)
        .ok_or_else(|| format!("program {program} missing from the object"))?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    prog.load().map_err(|e| verifier_refused(program, &e))?;
    prog.attach(function, 0)
        .map_err(|e| format!("{function}: {} (is its module loaded?)", error_chain(&e)))?;
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
    // A status is one line (`verifier_refused` picks the reason out of a verifier log).
    s.lines().next().unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::{probe_name, verifier_reason, COLLECTORS};

    #[test]
    fn every_probe_can_be_named_in_the_disable_list() {
        let names: Vec<&str> = COLLECTORS
            .iter()
            .flat_map(|c| c.probes)
            .map(|p| probe_name(p.id))
            .collect();
        for n in &names {
            assert!(!n.contains(','), "{n}");
            assert_eq!(names.iter().filter(|m| *m == n).count(), 1, "{n}");
        }
    }

    #[test]
    fn the_reason_is_the_last_line_before_the_statistics() {
        let log = "reg type unsupported for arg#0 function kfree_skb_tp#8\n\
                   0: R1=ctx(off=0,imm=0) R10=fp0\n\
                   invalid variable-offset read from stack R3 var_off=(0x0; 0xfc) size=1\n\
                   verification time 149563 usec\n\
                   stack depth 328+0+0\n\
                   processed 5412 insns (limit 1000000) max_states_per_insn 4\n";
        assert_eq!(
            verifier_reason(log),
            Some("invalid variable-offset read from stack R3 var_off=(0x0; 0xfc) size=1")
        );
        assert_eq!(verifier_reason("verification time 1 usec\n"), None);
    }
}
