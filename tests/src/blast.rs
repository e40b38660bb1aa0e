//! A drop generator with exact counts: small UDP datagrams sent with `sendmmsg` from one socket
//! per thread, to IPv4 destinations the receiver drops (a closed port, an nftables drop rule), at
//! a fixed total rate or as fast as the machine goes.

use std::{
    net::{SocketAddrV4, UdpSocket},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

use crate::netns::Netns;

/// Messages per `sendmmsg` call at most.
const BATCH: usize = 64;
/// A rate-controlled thread sleeps at least this long between calls, so that its wakeups stay
/// near 1,000/s whatever the rate.
const MIN_SLEEP: Duration = Duration::from_millis(1);

/// What to send. Datagram `i` of a thread goes to `targets[i % targets.len()]`, so the list sets
/// the mix (e.g. three closed-port entries and one nft-dropped entry: 3:1).
#[derive(Clone, Debug)]
pub struct Plan {
    pub targets: Vec<SocketAddrV4>,
    /// Total datagrams per second over all threads; `None` sends as fast as possible.
    pub rate: Option<u64>,
    pub duration: Duration,
    /// UDP payload bytes.
    pub payload: usize,
}

/// What was sent: exact, from the return values of `sendmmsg`.
#[derive(Clone, Debug, Default)]
pub struct Sent {
    /// Datagrams per entry of `Plan::targets`.
    pub per_target: Vec<u64>,
    pub elapsed: Duration,
}

impl Sent {
    pub fn total(&self) -> u64 {
        self.per_target.iter().sum()
    }

    /// Datagrams sent to `addr` (summed over the entries that name it).
    pub fn to(&self, plan: &Plan, addr: SocketAddrV4) -> u64 {
        plan.targets
            .iter()
            .zip(&self.per_target)
            .filter(|(t, _)| **t == addr)
            .map(|(_, n)| n)
            .sum()
    }

    pub fn per_s(&self) -> f64 {
        self.total() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// One UDP socket per sending thread, created in a namespace (a socket stays in the namespace
/// it was created in, whichever thread uses it).
pub struct Blaster {
    sockets: Vec<UdpSocket>,
}

impl Blaster {
    pub fn new(ns: &Netns, threads: usize) -> Result<Self> {
        let sockets = ns.run(|| {
            (0..threads.max(1))
                .map(|_| UdpSocket::bind("0.0.0.0:0"))
                .collect::<std::io::Result<Vec<_>>>()
        })??;
        Ok(Self { sockets })
    }

    pub fn threads(&self) -> usize {
        self.sockets.len()
    }

    /// Sends `plan` from every socket on its own thread and returns the exact counts.
    pub fn run(&self, plan: &Plan) -> Result<Sent> {
        if plan.targets.is_empty() {
            bail!("blast plan without targets");
        }
        let per_thread_rate = plan.rate.map(|r| r as f64 / self.sockets.len() as f64);
        let started = Instant::now();
        let results: Vec<Result<Vec<u64>>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .sockets
                .iter()
                .map(|sock| s.spawn(move || send_loop(sock, plan, per_thread_rate, started)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("blast thread panicked")))
                })
                .collect()
        });
        let mut sent = Sent {
            per_target: vec![0; plan.targets.len()],
            elapsed: started.elapsed(),
        };
        for r in results {
            for (total, n) in sent.per_target.iter_mut().zip(r?) {
                *total += n;
            }
        }
        Ok(sent)
    }
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

/// A token bucket when `rate` is set: send what is due (in batches of up to [`BATCH`]), then
/// sleep until a worthwhile batch is due again.
fn send_loop(
    sock: &UdpSocket,
    plan: &Plan,
    rate: Option<f64>,
    started: Instant,
) -> Result<Vec<u64>> {
    // Headers for BATCH + T messages: a call starts at header `sent % T`, so the mix holds
    // across calls of any size.
    let t = plan.targets.len();
    let mut addrs: Vec<libc::sockaddr_in> = (0..BATCH + t)
        .map(|i| sockaddr(plan.targets[i % t]))
        .collect();
    let payload = vec![0x5au8; plan.payload];
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr().cast_mut().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: mmsghdr is plain data; zero is a valid (empty) value for every field.
    let mut msgs: Vec<libc::mmsghdr> = (0..BATCH + t)
        .map(|_| unsafe { std::mem::zeroed() })
        .collect();
    for (m, a) in msgs.iter_mut().zip(addrs.iter_mut()) {
        m.msg_hdr.msg_name = (a as *mut libc::sockaddr_in).cast();
        m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        m.msg_hdr.msg_iov = &raw mut iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    // At low rates, smaller batches keep the traffic smooth (about one call per millisecond).
    let min_batch = rate.map_or(BATCH as u64, |r| {
        ((r / 1000.0) as u64).clamp(1, BATCH as u64)
    });
    let mut per_target = vec![0u64; plan.targets.len()];
    let mut sent = 0u64;
    loop {
        let elapsed = started.elapsed();
        if elapsed >= plan.duration {
            break;
        }
        let want = match rate {
            None => BATCH as u64,
            Some(r) => {
                let due = (elapsed.as_secs_f64() * r) as u64;
                let owed = due.saturating_sub(sent);
                if owed < min_batch {
                    let next = Duration::from_secs_f64((sent + min_batch) as f64 / r);
                    let wait = next.saturating_sub(elapsed).max(MIN_SLEEP);
                    std::thread::sleep(wait.min(plan.duration.saturating_sub(elapsed)));
                    continue;
                }
                owed.min(BATCH as u64)
            }
        };
        let first = (sent % t as u64) as usize;
        // SAFETY: `msgs` holds BATCH + t valid headers pointing at live buffers, and
        // first + want <= t + BATCH.
        let n = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr().add(first),
                want as libc::c_uint,
                0,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            bail!("sendmmsg: {e}");
        }
        let n = n as usize;
        for i in first..first + n {
            per_target[i % t] += 1;
        }
        sent += n as u64;
    }
    Ok(per_target)
}
