//! Where the programs find what they read: struct offsets from this kernel's BTF and record
//! layouts of the classic tracepoints from tracefs, written into [`ProbeConfig`].

use std::collections::BTreeMap;

use agent_common::ProbeConfig;

use crate::kernel::{
    btf::{BtfError, KernelBtf},
    tracefs::tracepoint_fields,
};

/// Record layouts of the classic tracepoints (the fallback hooks).
pub(super) fn tracepoint_layouts(
    cfg: &mut ProbeConfig,
) -> BTreeMap<&'static str, Result<(), String>> {
    let mut out = BTreeMap::new();
    out.insert(
        "skb/kfree_skb",
        tracepoint_fields("skb", "kfree_skb", &["skbaddr", "location", "reason"]).map(|o| {
            cfg.tp_skbaddr = o["skbaddr"];
            cfg.tp_location = o["location"];
            cfg.tp_reason = o["reason"];
        }),
    );
    out.insert(
        "net/net_dev_start_xmit",
        tracepoint_fields("net", "net_dev_start_xmit", &["skbaddr"]).map(|o| {
            cfg.tp_xmit_skbaddr = o["skbaddr"];
        }),
    );
    out.insert(
        "net/netif_receive_skb",
        tracepoint_fields("net", "netif_receive_skb", &["skbaddr"]).map(|o| {
            cfg.tp_rx_skbaddr = o["skbaddr"];
        }),
    );
    const NEIGH: &[&str] = &[
        "family",
        "dev",
        "lladdr",
        "nud_state",
        "primary_key4",
        "primary_key6",
        "new_lladdr",
        "new_state",
        "update_flags",
    ];
    out.insert(
        "neigh/neigh_update",
        tracepoint_fields("neigh", "neigh_update", NEIGH).map(|o| {
            cfg.tp_neigh_family = o["family"];
            cfg.tp_neigh_dev = o["dev"];
            cfg.tp_neigh_lladdr = o["lladdr"];
            cfg.tp_neigh_nud_state = o["nud_state"];
            cfg.tp_neigh_key4 = o["primary_key4"];
            cfg.tp_neigh_key6 = o["primary_key6"];
            cfg.tp_neigh_new_lladdr = o["new_lladdr"];
            cfg.tp_neigh_new_state = o["new_state"];
            cfg.tp_neigh_update_flags = o["update_flags"];
        }),
    );
    process_layouts(cfg, &mut out);
    out
}

/// Record layouts of sched_process_exit, mark_victim and signal_generate (exec needs none).
fn process_layouts(cfg: &mut ProbeConfig, out: &mut BTreeMap<&'static str, Result<(), String>>) {
    // `group_dead` is recent (6.16): without it the program falls back to the group leader.
    out.insert(
        "sched/sched_process_exit",
        tracepoint_fields("sched", "sched_process_exit", &[]).map(|_| {
            if let Ok(o) = tracepoint_fields("sched", "sched_process_exit", &["group_dead"]) {
                cfg.tp_exit_group_dead = o["group_dead"];
            }
        }),
    );
    const OOM: &[&str] = &[
        "pid",
        "comm",
        "total_vm",
        "anon_rss",
        "file_rss",
        "shmem_rss",
        "pgtables",
        "oom_score_adj",
    ];
    out.insert(
        "oom/mark_victim",
        tracepoint_fields("oom", "mark_victim", OOM).map(|o| {
            cfg.tp_oom_pid = o["pid"];
            cfg.tp_oom_comm = o["comm"];
            cfg.tp_oom_total_vm = o["total_vm"];
            cfg.tp_oom_anon_rss = o["anon_rss"];
            cfg.tp_oom_file_rss = o["file_rss"];
            cfg.tp_oom_shmem_rss = o["shmem_rss"];
            cfg.tp_oom_pgtables = o["pgtables"];
            cfg.tp_oom_score_adj = o["oom_score_adj"];
        }),
    );
    out.insert(
        "signal/signal_generate",
        tracepoint_fields("signal", "signal_generate", &["sig", "pid", "comm"]).map(|o| {
            cfg.tp_sig_sig = o["sig"];
            cfg.tp_sig_pid = o["pid"];
            cfg.tp_sig_comm = o["comm"];
        }),
    );
}

/// Offsets for the speaker programs: the task, its namespace, its memory (as `oom:mark_victim`
/// reports it). The indices of `mm->rss_stat` (an anonymous enum) and 4 KiB pages are kept as
/// the defaults of [`ProbeConfig::zeroed`].
pub fn process_offsets(btf: &KernelBtf, cfg: &mut ProbeConfig) -> Result<(), BtfError> {
    cfg.task_tgid = btf.member_offset("task_struct", "tgid")?;
    cfg.task_exit_code = btf.member_offset("task_struct", "exit_code")?;
    cfg.task_comm = btf.member_offset("task_struct", "comm")?;
    cfg.task_nsproxy = btf.member_offset("task_struct", "nsproxy")?;
    cfg.nsproxy_net_ns = btf.member_offset("nsproxy", "net_ns")?;
    cfg.task_signal = btf.member_offset("task_struct", "signal")?;
    cfg.signal_oom_score_adj = btf.member_offset("signal_struct", "oom_score_adj")?;
    cfg.task_mm = btf.member_offset("task_struct", "mm")?;
    cfg.mm_total_vm = btf.member_offset("mm_struct", "total_vm")?;
    cfg.mm_rss_stat = btf.member_offset("mm_struct", "rss_stat")?;
    cfg.percpu_counter_size = btf.struct_size("percpu_counter")?;
    cfg.percpu_counter_count = btf.member_offset("percpu_counter", "count")?;
    cfg.mm_pgtables_bytes = btf.member_offset("mm_struct", "pgtables_bytes")?;
    Ok(())
}

