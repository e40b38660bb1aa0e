//! Capabilities the agent needs, checked before anything is loaded.

use std::fs;

pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// Effective capability set of this process (from /proc/self/status).
pub fn effective() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

pub fn has(caps: u64, cap: u32) -> bool {
    caps & (1 << cap) != 0
}

/// Names of the capabilities missing to load and attach tracing programs: CAP_BPF and
/// CAP_PERFMON, or CAP_SYS_ADMIN, which implies both.
pub fn missing_for_tracing(caps: u64) -> Vec<&'static str> {
    if has(caps, CAP_SYS_ADMIN) {
        return Vec::new();
    }
    let mut missing = Vec::new();
    if !has(caps, CAP_BPF) {
        missing.push("CAP_BPF");
    }
    if !has(caps, CAP_PERFMON) {
        missing.push("CAP_PERFMON");
    }
    missing
}

/// Names of the capabilities set in `caps` that lbtrace cares about.
pub fn describe(caps: u64) -> Vec<&'static str> {
    [
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
        (CAP_PERFMON, "CAP_PERFMON"),
        (CAP_BPF, "CAP_BPF"),
        (12, "CAP_NET_ADMIN"),
        (34, "CAP_SYSLOG"),
    ]
    .into_iter()
    .filter(|(c, _)| has(caps, *c))
    .map(|(_, n)| n)
    .collect()
}

/// Older kernels charge BPF maps to RLIMIT_MEMLOCK; raising it is harmless on newer ones.
pub fn raise_memlock() {
    let lim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: valid pointer to an rlimit; failure only means the old limit stays.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sys_admin_is_enough() {
        assert!(missing_for_tracing(1 << CAP_SYS_ADMIN).is_empty());
        assert_eq!(missing_for_tracing(1 << CAP_BPF), vec!["CAP_PERFMON"]);
        assert_eq!(missing_for_tracing(0), vec!["CAP_BPF", "CAP_PERFMON"]);
    }
}
