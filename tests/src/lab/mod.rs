//! The namespace lab: a LAN with clients and three Kubernetes-like nodes, kube-proxy-style
//! nftables rules, a MetalLB-L2-like speaker, backend pods, a traffic generator that is the
//! ground truth, and the failure scenarios lbtrace has to explain. Shared by `cargo xtask lab`,
//! `cargo xtask demo` and tests/tests/lab.rs.

pub mod accounts;
pub mod backend;
pub mod cluster;
pub mod generator;
mod host;
mod inject;
pub mod kubeproxy;
pub mod kubeproxy_checks;
mod rules;
pub mod run;
mod scenario_texts;
pub mod scenarios;
pub mod speaker;
pub mod speaker_scenarios;
pub mod speakers;
pub mod topology;
mod verdict;

use std::sync::atomic::{AtomicBool, Ordering};

/// What clients connect to on a VIP, and what kube-proxy translates it to on a pod.
pub const TCP_PORT: u16 = 80;
pub const UDP_PORT: u16 = 53;
pub const POD_TCP_PORT: u16 = 8080;
pub const POD_UDP_PORT: u16 = 5353;

/// Namespaces of labs started by `cargo xtask` (`lab up`, `lab run`, `demo`) start with this;
/// `lab down` removes every one of them. Tests use their own unique prefixes.
pub const XTASK_PREFIX: &str = "lbl";
/// What a lab must find again after its process is gone: the holder's pid, sysctl backups.
pub const STATE_DIR: &str = "/run/lbtrace-lab";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Asks a running scenario to stop early (async-signal-safe: call it from a SIGINT handler).
pub fn interrupt() {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}
