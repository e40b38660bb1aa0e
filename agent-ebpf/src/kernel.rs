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

/// How a program reads the kernel structs its hook hands it.
pub trait Mem {
    /// Whether the drop program's frame leaves room for subprograms' (counting, VIP lookups):
    /// 6.1 allows 512 bytes for a chain of calls, and every probe read needs a stack buffer.
    const ROOM_FOR_CALLS: bool;

    /// Reads a `T` at `base + off`; fails for a null base or an offset the BTF did not provide.
    fn read<T: Copy>(base: u64, off: u32) -> Result<T, i32>;
}

/// `bpf_probe_read_kernel`: any address will do (classic tracepoints hand out plain numbers).
pub struct Probe;

/// A plain load. A tp_btf argument is a BTF-typed pointer, and so is every struct pointer read
/// through one: the verifier checks each load against the kernel's layout (the offsets are
/// constants to it, from the frozen `CONFIG`) and turns faults into zeroes. No helper call:
/// this is what keeps the per-packet hooks cheap.
pub struct Btf;

impl Mem for Probe {
    const ROOM_FOR_CALLS: bool = false;

    #[inline(always)]
    fn read<T: Copy>(base: u64, off: u32) -> Result<T, i32> {
        read(base, off)
    }
}

impl Mem for Btf {
    const ROOM_FOR_CALLS: bool = true;

    #[inline(always)]
    fn read<T: Copy>(base: u64, off: u32) -> Result<T, i32> {
        if base == 0 || off == OFFSET_UNKNOWN {
            return Err(-1);
        }
        // SAFETY: `base` is a BTF-typed kernel pointer; the verifier checks the access.
        Ok(unsafe { core::ptr::read_volatile((base + u64::from(off)) as *const T) })
    }
}

/// `struct net *` → `net->ns.inum`.
#[inline(always)]
pub fn netns_inum<M: Mem>(net: u64) -> u32 {
    M::read::<u32>(net, conf!(net_inum)).unwrap_or(0)
}
