//! The load-time configuration: filters, features and this kernel's struct offsets.

use core::mem::size_of;

/// Bits of [`ProbeConfig::filter_flags`]: which kernel-side filters are active.
pub const FILTER_REASON: u32 = 1 << 0;
pub const FILTER_HOST: u32 = 1 << 1;
pub const FILTER_PORT: u32 = 1 << 2;
pub const FILTER_PROTO: u32 = 1 << 3;
/// The filters that need the packet's headers.
pub const FILTER_PACKET: u32 = FILTER_HOST | FILTER_PORT | FILTER_PROTO;
pub const FILTER_NETNS: u32 = 1 << 4;

/// Bit in `filter_flags`: keep only records with a conntrack event in `filter_ct_events`.
pub const FILTER_CT_EVENT: u32 = 1 << 5;
/// Keep only drops the kernel attributes to a VIP (and memberlist traffic), aggregation only:
/// the host filter when its hosts are exactly the kernel's VIP set. It costs no lookup of its
/// own, and needs no headers beyond what attribution reads.
pub const FILTER_VIP: u32 = 1 << 6;

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
/// Count in `AGG_FAST` before `AGG`. Off with packet filters (host, port, protocol): that
/// program is the verifier's longest walk, and the cache would take it near the limit.
pub const FEATURE_AGG_FAST: u32 = 1 << 5;

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
    /// Arguments of tp_btf/sched_process_exit: 2 when it passes `group_dead` (6.16+).
    pub sched_exit_args: u8,
    pub _pad2: u8,
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
            sched_exit_args: 0,
            _pad2: 0,
            tp_sig_comm: OFFSET_UNKNOWN,
            tp_oom_comm: OFFSET_UNKNOWN,
        }
    }
}
