//! Reads of kernel memory at offsets resolved from the running kernel's BTF.

use agent_common::{ProbeConfig, OFFSET_UNKNOWN};
use aya_ebpf::helpers::bpf_probe_read_kernel;

/// Written by the agent before load (`EbpfLoader::override_global`); read-only afterwards, so
/// the verifier sees constants and prunes branches for unknown offsets.
#[unsafe(no_mangle)]
pub static CONFIG: ProbeConfig = ProbeConfig::zeroed();

/// One field of [`CONFIG`], read volatile so the compiler does not fold the defaults; field by
/// field, so the 512-byte stack never holds the whole struct.
#[macro_export]
macro_rules! conf {
    ($field:ident) => {
        // SAFETY: CONFIG is a plain static.
        unsafe { core::ptr::read_volatile(&raw const $crate::kernel::CONFIG.$field) }
    };
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
pub fn netns_inum(net: u64) -> u32 {
    read::<u32>(net, conf!(net_inum)).unwrap_or(0)
}
