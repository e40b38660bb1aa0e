//! Lab toolkit: network namespaces and links that clean up after themselves, traffic with known
//! counts, and kernel-side oracles (tracefs, nft counters) that no part of lbtrace produces.
//!
//! Every address used is in 10.200.0.0/16 or fd00:200::/64, or loopback inside a namespace.

pub mod agent;
pub mod blast;
pub mod browser;
pub mod deploy;
pub mod http;
pub mod lab;
pub mod lbtrace;
pub mod netns;
pub mod oracle;
pub mod prometheus;
pub mod traffic;

use std::process::{Command, Output};

use anyhow::{bail, Context, Result};

/// Runs a command and returns its output; fails with stderr when it fails.
pub fn sh(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Fails loudly (never skips) when not root: these tests need the real kernel.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "integration tests need root (eBPF, network namespaces); run them with `cargo xtask test` as root"
    );
}

/// A name unique to this process and call, short enough for an interface name (15 bytes).
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}{n}", std::process::id() % 100_000)
}
