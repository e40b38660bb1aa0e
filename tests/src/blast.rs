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
pub const BATCH: usize = 64;
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

/// `sendmmsg` headers for a fixed list of destinations, one datagram each, all with the same
/// payload. The headers point into the struct's own heap buffers, which stay put when it moves.
pub struct Headers {
    msgs: Vec<libc::mmsghdr>,
    _addrs: Vec<libc::sockaddr_in>,
    _iov: Box<libc::iovec>,
    _payload: Vec<u8>,
}

impl Headers {
    pub fn new(dests: impl IntoIterator<Item = SocketAddrV4>, payload: usize) -> Self {
        let payload = vec![0x5au8; payload];
        let mut iov = Box::new(libc::iovec {
            iov_base: payload.as_ptr().cast_mut().cast(),
            iov_len: payload.len(),
        });
        let mut addrs: Vec<libc::sockaddr_in> = dests
            .into_iter()
            .map(|a| libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            })
            .collect();
        let msgs = addrs
            .iter_mut()
            .map(|a| {
                // SAFETY: mmsghdr is plain data; zero is a valid (empty) value for every field.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_name = (a as *mut libc::sockaddr_in).cast();
                m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
                m.msg_hdr.msg_iov = &raw mut *iov;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        Self {
            msgs,
            _addrs: addrs,
            _iov: iov,
            _payload: payload,
        }
    }

    /// Sends the datagrams of headers `first..first + want` (at most [`BATCH`], and within the
    /// list) with one `sendmmsg`: how many went, 0 when a signal interrupted it.
    pub fn send(&mut self, sock: &UdpSocket, first: usize, want: usize) -> Result<usize> {
        let want = want.min(BATCH).min(self.msgs.len().saturating_sub(first));
        // SAFETY: headers first..first + want exist and point at live buffers of ours.
        let n = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                self.msgs.as_mut_ptr().add(first),
                want as libc::c_uint,
                0,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(0);
            }
            bail!("sendmmsg: {e}");
        }
        Ok(n as usize)
    }
}

/// A token bucket for one sending thread: at low rates, smaller batches keep the traffic smooth
/// (about one call per millisecond), and it sleeps at least [`MIN_SLEEP`] between calls, so that
/// its wakeups stay near 1,000/s whatever the rate.
#[derive(Clone, Copy, Debug)]
pub struct Pacer {
    rate: f64,
    min_batch: u64,
}

impl Pacer {
    /// `rate` datagrams per second.
    pub fn new(rate: f64) -> Self {
        Self {
            rate,
            min_batch: ((rate / 1000.0) as u64).clamp(1, BATCH as u64),
        }
    }

    /// With `sent` so far at `elapsed`: how many to send now (at most [`BATCH`]), or how long to
    /// sleep until a worthwhile batch is due.
    pub fn owed(&self, elapsed: Duration, sent: u64) -> std::result::Result<usize, Duration> {
        let owed = ((elapsed.as_secs_f64() * self.rate) as u64).saturating_sub(sent);
        if owed < self.min_batch {
            let next = Duration::from_secs_f64((sent + self.min_batch) as f64 / self.rate);
            return Err(next.saturating_sub(elapsed).max(MIN_SLEEP));
        }
        Ok(owed.min(BATCH as u64) as usize)
    }
}

/// Sends `plan` from one socket as fast as it goes, or paced at `rate`.
fn send_loop(
    sock: &UdpSocket,
    plan: &Plan,
    rate: Option<f64>,
    started: Instant,
) -> Result<Vec<u64>> {
    // Headers for BATCH + T messages: a call starts at header `sent % T`, so the mix holds
    // across calls of any size.
    let t = plan.targets.len();
    let mut headers = Headers::new((0..BATCH + t).map(|i| plan.targets[i % t]), plan.payload);
    let pacer = rate.map(Pacer::new);
    let mut per_target = vec![0u64; plan.targets.len()];
    let mut sent = 0u64;
    loop {
        let elapsed = started.elapsed();
        if elapsed >= plan.duration {
            break;
        }
        let want = match pacer.map(|p| p.owed(elapsed, sent)) {
            None => BATCH,
            Some(Ok(n)) => n,
            Some(Err(wait)) => {
                std::thread::sleep(wait.min(plan.duration.saturating_sub(elapsed)));
                continue;
            }
        };
        let first = (sent % t as u64) as usize;
        let n = headers.send(sock, first, want)?;
        for i in first..first + n {
            per_target[i % t] += 1;
        }
        sent += n as u64;
    }
    Ok(per_target)
}
