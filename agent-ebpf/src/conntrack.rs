//! Conntrack: the entry an skb carries, whether conntrack caused a NETFILTER_DROP, and the NAT
//! map that ties translated flows back to their VIP.

use agent_common::{
    CtEvent, CtStatKey, CtStatValue, DropRecord, NatOrigin, PacketInfo, Tuple, CT_FLAG_CONFIRMED,
    CT_FLAG_DNAT, CT_FLAG_ENTRY, CT_FLAG_NAT_JOIN, CT_FLAG_SNAT, FAMILY_IPV4, FAMILY_IPV6,
    FEATURE_NAT_CAPTURE, STAT_CT_NO_BASELINE, STAT_NAT_LEARNED,
};
use aya_ebpf::helpers::bpf_probe_read_kernel;

use crate::{
    conf,
    kernel::{read, Mem},
    maps::{stat_inc, CPU_OFFSET, CT_CACHE, CT_LAST, NAT, STATS},
    packet::{flow_of, parse_packet, skb_net},
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
/// `enum ip_conntrack_info`: a packet of a new, unreplied connection (original direction).
const IP_CT_NEW: u64 = 2;
/// `enum ip_conntrack_status` bits.
const IPS_CONFIRMED: u64 = 1 << 3;
const IPS_SRC_NAT: u64 = 1 << 4;
const IPS_DST_NAT: u64 = 1 << 5;
const IPS_TEMPLATE: u64 = 1 << 11;
/// `skb->_nfct` keeps `ip_conntrack_info` in its low bits.
const NFCT_INFOMASK: u64 = 7;

/// Set once the NAT map holds a translation (a writable global: reading it costs no helper).
#[unsafe(no_mangle)]
static mut NAT_LEARNED: u32 = 0;

#[inline(always)]
fn nat_learned() -> bool {
    // SAFETY: a plain global, read volatile so the compiler does not assume its initial value.
    unsafe { core::ptr::read_volatile(&raw const NAT_LEARNED) != 0 }
}

/// Bytes read for one `nf_conntrack_tuple` (40 on the kernels we know); the agent turns the
/// conntrack feature off when a member lies beyond it.
pub const TUPLE_BYTES: usize = 48;

/// A `T` at `off` in `bytes`, when it lies inside.
#[inline(always)]
fn field<T: Copy>(bytes: &[u8; TUPLE_BYTES], off: u32) -> Option<T> {
    let off = off as usize;
    if off + size_of::<T>() > TUPLE_BYTES {
        return None;
    }
    // SAFETY: in bounds (checked above); any bit pattern is a valid integer or byte array.
    Some(unsafe { bytes.as_ptr().add(off).cast::<T>().read_unaligned() })
}

/// Reads the `nf_conntrack_tuple` at `t` into `out` with one read of the whole tuple, then
/// takes its members at their BTF offsets.
#[inline(always)]
fn read_tuple(t: u64, out: &mut Tuple) {
    let Ok(b) = read::<[u8; TUPLE_BYTES]>(t, 0) else {
        return;
    };
    out.family = match field::<u16>(&b, conf!(tuple_l3num)).unwrap_or(0) {
        AF_INET => FAMILY_IPV4,
        AF_INET6 => FAMILY_IPV6,
        _ => 0,
    };
    out.saddr = field(&b, conf!(tuple_src_addr)).unwrap_or([0; 16]);
    out.daddr = field(&b, conf!(tuple_dst_addr)).unwrap_or([0; 16]);
    out.sport = u16::from_be(field(&b, conf!(tuple_src_port)).unwrap_or(0));
    out.dport = u16::from_be(field(&b, conf!(tuple_dst_port)).unwrap_or(0));
    out.proto = field(&b, conf!(tuple_protonum)).unwrap_or(0);
    out._pad0 = [0; 2];
}

/// `skb->_nfct`: the `nf_conn *` with `ip_conntrack_info` in its low bits.
#[inline(always)]
fn skb_nfct<M: Mem>(skb: u64) -> Option<(u64, u64)> {
    let nfct = M::read::<u64>(skb, conf!(skb_nfct)).ok()?;
    let ct = nfct & !NFCT_INFOMASK;
    (ct != 0).then_some((ct, nfct & NFCT_INFOMASK))
}

/// Whether the skb carries a conntrack entry (or template).
#[inline(always)]
pub fn has_entry<M: Mem>(skb: u64) -> bool {
    skb_nfct::<M>(skb).is_some()
}

/// `(nf_conn *, ctinfo, status)` of the skb's entry, skipping templates. The entry pointer is a
/// plain number (it shares its word with ctinfo), so it is probe-read.
#[inline(always)]
fn skb_ct<M: Mem>(skb: u64) -> Option<(u64, u64, u64)> {
    let (ct, ctinfo) = skb_nfct::<M>(skb)?;
    ct_status(ct, ctinfo)
}

#[inline(always)]
fn ct_status(ct: u64, ctinfo: u64) -> Option<(u64, u64, u64)> {
    let status = read::<u64>(ct, conf!(ct_status)).ok()?;
    if status & IPS_TEMPLATE != 0 {
        return None;
    }
    Some((ct, ctinfo, status))
}

/// Whether the skb's flow may have been translated: its conntrack entry is NATed, or it has
/// none and the NAT map holds translations. Cheap: one load, one read at most.
#[inline(always)]
pub fn translated<M: Mem>(skb: u64) -> bool {
    match skb_ct::<M>(skb) {
        Some((_, _, status)) => status & (IPS_DST_NAT | IPS_SRC_NAT) != 0,
        None => conf!(features) & FEATURE_NAT_CAPTURE != 0 && nat_learned(),
    }
}

/// Fills the record's conntrack fields: the skb's own entry, or else what the NAT map learned
/// about its flow.
#[inline(always)]
pub fn lookup<M: Mem>(skb: u64, rec: &mut DropRecord) {
    rec.ct_flags = 0;
    rec.nat_netns = 0;
    rec.orig = Tuple::default();
    rec.reply = Tuple::default();
    if let Some((ct, _, status)) = skb_ct::<M>(skb) {
        let mut flags = CT_FLAG_ENTRY;
        if status & IPS_DST_NAT != 0 {
            flags |= CT_FLAG_DNAT;
        }
        if status & IPS_SRC_NAT != 0 {
            flags |= CT_FLAG_SNAT;
        }
        if status & IPS_CONFIRMED != 0 {
            flags |= CT_FLAG_CONFIRMED;
        }
        rec.ct_flags = flags;
        read_tuple(ct + u64::from(conf!(ct_tuple_orig)), &mut rec.orig);
        read_tuple(ct + u64::from(conf!(ct_tuple_reply)), &mut rec.reply);
        return;
    }
    // Until a translation was learned the map is empty: skip the hash lookup.
    if conf!(features) & FEATURE_NAT_CAPTURE != 0 && nat_learned() {
        let key = flow_of(&rec.pkt);
        // SAFETY: the value is copied out at once; LRU entries may be replaced concurrently,
        // which at worst yields another flow's (still valid) bytes.
        if let Some(nat) = unsafe { NAT.get(key) } {
            rec.ct_flags = CT_FLAG_NAT_JOIN;
            rec.orig = nat.orig;
            rec.nat_netns = nat.netns;
        }
    }
}

/// The bits of a pointer, as a plain number: copied through a helper, because the verifier does
/// not let a map pointer be used as an integer directly.
#[inline(always)]
fn addr_of<T>(p: *const T) -> u64 {
    let slot: *const T = p;
    // SAFETY: reads 8 bytes from our own stack slot.
    unsafe { bpf_probe_read_kernel((&raw const slot).cast::<u64>()) }.unwrap_or(0)
}

/// This CPU's per-CPU offset (`__per_cpu_offset[cpu]`, absent from kallsyms without
/// CONFIG_KALLSYMS_ALL): our per-CPU STATS element's address minus the array's per-CPU base.
/// Computed once per CPU (three helper calls) and kept in `CPU_OFFSET`.
#[inline(always)]
fn this_cpu_offset() -> Option<u64> {
    let slot = CPU_OFFSET.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot; programs do not nest on one CPU.
    let cached = unsafe { *slot };
    if cached != 0 {
        return Some(cached);
    }
    let elem = addr_of(STATS.get_ptr(0)?);
    let map = addr_of(&raw const STATS);
    let base = read::<u64>(map, conf!(array_pptrs)).ok()?;
    if elem == 0 || base == 0 {
        return None;
    }
    let off = elem.wrapping_sub(base);
    // SAFETY: as above.
    unsafe { *slot = off };
    Some(off)
}

/// Bytes of `struct ip_conntrack_stat` read in one go; the agent turns classification off when
/// a counter it needs lies beyond them.
pub const STAT_BYTES: usize = 32;

#[inline(always)]
fn stat_field(bytes: &[u8; STAT_BYTES], off: u32) -> u32 {
    let off = off as usize;
    if off + 4 > STAT_BYTES {
        return 0;
    }
    // SAFETY: in bounds (checked above); any bit pattern is a valid u32.
    unsafe { bytes.as_ptr().add(off).cast::<u32>().read_unaligned() }
}

/// Whether conntrack caused this NETFILTER_DROP, where its verdicts are not hooked
/// (`crate::verdict`): compares the namespace's per-CPU conntrack statistics with what this CPU
/// saw last. An insert failure or a full table increments them on
/// this CPU right before the packet is freed, in the same softirq.
#[inline(always)]
pub fn classify(net: u64, netns: u32, cpu: u32) -> u8 {
    let Some(off) = this_cpu_offset() else {
        return 0;
    };
    // Probe-read even from a BTF pointer: the per-CPU address is computed from it, and the
    // verifier allows no arithmetic on a typed pointer.
    let Ok(pcpu) = read::<u64>(net, conf!(net_ct_stat)) else {
        return 0;
    };
    if pcpu == 0 {
        return 0;
    }
    let Ok(stats) = read::<[u8; STAT_BYTES]>(pcpu.wrapping_add(off), 0) else {
        return 0;
    };
    let now = CtStatValue {
        insert_failed: stat_field(&stats, conf!(stat_insert_failed)),
        drop: stat_field(&stats, conf!(stat_drop)),
        early_drop: stat_field(&stats, conf!(stat_early_drop)),
        _pad0: 0,
    };
    let last = swap_baseline(netns, cpu, now);
    if now.insert_failed < last.insert_failed || now.drop < last.drop {
        stat_inc(STAT_CT_NO_BASELINE);
        return 0;
    }
    // An insert failure also counts in `drop`: check it first.
    if now.insert_failed != last.insert_failed {
        CtEvent::InsertFailed as u8
    } else if now.drop != last.drop {
        CtEvent::TableFull as u8
    } else if now.early_drop != last.early_drop {
        CtEvent::EarlyDrop as u8
    } else {
        0
    }
}

/// A slot of `CT_CACHE`: one namespace's last statistics on this CPU.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CtCacheSlot {
    pub netns: u32,
    pub _pad0: u32,
    pub last: CtStatValue,
}

