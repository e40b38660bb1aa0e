//! Record and configuration types shared by the eBPF programs and the agent.
//!
//! Every type here crosses the kernel/user boundary as raw bytes, so each is `#[repr(C)]`, padded
//! explicitly and checked for size at compile time. Fields that hold enumerations are plain
//! integers: the agent decodes them with `TryFrom` and keeps values it does not know.
#![no_std]

use core::mem::size_of;

mod proc;
pub use proc::*;

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

/// Bits of [`ProbeConfig::filter_flags`]: which kernel-side filters are active.
pub const FILTER_REASON: u32 = 1 << 0;
pub const FILTER_HOST: u32 = 1 << 1;
pub const FILTER_PORT: u32 = 1 << 2;
pub const FILTER_PROTO: u32 = 1 << 3;
pub const FILTER_NETNS: u32 = 1 << 4;

/// Bit in `filter_flags`: keep only records with a conntrack event in `filter_ct_events`.
pub const FILTER_CT_EVENT: u32 = 1 << 5;

/// Bits of [`ProbeConfig::features`].
/// Classify NETFILTER_DROP through the netns's per-CPU conntrack statistics.
pub const FEATURE_CT_STATS: u32 = 1 << 0;
/// Learn DNAT translations at transmit, to attribute drops behind them.
pub const FEATURE_NAT_CAPTURE: u32 = 1 << 1;
/// Record ARP and IPv6 neighbour discovery on transmit and receive, and neighbour updates.
pub const FEATURE_ARP: u32 = 1 << 2;
/// Count every drop in `AGG` (keyed by VIP, reason, location, conntrack event) and send only
/// samples through the ring: `sample_limit` per key, CPU and second.
pub const FEATURE_AGGREGATE: u32 = 1 << 3;
/// Drops to or from [`ProbeConfig::memberlist_port`] (speakers' election traffic) are always
/// sent as records, flagged `DROP_FLAG_MEMBERLIST`.
pub const FEATURE_MEMBERLIST: u32 = 1 << 4;

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
    // conntrack: struct sk_buff._nfct, struct nf_conn, struct nf_conntrack_tuple
    pub skb_nfct: u32,
    pub ct_status: u32,
    pub ct_tuple_orig: u32,
    pub ct_tuple_reply: u32,
    pub tuple_src_addr: u32,
    pub tuple_src_port: u32,
    pub tuple_dst_addr: u32,
    pub tuple_dst_port: u32,
    pub tuple_l3num: u32,
    pub tuple_protonum: u32,
    // struct net.ct.stat (per-CPU) and struct ip_conntrack_stat
    pub net_ct_stat: u32,
    pub stat_insert_failed: u32,
    pub stat_drop: u32,
    pub stat_early_drop: u32,
    /// struct bpf_array.pptrs: finds this CPU's per-CPU offset through our own STATS map.
    pub array_pptrs: u32,
    /// `SKB_DROP_REASON_NETFILTER_DROP` on this kernel (from BTF).
    pub reason_netfilter_drop: u32,
    /// `FEATURE_*` bits.
    pub features: u32,
    pub filter_ct_events: u32,
    // classic tracepoint skb/kfree_skb record layout (from tracefs)
    pub tp_skbaddr: u32,
    pub tp_location: u32,
    pub tp_reason: u32,
    // classic tracepoints net/net_dev_start_xmit, net/netif_receive_skb
    pub tp_xmit_skbaddr: u32,
    pub tp_rx_skbaddr: u32,
    // classic tracepoint neigh/neigh_update
    pub tp_neigh_family: u32,
    pub tp_neigh_dev: u32,
    pub tp_neigh_lladdr: u32,
    pub tp_neigh_nud_state: u32,
    pub tp_neigh_key4: u32,
    pub tp_neigh_key6: u32,
    pub tp_neigh_new_lladdr: u32,
    pub tp_neigh_new_state: u32,
    pub tp_neigh_update_flags: u32,
    // ARP: struct sk_buff, struct net_device
    pub skb_data: u32,
    pub skb_mac_header: u32,
    pub dev_type: u32,
    pub dev_priv_flags: u32,
    /// `IFF_BRIDGE_PORT` on this kernel (from BTF `enum netdev_priv_flags`).
    pub priv_flag_bridge_port: u32,
    // struct neighbour, struct neigh_table
    pub neigh_dev: u32,
    pub neigh_tbl: u32,
    pub tbl_family: u32,
    pub neigh_primary_key: u32,
    pub neigh_ha: u32,
    pub neigh_nud_state: u32,
    // filters
    pub filter_flags: u32,
    pub filter_port: u16,
    pub filter_proto: u8,
    pub _pad0: u8,
    /// With `FILTER_NETNS` and a set of one namespace: its inode, compared without a map
    /// lookup (every drop pays the filter). 0 with a larger set.
    pub filter_netns_one: u32,
    pub _pad1: u32,
    /// Arguments of tp_btf/kfree_skb on this kernel: 4 when it passes `rx_sk` (the receiving
    /// socket, which names the namespace of a drop whose skb has no device and no socket).
    pub kfree_skb_args: u32,
    /// Submit records without waking the reader until this many bytes wait in the ring; a timer
    /// in the reader collects what stays below it.
    pub wakeup_bytes: u64,
    /// With `FEATURE_AGGREGATE`: records per `AGG` key, CPU and second (0: every drop).
    pub sample_limit: u32,
    /// Sampling windows are 2^`window_shift` jiffies, the power of two nearest the kernel's
    /// tick rate (about a second, without a clock read or a division); 0 when the rate is
    /// unknown (then the monotonic clock is read).
    pub window_shift: u32,
    // speakers: struct sock, struct sk_buff, struct task_struct and what hangs off it
    pub sk_family: u32,
    pub skb_transport_header: u32,
    pub task_tgid: u32,
    pub task_exit_code: u32,
    pub task_comm: u32,
    pub task_nsproxy: u32,
    pub nsproxy_net_ns: u32,
    pub task_signal: u32,
    pub signal_oom_score_adj: u32,
    pub task_mm: u32,
    pub mm_total_vm: u32,
    /// `mm_struct.rss_stat`: an array of `struct percpu_counter`, `percpu_counter_size` apart,
    /// indexed by `MM_FILEPAGES`, `MM_ANONPAGES`, `MM_SHMEMPAGES`.
    pub mm_rss_stat: u32,
    pub percpu_counter_size: u32,
    pub percpu_counter_count: u32,
    pub mm_pgtables_bytes: u32,
    pub mm_file_pages: u32,
    pub mm_anon_pages: u32,
    pub mm_shmem_pages: u32,
    /// log2 of the page size in kB (4 KiB pages: 2).
    pub page_kb_shift: u32,
    // classic tracepoints sched/sched_process_exit, oom/mark_victim, signal/signal_generate
    pub tp_exit_group_dead: u32,
    pub tp_oom_pid: u32,
    pub tp_oom_total_vm: u32,
    pub tp_oom_anon_rss: u32,
    pub tp_oom_file_rss: u32,
    pub tp_oom_shmem_rss: u32,
    pub tp_oom_pgtables: u32,
    pub tp_oom_score_adj: u32,
    pub tp_sig_sig: u32,
    pub tp_sig_pid: u32,
    /// The memberlist port with `FEATURE_MEMBERLIST`.
    pub memberlist_port: u16,
    pub _pad2: [u8; 2],
    pub tp_sig_comm: u32,
    pub tp_oom_comm: u32,
}
const _: () = assert!(size_of::<ProbeConfig>() == 384);

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
            skb_nfct: OFFSET_UNKNOWN,
            ct_status: OFFSET_UNKNOWN,
            ct_tuple_orig: OFFSET_UNKNOWN,
            ct_tuple_reply: OFFSET_UNKNOWN,
            tuple_src_addr: OFFSET_UNKNOWN,
            tuple_src_port: OFFSET_UNKNOWN,
            tuple_dst_addr: OFFSET_UNKNOWN,
            tuple_dst_port: OFFSET_UNKNOWN,
            tuple_l3num: OFFSET_UNKNOWN,
            tuple_protonum: OFFSET_UNKNOWN,
            net_ct_stat: OFFSET_UNKNOWN,
            stat_insert_failed: OFFSET_UNKNOWN,
            stat_drop: OFFSET_UNKNOWN,
            stat_early_drop: OFFSET_UNKNOWN,
            array_pptrs: OFFSET_UNKNOWN,
            reason_netfilter_drop: u32::MAX,
            features: 0,
            filter_ct_events: 0,
            tp_skbaddr: OFFSET_UNKNOWN,
            tp_location: OFFSET_UNKNOWN,
            tp_reason: OFFSET_UNKNOWN,
            tp_xmit_skbaddr: OFFSET_UNKNOWN,
            tp_rx_skbaddr: OFFSET_UNKNOWN,
            tp_neigh_family: OFFSET_UNKNOWN,
            tp_neigh_dev: OFFSET_UNKNOWN,
            tp_neigh_lladdr: OFFSET_UNKNOWN,
            tp_neigh_nud_state: OFFSET_UNKNOWN,
            tp_neigh_key4: OFFSET_UNKNOWN,
            tp_neigh_key6: OFFSET_UNKNOWN,
            tp_neigh_new_lladdr: OFFSET_UNKNOWN,
            tp_neigh_new_state: OFFSET_UNKNOWN,
            tp_neigh_update_flags: OFFSET_UNKNOWN,
            skb_data: OFFSET_UNKNOWN,
            skb_mac_header: OFFSET_UNKNOWN,
            dev_type: OFFSET_UNKNOWN,
            dev_priv_flags: OFFSET_UNKNOWN,
            priv_flag_bridge_port: 0,
            neigh_dev: OFFSET_UNKNOWN,
            neigh_tbl: OFFSET_UNKNOWN,
            tbl_family: OFFSET_UNKNOWN,
            neigh_primary_key: OFFSET_UNKNOWN,
            neigh_ha: OFFSET_UNKNOWN,
            neigh_nud_state: OFFSET_UNKNOWN,
            filter_flags: 0,
            filter_port: 0,
            filter_proto: 0,
            _pad0: 0,
            filter_netns_one: 0,
            _pad1: 0,
            kfree_skb_args: 0,
            wakeup_bytes: 0,
            sample_limit: 0,
            window_shift: 0,
            sk_family: OFFSET_UNKNOWN,
            skb_transport_header: OFFSET_UNKNOWN,
            task_tgid: OFFSET_UNKNOWN,
            task_exit_code: OFFSET_UNKNOWN,
            task_comm: OFFSET_UNKNOWN,
            task_nsproxy: OFFSET_UNKNOWN,
            nsproxy_net_ns: OFFSET_UNKNOWN,
            task_signal: OFFSET_UNKNOWN,
            signal_oom_score_adj: OFFSET_UNKNOWN,
            task_mm: OFFSET_UNKNOWN,
            mm_total_vm: OFFSET_UNKNOWN,
            mm_rss_stat: OFFSET_UNKNOWN,
            percpu_counter_size: 0,
            percpu_counter_count: OFFSET_UNKNOWN,
            mm_pgtables_bytes: OFFSET_UNKNOWN,
            mm_file_pages: 0,
            mm_anon_pages: 1,
            mm_shmem_pages: 3,
            page_kb_shift: 2,
            tp_exit_group_dead: OFFSET_UNKNOWN,
            tp_oom_pid: OFFSET_UNKNOWN,
            tp_oom_total_vm: OFFSET_UNKNOWN,
            tp_oom_anon_rss: OFFSET_UNKNOWN,
            tp_oom_file_rss: OFFSET_UNKNOWN,
            tp_oom_shmem_rss: OFFSET_UNKNOWN,
            tp_oom_pgtables: OFFSET_UNKNOWN,
            tp_oom_score_adj: OFFSET_UNKNOWN,
            tp_sig_sig: OFFSET_UNKNOWN,
            tp_sig_pid: OFFSET_UNKNOWN,
            memberlist_port: 0,
            _pad2: [0; 2],
            tp_sig_comm: OFFSET_UNKNOWN,
            tp_oom_comm: OFFSET_UNKNOWN,
        }
    }
}

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

