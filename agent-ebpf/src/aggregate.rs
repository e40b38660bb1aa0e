//! Aggregation mode (the agent): every drop counted in `AGG` by what the metrics expose, and
//! only a bounded number of samples per key and second sent through the ring.

use agent_common::{
    AggKey, AggSlot, AggValue, AGG_FAST_SLOTS, FEATURE_AGG_FAST, FEATURE_MEMBERLIST, STAT_AGG_FULL,
};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_jiffies64, bpf_ktime_get_ns},
};

use crate::{
    attribution::Vip,
    conf,
    drop::Drop,
    kernel::{read, Mem},
    maps::{stat_inc, AGG, AGG_FAST},
    packet::HEADER_UNSET,
};

/// What becomes of a drop once counted (numbered from 1: a subprogram returns 0 for none).
#[repr(u32)]
#[derive(Clone, Copy)]
pub enum Outcome {
    /// Counted; send it as a sample.
    Sample = 1,
    /// Counted; memberlist traffic: send it whatever the sample limit.
    Memberlist = 2,
    /// Counted; over this key's sample limit.
    Skip = 3,
    /// `AGG` is full: send it unaggregated, so userspace still counts it.
    Unaggregated = 4,
}

impl Outcome {
    /// The outcome a subprogram returned as its number.
    #[inline(always)]
    fn from_code(code: u32) -> Self {
        match code {
            1 => Self::Sample,
            2 => Self::Memberlist,
            3 => Self::Skip,
            _ => Self::Unaggregated,
        }
    }
}

/// Whether a drop without a VIP is memberlist traffic (a port of it is the memberlist port):
/// one 4-byte read at the transport header, only when the feature is on.
#[inline(always)]
pub fn memberlist<M: Mem>(skb: u64) -> bool {
    if conf!(features) & FEATURE_MEMBERLIST == 0 {
        return false;
    }
    // One read after the other: see `handle_drop` on 6.1's verifier and merged checks.
    let Ok(head) = M::read::<u64>(skb, conf!(skb_head)) else {
        return false;
    };
    let Ok(th) = M::read::<u16>(skb, conf!(skb_transport_header)) else {
        return false;
    };
    if th == HEADER_UNSET {
        return false;
    }
    let Ok(p) = read::<[u8; 4]>(head + u64::from(th), 0) else {
        return false;
    };
    let port = conf!(memberlist_port);
    u16::from_be_bytes([p[0], p[1]]) == port || u16::from_be_bytes([p[2], p[3]]) == port
}

/// The current sampling window, about a second: 2^`window_shift` jiffies (inlined by the JIT:
/// no clock read, no division), or 2^30 ns when the agent could not tell the tick rate.
#[inline(always)]
fn window() -> u64 {
    let shift = conf!(window_shift);
    // SAFETY: plain helpers without arguments.
    unsafe {
        if shift != 0 {
            bpf_jiffies64() >> (shift & 31)
        } else {
            bpf_ktime_get_ns() >> 30
        }
    }
}

/// Takes a sample when this key's window has room.
#[inline(always)]
fn sample(v: &mut AggValue) -> Outcome {
    let limit = conf!(sample_limit);
    if limit == 0 {
        return Outcome::Sample;
    }
    let now = window();
    if v.window != now {
        v.window = now;
        v.samples = 0;
    }
    if v.samples < limit {
        v.samples += 1;
        Outcome::Sample
    } else {
        Outcome::Skip
    }
}

/// The key of an attributed drop.
#[inline(always)]
pub fn key(d: &Drop, event: u8, vip: Vip) -> AggKey {
    AggKey {
        vip: vip.addr,
        family: vip.family,
        ct_event: event,
        flags: vip.flags,
        _pad0: 0,
        reason: d.reason,
        location: d.location,
    }
}

/// The `AGG_FAST` slot of a key: call sites lie bytes apart, so the location's low bits, with
/// the reason, event and VIP's outer words, spread the keys a CPU meets.
#[inline(always)]
fn slot_of(key: &AggKey) -> u32 {
    let l = key.location;
    let h = (l ^ (l >> 7) ^ (l >> 13)) as u32
        ^ key.reason
        ^ (u32::from(key.ct_event) << 3)
        ^ key.vip[0]
        ^ key.vip[3];
    (h ^ (h >> 16)) & (AGG_FAST_SLOTS - 1)
}