/// Slots of the per-CPU direct-mapped cache in front of `CT_LAST` (a power of two).
pub const CT_CACHE_SLOTS: u32 = 64;

/// This namespace's last statistics on this CPU, replaced by `now`. A direct-mapped per-CPU
/// cache answers without a hash lookup; a namespace it evicts is written back to `CT_LAST`.
#[inline(always)]
fn swap_baseline(netns: u32, cpu: u32, now: CtStatValue) -> CtStatValue {
    let Some(slot) = CT_CACHE.get_ptr_mut(netns & (CT_CACHE_SLOTS - 1)) else {
        return last_from_map(netns, cpu, now);
    };
    // SAFETY: this CPU's slot; programs do not nest on one CPU.
    let slot = unsafe { &mut *slot };
    if slot.netns == netns && netns != 0 {
        let last = slot.last;
        slot.last = now;
        return last;
    }
    if slot.netns != 0 {
        let evicted = CtStatKey {
            netns: slot.netns,
            cpu,
        };
        #[expect(
            clippy::needless_borrows_for_generic_args,
            reason = "by value, the copies overflow the 512-byte BPF stack"
        )]
        let _ = CT_LAST.insert(&evicted, &slot.last, 0);
    }
    let last = last_from_map(netns, cpu, now);
    slot.netns = netns;
    slot.last = now;
    last
}

