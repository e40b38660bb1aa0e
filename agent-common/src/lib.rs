//! Record and configuration types shared by the eBPF programs and the agent.
//!
//! Every type here crosses the kernel/user boundary as raw bytes, so each is `#[repr(C)]`, padded
//! explicitly and checked for size at compile time. Fields that hold enumerations are plain
//! integers: the agent decodes them with `TryFrom` and keeps values it does not know.
#![no_std]

use core::mem::size_of;

/// Discriminant in [`RecordHeader::kind`].
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    Drop = 1,
}

impl TryFrom<u16> for RecordKind {
    type Error = u16;

    fn try_from(v: u16) -> Result<Self, u16> {
        match v {
            1 => Ok(Self::Drop),
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
}

impl TryFrom<u8> for ProbeId {
    type Error = u8;

    fn try_from(v: u8) -> Result<Self, u8> {
        match v {
            1 => Ok(Self::KfreeSkbBtf),
            2 => Ok(Self::KfreeSkbTracepoint),
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
}
const _: () = assert!(size_of::<DropRecord>() == 104);

/// Bits of [`ProbeConfig::filter_flags`]: which kernel-side filters are active.
pub const FILTER_REASON: u32 = 1 << 0;
pub const FILTER_HOST: u32 = 1 << 1;
pub const FILTER_PORT: u32 = 1 << 2;
pub const FILTER_PROTO: u32 = 1 << 3;
pub const FILTER_NETNS: u32 = 1 << 4;

/// Value that marks a struct offset the running kernel's BTF did not provide.
pub const OFFSET_UNKNOWN: u32 = u32::MAX;

/// Load-time configuration, written into the `CONFIG` global before the programs load.
///
/// Rust eBPF emits no CO-RE relocations, so every kernel struct offset the programs use is
/// resolved from the running kernel's BTF (and tracefs formats) by the agent and passed here.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeConfig {
    // struct sk_buff
    pub skb_head: u32,
    pub skb_len: u32,
    pub skb_protocol: u32,
    pub skb_network_header: u32,
    pub skb_dev: u32,
    pub skb_sk: u32,
    // struct net_device
    pub dev_ifindex: u32,
    pub dev_nd_net: u32,
    pub dev_name: u32,
    // struct sock (sk_common.skc_net)
    pub sk_net: u32,
    // struct net (ns.inum)
    pub net_inum: u32,
    // classic tracepoint skb/kfree_skb record layout (from tracefs)
    pub tp_skbaddr: u32,
    pub tp_location: u32,
    pub tp_reason: u32,
    // filters
    pub filter_flags: u32,
    pub filter_netns: u32,
    pub filter_port: u16,
    pub filter_proto: u8,
    pub _pad0: u8,
    pub _pad1: u32,
    /// Submit records without waking the reader until this many bytes wait in the ring; a timer
    /// in the reader collects what stays below it.
    pub wakeup_bytes: u64,
}
const _: () = assert!(size_of::<ProbeConfig>() == 80);

impl ProbeConfig {
    pub const fn zeroed() -> Self {
        Self {
            skb_head: OFFSET_UNKNOWN,
            skb_len: OFFSET_UNKNOWN,
            skb_protocol: OFFSET_UNKNOWN,
            skb_network_header: OFFSET_UNKNOWN,
            skb_dev: OFFSET_UNKNOWN,
            skb_sk: OFFSET_UNKNOWN,
            dev_ifindex: OFFSET_UNKNOWN,
            dev_nd_net: OFFSET_UNKNOWN,
            dev_name: OFFSET_UNKNOWN,
            sk_net: OFFSET_UNKNOWN,
            net_inum: OFFSET_UNKNOWN,
            tp_skbaddr: OFFSET_UNKNOWN,
            tp_location: OFFSET_UNKNOWN,
            tp_reason: OFFSET_UNKNOWN,
            filter_flags: 0,
            filter_netns: 0,
            filter_port: 0,
            filter_proto: 0,
            _pad0: 0,
            _pad1: 0,
            wakeup_bytes: 0,
        }
    }
}

/// Index into the per-CPU `STATS` array.
pub const STAT_RING_LOST: u32 = 0;
/// Drops seen by a program before any filter.
pub const STAT_SEEN: u32 = 1;
/// Drops that passed the filters (the sum of `DROP_COUNTS`).
pub const STAT_MATCHED: u32 = 2;
/// Reads of kernel memory that failed: records are still sent, with the fields left zero.
pub const STAT_READ_ERRORS: u32 = 3;
pub const STAT_COUNT: u32 = 4;

/// Key of `HOST_FILTER`: an address in the layout of [`PacketInfo`] plus its family.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HostKey {
    pub addr: [u8; 16],
    pub family: u8,
    pub _pad0: [u8; 3],
}
const _: () = assert!(size_of::<HostKey>() == 20);

/// Map names, shared so the agent and the programs cannot disagree.
pub const MAP_EVENTS: &str = "EVENTS";
pub const MAP_DROP_COUNTS: &str = "DROP_COUNTS";
pub const MAP_STATS: &str = "STATS";
pub const MAP_REASON_FILTER: &str = "REASON_FILTER";
pub const MAP_HOST_FILTER: &str = "HOST_FILTER";
pub const GLOBAL_CONFIG: &str = "CONFIG";
/// Entries in `DROP_COUNTS`: enough for every reason of every subsystem a kernel defines.
pub const DROP_COUNTS_ENTRIES: u32 = 1024;
pub const HOST_FILTER_ENTRIES: u32 = 256;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), made only of integers, with every padding byte explicit.
    unsafe impl aya::Pod for super::RecordHeader {}
    unsafe impl aya::Pod for super::PacketInfo {}
    unsafe impl aya::Pod for super::DropRecord {}
    unsafe impl aya::Pod for super::ProbeConfig {}
    unsafe impl aya::Pod for super::HostKey {}
}
