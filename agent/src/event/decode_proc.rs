//! Process records (speaker lifecycle, OOM victims) from the ring: [`ProcEvent`].

use agent_common::{ProbeId, ProcRecord, PROC_EXEC, PROC_EXIT, PROC_OOM_VICTIM, PROC_SIGNAL};

use super::{
    decode::{read_pod, DecodeError, IfName},
    speaker::{OomFigures, SpeakerEvent},
};

/// A start, exit, OOM kill or signal of a process, as the kernel saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcEvent {
    pub ts_ns: u64,
    pub cpu: u32,
    pub probe: Result<ProbeId, u8>,
    /// Unknown kinds are kept as their number.
    pub event: Result<SpeakerEvent, u8>,
    pub pid: u32,
    pub netns: u32,
    pub comm: Option<IfName>,
    /// exit: the raw `wait()` status.
    pub exit_status: i32,
    pub signal: u32,
    pub sender_pid: u32,
    pub sender_comm: Option<IfName>,
    pub oom: OomFigures,
}

impl ProcEvent {
    /// exit: (code, terminating signal) from the `wait()` status, as `WEXITSTATUS` and
    /// `WTERMSIG` read it.
    pub fn exit(&self) -> (Option<i32>, Option<u32>) {
        let sig = self.exit_status & 0x7f;
        if sig == 0 {
            (Some((self.exit_status >> 8) & 0xff), None)
        } else {
            (None, u32::try_from(sig).ok())
        }
    }
}

fn event_of(v: u8) -> Result<SpeakerEvent, u8> {
    match v {
        PROC_EXEC => Ok(SpeakerEvent::Start),
        PROC_EXIT => Ok(SpeakerEvent::Exit),
        PROC_OOM_VICTIM => Ok(SpeakerEvent::OomKill),
        PROC_SIGNAL => Ok(SpeakerEvent::Signal),
        other => Err(other),
    }
}

pub(super) fn decode(bytes: &[u8]) -> Result<ProcEvent, DecodeError> {
    let r: ProcRecord = read_pod(bytes, "process record")?;
    Ok(ProcEvent {
        ts_ns: r.header.ts_ns,
        cpu: r.header.cpu,
        probe: ProbeId::try_from(r.header.probe),
        event: event_of(r.event),
        pid: r.pid,
        netns: r.netns,
        comm: IfName::new(&r.comm),
        exit_status: r.exit_code,
        signal: r.signal,
        sender_pid: r.sender_pid,
        sender_comm: IfName::new(&r.sender_comm),
        oom: OomFigures {
            total_vm_kb: r.total_vm_kb,
            anon_rss_kb: r.anon_rss_kb,
            file_rss_kb: r.file_rss_kb,
            shmem_rss_kb: r.shmem_rss_kb,
            pgtables_kb: r.pgtables_kb,
            oom_score_adj: r.oom_score_adj,
        },
    })
}

#[cfg(test)]
mod tests {
    use agent_common::RecordKind;

    use super::*;
    use crate::event::decode::{decode as decode_any, Event};

    #[test]
    fn exit_statuses_and_oom_figures() {
        let mut rec = ProcRecord::default();
        rec.header.kind = RecordKind::Proc as u16;
        rec.event = PROC_EXIT;
        rec.pid = 4242;
        rec.comm[..7].copy_from_slice(b"speaker");
        rec.exit_code = 3 << 8;
        // SAFETY: a repr(C) value of integers with explicit padding.
        let bytes = unsafe {
            std::slice::from_raw_parts((&raw const rec).cast::<u8>(), size_of::<ProcRecord>())
        };
        let Ok(Event::Proc(p)) = decode_any(bytes) else {
            panic!("not a process record")
        };
        assert_eq!(p.event, Ok(SpeakerEvent::Exit));
        assert_eq!(p.exit(), (Some(3), None));
        assert_eq!(p.comm.map(|c| c.to_text()).as_deref(), Some("speaker"));
        let killed = ProcEvent {
            exit_status: 9,
            ..p.clone()
        };
        assert_eq!(killed.exit(), (None, Some(9)));
        assert!(decode_any(&bytes[..40]).is_err());
    }
}
