//! Attribution in the kernel: which VIP a drop belongs to, from the packet's own addresses or,
//! behind NAT, its flow's original tuple.
//!
//! Every drop pays this path, so it reads as little as it can: no header at all when no VIP is
//! configured, only the two addresses when one is, and conntrack or the NAT map only when the
//! packet itself carries no VIP. A per-CPU cache answers for addresses a CPU met before.

use agent_common::{
    DropRecord, AGG_FLAG_MULTICAST, CT_FLAG_ENTRY, CT_FLAG_NAT_JOIN, FAMILY_IPV4, FAMILY_IPV6,
    VIP_META_GEN_SHIFT, VIP_META_IPV4, VIP_META_IPV6, VIP_META_POOL4, VIP_META_POOL6,
};
use aya_ebpf::maps::{lpm_trie::Key, HashMap, LpmTrie};

use crate::{
    conf,
    drop::parse_into,
    kernel::{read, Mem},
    maps::{VIPS4, VIPS6, VIP_ADDRS4, VIP_ADDRS6, VIP_CACHE, VIP_META},
    packet::{host_listed, ETH_IPV4, ETH_IPV6, HEADER_UNSET},
};

/// Whether `addr` is a VIP: a single one (hash lookup), else, when pools are set, inside one
/// (trie walk). Keys are words, not bytes: the program builds them in one or four moves.
#[inline(always)]
fn is_vip<K: Copy>(
    addrs: &HashMap<K, u8>,
    pools: &LpmTrie<K, u8>,
    addr: &K,
    has_pools: bool,
) -> bool {
    if addrs.get_ptr(addr).is_some() {
        return true;
    }
    has_pools
        && pools
            .get(Key::new((size_of::<K>() * 8) as u32, *addr))
            .is_some()
}

/// A VIP (family 0: none) and the `AGG_FLAG_*` its packet earned: what attribution adds to a
/// key. Never an `Option`: the payload of a `None` is undefined, and the compiler then copies
/// whatever register it likes, which the verifier rejects as unreadable.
#[derive(Clone, Copy, Default)]
pub struct Vip {
    pub addr: [u32; 4],
    pub family: u8,
    pub flags: u8,
}

impl Vip {
    #[inline(always)]
    fn found(self) -> bool {
        self.family != 0
    }
}

/// What attribution needs of `VIP_META`: which maps hold entries, and their generation.
#[derive(Clone, Copy)]
pub struct Meta {
    pub bits: u32,
    generation: u32,
}

/// A slot of `VIP_CACHE`: whether `addr` is a VIP, as of a generation of the VIP maps.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct VipCacheSlot {
    pub addr: [u32; 4],
    pub generation: u32,
    pub family: u8,
    pub is_vip: u8,
    pub _pad0: [u8; 2],
}

/// Slots of the per-CPU direct-mapped cache of VIP lookups (a power of two).
pub const VIP_CACHE_SLOTS: u32 = 64;

/// This CPU's `VIP_CACHE` slot for an address whose words xor to `h`.
#[inline(always)]
fn cache_slot(h: u32) -> Option<&'static mut VipCacheSlot> {
    let h = h ^ (h >> 16);
    let slot = VIP_CACHE.get_ptr_mut((h ^ (h >> 8)) & (VIP_CACHE_SLOTS - 1))?;
    // SAFETY: this CPU's slot; programs do not nest on one CPU.
    Some(unsafe { &mut *slot })
}

/// Whether `slot` answers for `family` at the maps' current generation (its address checked
/// by the caller).
#[inline(always)]
fn current(slot: &VipCacheSlot, family: u8, meta: Meta) -> bool {
    slot.generation == meta.generation && slot.family == family
}

/// Keeps `is_vip` as the slot's answer for `addr` at the maps' current generation.
#[inline(always)]
fn keep(slot: &mut VipCacheSlot, addr: [u32; 4], family: u8, meta: Meta, is_vip: bool) -> bool {
    slot.addr = addr;
    slot.generation = meta.generation;
    slot.family = family;
    slot.is_vip = u8::from(is_vip);
    is_vip
}

