//! Record and configuration types shared by the eBPF programs and the agent.
//!
//! Every type here crosses the kernel/user boundary as raw bytes, so each is `#[repr(C)]`, padded
//! explicitly and checked for size at compile time. Fields that hold enumerations are plain
//! integers: the agent decodes them with `TryFrom` and keeps values it does not know.
#![no_std]

use core::mem::size_of;

mod proc;
pub use proc::*;
mod config;
pub use config::*;

/// Discriminant in [`RecordHeader::kind`].
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    Drop = 1,
    Arp = 2,
    Neigh = 3,
    Proc = 4,
}

impl TryFrom<u16> for RecordKind {
    type Error = u16;

    fn try_from(v: u16) -> Result<Self, u16> {
        match v {
            1 => Ok(Self::Drop),
            2 => Ok(Self::Arp),
            3 => Ok(Self::Neigh),
            4 => Ok(Self::Proc),
            other => Err(other),
        }
    }
}

/// Which kernel program produced a record.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeId {
    KfreeSkbBtf = 1,
    KfreeSkbTracepoint = 2,
    NetDevXmitBtf = 3,
    NetDevXmitTracepoint = 4,
    NetifReceiveBtf = 5,
    NetifReceiveTracepoint = 6,
    NeighUpdateBtf = 7,
    NeighUpdateTracepoint = 8,
    /// kprobe + kretprobe on `__nf_conntrack_confirm` and `__nf_conntrack_alloc`: conntrack's
    /// own verdicts classify NETFILTER_DROPs.
    CtVerdictKprobes = 9,
    /// No hook of its own: kfree_skb compares conntrack's per-CPU statistics.
    CtStatistics = 10,
    ProcessExitBtf = 11,
    ProcessExitTracepoint = 12,
    ProcessExecBtf = 13,
    ProcessExecTracepoint = 14,
    OomVictimBtf = 15,
    OomVictimTracepoint = 16,
    SignalBtf = 17,
    SignalTracepoint = 18,
}

impl TryFrom<u8> for ProbeId {
    type Error = u8;

    fn try_from(v: u8) -> Result<Self, u8> {
        match v {
            1 => Ok(Self::KfreeSkbBtf),
            2 => Ok(Self::KfreeSkbTracepoint),
            3 => Ok(Self::NetDevXmitBtf),
            4 => Ok(Self::NetDevXmitTracepoint),
            5 => Ok(Self::NetifReceiveBtf),
            6 => Ok(Self::NetifReceiveTracepoint),
            7 => Ok(Self::NeighUpdateBtf),
            8 => Ok(Self::NeighUpdateTracepoint),
            9 => Ok(Self::CtVerdictKprobes),
            10 => Ok(Self::CtStatistics),
            11 => Ok(Self::ProcessExitBtf),
            12 => Ok(Self::ProcessExitTracepoint),
            13 => Ok(Self::ProcessExecBtf),
            14 => Ok(Self::ProcessExecTracepoint),
            15 => Ok(Self::OomVictimBtf),
            16 => Ok(Self::OomVictimTracepoint),
            17 => Ok(Self::SignalBtf),
            18 => Ok(Self::SignalTracepoint),
            other => Err(other),
        }
    }
}

/// Common prefix of every ring-buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordHeader {
    /// `bpf_ktime_get_boot_ns()`: CLOCK_BOOTTIME, converted to wall time in userspace.
    pub ts_ns: u64,
    pub kind: u16,
    pub probe: u8,
    pub _pad0: u8,
    pub cpu: u32,
}
const _: () = assert!(size_of::<RecordHeader>() == 16);

/// Address family in [`PacketInfo::family`].
pub const FAMILY_NONE: u8 = 0;
pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;

/// Headers of the dropped packet as parsed in the kernel. Addresses are stored as 16 bytes;
/// IPv4 uses the first four. Ports are in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketInfo {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// `skb->len` at the drop.
    pub len: u32,
    pub sport: u16,
    pub dport: u16,
    /// `skb->protocol` (an ethertype) in host byte order.
    pub l3_proto: u16,
    pub family: u8,
    pub l4_proto: u8,
    pub tcp_flags: u8,
    pub icmp_type: u8,
    pub icmp_code: u8,
    pub _pad0: u8,
}
const _: () = assert!(size_of::<PacketInfo>() == 48);

