//! Reads of kernel memory at offsets resolved from the running kernel's BTF.

use agent_common::{ProbeConfig, OFFSET_UNKNOWN};
use aya_ebpf::helpers::bpf_probe_read_kernel;

/// Written by the agent before load (`EbpfLoader::set_global`); read-only afterwards, so the
/// verifier sees constants and prunes branches for unknown offsets.
#[unsafe(no_mangle)]
static CONFIG: ProbeConfig = ProbeConfig::zeroed();

#[inline(always)]
pub fn config() -> ProbeConfig {
    // SAFETY: CONFIG is a plain static; volatile keeps the compiler from folding the defaults.
    unsafe { core::ptr::read_volatile(&raw const CONFIG) }
}

/// Reads a `T` at `base + off`; fails for a null base or an offset the BTF did not provide.
#[inline(always)]
pub fn read<T>(base: u64, off: u32) -> Result<T, i32> {
    if base == 0 || off == OFFSET_UNKNOWN {
        return Err(-1);
    }
    // SAFETY: bpf_probe_read_kernel checks the address and fails instead of faulting.
    unsafe { bpf_probe_read_kernel((base + u64::from(off)) as *const T) }
}

/// `struct net *` → `net->ns.inum`.
#[inline(always)]
pub fn netns_inum(cfg: &ProbeConfig, net: u64) -> u32 {
    read::<u32>(net, cfg.net_inum).unwrap_or(0)
}