/// The baseline kept in `CT_LAST` (seeded by the agent), replaced by `now`.
#[inline(always)]
fn last_from_map(netns: u32, cpu: u32, now: CtStatValue) -> CtStatValue {
    let key = CtStatKey { netns, cpu };
    // Updated in place: only this CPU writes this key, and an LRU insert costs far more.
    match CT_LAST.get_ptr_mut(key) {
        Some(slot) => {
            // SAFETY: this CPU's own key; programs do not nest on one CPU.
            let slot = unsafe { &mut *slot };
            let last = *slot;
            *slot = now;
            last
        }
        None => {
            #[expect(
                clippy::needless_borrows_for_generic_args,
                reason = "by value, the copies overflow the 512-byte BPF stack"
            )]
            let _ = CT_LAST.insert(&key, &now, 0);
            CtStatValue::default()
        }
    }
}

/// At transmit: remember a new DNATed flow under its translated 5-tuple. Only a flow's first
/// packet (ctinfo NEW) reads further than `skb->_nfct`: every other packet leaves at once.
#[inline(always)]
pub fn learn_nat<M: Mem>(skb: u64) {
    let Some((ct, ctinfo)) = skb_nfct::<M>(skb) else {
        return;
    };
    if ctinfo != IP_CT_NEW {
        return;
    }
    let Some((_, _, status)) = ct_status(ct, ctinfo) else {
        return;
    };
    if status & IPS_DST_NAT == 0 {
        return;
    }
    let mut pkt = PacketInfo::default();
    // Opaque to the optimiser: split into bytes, the two addresses took some 250 bytes of
    // spill slots, over what 6.1's verifier allows a program that calls memset (480).
    if parse_packet::<M>(skb, core::hint::black_box(&mut pkt)).is_err() {
        return;
    }
    let mut value = NatOrigin {
        orig: Tuple::default(),
        netns: skb_net::<M>(skb, 0).1,
        _pad0: 0,
    };
    read_tuple(ct + u64::from(conf!(ct_tuple_orig)), &mut value.orig);
    let key = flow_of(&pkt);
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "by value, the copies overflow the 512-byte BPF stack"
    )]
    let learned = NAT.insert(&key, &value, 0).is_ok();
    if learned {
        stat_inc(STAT_NAT_LEARNED);
        // SAFETY: a plain global; every writer stores the same value.
        unsafe { core::ptr::write_volatile(&raw mut NAT_LEARNED, 1) };
    }
}

/// Entry for the transmit hooks: NAT learning, and ARP/NDP.
#[inline(always)]
pub fn handle_xmit<M: Mem>(skb: u64, probe: agent_common::ProbeId) {
    if conf!(features) & FEATURE_NAT_CAPTURE != 0 {
        learn_nat::<M>(skb);
    }
    crate::arp::handle_frame::<M>(skb, agent_common::DIR_TX, probe);
}