/// A flow as the kernel sees it: a conntrack tuple, or a packet's 5-tuple (the key of the NAT
/// map). IPv4 addresses use the first four bytes; ports in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad0: [u8; 2],
}
const _: () = assert!(size_of::<Tuple>() == 40);

/// Value of the NAT map: the flow as it was before DNAT, learned where the DNAT happened.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatOrigin {
    pub orig: Tuple,
    /// Network namespace where the translation happened (the "node").
    pub netns: u32,
    pub _pad0: u32,
}
const _: () = assert!(size_of::<NatOrigin>() == 48);

/// What conntrack did to a dropped packet ([`DropRecord::ct_event`]).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CtEvent {
    /// Confirm failed: the tuple clashed with an existing entry (`insert_failed`).
    InsertFailed = 1,
    /// No entry could be allocated: the table is full (`drop`).
    TableFull = 2,
    /// An entry was evicted to make room (`early_drop`).
    EarlyDrop = 3,
}
pub const CT_EVENT_COUNT: u32 = 4;

impl CtEvent {
    pub const ALL: [Self; 3] = [Self::InsertFailed, Self::TableFull, Self::EarlyDrop];

    /// The name records, filters and metrics use: the conntrack statistic's own name, except
    /// `drop`, which says what it means.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InsertFailed => "insert_failed",
            Self::TableFull => "table_full",
            Self::EarlyDrop => "early_drop",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == name)
    }
}

impl TryFrom<u8> for CtEvent {
    type Error = u8;

    fn try_from(v: u8) -> Result<Self, u8> {
        match v {
            1 => Ok(Self::InsertFailed),
            2 => Ok(Self::TableFull),
            3 => Ok(Self::EarlyDrop),
            other => Err(other),
        }
    }
}

/// Bits of [`DropRecord::ct_flags`].
/// The skb carried a conntrack entry: `orig` and `reply` are its tuples.
pub const CT_FLAG_ENTRY: u8 = 1 << 0;
/// The entry had been destination-NATed.
pub const CT_FLAG_DNAT: u8 = 1 << 1;
/// The entry had been source-NATed.
pub const CT_FLAG_SNAT: u8 = 1 << 2;
/// No entry on the skb, but the NAT map knew the flow: `orig` is the pre-DNAT flow and
/// `nat_netns` where it was translated.
pub const CT_FLAG_NAT_JOIN: u8 = 1 << 3;
/// The entry was confirmed (in the table) when the packet was dropped.
pub const CT_FLAG_CONFIRMED: u8 = 1 << 4;

/// A packet freed through `kfree_skb_reason`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropRecord {
    pub header: RecordHeader,
    /// Kernel text address the drop came from (the tracepoint's `location`).
    pub location: u64,
    /// `enum skb_drop_reason` value; names come from the running kernel's BTF.
    pub reason: u32,
    pub ifindex: u32,
    /// Inode of the network namespace, from the skb's device or socket (never the current task).
    pub netns: u32,
    pub _pad0: u32,
    /// `dev->name` at the drop (NUL-padded): names stay right after the netns is gone.
    pub ifname: [u8; 16],
    pub pkt: PacketInfo,
    /// [`CtEvent`] when conntrack caused the drop, else 0.
    pub ct_event: u8,
    /// `CT_FLAG_*`.
    pub ct_flags: u8,
    pub _pad1: [u8; 2],
    /// Where the NAT map's translation happened (with `CT_FLAG_NAT_JOIN`).
    pub nat_netns: u32,
    pub orig: Tuple,
    pub reply: Tuple,
    /// Ethernet source and destination of the frame, when the skb still has a MAC header
    /// (`DROP_FLAG_MAC`): the destination is the MAC the sender believed holds the address.
    pub eth_src: [u8; 6],
    pub eth_dst: [u8; 6],
    /// `DROP_FLAG_*`.
    pub flags: u8,
    pub _pad2: [u8; 3],
}
const _: () = assert!(size_of::<DropRecord>() == 208);

/// Bits of [`DropRecord::flags`].
/// `eth_src` and `eth_dst` hold the frame's Ethernet header.
pub const DROP_FLAG_MAC: u8 = 1 << 0;
/// A sample: in aggregation mode only some drops per key and second become records.
pub const DROP_FLAG_SAMPLED: u8 = 1 << 1;
/// Not attributed to a VIP, and a port of the packet is the memberlist port: sent whatever
/// the sample limit (every such drop becomes a record).
pub const DROP_FLAG_MEMBERLIST: u8 = 1 << 2;

