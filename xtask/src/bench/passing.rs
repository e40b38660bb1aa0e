//! Passing traffic: a UDP flow delivered to a bound socket the bench drains, nothing dropped, so
//! the hooks every packet pays for (transmit, receive) are measured on healthy packets: per
//! program runs and ns (kernel statistics), and the throughput against no tracer.

use std::{
    net::{SocketAddrV4, UdpSocket},
    os::fd::AsRawFd,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use lbtest::blast::{Blaster, Plan};
use serde_json::{json, Value};

use super::{bpfstats, measure, tracer::Running, Ctx, Kind, Lab, VIP};

/// The floor rounds' name in the results.
pub const FLOOR: &str = "empty-tp_btf-on-net_dev_start_xmit";

/// The port the sink listens on in the node namespace.
pub const PASS_PORT: u16 = 40500;

/// One tracer, one round of passing traffic.
pub struct Passing {
    pub tracer: Kind,
    /// No tracer, only the empty program on the tx hook ([`super::floor`]).
    pub floor: bool,
    pub round: usize,
    pub sent: u64,
    pub received: u64,
    pub secs: f64,
    /// Kernel counters of the node over the round: delivered, and dropped for a full buffer.
    pub in_datagrams: u64,
    pub rcvbuf_errors: u64,
    pub background_pct: f64,
    pub progs: Vec<bpfstats::Cost>,
}

impl Passing {
    pub fn per_s(&self) -> f64 {
        self.received as f64 / self.secs.max(1e-9)
    }

    /// Whether every datagram was delivered, by the sink's and the kernel's count.
    pub fn clean(&self) -> bool {
        self.received == self.sent && self.in_datagrams == self.sent && self.rcvbuf_errors == 0
    }

    /// Program time per delivered packet.
    pub fn ns_per_packet(&self, c: &bpfstats::Cost) -> f64 {
        c.ns as f64 / self.received.max(1) as f64
    }

    pub fn to_json(&self) -> Value {
        json!({
            "tracer": if self.floor { FLOOR } else { self.tracer.name() },
            "round": self.round,
            "sent": self.sent,
            "received": self.received,
            "kernel_in_datagrams": self.in_datagrams,
            "kernel_rcvbuf_errors": self.rcvbuf_errors,
            "clean": self.clean(),
            "packets_per_s": self.per_s(),
            "background_pct": self.background_pct,
            "programs": self.progs.iter().map(|c| {
                let mut v = c.to_json();
                v["ns_per_packet"] = json!(self.ns_per_packet(c));
                v
            }).collect::<Vec<_>>(),
        })
    }
}

fn udp_stat(lab: &Lab, field: &str) -> Result<u64> {
    let snmp = lab
        .node
        .run(|| std::fs::read_to_string("/proc/thread-self/net/snmp"))??;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next().unwrap_or(""), udp.next().unwrap_or(""));
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == field)
        .and_then(|(_, v)| v.parse().ok())
        .with_context(|| format!("no Udp {field} in the node's /proc/net/snmp"))
}

/// Receives with recvmmsg until `stop`; returns the datagrams received.
fn drain(sock: &UdpSocket, stop: &AtomicBool) -> u64 {
    const BATCH: usize = 64;
    let mut bufs = vec![[0u8; 64]; BATCH];
    let mut iov: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: mmsghdr is plain data; all-zero is valid.
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
        m.msg_hdr.msg_iov = v;
        m.msg_hdr.msg_iovlen = 1;
    }
    let mut got = 0u64;
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: msgs points to BATCH headers, each with one iovec into a live buffer.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                0,
                std::ptr::null_mut(),
            )
        };
        if n > 0 {
            got += n as u64;
        }
    }
    got
}

/// Runs `duration` of passing traffic (one sender thread, as fast as it goes; the sink on the
/// other CPU) with `kind` attached, or (`floor`, no tracer) only the empty tx program.
pub fn run_passing(
    lab: &Lab,
    ctx: &Ctx,
    (kind, floor): (Kind, bool),
    duration: Duration,
    round: usize,
) -> Result<Passing> {
    let sink = lab.node.run(|| -> Result<UdpSocket> {
        let s = UdpSocket::bind(SocketAddrV4::new(VIP, PASS_PORT))?;
        let size: libc::c_int = 64 << 20;
        // SAFETY: an int option on our socket.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&raw const size).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        s.set_read_timeout(Some(Duration::from_millis(100)))?;
        Ok(s)
    })??;
    let sender = Blaster::new(&lab.client, 1)?;
    let plan = Plan {
        targets: vec![SocketAddrV4::new(VIP, PASS_PORT)],
        rate: None,
        duration,
        payload: 16,
    };
    let pre = bpfstats::snapshot()?;
    let tracer = Running::start(kind, &ctx.bin, lab.scope(), None)?;
    let empty = floor.then(super::floor::Floor::attach).transpose()?;
    let pid = tracer.pid();
    let ours = [Some(std::process::id()), pid].map(|p| p.unwrap_or(0));
    let (in0, err0) = (
        udp_stat(lab, "InDatagrams")?,
        udp_stat(lab, "RcvbufErrors")?,
    );
    let s0 = bpfstats::snapshot()?;
    let others0 = measure::others_cpu_ns(&ours);
    let t0 = Instant::now();
    let stop = AtomicBool::new(false);
    let (sent, received) = std::thread::scope(|s| -> Result<_> {
        let h = s.spawn(|| drain(&sink, &stop));
        let sent = sender.run(&plan);
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        let got = h.join().map_err(|_| anyhow::anyhow!("sink panicked"))?;
        Ok((sent?, got))
    })?;
    let others = measure::others_cpu_ns(&ours).saturating_sub(others0);
    let interval = t0.elapsed();
    let s1 = bpfstats::snapshot()?;
    let (in1, err1) = (
        udp_stat(lab, "InDatagrams")?,
        udp_stat(lab, "RcvbufErrors")?,
    );
    drop(empty);
    tracer.stop(&ctx.names)?;
    let progs = if floor {
        bpfstats::costs(&s0, &s1, |id, p| {
            !pre.contains_key(&id) && p.name == super::floor::FLOOR_PROG
        })
    } else {
        super::tracer_costs(kind, pid, &pre, &s0, &s1)
    };
    Ok(Passing {
        tracer: kind,
        floor,
        round,
        sent: sent.total(),
        received,
        secs: sent.elapsed.as_secs_f64(),
        in_datagrams: in1 - in0,
        rcvbuf_errors: err1 - err0,
        background_pct: others as f64 / interval.as_secs_f64() / super::ncpus() as f64 / 1e7,
        progs,
    })
}
