//! lbtrace kernel programs.
//!
//! Entry points are thin: they pull the tracepoint arguments out of their context and hand them to
//! shared handlers. Every kernel struct offset comes from the `CONFIG` global, filled in by the agent
//! from the running kernel's BTF, because Rust eBPF emits no CO-RE relocations.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod drop;
#[cfg(target_arch = "bpf")]
mod kernel;
#[cfg(target_arch = "bpf")]
mod maps;

#[cfg(target_arch = "bpf")]
mod programs {
    use agent_common::ProbeId;
    use aya_ebpf::{
        macros::{btf_tracepoint, tracepoint},
        programs::{BtfTracePointContext, TracePointContext},
    };

    use crate::{drop::handle_drop, kernel::config};

    /// tp_btf/kfree_skb: args are (skb, location, reason, rx_sk).
    #[btf_tracepoint(function = "kfree_skb")]
    pub fn kfree_skb_btf(ctx: BtfTracePointContext) -> u32 {
        let skb: u64 = ctx.arg(0);
        let location: u64 = ctx.arg(1);
        let reason: u32 = ctx.arg(2);
        handle_drop(ProbeId::KfreeSkbBtf, skb, location, reason);
        0
    }

    /// The classic tracepoint skb/kfree_skb: the record layout comes from tracefs at load time.
    #[tracepoint]
    pub fn kfree_skb_tp(ctx: TracePointContext) -> u32 {
        match try_kfree_skb_tp(&ctx) {
            Ok(()) | Err(_) => 0,
        }
    }

    fn try_kfree_skb_tp(ctx: &TracePointContext) -> Result<(), i32> {
        let cfg = config();
        // SAFETY: offsets come from this kernel's tracefs format for skb/kfree_skb.
        let (skb, location, reason) = unsafe {
            (
                ctx.read_at::<u64>(cfg.tp_skbaddr as usize)?,
                ctx.read_at::<u64>(cfg.tp_location as usize)?,
                ctx.read_at::<u32>(cfg.tp_reason as usize)?,
            )
        };
        handle_drop(ProbeId::KfreeSkbTracepoint, skb, location, reason);
        Ok(())
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
