//! The speaker maps: which processes the lifecycle programs report (by thread-group id, and by
//! name for a restart's new pid). Bounded; what does not fit is counted by the caller.

use agent_common::{MAP_SPEAKER_COMMS, MAP_SPEAKER_PIDS};
use aya::{
    maps::{HashMap, MapData, MapError},
    Ebpf,
};

use super::{map_err, ProbeError, Tracer};

/// MetalLB's memberlist port (UDP and TCP).
pub const MEMBERLIST_PORT: u16 = 7946;

/// The collectors the speaker lifecycle needs (OOM kills and signals add to it).
pub(super) const COLLECTORS: &[&str] = &["exit", "exec"];

/// A process name as the kernel keeps it: at most 15 bytes, NUL-padded.
pub fn comm_key(name: &str) -> [u8; 16] {
    let mut key = [0u8; 16];
    let bytes = name.as_bytes();
    let n = bytes.len().min(15);
    key[..n].copy_from_slice(&bytes[..n]);
    key
}

fn map<'a, K: aya::Pod>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<HashMap<&'a mut MapData, K, u8>, ProbeError> {
    let m = ebpf.map_mut(name).ok_or(ProbeError::MissingMap(name))?;
    HashMap::try_from(m).map_err(map_err(name))
}

/// Pre-fills the names (`--speaker-comm`) before anything attaches.
pub(super) fn fill_comms(ebpf: &mut Ebpf, comms: &[String]) -> Result<(), ProbeError> {
    let mut m = map::<[u8; 16]>(ebpf, MAP_SPEAKER_COMMS)?;
    for c in comms {
        m.insert(comm_key(c), 1, 0)
            .map_err(map_err(MAP_SPEAKER_COMMS))?;
    }
    Ok(())
}

/// Whether an insert failed because the map is full (the caller counts it).
fn full(e: &MapError) -> bool {
    matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::E2BIG))
}

/// The outcome of adding to a speaker map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Added {
    Yes,
    /// The map is full: the process is not reported.
    Full,
}

impl Tracer {
    /// Reports this process's exit and the signals sent to it from now on.
    pub fn add_speaker_pid(&mut self, pid: u32) -> Result<Added, ProbeError> {
        let mut m = map::<u32>(&mut self.ebpf, MAP_SPEAKER_PIDS)?;
        match m.insert(pid, 1, 0) {
            Ok(()) => Ok(Added::Yes),
            Err(e) if full(&e) => Ok(Added::Full),
            Err(e) => Err(map_err(MAP_SPEAKER_PIDS)(e)),
        }
    }

    /// Forgets an exited process (its pid may be reused by anything).
    pub fn remove_speaker_pid(&mut self, pid: u32) -> Result<(), ProbeError> {
        let mut m = map::<u32>(&mut self.ebpf, MAP_SPEAKER_PIDS)?;
        match m.remove(&pid) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(MapError::SyscallError(s)) if s.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            Err(e) => Err(map_err(MAP_SPEAKER_PIDS)(e)),
        }
    }

    /// Reports the processes that take this name (exec) from now on.
    pub fn add_speaker_comm(&mut self, comm: &str) -> Result<Added, ProbeError> {
        let mut m = map::<[u8; 16]>(&mut self.ebpf, MAP_SPEAKER_COMMS)?;
        match m.insert(comm_key(comm), 1, 0) {
            Ok(()) => Ok(Added::Yes),
            Err(e) if full(&e) => Ok(Added::Full),
            Err(e) => Err(map_err(MAP_SPEAKER_COMMS)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::comm_key;

    #[test]
    fn names_are_cut_as_the_kernel_cuts_them() {
        assert_eq!(&comm_key("speaker")[..8], b"speaker\0");
        let long = comm_key("a-very-long-process-name");
        assert_eq!(&long[..15], b"a-very-long-pro");
        assert_eq!(long[15], 0);
    }
}
