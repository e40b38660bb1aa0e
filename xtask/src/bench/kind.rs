//! The tracers under comparison, and the two baselines that are not tracers: nothing attached,
//! and empty programs on the hooks a dropped packet crosses.

use std::net::Ipv4Addr;

use super::tracer::BPFTRACE_PROGRAM;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    None,
    Watch,
    Agent,
    Bpftrace,
    /// Not a tracer: empty programs on kfree_skb and the tx hook ([`super::floor`]), the least
    /// any tracer hooking them pays per drop. Run at saturation only.
    Hooks,
    /// Not a product setting: the agent with its tx program refused (the test-only
    /// `LBTRACE_DISABLE_PROBES`), to show what the tx hook costs it per drop here. Run at
    /// saturation only.
    AgentNoTx,
}

/// The probes `Kind::AgentNoTx` refuses, as `lbtrace doctor` names them.
pub(super) const TX_PROBES: &str = "tp_btf/net_dev_start_xmit,tracepoint/net/net_dev_start_xmit";

impl Kind {
    pub const ALL: [Self; 6] = [
        Self::None,
        Self::Watch,
        Self::Agent,
        Self::Bpftrace,
        Self::Hooks,
        Self::AgentNoTx,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Watch => "lbtrace-watch",
            Self::Agent => "lbtrace-agent",
            Self::Bpftrace => "bpftrace",
            Self::Hooks => "empty-hooks",
            Self::AgentNoTx => "lbtrace-agent-no-tx",
        }
    }

    /// Whether it runs beyond the saturation and program-cost rounds (the 10k and 200k
    /// loads, passing traffic).
    pub fn runs_every_phase(self) -> bool {
        !matches!(self, Self::Hooks | Self::AgentNoTx)
    }

    /// The command line (after the program), the metrics address standing as `ADDR`.
    pub(super) fn args(self, scope: Scope) -> Vec<String> {
        let (vip, netns) = (scope.vip.to_string(), scope.netns.to_string());
        let v: Vec<&str> = match self {
            Self::None | Self::Hooks => vec![],
            Self::Watch => vec!["watch", "--json", "--netns", &netns, "--vip", &vip],
            Self::Agent | Self::AgentNoTx => vec![
                "agent",
                "--metrics-addr",
                "ADDR",
                "--netns",
                &netns,
                "--vip",
                &vip,
            ],
            Self::Bpftrace => vec!["-e", BPFTRACE_PROGRAM],
        };
        v.into_iter().map(str::to_owned).collect()
    }

    /// What runs, for the report.
    pub fn command(self, scope: Scope) -> String {
        let args = self.args(scope).join(" ");
        match self {
            Self::None => "(nothing attached)".into(),
            Self::Watch => format!("lbtrace {args} > pipe (read and discarded)"),
            Self::Agent => format!("lbtrace {args} (metrics scraped at the end)"),
            Self::AgentNoTx => format!(
                "LBTRACE_DISABLE_PROBES={TX_PROBES} lbtrace {args} (the agent without its tx program)"
            ),
            Self::Bpftrace => format!("bpftrace -e '{BPFTRACE_PROGRAM}'"),
            Self::Hooks => "empty tp_btf programs (r0 = 0) on kfree_skb and net_dev_start_xmit, \
                            the hooks lbtrace's agent has on a dropped packet's path"
                .into(),
        }
    }

    pub fn is_lbtrace(self) -> bool {
        matches!(self, Self::Watch | Self::Agent | Self::AgentNoTx)
    }
}

/// What lbtrace is pointed at: the bench's VIP, in the node namespace.
#[derive(Clone, Copy, Debug)]
pub struct Scope {
    pub vip: Ipv4Addr,
    pub netns: u32,
}
