//! Speaker lifecycle: exec, exit and SIGKILL/SIGTERM of the processes the agent names in
//! `SPEAKER_PIDS`/`SPEAKER_COMMS`, and every OOM victim (rare). Every other process leaves after
//! one hash lookup.

use agent_common::{
    ProbeId, ProcRecord, RecordHeader, RecordKind, PROC_EXEC, PROC_EXIT, PROC_OOM_VICTIM,
    PROC_SIGNAL, STAT_PROC,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_smp_processor_id,
        bpf_ktime_get_boot_ns,
    },
    programs::TracePointContext,
};

use crate::{
    conf,
    kernel::{netns_inum, Mem, Probe},
    maps::{stat_inc, submit, SPEAKER_COMMS, SPEAKER_PIDS},
};

const SIGKILL: u32 = 9;
const SIGTERM: u32 = 15;

#[inline(always)]
fn record(event: u8, probe: ProbeId, pid: u32) -> ProcRecord {
    ProcRecord {
        header: RecordHeader {
            // SAFETY: plain helpers without arguments.
            ts_ns: unsafe { bpf_ktime_get_boot_ns() },
            kind: RecordKind::Proc as u16,
            probe: probe as u8,
            _pad0: 0,
            // SAFETY: as above.
            cpu: unsafe { bpf_get_smp_processor_id() },
        },
        pid,
        event,
        ..ProcRecord::default()
    }
}

#[inline(always)]
fn send(rec: &ProcRecord) {
    stat_inc(STAT_PROC);
    submit(rec);
}

/// `task->nsproxy->net_ns->ns.inum` (0 once the namespaces are gone).
#[inline(always)]
fn task_netns<M: Mem>(task: u64) -> u32 {
    let nsproxy = M::read::<u64>(task, conf!(task_nsproxy)).unwrap_or(0);
    let net = M::read::<u64>(nsproxy, conf!(nsproxy_net_ns)).unwrap_or(0);
    netns_inum::<M>(net)
}

#[inline(always)]
fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// sched_process_exit of the current task: only when its whole thread group is done, and only
/// for a speaker's pid.
#[inline(always)]
pub fn handle_exit<M: Mem>(task: u64, group_dead: bool, probe: ProbeId) {
    if !group_dead {
        return;
    }
    let tgid = current_tgid();
    if SPEAKER_PIDS.get_ptr(tgid).is_none() {
        return;
    }
    let mut rec = record(PROC_EXIT, probe, tgid);
    rec.exit_code = M::read::<i32>(task, conf!(task_exit_code)).unwrap_or(0);
    rec.comm = bpf_get_current_comm().unwrap_or([0; 16]);
    rec.netns = task_netns::<M>(task);
    send(&rec);
}

/// sched_process_exec of the current task: a process that takes a speaker's name (a restart
/// has a new pid, so the name is what is known).
#[inline(always)]
pub fn handle_exec<M: Mem>(task: u64, probe: ProbeId) {
    let Ok(comm) = bpf_get_current_comm() else {
        return;
    };
    if SPEAKER_COMMS.get_ptr(comm).is_none() {
        return;
    }
    let mut rec = record(PROC_EXEC, probe, current_tgid());
    rec.comm = comm;
    rec.netns = task_netns::<M>(task);
    send(&rec);
}

/// signal_generate: SIGKILL or SIGTERM sent to a speaker (`pid` is the target's thread-group
/// id, or its thread id from the classic tracepoint); the current task is the sender.
#[inline(always)]
pub fn handle_signal(sig: u32, pid: u32, comm: [u8; 16], netns: u32, probe: ProbeId) {
    let mut rec = record(PROC_SIGNAL, probe, pid);
    rec.signal = sig;
    rec.comm = comm;
    rec.netns = netns;
    rec.sender_pid = current_tgid();
    rec.sender_comm = bpf_get_current_comm().unwrap_or([0; 16]);
    send(&rec);
}

/// Whether a signal_generate concerns us: only SIGKILL and SIGTERM, to a speaker.
#[inline(always)]
pub fn signal_wanted(sig: u32, pid: u32) -> bool {
    (sig == SIGKILL || sig == SIGTERM) && SPEAKER_PIDS.get_ptr(pid).is_some()
}

/// tp_btf/signal_generate(sig, info, task, group, result).
#[inline(always)]
pub fn handle_signal_btf<M: Mem>(sig: u32, task: u64) {
    if sig != SIGKILL && sig != SIGTERM {
        return;
    }
    let pid = M::read::<u32>(task, conf!(task_tgid)).unwrap_or(0);
    if !signal_wanted(sig, pid) {
        return;
    }
    let comm = M::read::<[u8; 16]>(task, conf!(task_comm)).unwrap_or([0; 16]);
    handle_signal(sig, pid, comm, task_netns::<M>(task), ProbeId::SignalBtf);
}

/// The classic tracepoint signal/signal_generate: `sig`, `pid` and `comm` from tracefs.
#[inline(always)]
pub fn handle_signal_tp(ctx: &TracePointContext) -> Result<(), i32> {
    let (sig_at, pid_at, comm_at) = (
        conf!(tp_sig_sig) as usize,
        conf!(tp_sig_pid) as usize,
        conf!(tp_sig_comm) as usize,
    );
    // SAFETY: offsets from this kernel's tracefs format for signal/signal_generate.
    let (sig, pid) = unsafe { (ctx.read_at::<u32>(sig_at)?, ctx.read_at::<u32>(pid_at)?) };
    if !signal_wanted(sig, pid) {
        return Ok(());
    }
    // SAFETY: as above.
    let comm = unsafe { ctx.read_at::<[u8; 16]>(comm_at) }.unwrap_or([0; 16]);
    handle_signal(sig, pid, comm, 0, ProbeId::SignalTracepoint);
    Ok(())
}