/// [`ArpRecord::direction`].
pub const DIR_TX: u8 = 1;
pub const DIR_RX: u8 = 2;

/// Bits of [`ArpRecord::flags`].
/// ARP with sender IP equal to target IP: an announcement (gratuitous ARP).
pub const ARP_FLAG_GRATUITOUS: u8 = 1 << 0;
/// Transmitted on a bridge port: a copy the bridge forwarded, not a host's own send.
pub const ARP_FLAG_BRIDGED: u8 = 1 << 1;

/// An ARP packet or an IPv6 neighbour solicitation/advertisement, on transmit or receive.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ArpRecord {
    pub header: RecordHeader,
    pub netns: u32,
    pub ifindex: u32,
    pub ifname: [u8; 16],
    /// ARP sender protocol address, or the IPv6 source address.
    pub sender_ip: [u8; 16],
    /// ARP target protocol address, or the NDP target address.
    pub target_ip: [u8; 16],
    /// ARP sender hardware address, or the NDP link-layer address option (source for a
    /// solicitation, target for an advertisement), else the Ethernet source.
    pub sender_mac: [u8; 6],
    /// ARP target hardware address (zero for NDP).
    pub target_mac: [u8; 6],
    pub eth_dst: [u8; 6],
    /// ARP operation (1 request, 2 reply), or ICMPv6 type (135 NS, 136 NA).
    pub op: u16,
    pub family: u8,
    pub direction: u8,
    pub flags: u8,
    /// Neighbour advertisement flags as on the wire (0x80 router, 0x40 solicited, 0x20
    /// override).
    pub ndp_flags: u8,
    /// Transmitted from an AF_PACKET socket (a speaker's own send): the sending task's
    /// thread-group id and name, else 0 and empty.
    pub pid: u32,
    pub _pad0: [u8; 4],
    pub comm: [u8; 16],
}
const _: () = assert!(size_of::<ArpRecord>() == 120);

/// A neighbour-cache update (`neigh_update`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NeighRecord {
    pub header: RecordHeader,
    /// 0 when the hook cannot tell (the classic tracepoint carries no namespace).
    pub netns: u32,
    pub ifindex: u32,
    pub ifname: [u8; 16],
    pub ip: [u8; 16],
    pub old_mac: [u8; 6],
    pub new_mac: [u8; 6],
    pub family: u8,
    /// `NUD_*` states.
    pub old_state: u8,
    pub new_state: u8,
    /// 1 when the update carried a link-layer address.
    pub has_lladdr: u8,
    pub _pad0: [u8; 4],
    /// `NEIGH_UPDATE_F_*`.
    pub update_flags: u32,
}
const _: () = assert!(size_of::<NeighRecord>() == 80);

/// Index into the per-CPU `STATS` array. (Drops that passed the filters are the sum of the
/// per-reason counts, and nothing counts every drop before the filters: each increment is paid
/// by every drop.)
pub const STAT_RING_LOST: u32 = 0;
/// Reads of kernel memory that failed: records are still sent, with the fields left zero.
pub const STAT_READ_ERRORS: u32 = 1;
/// Conntrack statistics whose baseline was missing or ran backwards (counted, not classified).
pub const STAT_CT_NO_BASELINE: u32 = 2;
/// DNAT translations learned into the NAT map.
pub const STAT_NAT_LEARNED: u32 = 3;
/// Drops attributed through the NAT map.
pub const STAT_NAT_JOINED: u32 = 4;
/// ARP/NDP and neighbour records that passed the filters.
pub const STAT_ARP: u32 = 5;
pub const STAT_NEIGH: u32 = 6;
/// Aggregation: drops counted in `AGG` but not sent as records (over the sample limit).
pub const STAT_SAMPLED_OUT: u32 = 7;
/// Aggregation: drops whose key found `AGG` full (sent as records, counted from them).
pub const STAT_AGG_FULL: u32 = 8;
/// Process records (speakers, OOM victims) sent.
pub const STAT_PROC: u32 = 9;
pub const STAT_COUNT: u32 = 10;

