//! The floor of a hook: an empty tp_btf program (`r0 = 0; exit`) on it. On
//! `net_dev_start_xmit`, the hook lbtrace's tx program (`net_dev_xmit_btf`) uses, its ns per
//! passing packet under bpf_stats is what the kernel charges any program there (the dispatch
//! and the statistics themselves), against which lbtrace's own work is read. On the hooks every
//! dropped packet of the bench crosses (kfree_skb, and net_dev_start_xmit at the sender), its
//! overhead per drop is the least any tracer hooking them pays: the dispatch alone.

use std::{
    os::fd::{FromRawFd, OwnedFd},
    process::Command,
};

use anyhow::{bail, Context, Result};

/// The tx floor's name, as `bpftool prog show` lists it.
pub const FLOOR_PROG: &str = "lbt_floor_xmit";
/// The kfree_skb floor's name.
pub const FLOOR_KFREE: &str = "lbt_floor_kfree";
/// The tracepoint of each floor program.
const TX: (&str, &str) = ("net_dev_start_xmit", FLOOR_PROG);
const KFREE: (&str, &str) = ("kfree_skb", FLOOR_KFREE);

/// Whether `name` is one of the floor programs.
pub fn is_floor(name: &str) -> bool {
    name == FLOOR_PROG || name == FLOOR_KFREE
}

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

/// The BTF ids of the tracepoints' types (`btf_trace_<name>`, the attach target of a tp_btf
/// program), from one dump (`[ID] TYPEDEF 'name' …` lines).
fn target_btf_ids(tracepoints: &[&str]) -> Result<Vec<u32>> {
    let out = crate::util::output(Command::new("bpftool").args([
        "btf",
        "dump",
        "file",
        "/sys/kernel/btf/vmlinux",
    ]))?;
    let text = String::from_utf8_lossy(&out.stdout);
    tracepoints
        .iter()
        .map(|tp| {
            let needle = format!("TYPEDEF 'btf_trace_{tp}'");
            let line = text
                .lines()
                .find(|l| l.contains(&needle))
                .with_context(|| format!("no btf_trace_{tp} in the kernel's BTF"))?;
            line.trim_start_matches('[')
                .split(']')
                .next()
                .and_then(|id| id.parse().ok())
                .with_context(|| format!("unexpected bpftool line: {line}"))
        })
        .collect()
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

/// An empty program, attached while it lives.
pub struct Floor {
    _link: OwnedFd,
    _prog: OwnedFd,
}

impl Floor {
    /// On the tx hook alone.
    pub fn attach() -> Result<Self> {
        Self::attach_all(&[TX])?
            .pop()
            .context("no floor program attached")
    }

    /// On every hook a dropped packet of the bench crosses: kfree_skb, and the tx hook at the
    /// sender. These are the hooks lbtrace's agent has on that path.
    pub fn drop_path() -> Result<Vec<Self>> {
        Self::attach_all(&[KFREE, TX])
    }

    fn attach_all(hooks: &[(&str, &str)]) -> Result<Vec<Self>> {
        let tps: Vec<&str> = hooks.iter().map(|h| h.0).collect();
        let ids = target_btf_ids(&tps)?;
        hooks
            .iter()
            .zip(ids)
            .map(|(&(tp, name), id)| Self::attach_one(tp, name, id))
            .collect()
    }

    fn attach_one(tracepoint: &str, prog_name: &str, btf_id: u32) -> Result<Self> {
        // r0 = 0; exit
        let insns: [u64; 2] = [0xb7, 0x95];
        let license = c"GPL";
        let mut name = [0u8; 16];
        name[..prog_name.len()].copy_from_slice(prog_name.as_bytes());
        let load = ProgLoad {
            prog_type: BPF_PROG_TYPE_TRACING,
            insn_cnt: 2,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name: name,
            expected_attach_type: BPF_TRACE_RAW_TP,
            attach_btf_id: btf_id,
            ..ProgLoad::default()
        };
        let prog = bpf(
            BPF_PROG_LOAD,
            (&raw const load).cast(),
            size_of::<ProgLoad>(),
        )
        .with_context(|| format!("loading the empty tp_btf program for {tracepoint}"))?;
        let open = RawTpOpen {
            prog_fd: std::os::fd::AsRawFd::as_raw_fd(&prog) as u32,
            ..RawTpOpen::default()
        };
        let link = bpf(
            BPF_RAW_TRACEPOINT_OPEN,
            (&raw const open).cast(),
            size_of::<RawTpOpen>(),
        )
        .with_context(|| format!("attaching the empty tp_btf program to {tracepoint}"))?;
        Ok(Self {
            _link: link,
            _prog: prog,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads BPF programs: without root it fails, loudly (CI runs as root).
    #[test]
    fn the_empty_programs_attach_and_run() {
        crate::util::require_root("the floor test loads BPF programs").unwrap();
        let _stats = crate::bench::bpfstats::StatsEnabled::on().unwrap();
        let floors = Floor::drop_path().unwrap();
        // Datagrams to a closed port on loopback, in a namespace of the test's own: each is
        // transmitted, then dropped (NO_SOCKET).
        let ns = lbtest::netns::Netns::new("floor").unwrap();
        ns.run(|| {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            for _ in 0..10 {
                let _ = s.send_to(b"x", "127.0.0.1:9");
            }
        })
        .unwrap();
        let snap = crate::bench::bpfstats::snapshot().unwrap();
        for name in [FLOOR_PROG, FLOOR_KFREE] {
            let p = snap.values().find(|p| p.name == name).unwrap();
            assert!(p.run_cnt >= 10, "{p:?}");
        }
        drop(floors);
    }
}
