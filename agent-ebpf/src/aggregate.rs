//! Aggregation mode (the agent): every drop counted in `AGG` by what the metrics expose, and
//! only a bounded number of samples per key and second sent through the ring.
//!
//! Every drop pays this path, so it reads as little as it can: no header at all when no VIP is
//! configured, only the two addresses when one is, and conntrack or the NAT map only when the
//! packet itself carries no VIP.

use agent_common::{
    AggKey, AggSlot, AggValue, DropRecord, AGG_FAST_SLOTS, AGG_FLAG_MULTICAST, CT_FLAG_ENTRY,
    CT_FLAG_NAT_JOIN, FAMILY_IPV4, FAMILY_IPV6, FEATURE_AGG_FAST, FEATURE_MEMBERLIST,
    STAT_AGG_FULL, VIP_META_IPV4, VIP_META_IPV6, VIP_META_POOL4, VIP_META_POOL6,
};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_jiffies64, bpf_ktime_get_ns},
    maps::{lpm_trie::Key, HashMap, LpmTrie},
};

use crate::{
    conf,
    drop::{parse_into, Drop},
    kernel::{read, Mem},
    maps::{stat_inc, AGG, AGG_FAST, VIPS4, VIPS6, VIP_ADDRS4, VIP_ADDRS6, VIP_META},
    packet::{host_listed, ETH_IPV4, ETH_IPV6, HEADER_UNSET},
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

/// Whether `addr` is a VIP: a single one (hash lookup), else, when pools are set, inside one
/// (trie walk).
#[inline(always)]
fn is_vip<const N: usize>(
    addrs: &HashMap<[u8; N], u8>,
    pools: &LpmTrie<[u8; N], u8>,
    addr: &[u8; N],
    has_pools: bool,
) -> bool {
    if addrs.get_ptr(addr).is_some() {
        return true;
    }
    has_pools && pools.get(Key::new((N * 8) as u32, *addr)).is_some()
}

#[inline(always)]
fn vip4(addr: [u8; 4], meta: u32) -> bool {
    is_vip(&VIP_ADDRS4, &VIPS4, &addr, meta & VIP_META_POOL4 != 0)
}

#[inline(always)]
fn vip6(addr: &[u8; 16], meta: u32) -> bool {
    is_vip(&VIP_ADDRS6, &VIPS6, addr, meta & VIP_META_POOL6 != 0)
}

#[inline(always)]
fn take4(key: &mut AggKey, addr: [u8; 4], meta: u32) -> bool {
    if !vip4(addr, meta) {
        return false;
    }
    key.vip = [u32::from_ne_bytes(addr), 0, 0, 0];
    key.family = FAMILY_IPV4;
    true
}

#[inline(always)]
fn take6(key: &mut AggKey, addr: &[u8; 16], meta: u32) -> bool {
    if !vip6(addr, meta) {
        return false;
    }
    // SAFETY: [u8; 16] and [u32; 4] have the same size; any bit pattern is valid.
    key.vip = unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(*addr) };
    key.family = FAMILY_IPV6;
    true
}

/// Sets `key`'s VIP to the first of `addrs` that is one.
#[inline(always)]
fn take_tuple(key: &mut AggKey, family: u8, daddr: &[u8; 16], saddr: &[u8; 16], meta: u32) {
    match family {
        FAMILY_IPV4 if meta & VIP_META_IPV4 != 0 => {
            let _ = take4(key, [daddr[0], daddr[1], daddr[2], daddr[3]], meta)
                || take4(key, [saddr[0], saddr[1], saddr[2], saddr[3]], meta);
        }
        FAMILY_IPV6 if meta & VIP_META_IPV6 != 0 => {
            let _ = take6(key, daddr, meta) || take6(key, saddr, meta);
        }
        _ => {}
    }
}

/// A packet's own addresses, as the host filter keys them (IPv4 in the first four bytes).
pub struct Addrs {
    family: u8,
    dst: [u8; 16],
    src: [u8; 16],
}

/// Reads the packet's addresses in one small block at the network header (IPv4 and IPv6).
#[inline(always)]
pub fn packet_addrs<M: Mem>(skb: u64) -> Option<Addrs> {
    let (Ok(proto), Ok(head), Ok(nh)) = (
        M::read::<u16>(skb, conf!(skb_protocol)),
        M::read::<u64>(skb, conf!(skb_head)),
        M::read::<u16>(skb, conf!(skb_network_header)),
    ) else {
        return None;
    };
    if nh == HEADER_UNSET {
        return None;
    }
    let l3 = head + u64::from(nh);
    let mut out = Addrs {
        family: 0,
        dst: [0; 16],
        src: [0; 16],
    };
    if proto == ETH_IPV4 {
        // saddr and daddr: the 8 bytes at offset 12 of the IPv4 header.
        let a = read::<[u8; 8]>(l3, 12).ok()?;
        out.family = FAMILY_IPV4;
        out.src[..4].copy_from_slice(&a[..4]);
        out.dst[..4].copy_from_slice(&a[4..]);
        return Some(out);
    }
    if proto == ETH_IPV6 {
        // saddr then daddr: the 32 bytes at offset 8 of the IPv6 header.
        let a = read::<[u8; 32]>(l3, 8).ok()?;
        out.family = FAMILY_IPV6;
        out.src.copy_from_slice(&a[..16]);
        out.dst.copy_from_slice(&a[16..]);
        return Some(out);
    }
    None
}