/// The one per-CPU slot of `CT_VERDICT`: what conntrack's hooks saw last on this CPU, for the
/// NETFILTER_DROP that follows in the same call chain.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtVerdict {
    /// Set by the agent once the hooks are attached: kfree_skb then classifies from this slot
    /// instead of the statistics.
    pub hooked: u64,
    /// The skb `__nf_conntrack_confirm` is working on (its entry probe).
    pub confirming: u64,
    /// The skb whose confirm returned NF_DROP (insert_failed), until kfree_skb takes it.
    pub refused: u64,
    /// The `struct net` `__nf_conntrack_alloc` is allocating in (its entry probe).
    pub allocating: u64,
    /// The `struct net` whose allocation failed (table full), until kfree_skb takes it.
    pub full: u64,
}
const _: () = assert!(size_of::<CtVerdict>() == 40);

/// Key of `CT_LAST`: the last conntrack statistics seen per netns and CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtStatKey {
    pub netns: u32,
    pub cpu: u32,
}
const _: () = assert!(size_of::<CtStatKey>() == 8);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtStatValue {
    pub insert_failed: u32,
    pub drop: u32,
    pub early_drop: u32,
    pub _pad0: u32,
}
const _: () = assert!(size_of::<CtStatValue>() == 16);

/// Key of `HOST_FILTER`: an address in the layout of [`PacketInfo`] plus its family. Aligned
/// to words so the program builds it in five moves, not twenty.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HostKey {
    pub addr: [u8; 16],
    pub family: u8,
    pub _pad0: [u8; 3],
}
const _: () = assert!(size_of::<HostKey>() == 20);

/// Key of `AGG`: what the metrics expose of a drop.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AggKey {
    /// The VIP the drop is attributed to, in network byte order (IPv4 in the first word; zero
    /// when none). Words, not bytes, so the program copies it in four moves.
    pub vip: [u32; 4],
    /// Family of `vip` (`FAMILY_NONE` when unattributed).
    pub family: u8,
    /// [`CtEvent`] or 0.
    pub ct_event: u8,
    /// `AGG_FLAG_*`.
    pub flags: u8,
    pub _pad0: u8,
    pub reason: u32,
    /// Kernel text address of the drop: with the reason, it tells loss from a benign free.
    pub location: u64,
}
const _: () = assert!(size_of::<AggKey>() == 32);
/// Bit of [`AggKey::flags`]: the packet's destination is multicast, which with some reasons
/// tells a benign drop from loss (as a record's `dst` does).
pub const AGG_FLAG_MULTICAST: u8 = 1 << 0;

/// Per-CPU value of `AGG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AggValue {
    /// Every drop of this key on this CPU (exact).
    pub count: u64,
    /// The current sampling window (about a second, see `ProbeConfig::window_shift`).
    pub window: u64,
    /// Records sent in that window.
    pub samples: u32,
    pub _pad0: u32,
}
const _: () = assert!(size_of::<AggValue>() == 24);

/// A slot of `AGG_FAST`, the per-CPU direct-mapped cache in front of `AGG`: a CPU claims a
/// free slot for the first key it meets there and keeps counting that key in it, so the hot
/// keys cost an array index and a compare instead of a hash. A slot is never given to another
/// key, so a key's exact count is its slots' plus `AGG`'s, and it only ever grows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AggSlot {
    /// Non-zero once claimed: the program writes it after `key` and `value`, and a reader, which
    /// copies the slot in address order, reads it first.
    pub used: u32,
    pub _pad0: u32,
    pub key: AggKey,
    pub value: AggValue,
}
const _: () = assert!(size_of::<AggSlot>() == 64);
/// Slots of `AGG_FAST` per CPU (a power of two: the index is a mask of the key's hash).
pub const AGG_FAST_SLOTS: u32 = 64;

