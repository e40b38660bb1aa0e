//! Conntrack's own verdicts, where the kernel allows kprobes: `__nf_conntrack_confirm` returning
//! NF_DROP is an insert failure, `__nf_conntrack_alloc` returning an error is a full table. Each
//! is kept in this CPU's `CT_VERDICT` slot for the NETFILTER_DROP that `nf_hook_slow` frees
//! right after, in the same call chain. Exact where the statistics can only tell that a counter
//! of the namespace moved, and cheaper for kfree_skb: one per-CPU array read.

use agent_common::{CtEvent, CtVerdict};

use crate::{conntrack::has_entry, kernel::Mem, maps::CT_VERDICT};

/// `NF_DROP`: what `__nf_conntrack_confirm` returns when the entry could not be inserted.
const NF_DROP: i32 = 0;
/// `IS_ERR_VALUE`: the top 4095 addresses are negative errnos.
const MAX_ERRNO: u64 = 4095;

#[inline(always)]
fn slot() -> Option<&'static mut CtVerdict> {
    // SAFETY: this CPU's slot; programs do not nest on one CPU.
    CT_VERDICT.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// kprobe `__nf_conntrack_confirm(skb)`.
#[inline(always)]
pub fn confirm_entry(skb: u64) {
    if let Some(v) = slot() {
        v.confirming = skb;
    }
}

/// kretprobe `__nf_conntrack_confirm`: remember the skb it refused.
#[inline(always)]
pub fn confirm_return(ret: i32) {
    if let Some(v) = slot() {
        let skb = v.confirming;
        v.confirming = 0;
        if ret == NF_DROP && skb != 0 {
            v.refused = skb;
        }
    }
}

/// kprobe `__nf_conntrack_alloc(net, ...)`.
#[inline(always)]
pub fn alloc_entry(net: u64) {
    if let Some(v) = slot() {
        v.allocating = net;
    }
}

/// kretprobe `__nf_conntrack_alloc`: an error pointer means the table was full (or memory
/// ran out, which the kernel counts as the same `drop`).
#[inline(always)]
pub fn alloc_return(ret: u64) {
    if let Some(v) = slot() {
        let net = v.allocating;
        v.allocating = 0;
        if ret >= MAX_ERRNO.wrapping_neg() && net != 0 {
            v.full = net;
        }
    }
}

/// The conntrack event of this NETFILTER_DROP from the hooks' verdicts, or `None` when the
/// hooks are not in use (then the statistics decide). A verdict is taken once.
#[inline(always)]
pub fn classify<M: Mem>(skb: u64, net: u64) -> Option<u8> {
    let v = slot()?;
    if v.hooked == 0 {
        return None;
    }
    if v.refused != 0 && v.refused == skb {
        v.refused = 0;
        return Some(CtEvent::InsertFailed as u8);
    }
    // The packet whose entry could not be allocated carries none.
    if v.full != 0 && v.full == net && !has_entry::<M>(skb) {
        v.full = 0;
        return Some(CtEvent::TableFull as u8);
    }
    Some(0)
}
