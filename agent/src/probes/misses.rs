//! Runs the kernel skipped. A program already running on a CPU is not run again there: a drop
//! in process context interrupted by a softirq's drop is one such case. The kernel counts each
//! in the program's `recursion_misses`. Each is an event no program saw, so it is reported,
//! never silent.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
};

use aya_obj::generated::{bpf_cmd, bpf_prog_info};

use super::Tracer;

/// `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
struct InfoByFd {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// Room for `bpf_prog_info`, 8-byte aligned.
const INFO_WORDS: usize = size_of::<bpf_prog_info>().div_ceil(8);

/// The kernel's own info about a program.
fn prog_info(fd: BorrowedFd<'_>) -> Option<bpf_prog_info> {
    let mut info = [0u64; INFO_WORDS];
    let attr = InfoByFd {
        bpf_fd: u32::try_from(fd.as_raw_fd()).ok()?,
        info_len: u32::try_from(size_of::<bpf_prog_info>()).ok()?,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: the attribute names a buffer of `info_len` bytes that outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_long,
            &raw const attr,
            size_of::<InfoByFd>(),
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: the buffer holds a whole `bpf_prog_info`, which is plain integers.
    Some(unsafe { info.as_ptr().cast::<bpf_prog_info>().read_unaligned() })
}

impl Tracer {
    /// One field of the kernel's info, for every loaded program.
    fn per_program<T>(&self, field: impl Fn(&bpf_prog_info) -> T) -> BTreeMap<String, T> {
        self.ebpf
            .programs()
            .filter_map(|(name, p)| {
                let info = prog_info(p.fd().ok()?.as_fd())?;
                Some((name.to_owned(), field(&info)))
            })
            .collect()
    }

    /// For every loaded program, the runs the kernel skipped (0 included).
    pub fn recursion_misses(&self) -> BTreeMap<String, u64> {
        self.per_program(|i| i.recursion_misses)
    }

    /// For every loaded program, the instructions the verifier walked to accept it: how close
    /// it came to the kernel's limit of 1,000,000, logged at debug level after loading.
    pub fn verified_insns(&self) -> BTreeMap<String, u32> {
        self.per_program(|i| i.verified_insns)
    }
}
