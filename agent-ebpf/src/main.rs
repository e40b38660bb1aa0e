//! lbtrace kernel programs.
//!
//! Entry points are thin: they pull the tracepoint arguments out of their context and hand them to
//! shared handlers. Every kernel struct offset comes from the `CONFIG` global, filled in by the agent
//! from the running kernel's BTF, because Rust eBPF emits no CO-RE relocations.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod aggregate;
#[cfg(target_arch = "bpf")]
mod arp;
#[cfg(target_arch = "bpf")]
mod attribution;
#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod drop;
#[cfg(target_arch = "bpf")]
mod kernel;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod packet;
#[cfg(target_arch = "bpf")]
mod proc;
#[cfg(target_arch = "bpf")]
mod verdict;

#[cfg(target_arch = "bpf")]
mod programs {
    use agent_common::ProbeId;
    use aya_ebpf::{
        macros::{btf_tracepoint, tracepoint},
        programs::{BtfTracePointContext, TracePointContext},
    };

    use crate::{
        conf,
        drop::{handle_drop, Drop},
        kernel::{Btf, Probe},
    };

    /// tp_btf/kfree_skb: args are (skb, location, reason) and, on recent kernels, rx_sk.
    /// Inlined into the section's entry (as is the classic tracepoint's): each frame in a
    /// chain of calls counts against the 512 bytes 6.1 allows the chain.
    #[btf_tracepoint(function = "kfree_skb")]
    #[inline(always)]
    pub fn kfree_skb_btf(ctx: BtfTracePointContext) -> u32 {
        let skb: u64 = ctx.arg(0);
        let location: u64 = ctx.arg(1);
        let reason: u32 = ctx.arg(2);
        // The verifier prunes this read on kernels whose tracepoint has no fourth argument.
        let rx_sk: u64 = if conf!(kfree_skb_args) >= 4 {
            ctx.arg(3)
        } else {
            0
        };
        handle_drop::<Btf>(Drop {
            probe: ProbeId::KfreeSkbBtf,
            skb,
            location,
            reason,
            rx_sk,
        });
        0
    }

    /// The classic tracepoint skb/kfree_skb: the record layout comes from tracefs at load time.
    #[tracepoint]
    #[inline(always)]
    pub fn kfree_skb_tp(ctx: TracePointContext) -> u32 {
        let (skb_at, location_at, reason_at) = (
            conf!(tp_skbaddr) as usize,
            conf!(tp_location) as usize,
            conf!(tp_reason) as usize,
        );
        // SAFETY: offsets come from this kernel's tracefs format for skb/kfree_skb.
        let read = unsafe {
            (
                ctx.read_at::<u64>(skb_at),
                ctx.read_at::<u64>(location_at),
                ctx.read_at::<u32>(reason_at),
            )
        };
        let (Ok(skb), Ok(location), Ok(reason)) = read else {
            return 0;
        };
        handle_drop::<Probe>(Drop {
            probe: ProbeId::KfreeSkbTracepoint,
            skb,
            location,
            reason,
            rx_sk: 0,
        });
        0
    }
}

#[cfg(target_arch = "bpf")]
mod frame_programs {
    use agent_common::{ProbeId, DIR_RX};
    use aya_ebpf::{
        macros::{btf_tracepoint, tracepoint},
        programs::{BtfTracePointContext, TracePointContext},
    };

    use crate::{
        arp::{handle_frame, handle_neigh_btf, handle_neigh_tp},
        conf,
        conntrack::handle_xmit,
        kernel::{Btf, Probe},
    };

    /// tp_btf/net_dev_start_xmit: args are (skb, dev).
    #[btf_tracepoint(function = "net_dev_start_xmit")]
    pub fn net_dev_xmit_btf(ctx: BtfTracePointContext) -> u32 {
        handle_xmit::<Btf>(ctx.arg(0), ProbeId::NetDevXmitBtf);
        0
    }

    /// The classic tracepoint net/net_dev_start_xmit: `skbaddr` offset from tracefs.
    #[tracepoint]
    pub fn net_dev_xmit_tp(ctx: TracePointContext) -> u32 {
        let skb_at = conf!(tp_xmit_skbaddr) as usize;
        // SAFETY: offset from this kernel's tracefs format for net/net_dev_start_xmit.
        if let Ok(skb) = unsafe { ctx.read_at::<u64>(skb_at) } {
            handle_xmit::<Probe>(skb, ProbeId::NetDevXmitTracepoint);
        }
        0
    }

    /// tp_btf/netif_receive_skb: args are (skb).
    #[btf_tracepoint(function = "netif_receive_skb")]
    pub fn netif_receive_btf(ctx: BtfTracePointContext) -> u32 {
        handle_frame::<Btf>(ctx.arg(0), DIR_RX, ProbeId::NetifReceiveBtf);
        0
    }

    /// The classic tracepoint net/netif_receive_skb.
    #[tracepoint]
    pub fn netif_receive_tp(ctx: TracePointContext) -> u32 {
        let skb_at = conf!(tp_rx_skbaddr) as usize;
        // SAFETY: offset from this kernel's tracefs format for net/netif_receive_skb.
        if let Ok(skb) = unsafe { ctx.read_at::<u64>(skb_at) } {
            handle_frame::<Probe>(skb, DIR_RX, ProbeId::NetifReceiveTracepoint);
        }
        0
    }

