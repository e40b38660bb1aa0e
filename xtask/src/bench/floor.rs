//! The floor of a per-packet hook: an empty tp_btf program (`r0 = 0; exit`) on
//! `net_dev_start_xmit`, the hook type and tracepoint lbtrace's tx program
//! (`net_dev_xmit_btf`) uses. Under bpf_stats its
//! ns per passing packet is what the kernel charges any program there (the dispatch and the
//! statistics themselves), against which lbtrace's own work is read.

use std::{
    os::fd::{FromRawFd, OwnedFd},
    process::Command,
};

use anyhow::{bail, Context, Result};

/// The program's name, as `bpftool prog show` lists it.
pub const FLOOR_PROG: &str = "lbt_floor_xmit";
/// The tracepoint's BTF type, which a tp_btf program names as its attach target.
const TARGET: &str = "btf_trace_net_dev_start_xmit";

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_PROG_TYPE_TRACING: u32 = 26;
const BPF_TRACE_RAW_TP: u32 = 23;

/// `union bpf_attr` for BPF_PROG_LOAD, up to `attach_btf_id` (the rest stays zero).
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    prog_btf_fd: u32,
    func_info_rec_size: u32,
    func_info: u64,
    func_info_cnt: u32,
    line_info_rec_size: u32,
    line_info: u64,
    line_info_cnt: u32,
    attach_btf_id: u32,
    rest: [u64; 8],
}

/// `union bpf_attr` for BPF_RAW_TRACEPOINT_OPEN: no name, the program's attach target.
#[repr(C)]
#[derive(Default)]
struct RawTpOpen {
    name: u64,
    prog_fd: u32,
    _pad: u32,
    rest: [u64; 4],
}

/// The BTF id of `TARGET` in the kernel's BTF (`[ID] TYPEDEF 'name' …` in bpftool's dump).
fn target_btf_id() -> Result<u32> {
    let out = crate::util::output(Command::new("bpftool").args([
        "btf",
        "dump",
        "file",
        "/sys/kernel/btf/vmlinux",
    ]))?;
    let needle = format!("TYPEDEF '{TARGET}'");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains(&needle))
        .with_context(|| format!("no {TARGET} in the kernel's BTF"))?;
    line.trim_start_matches('[')
        .split(']')
        .next()
        .and_then(|id| id.parse().ok())
        .with_context(|| format!("unexpected bpftool line: {line}"))
}

fn bpf(cmd: libc::c_long, attr: *const u8, size: usize) -> Result<OwnedFd> {
    // SAFETY: `attr` points to a live, initialized attribute of `size` bytes.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) };
    if fd < 0 {
        bail!("bpf({cmd}): {}", std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The empty program, attached while it lives.
pub struct Floor {
    _link: OwnedFd,
    _prog: OwnedFd,
}

impl Floor {
    pub fn attach() -> Result<Self> {
        // r0 = 0; exit
        let insns: [u64; 2] = [0xb7, 0x95];
        let license = c"GPL";
        let mut name = [0u8; 16];
        name[..FLOOR_PROG.len()].copy_from_slice(FLOOR_PROG.as_bytes());
        let load = ProgLoad {
            prog_type: BPF_PROG_TYPE_TRACING,
            insn_cnt: 2,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name: name,
            expected_attach_type: BPF_TRACE_RAW_TP,
            attach_btf_id: target_btf_id()?,
            ..ProgLoad::default()
        };
        let prog = bpf(
            BPF_PROG_LOAD,
            (&raw const load).cast(),
            size_of::<ProgLoad>(),
        )
        .context("loading the empty tp_btf program")?;
        let open = RawTpOpen {
            prog_fd: std::os::fd::AsRawFd::as_raw_fd(&prog) as u32,
            ..RawTpOpen::default()
        };
        let link = bpf(
            BPF_RAW_TRACEPOINT_OPEN,
            (&raw const open).cast(),
            size_of::<RawTpOpen>(),
        )
        .context("attaching the empty tp_btf program to net_dev_start_xmit")?;
        Ok(Self {
            _link: link,
            _prog: prog,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads a BPF program: without root it fails, loudly (CI runs as root).
    #[test]
    fn the_empty_program_attaches_and_runs() {
        crate::util::require_root("the floor test loads a BPF program").unwrap();
        let _stats = crate::bench::bpfstats::StatsEnabled::on().unwrap();
        let f = Floor::attach().unwrap();
        // Any transmitted packet runs it: loopback in a namespace of the test's own.
        let ns = lbtest::netns::Netns::new("floor").unwrap();
        ns.run(|| {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            for _ in 0..10 {
                let _ = s.send_to(b"x", "127.0.0.1:9");
            }
        })
        .unwrap();
        let snap = crate::bench::bpfstats::snapshot().unwrap();
        let p = snap.values().find(|p| p.name == FLOOR_PROG).unwrap();
        assert!(p.run_cnt >= 10, "{p:?}");
        drop(f);
    }
}