/// Whether the IPv4 `addr` is a VIP: this CPU's cached answer when it is of the maps' current
/// generation, else the maps', then cached. A hit costs no hash: most drops a CPU meets are to
/// or from a handful of addresses. The address stays a word: no array on the stack.
#[inline(always)]
fn cached4(addr: u32, meta: Meta) -> bool {
    let lookup = || is_vip(&VIP_ADDRS4, &VIPS4, &addr, meta.bits & VIP_META_POOL4 != 0);
    let Some(slot) = cache_slot(addr) else {
        return lookup();
    };
    if slot.addr[0] == addr && current(slot, FAMILY_IPV4, meta) {
        return slot.is_vip != 0;
    }
    keep(slot, [addr, 0, 0, 0], FAMILY_IPV4, meta, lookup())
}

/// [`cached4`] for an IPv6 address.
#[inline(always)]
fn cached6(addr: &[u32; 4], meta: Meta) -> bool {
    let lookup = || is_vip(&VIP_ADDRS6, &VIPS6, addr, meta.bits & VIP_META_POOL6 != 0);
    let Some(slot) = cache_slot(addr[0] ^ addr[1] ^ addr[2] ^ addr[3]) else {
        return lookup();
    };
    let a = &slot.addr;
    // One branch, not four: each would double the states the verifier walks after it.
    let same = (a[0] ^ addr[0]) | (a[1] ^ addr[1]) | (a[2] ^ addr[2]) | (a[3] ^ addr[3]) == 0;
    if same && current(slot, FAMILY_IPV6, meta) {
        return slot.is_vip != 0;
    }
    keep(slot, *addr, FAMILY_IPV6, meta, lookup())
}

/// [`cached4`] as a function of its own, for the verifier: the paths through the cache and the
/// maps are walked once per call, not once per path after it (`watch --host` came near the
/// limit with them inlined). The map's bits and generation come as plain numbers.
#[inline(never)]
fn cached4_call(addr: u32, bits: u32, generation: u32) -> u32 {
    u32::from(cached4(addr, Meta { bits, generation }))
}

/// [`cached6`] as a function of its own (see [`cached4_call`]).
#[inline(never)]
fn cached6_call(addr: &[u32; 4], bits: u32, generation: u32) -> u32 {
    u32::from(cached6(addr, Meta { bits, generation }))
}

/// `addr` of `family` as the drop's VIP when `is_vip`, else none.
#[inline(always)]
fn vip_if(is_vip: bool, addr: [u32; 4], family: u8) -> Vip {
    if !is_vip {
        return Vip::default();
    }
    Vip {
        addr,
        family,
        flags: 0,
    }
}

#[inline(always)]
fn take4<M: Mem>(addr: u32, meta: Meta) -> Vip {
    let is_vip = if M::ROOM_FOR_CALLS {
        cached4_call(addr, meta.bits, meta.generation) != 0
    } else {
        cached4(addr, meta)
    };
    vip_if(is_vip, [addr, 0, 0, 0], FAMILY_IPV4)
}

#[inline(always)]
fn take6<M: Mem>(addr: &[u32; 4], meta: Meta) -> Vip {
    let is_vip = if M::ROOM_FOR_CALLS {
        cached6_call(addr, meta.bits, meta.generation) != 0
    } else {
        cached6(addr, meta)
    };
    vip_if(is_vip, *addr, FAMILY_IPV6)
}

/// The first of a destination and a source that is a VIP.
#[inline(always)]
fn take_either<M: Mem>(family: u8, dst: &[u32; 4], src: &[u32; 4], meta: Meta) -> Vip {
    match family {
        FAMILY_IPV4 if meta.bits & VIP_META_IPV4 != 0 => {
            let vip = take4::<M>(dst[0], meta);
            if vip.found() {
                vip
            } else {
                take4::<M>(src[0], meta)
            }
        }
        FAMILY_IPV6 if meta.bits & VIP_META_IPV6 != 0 => {
            let vip = take6::<M>(dst, meta);
            if vip.found() {
                vip
            } else {
                take6::<M>(src, meta)
            }
        }
        _ => Vip::default(),
    }
}