/// Whether two keys are equal, as four words (the padding is always zero).
#[inline(always)]
fn same(a: &AggKey, b: &AggKey) -> bool {
    // SAFETY: AggKey is 32 bytes of plain integers, 8-aligned.
    let (a, b) = unsafe {
        (
            &*(a as *const AggKey).cast::<[u64; 4]>(),
            &*(b as *const AggKey).cast::<[u64; 4]>(),
        )
    };
    // One branch, not four: each would double the states the verifier walks after it.
    (a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) == 0
}

/// This CPU's `AGG_FAST` slot for the key, claimed if free; `None` when another key has it.
#[inline(always)]
fn fast_value(key: &AggKey) -> Option<&'static mut AggValue> {
    let slot = AGG_FAST.get_ptr_mut(slot_of(key))?;
    // SAFETY: this CPU's slot; programs do not nest on one CPU.
    let slot: &mut AggSlot = unsafe { &mut *slot };
    // SAFETY: plain fields of our own slot. Volatile: `used` is written after the rest, and the
    // reader copies the slot in address order, so it never sees a claimed slot half written.
    unsafe {
        if core::ptr::read_volatile(&raw const slot.used) == 0 {
            core::ptr::write_volatile(&raw mut slot.key, *key);
            core::ptr::write_volatile(&raw mut slot.value, AggValue::default());
            core::ptr::write_volatile(&raw mut slot.used, 1);
        }
    }
    same(&slot.key, key).then_some(&mut slot.value)
}

/// Counts the drop in `v`: memberlist traffic is sent whatever the limit, the rest sampled.
#[inline(always)]
fn tally(v: &mut AggValue, always: bool) -> Outcome {
    v.count += 1;
    if always {
        Outcome::Memberlist
    } else {
        sample(v)
    }
}

/// Counts in the fast slot when it is the key's: the outcome, or 0 when the slot is another
/// key's.
#[inline(always)]
fn count_fast_inline(key: &AggKey, always: bool) -> u32 {
    fast_value(key).map_or(0, |v| tally(v, always) as u32)
}

/// [`count_fast_inline`] as a function of its own: the verifier walks it once per call, not
/// once per path after it, which keeps `kfree_skb` well inside the verifier's limit.
#[inline(never)]
fn count_fast(key: &AggKey, always: bool) -> u32 {
    count_fast_inline(key, always)
}

/// Counts the drop under its key, in this CPU's fast slot or else in `AGG`; `always`
/// (memberlist traffic) is sent whatever the limit.
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "by value, the key and value are copied again on the 512-byte BPF stack"
)]
pub fn count<M: Mem>(key: &AggKey, always: bool) -> Outcome {
    if conf!(features) & FEATURE_AGG_FAST != 0 {
        let code = if M::ROOM_FOR_CALLS {
            count_fast(key, always)
        } else {
            count_fast_inline(key, always)
        };
        match code {
            0 => {}
            code => return Outcome::from_code(code),
        }
    }
    if let Some(v) = AGG.get_ptr_mut(key) {
        // SAFETY: this CPU's slot; programs do not nest on one CPU.
        return tally(unsafe { &mut *v }, always);
    }
    let first = AggValue {
        count: 1,
        window: window(),
        samples: 1,
        _pad0: 0,
    };
    if AGG.insert(key, &first, u64::from(BPF_NOEXIST)).is_ok() {
        return if always {
            Outcome::Memberlist
        } else {
            Outcome::Sample
        };
    }
    // Another CPU created the key (this CPU's slot starts at zero), or the map is full.
    if let Some(v) = AGG.get_ptr_mut(key) {
        // SAFETY: as above.
        return tally(unsafe { &mut *v }, always);
    }
    stat_inc(STAT_AGG_FULL);
    Outcome::Unaggregated
}