    /// tp_btf/neigh_update: args are (n, lladdr, new, flags, nlmsg_pid).
    #[btf_tracepoint(function = "neigh_update")]
    pub fn neigh_update_btf(ctx: BtfTracePointContext) -> u32 {
        let n: u64 = ctx.arg(0);
        let lladdr: u64 = ctx.arg(1);
        let new: u64 = ctx.arg(2);
        let flags: u64 = ctx.arg(3);
        handle_neigh_btf(n, lladdr, new as u8, flags as u32);
        0
    }

    /// The classic tracepoint neigh/neigh_update.
    #[tracepoint]
    pub fn neigh_update_tp(ctx: TracePointContext) -> u32 {
        match handle_neigh_tp(&ctx) {
            Ok(()) | Err(_) => 0,
        }
    }
}

#[cfg(target_arch = "bpf")]
mod verdict_programs {
    use aya_ebpf::{
        macros::{kprobe, kretprobe},
        programs::{ProbeContext, RetProbeContext},
    };

    use crate::verdict;

    /// kprobe/__nf_conntrack_confirm: arg is (skb).
    #[kprobe]
    pub fn ct_confirm(ctx: ProbeContext) -> u32 {
        verdict::confirm_entry(ctx.arg(0).unwrap_or(0));
        0
    }

    /// kretprobe/__nf_conntrack_confirm: NF_ACCEPT or NF_DROP.
    #[kretprobe]
    pub fn ct_confirm_ret(ctx: RetProbeContext) -> u32 {
        verdict::confirm_return(ctx.ret());
        0
    }

    /// kprobe/__nf_conntrack_alloc: args are (net, zone, orig, repl, gfp, hash).
    #[kprobe]
    pub fn ct_alloc(ctx: ProbeContext) -> u32 {
        verdict::alloc_entry(ctx.arg(0).unwrap_or(0));
        0
    }

    /// kretprobe/__nf_conntrack_alloc: the entry, or an error pointer.
    #[kretprobe]
    pub fn ct_alloc_ret(ctx: RetProbeContext) -> u32 {
        verdict::alloc_return(ctx.ret());
        0
    }
}

#[cfg(target_arch = "bpf")]
mod proc_programs {
    use agent_common::ProbeId;
    use aya_ebpf::{
        macros::{btf_tracepoint, tracepoint},
        programs::{BtfTracePointContext, TracePointContext},
    };

    use crate::{
        conf,
        kernel::{Btf, Probe},
        proc::{
            current_task, exit_tp, handle_exec, handle_exit, handle_oom_btf, handle_oom_tp,
            handle_signal_btf, handle_signal_tp, leader_exits,
        },
    };

    /// tp_btf/sched_process_exit: args are (task) and, since 6.16, group_dead.
    #[btf_tracepoint(function = "sched_process_exit")]
    pub fn process_exit_btf(ctx: BtfTracePointContext) -> u32 {
        // The verifier prunes this read on kernels whose tracepoint has no second argument.
        let group_dead = if conf!(sched_exit_args) >= 2 {
            ctx.arg::<u64>(1) & 0xff != 0
        } else {
            leader_exits()
        };
        handle_exit::<Btf>(ctx.arg(0), group_dead, ProbeId::ProcessExitBtf);
        0
    }

    /// The classic tracepoint sched/sched_process_exit.
    #[tracepoint]
    pub fn process_exit_tp(ctx: TracePointContext) -> u32 {
        exit_tp(&ctx);
        0
    }

    /// tp_btf/sched_process_exec: args are (task, old_pid, bprm); the task has its new name.
    #[btf_tracepoint(function = "sched_process_exec")]
    pub fn process_exec_btf(ctx: BtfTracePointContext) -> u32 {
        handle_exec::<Btf>(ctx.arg(0), ProbeId::ProcessExecBtf);
        0
    }

    /// The classic tracepoint sched/sched_process_exec (the current task is the one).
    #[tracepoint]
    pub fn process_exec_tp(_ctx: TracePointContext) -> u32 {
        handle_exec::<Probe>(current_task(), ProbeId::ProcessExecTracepoint);
        0
    }

    /// tp_btf/mark_victim: args are (task, uid).
    #[btf_tracepoint(function = "mark_victim")]
    pub fn oom_victim_btf(ctx: BtfTracePointContext) -> u32 {
        handle_oom_btf::<Btf>(ctx.arg(0));
        0
    }

    /// The classic tracepoint oom/mark_victim.
    #[tracepoint]
    pub fn oom_victim_tp(ctx: TracePointContext) -> u32 {
        match handle_oom_tp(&ctx) {
            Ok(()) | Err(_) => 0,
        }
    }

    /// tp_btf/signal_generate: args are (sig, info, task, group, result).
    #[btf_tracepoint(function = "signal_generate")]
    pub fn signal_btf(ctx: BtfTracePointContext) -> u32 {
        let sig: u64 = ctx.arg(0);
        handle_signal_btf::<Btf>(sig as u32, ctx.arg(2));
        0
    }

    /// The classic tracepoint signal/signal_generate.
    #[tracepoint]
    pub fn signal_tp(ctx: TracePointContext) -> u32 {
        match handle_signal_tp(&ctx) {
            Ok(()) | Err(_) => 0,
        }
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