/// Bytes as the words they are in memory (network byte order kept).
#[inline(always)]
fn words(b: &[u8; 16]) -> [u32; 4] {
    // SAFETY: same size; any bit pattern is valid.
    unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(*b) }
}

/// A packet's own addresses, in network byte order (IPv4 in the first word).
pub struct Addrs {
    family: u8,
    dst: [u32; 4],
    src: [u32; 4],
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
    if proto == ETH_IPV4 {
        // saddr and daddr: the 8 bytes at offset 12 of the IPv4 header, as two words.
        let a = read::<[u32; 2]>(l3, 12).ok()?;
        return Some(Addrs {
            family: FAMILY_IPV4,
            dst: [a[1], 0, 0, 0],
            src: [a[0], 0, 0, 0],
        });
    }
    if proto == ETH_IPV6 {
        // saddr then daddr: the 32 bytes at offset 8 of the IPv6 header.
        let a = read::<[[u32; 4]; 2]>(l3, 8).ok()?;
        return Some(Addrs {
            family: FAMILY_IPV6,
            dst: a[1],
            src: a[0],
        });
    }
    None
}

/// The host filter from the packet's own addresses: `true` when one is listed. A packet whose
/// addresses are not may still match through its flow's original tuple (behind NAT): the
/// caller then reads the whole record.
#[inline(always)]
pub fn hosts_listed(a: &Addrs) -> bool {
    // SAFETY: same size; any bit pattern is valid.
    let bytes = |w: &[u32; 4]| unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(*w) };
    host_listed(&bytes(&a.dst), a.family) || host_listed(&bytes(&a.src), a.family)
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

/// Attributes by the packet's own destination, then source, with the multicast flag.
#[inline(always)]
fn by_packet<M: Mem>(a: &Addrs, meta: Meta) -> Vip {
    let mut vip = take_either::<M>(a.family, &a.dst, &a.src, meta);
    // The first byte in memory is the word's low byte (little-endian BPF).
    let first = a.dst[0] as u8;
    vip.flags = match a.family {
        FAMILY_IPV4 => mcast4(first),
        FAMILY_IPV6 => mcast6(first),
        _ => 0,
    };
    vip
}

/// Which VIP maps hold entries (`bits` 0: none, attribution reads nothing), and their
/// generation.
#[inline(always)]
pub fn vip_meta() -> Meta {
    let v = VIP_META.get(0).copied().unwrap_or(0);
    Meta {
        bits: v as u32,
        generation: (v >> VIP_META_GEN_SHIFT) as u32,
    }
}

/// The drop's VIP, in the order userspace attributes: the packet's destination, its source
/// (`addrs`, read by the caller), then (only when the packet carries none and the flow is
/// translated) conntrack's original tuple or the NAT map's. With `must_parse` (a packet filter
/// needs the headers) the whole record is read first. Returns the VIP (family 0 for none) and
/// whether the record was read.
#[inline(always)]
pub fn attribute<M: Mem>(
    skb: u64,
    (addrs, meta): (Option<&Addrs>, Meta),
    rec: &mut DropRecord,
    must_parse: bool,
) -> (Vip, bool) {
    let mut vip = match addrs {
        Some(a) if meta.bits != 0 => by_packet::<M>(a, meta),
        _ => Vip::default(),
    };
    let via_tuple = !vip.found() && meta.bits != 0 && crate::conntrack::translated::<M>(skb);
    if !(must_parse || via_tuple) {
        return (vip, false);
    }
    parse_into::<M>(skb, rec);
    if via_tuple && rec.ct_flags & (CT_FLAG_ENTRY | CT_FLAG_NAT_JOIN) != 0 {
        let o = &rec.orig;
        let flags = vip.flags;
        vip = take_either::<M>(o.family, &words(&o.daddr), &words(&o.saddr), meta);
        vip.flags = flags;
    }
    (vip, true)
}