/// Struct offsets the drop programs need, from this kernel's BTF.
pub fn kernel_offsets(btf: &KernelBtf, cfg: &mut ProbeConfig) -> Result<(), BtfError> {
    // Older kernels pass (skb, location, reason); without the count the program reads no more.
    cfg.kfree_skb_args = btf
        .tracepoint_args("kfree_skb")
        .ok()
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(3);
    cfg.skb_head = btf.member_offset("sk_buff", "head")?;
    cfg.skb_len = btf.member_offset("sk_buff", "len")?;
    cfg.skb_protocol = btf.member_offset("sk_buff", "protocol")?;
    cfg.skb_network_header = btf.member_offset("sk_buff", "network_header")?;
    cfg.skb_transport_header = btf.member_offset("sk_buff", "transport_header")?;
    cfg.skb_mac_header = btf.member_offset("sk_buff", "mac_header")?;
    cfg.skb_dev = btf.member_offset("sk_buff", "dev")?;
    cfg.skb_sk = btf.member_offset("sk_buff", "sk")?;
    cfg.dev_ifindex = btf.member_offset("net_device", "ifindex")?;
    // possible_net_t is a typedef of an anonymous struct: walk through it by member name.
    cfg.dev_nd_net = btf.member_offset("net_device", "nd_net.net")?;
    cfg.dev_name = btf.member_offset("net_device", "name")?;
    cfg.sk_net = btf.member_offset("sock", "__sk_common.skc_net.net")?;
    cfg.net_inum = btf.member_offset("net", "ns.inum")?;
    Ok(())
}

/// Offsets for conntrack: the entry an skb carries and its tuples. Absent when conntrack is not
/// built in (its types then live in a module's BTF).
pub fn conntrack_offsets(btf: &KernelBtf, cfg: &mut ProbeConfig) -> Result<(), BtfError> {
    cfg.skb_nfct = btf.member_offset("sk_buff", "_nfct")?;
    cfg.ct_status = btf.member_offset("nf_conn", "status")?;
    let hash = btf.member_offset("nf_conn", "tuplehash")?;
    let tuple_in_hash = btf.member_offset("nf_conntrack_tuple_hash", "tuple")?;
    cfg.ct_tuple_orig = hash + tuple_in_hash;
    cfg.ct_tuple_reply = cfg.ct_tuple_orig + btf.struct_size("nf_conntrack_tuple_hash")?;
    cfg.tuple_src_addr = btf.member_offset("nf_conntrack_tuple", "src.u3")?;
    cfg.tuple_src_port = btf.member_offset("nf_conntrack_tuple", "src.u")?;
    cfg.tuple_l3num = btf.member_offset("nf_conntrack_tuple", "src.l3num")?;
    cfg.tuple_dst_addr = btf.member_offset("nf_conntrack_tuple", "dst.u3")?;
    cfg.tuple_dst_port = btf.member_offset("nf_conntrack_tuple", "dst.u")?;
    cfg.tuple_protonum = btf.member_offset("nf_conntrack_tuple", "dst.protonum")?;
    Ok(())
}

/// Offsets for ARP/NDP frames and neighbour entries.
pub fn arp_offsets(btf: &KernelBtf, cfg: &mut ProbeConfig) -> Result<(), BtfError> {
    cfg.skb_data = btf.member_offset("sk_buff", "data")?;
    cfg.sk_family = btf.member_offset("sock", "__sk_common.skc_family")?;
    cfg.dev_type = btf.member_offset("net_device", "type")?;
    cfg.dev_priv_flags = btf.member_offset("net_device", "priv_flags")?;
    cfg.priv_flag_bridge_port = btf
        .enum_values("netdev_priv_flags")?
        .into_iter()
        .find(|(_, n)| n == "IFF_BRIDGE_PORT")
        .and_then(|(v, _)| u32::try_from(v).ok())
        .unwrap_or(0);
    cfg.neigh_dev = btf.member_offset("neighbour", "dev")?;
    cfg.neigh_tbl = btf.member_offset("neighbour", "tbl")?;
    cfg.tbl_family = btf.member_offset("neigh_table", "family")?;
    cfg.neigh_primary_key = btf.member_offset("neighbour", "primary_key")?;
    cfg.neigh_ha = btf.member_offset("neighbour", "ha")?;
    cfg.neigh_nud_state = btf.member_offset("neighbour", "nud_state")?;
    Ok(())
}

/// Offsets for the per-CPU conntrack statistics of a namespace.
pub fn ct_stat_offsets(btf: &KernelBtf, cfg: &mut ProbeConfig) -> Result<(), BtfError> {
    cfg.net_ct_stat = btf.member_offset("net", "ct.stat")?;
    // The program reads the first STAT_BYTES of the struct in one go.
    const STAT_BYTES: u32 = 32;
    let within = |member: &'static str| -> Result<u32, BtfError> {
        let off = btf.member_offset("ip_conntrack_stat", member)?;
        if off + 4 > STAT_BYTES {
            return Err(BtfError::BeyondRead {
                strukt: "ip_conntrack_stat",
                member,
                limit: STAT_BYTES,
            });
        }
        Ok(off)
    };
    cfg.stat_insert_failed = within("insert_failed")?;
    cfg.stat_drop = within("drop")?;
    cfg.stat_early_drop = within("early_drop")?;
    cfg.array_pptrs = btf.member_offset("bpf_array", "pptrs")?;
    Ok(())
}