/// Map names, shared so the agent and the programs cannot disagree.
pub const MAP_EVENTS: &str = "EVENTS";
pub const MAP_DROP_COUNTS: &str = "DROP_COUNTS";
/// Per-CPU counts of the core drop reasons (those below [`REASON_COUNTS_ENTRIES`]), indexed by
/// reason: an array slot costs no hash lookup. Other reasons (subsystems) go to `DROP_COUNTS`.
pub const MAP_REASON_COUNTS: &str = "REASON_COUNTS";
pub const REASON_COUNTS_ENTRIES: u32 = 256;
pub const MAP_STATS: &str = "STATS";
pub const MAP_REASON_FILTER: &str = "REASON_FILTER";
pub const MAP_HOST_FILTER: &str = "HOST_FILTER";
pub const MAP_CT_COUNTS: &str = "CT_COUNTS";
pub const MAP_CT_LAST: &str = "CT_LAST";
/// Per-CPU [`CtVerdict`] (one slot).
pub const MAP_CT_VERDICT: &str = "CT_VERDICT";
pub const MAP_NAT: &str = "NAT";
pub const MAP_AGG: &str = "AGG";
/// Per-CPU [`AggSlot`]s in front of `AGG`.
pub const MAP_AGG_FAST: &str = "AGG_FAST";
/// Pools (prefixes shorter than an address), in LPM tries.
pub const MAP_VIPS4: &str = "VIPS4";
pub const MAP_VIPS6: &str = "VIPS6";
/// Single VIPs, in hash maps: one hash lookup whatever their number, where a trie of 1,000
/// addresses costs some 50 ns more per drop than one of a single address.
pub const MAP_VIP_ADDRS4: &str = "VIP_ADDRS4";
pub const MAP_VIP_ADDRS6: &str = "VIP_ADDRS6";
/// One `u64`: `VIP_META_*` bits in the low word (which of the VIP maps hold an entry: no lookup
/// in the others), and in the high word the maps' generation, bumped after every change: the
/// programs' per-CPU cache of lookups holds only answers of the current generation.
pub const MAP_VIP_META: &str = "VIP_META";
/// Where the generation sits in `VIP_META`'s value.
pub const VIP_META_GEN_SHIFT: u32 = 32;
/// An IPv4 VIP or pool is set.
pub const VIP_META_IPV4: u32 = 1 << 0;
/// An IPv6 VIP or pool is set.
pub const VIP_META_IPV6: u32 = 1 << 1;
/// `VIPS4` holds a pool.
pub const VIP_META_POOL4: u32 = 1 << 2;
/// `VIPS6` holds a pool.
pub const VIP_META_POOL6: u32 = 1 << 3;
/// Default sizes; the agent sets them at load time.
pub const AGG_ENTRIES: u32 = 16384;
pub const VIP_ENTRIES: u32 = 1024;
pub const CT_LAST_ENTRIES: u32 = 4096;
pub const NAT_ENTRIES: u32 = 16384;
pub const GLOBAL_CONFIG: &str = "CONFIG";
/// Entries in `DROP_COUNTS`: enough for every reason of every subsystem a kernel defines.
pub const DROP_COUNTS_ENTRIES: u32 = 1024;
pub const HOST_FILTER_ENTRIES: u32 = 256;
/// Network namespaces to keep when `FILTER_NETNS` is set: a node's own and its pods'.
pub const MAP_NETNS_FILTER: &str = "NETNS_FILTER";
pub const NETNS_FILTER_ENTRIES: u32 = 1024;
/// Thread-group ids of the processes that announce VIPs (`u32` → `u8`), filled by the agent.
pub const MAP_SPEAKER_PIDS: &str = "SPEAKER_PIDS";
/// Names (`comm`, 16 bytes NUL-padded) of those processes: a restarted one has a new pid.
pub const MAP_SPEAKER_COMMS: &str = "SPEAKER_COMMS";
pub const SPEAKER_ENTRIES: u32 = 256;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), made only of integers, with every padding byte explicit.
    unsafe impl aya::Pod for super::RecordHeader {}
    unsafe impl aya::Pod for super::PacketInfo {}
    unsafe impl aya::Pod for super::DropRecord {}
    unsafe impl aya::Pod for super::ArpRecord {}
    unsafe impl aya::Pod for super::NeighRecord {}
    unsafe impl aya::Pod for super::ProbeConfig {}
    unsafe impl aya::Pod for super::HostKey {}
    unsafe impl aya::Pod for super::Tuple {}
    unsafe impl aya::Pod for super::NatOrigin {}
    unsafe impl aya::Pod for super::CtStatKey {}
    unsafe impl aya::Pod for super::CtStatValue {}
    unsafe impl aya::Pod for super::CtVerdict {}
    unsafe impl aya::Pod for super::AggKey {}
    unsafe impl aya::Pod for super::AggValue {}
    unsafe impl aya::Pod for super::AggSlot {}
}