/// Key of `HOST_FILTER`: an address in the layout of [`PacketInfo`] plus its family.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HostKey {
    pub addr: [u8; 16],
    pub family: u8,
    pub _pad0: [u8; 3],
}
const _: () = assert!(size_of::<HostKey>() == 20);

/// Key of the VIP tries (`VIPS4`, `VIPS6`): a prefix length, then the address in network byte
/// order, as `BPF_MAP_TYPE_LPM_TRIE` wants it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Vip4Key {
    pub prefix_len: u32,
    pub addr: [u8; 4],
}
const _: () = assert!(size_of::<Vip4Key>() == 8);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Vip6Key {
    pub prefix_len: u32,
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<Vip6Key>() == 20);

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
    pub _pad0: [u8; 2],
    pub reason: u32,
    /// Kernel text address of the drop: with the reason, it tells loss from a benign free.
    pub location: u64,
}
const _: () = assert!(size_of::<AggKey>() == 32);

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
pub const MAP_VIPS4: &str = "VIPS4";
pub const MAP_VIPS6: &str = "VIPS6";
/// One `u32`: bit 0 when `VIPS4` holds an entry, bit 1 when `VIPS6` does (no trie walk
/// otherwise).
pub const MAP_VIP_META: &str = "VIP_META";
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
    unsafe impl aya::Pod for super::Vip4Key {}
    unsafe impl aya::Pod for super::Vip6Key {}
    unsafe impl aya::Pod for super::AggKey {}
    unsafe impl aya::Pod for super::AggValue {}
}