/// `mm->rss_stat[index].count` in kB, as `get_mm_counter` reads it (never below 0).
#[inline(always)]
fn rss_kb<M: Mem>(mm: u64, index: u32) -> u64 {
    let at = conf!(mm_rss_stat)
        .wrapping_add(index.wrapping_mul(conf!(percpu_counter_size)))
        .wrapping_add(conf!(percpu_counter_count));
    let pages = M::read::<i64>(mm, at).unwrap_or(0).max(0) as u64;
    pages << conf!(page_kb_shift)
}

/// tp_btf/mark_victim(task, uid): the figures the classic tracepoint computes, from the task.
#[inline(always)]
pub fn handle_oom_btf<M: Mem>(task: u64) {
    let pid = M::read::<u32>(task, conf!(task_tgid)).unwrap_or(0);
    let mut rec = record(PROC_OOM_VICTIM, ProbeId::OomVictimBtf, pid);
    rec.comm = M::read::<[u8; 16]>(task, conf!(task_comm)).unwrap_or([0; 16]);
    rec.netns = task_netns::<M>(task);
    let mm = M::read::<u64>(task, conf!(task_mm)).unwrap_or(0);
    let shift = conf!(page_kb_shift);
    rec.total_vm_kb = M::read::<u64>(mm, conf!(mm_total_vm)).unwrap_or(0) << shift;
    rec.anon_rss_kb = rss_kb::<M>(mm, conf!(mm_anon_pages));
    rec.file_rss_kb = rss_kb::<M>(mm, conf!(mm_file_pages));
    rec.shmem_rss_kb = rss_kb::<M>(mm, conf!(mm_shmem_pages));
    rec.pgtables_kb = M::read::<u64>(mm, conf!(mm_pgtables_bytes)).unwrap_or(0) >> 10;
    let signal = M::read::<u64>(task, conf!(task_signal)).unwrap_or(0);
    rec.oom_score_adj = M::read::<i16>(signal, conf!(signal_oom_score_adj)).unwrap_or(0);
    send(&rec);
}

/// The classic tracepoint oom/mark_victim: its own fields (already in kB).
#[inline(always)]
pub fn handle_oom_tp(ctx: &TracePointContext) -> Result<(), i32> {
    let (pid_at, vm_at, anon_at, file_at, shmem_at, pgt_at, adj_at, comm_at) = (
        conf!(tp_oom_pid) as usize,
        conf!(tp_oom_total_vm) as usize,
        conf!(tp_oom_anon_rss) as usize,
        conf!(tp_oom_file_rss) as usize,
        conf!(tp_oom_shmem_rss) as usize,
        conf!(tp_oom_pgtables) as usize,
        conf!(tp_oom_score_adj) as usize,
        conf!(tp_oom_comm) as usize,
    );
    // SAFETY: every offset comes from this kernel's tracefs format for oom/mark_victim.
    unsafe {
        let pid = ctx.read_at::<u32>(pid_at)?;
        let mut rec = record(PROC_OOM_VICTIM, ProbeId::OomVictimTracepoint, pid);
        rec.total_vm_kb = ctx.read_at::<u64>(vm_at)?;
        rec.anon_rss_kb = ctx.read_at::<u64>(anon_at)?;
        rec.file_rss_kb = ctx.read_at::<u64>(file_at)?;
        rec.shmem_rss_kb = ctx.read_at::<u64>(shmem_at)?;
        rec.pgtables_kb = ctx.read_at::<u64>(pgt_at)?;
        rec.oom_score_adj = ctx.read_at::<i16>(adj_at)?;
        // __data_loc: low 16 bits are the string's offset in the record.
        let loc = ctx.read_at::<u32>(comm_at)?;
        rec.comm = ctx
            .read_at::<[u8; 16]>((loc & 0xffff) as usize)
            .unwrap_or([0; 16]);
        send(&rec);
    }
    Ok(())
}

/// The current task, for the classic tracepoints (a plain number: read with `Probe`).
#[inline(always)]
pub fn current_task() -> u64 {
    // SAFETY: plain helper without arguments.
    unsafe { aya_ebpf::helpers::bpf_get_current_task() }
}

/// For the classic exit tracepoint: `group_dead` from its record when the kernel has it, else
/// whether the exiting thread is the group leader.
#[inline(always)]
pub fn exit_tp(ctx: &TracePointContext) {
    let at = conf!(tp_exit_group_dead);
    let group_dead = if at == agent_common::OFFSET_UNKNOWN {
        let id = bpf_get_current_pid_tgid();
        id >> 32 == id & 0xffff_ffff
    } else {
        // SAFETY: offset from this kernel's tracefs format for sched/sched_process_exit.
        unsafe { ctx.read_at::<u8>(at as usize) }.unwrap_or(0) != 0
    };
    handle_exit::<Probe>(current_task(), group_dead, ProbeId::ProcessExitTracepoint);
}
