//! The speaker lifecycle's record: process exec, exit, OOM kill and signals.

use core::mem::size_of;

use crate::RecordHeader;

/// [`ProcRecord::event`].
pub const PROC_EXEC: u8 = 1;
pub const PROC_EXIT: u8 = 2;
pub const PROC_OOM_VICTIM: u8 = 3;
pub const PROC_SIGNAL: u8 = 4;

/// A start (exec), exit, OOM kill or SIGKILL/SIGTERM of a process the speaker maps name (or,
/// for an OOM kill, of any process: they are rare).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcRecord {
    pub header: RecordHeader,
    /// Thread-group id of the process it happened to.
    pub pid: u32,
    /// Inode of that process's network namespace (0 when it could not be read).
    pub netns: u32,
    /// exit: `task->exit_code` as `wait()` encodes it (code << 8, or the signal in the low 7
    /// bits).
    pub exit_code: i32,
    /// signal: the signal sent.
    pub signal: u32,
    /// signal: the sender's thread-group id.
    pub sender_pid: u32,
    /// `PROC_*`.
    pub event: u8,
    pub _pad0: [u8; 3],
    pub comm: [u8; 16],
    /// signal: the sender's name.
    pub sender_comm: [u8; 16],
    /// oom: `oom:mark_victim`'s figures, in kB.
    pub total_vm_kb: u64,
    pub anon_rss_kb: u64,
    pub file_rss_kb: u64,
    pub shmem_rss_kb: u64,
    pub pgtables_kb: u64,
    pub oom_score_adj: i16,
    pub _pad1: [u8; 6],
}
const _: () = assert!(size_of::<ProcRecord>() == 120);

#[cfg(feature = "user")]
// SAFETY: repr(C), made only of integers, with every padding byte explicit.
unsafe impl aya::Pod for ProcRecord {}
