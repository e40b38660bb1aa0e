//! Aggregation mode (the agent): every drop counted in `AGG` by what the metrics expose, and
//! only a bounded number of samples per key and second sent through the ring.
//!
//! Every drop pays this path, so it reads as little as it can: no header at all when no VIP is
//! configured, only the two addresses when one is, and conntrack or the NAT map only when the
//! packet itself carries no VIP.

use agent_common::{
    AggKey, AggValue, DropRecord, AGG_FLAG_MULTICAST, CT_FLAG_ENTRY, CT_FLAG_NAT_JOIN, FAMILY_IPV4,
    FAMILY_IPV6, FEATURE_MEMBERLIST, STAT_AGG_FULL, VIP_META_IPV4, VIP_META_IPV6, VIP_META_POOL4,
    VIP_META_POOL6,
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
    maps::{stat_inc, AGG, VIPS4, VIPS6, VIP_ADDRS4, VIP_ADDRS6, VIP_META},
    packet::{host_listed, ETH_IPV4, ETH_IPV6, HEADER_UNSET},
};

/// What becomes of a drop once counted.
pub enum Outcome {
    /// Counted in `AGG`; send it as a sample.
    Sample,
    /// Counted in `AGG`; memberlist traffic: send it whatever the sample limit.
    Memberlist,
    /// Counted in `AGG`; over this key's sample limit.
    Skip,
    /// `AGG` is full: send it unaggregated, so userspace still counts it.
    Unaggregated,
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

/// Counts the drop under its key; `always` (memberlist traffic) is sent whatever the limit.
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "by value, the key and value are copied again on the 512-byte BPF stack"
)]
pub fn count(key: &AggKey, always: bool) -> Outcome {
    if let Some(v) = AGG.get_ptr_mut(key) {
        // SAFETY: this CPU's slot; programs do not nest on one CPU.
        let v = unsafe { &mut *v };
        v.count += 1;
        return if always {
            Outcome::Memberlist
        } else {
            sample(v)
        };
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
        let v = unsafe { &mut *v };
        v.count += 1;
        return if always {
            Outcome::Memberlist
        } else {
            sample(v)
        };
    }
    stat_inc(STAT_AGG_FULL);
    Outcome::Unaggregated
}