/// The host filter from the packet's own addresses: `true` when one is listed. A packet whose
/// addresses are not may still match through its flow's original tuple (behind NAT): the
/// caller then reads the whole record.
#[inline(always)]
pub fn hosts_listed(a: &Addrs) -> bool {
    host_listed(&a.dst, a.family) || host_listed(&a.src, a.family)
}

/// `AGG_FLAG_MULTICAST` when the destination's first byte is multicast's: arithmetic, not a
/// branch, so the verifier does not follow two states from here on.
#[inline(always)]
fn mcast4(first: u8) -> u8 {
    // 224.0.0.0/4: the top nibble is 0xe. (n ^ 0xe) + 15 reaches 16 unless it is zero.
    let n = u32::from(first >> 4) ^ 0xe;
    (1 ^ ((n + 15) >> 4)) as u8 & AGG_FLAG_MULTICAST
}

#[inline(always)]
fn mcast6(first: u8) -> u8 {
    // ff00::/8: only 0xff + 1 reaches 256.
    ((u32::from(first) + 1) >> 8) as u8 & AGG_FLAG_MULTICAST
}

/// Attributes by the packet's own destination, then source. Returns whether a VIP was found.
#[inline(always)]
fn by_packet(a: &Addrs, key: &mut AggKey, meta: u32) -> bool {
    if a.family == FAMILY_IPV4 && meta & VIP_META_IPV4 != 0 {
        let (d, s) = (&a.dst, &a.src);
        key.flags |= mcast4(d[0]);
        return take4(key, [d[0], d[1], d[2], d[3]], meta)
            || take4(key, [s[0], s[1], s[2], s[3]], meta);
    }
    if a.family == FAMILY_IPV6 && meta & VIP_META_IPV6 != 0 {
        key.flags |= mcast6(a.dst[0]);
        return take6(key, &a.dst, meta) || take6(key, &a.src, meta);
    }
    false
}

/// Which families the VIP tries hold (0: none, attribution reads nothing).
#[inline(always)]
pub fn vip_meta() -> u32 {
    VIP_META.get(0).copied().unwrap_or(0)
}

/// The drop's VIP, in the order userspace attributes: the packet's destination, its source
/// (`addrs`, read by the caller), then (only when the packet carries none and the flow is
/// translated) conntrack's original tuple or the NAT map's. With `must_parse` (a packet filter
/// needs the headers) the whole record is read first. Returns whether the record was read.
#[inline(always)]
pub fn attribute<M: Mem>(
    skb: u64,
    (addrs, meta): (Option<&Addrs>, u32),
    key: &mut AggKey,
    rec: &mut DropRecord,
    must_parse: bool,
) -> bool {
    let found = meta != 0 && addrs.is_some_and(|a| by_packet(a, key, meta));
    let via_tuple = !found && meta != 0 && crate::conntrack::translated::<M>(skb);
    if !(must_parse || via_tuple) {
        return false;
    }
    parse_into::<M>(skb, rec);
    if via_tuple && rec.ct_flags & (CT_FLAG_ENTRY | CT_FLAG_NAT_JOIN) != 0 {
        let o = &rec.orig;
        take_tuple(key, o.family, &o.daddr, &o.saddr, meta);
    }
    true
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

/// The key of a drop, before attribution.
#[inline(always)]
pub fn key(d: &Drop, event: u8) -> AggKey {
    AggKey {
        vip: [0; 4],
        family: 0,
        ct_event: event,
        flags: 0,
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
/// key's. A function of its own: the verifier walks it once per call, not once per path
/// after it, which keeps `kfree_skb` well inside the verifier's limit.
#[inline(never)]
fn count_fast(key: &AggKey, always: bool) -> u32 {
    fast_value(key).map_or(0, |v| tally(v, always) as u32)
}

/// Counts the drop under its key, in this CPU's fast slot or else in `AGG`; `always`
/// (memberlist traffic) is sent whatever the limit.
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "by value, the key and value are copied again on the 512-byte BPF stack"
)]
pub fn count(key: &AggKey, always: bool) -> Outcome {
    if conf!(features) & FEATURE_AGG_FAST != 0 {
        match count_fast(key, always) {
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
