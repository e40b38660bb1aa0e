//! The ground truth: TCP and UDP requests to each VIP at a set rate from a client namespace,
//! each one judged by its answer (the echo, whole), counted per second.
//!
//! A TCP attempt connects, sends its payload, half-closes and reads the echo to the end; a UDP
//! attempt sends one datagram (always with DF: `IP_PMTUDISC_PROBE`) from a fresh connected
//! socket and waits for the echo. Each attempt also reports how many segments TCP sent again
//! (`tcpi_total_retrans`: SYN and data), since every retransmission stands for one more packet
//! lost: a connect that times out after SYNs at 0, 1 and 2 s lost three.

use std::{
    io::{Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};

use super::{backend::poll_one, TCP_PORT, UDP_PORT};
use crate::netns::Netns;

/// A UDP payload size that stands for "a full 1500-byte packet": 1472 bytes over IPv4, 1452
/// over IPv6 (its header is 20 bytes longer).
pub const FULL_PACKET: usize = usize::MAX;

/// Bytes a TCP attempt sends (and expects back).
const TCP_PAYLOAD: usize = 64;

#[derive(Clone, Debug)]
pub struct Load {
    /// Attempts per second per VIP and protocol.
    pub rate: u32,
    pub duration: Duration,
    /// Connect, and then the whole exchange, must each finish within this.
    pub tcp_timeout: Duration,
    pub udp_timeout: Duration,
    /// UDP payload sizes, used in turn.
    pub udp_payloads: Vec<usize>,
}

impl Default for Load {
    fn default() -> Self {
        Self {
            rate: 10,
            duration: Duration::from_secs(10),
            // SYNs at 0, 1 and 2 s: retransmissions are part of every failed connect.
            tcp_timeout: Duration::from_millis(2500),
            udp_timeout: Duration::from_secs(1),
            udp_payloads: vec![64],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

#[derive(Clone, Debug)]
pub struct Attempt {
    pub vip: IpAddr,
    pub proto: Proto,
    /// When it started, from the generator's start.
    pub at: Duration,
    pub ok: bool,
    /// Segments TCP sent again (0 for UDP).
    pub retrans: u32,
}

/// Sums over a set of attempts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub attempts: u64,
    pub ok: u64,
    pub failed: u64,
    pub retrans: u64,
}

impl Totals {
    fn add(&mut self, a: &Attempt) {
        self.attempts += 1;
        if a.ok {
            self.ok += 1;
        } else {
            self.failed += 1;
        }
        self.retrans += u64::from(a.retrans);
    }

    /// Packets the network lost, as the client saw it: one per failed attempt (its first
    /// packet, or for UDP its only one) plus every retransmission.
    pub fn lost(&self) -> u64 {
        self.failed + self.retrans
    }
}

#[derive(Clone, Debug)]
pub struct Report {
    /// Wall-clock start, to line attempts up with lbtrace's timestamps.
    pub started: SystemTime,
    pub duration: Duration,
    pub attempts: Vec<Attempt>,
}

impl Report {
    pub fn totals(&self, vip: IpAddr) -> Totals {
        let mut t = Totals::default();
        self.attempts
            .iter()
            .filter(|a| a.vip == vip)
            .for_each(|a| t.add(a));
        t
    }

    /// Totals for `vip` per second of the run (by attempt start).
    pub fn per_second(&self, vip: IpAddr) -> Vec<Totals> {
        let mut secs = vec![Totals::default(); self.duration.as_secs().max(1) as usize];
        for a in self.attempts.iter().filter(|a| a.vip == vip) {
            let i = (a.at.as_secs() as usize).min(secs.len() - 1);
            secs[i].add(a);
        }
        secs
    }

    /// Start of the first and of the last attempt to `vip` that failed or retransmitted.
    pub fn loss_span(&self, vip: IpAddr) -> Option<(Duration, Duration)> {
        let lossy = self
            .attempts
            .iter()
            .filter(|a| a.vip == vip && (!a.ok || a.retrans > 0))
            .map(|a| a.at);
        lossy.clone().min().zip(lossy.max())
    }
}

/// A generator running on a thread of its own in the client namespace.
pub struct Running(JoinHandle<Result<Report>>);

impl Running {
    /// Waits for the run (its duration plus the slowest attempt's timeout).
    pub fn join(self) -> Result<Report> {
        self.0
            .join()
            .map_err(|_| anyhow::anyhow!("generator panicked"))?
    }
}

/// Starts sending to TCP port 80 and UDP port 53 of each of `vips` from `client`.
pub fn start(client: &Netns, vips: &[IpAddr], load: Load) -> Result<Running> {
    let vips = vips.to_vec();
    let handle = client.spawn(move || run(&vips, &load))?;
    Ok(Running(handle))
}

fn run(vips: &[IpAddr], load: &Load) -> Result<Report> {
    let started = SystemTime::now();
    let t0 = Instant::now();
    let interval = Duration::from_secs(1) / load.rate.max(1);
    let ticks = (load.duration.as_secs_f64() * f64::from(load.rate.max(1))) as u32;
    // Attempt threads are created from this one, so their sockets are in the client namespace.
    let attempts = std::thread::scope(|s| -> Result<Vec<Attempt>> {
        let mut handles = Vec::new();
        for tick in 0..ticks {
            if super::interrupted() {
                break;
            }
            let due = t0 + interval * tick;
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            let udp_payload = load.udp_payloads[tick as usize % load.udp_payloads.len().max(1)];
            for &vip in vips {
                for proto in [Proto::Tcp, Proto::Udp] {
                    let h = std::thread::Builder::new()
                        .stack_size(128 * 1024)
                        .spawn_scoped(s, move || {
                            let at = t0.elapsed();
                            let (ok, retrans) = match proto {
                                Proto::Tcp => tcp(
                                    SocketAddr::new(vip, TCP_PORT),
                                    TCP_PAYLOAD,
                                    load.tcp_timeout,
                                ),
                                Proto::Udp => (
                                    udp(
                                        SocketAddr::new(vip, UDP_PORT),
                                        udp_payload,
                                        load.udp_timeout,
                                    )
                                    .unwrap_or(false),
                                    0,
                                ),
                            };
                            Attempt {
                                vip,
                                proto,
                                at,
                                ok,
                                retrans,
                            }
                        })
                        .context("spawning an attempt")?;
                    handles.push(h);
                }
            }
        }
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("attempt panicked")))
            .collect()
    })?;
    Ok(Report {
        started,
        duration: load.duration,
        attempts,
    })
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// One TCP exchange: (whole echo received, segments retransmitted).
fn tcp(addr: SocketAddr, len: usize, timeout: Duration) -> (bool, u32) {
    let Ok((stream, connected)) = connect(addr, timeout) else {
        return (false, 0);
    };
    let ok = connected && exchange(&stream, len, timeout).unwrap_or(false);
    (ok, total_retrans(&stream))
}

/// Connects with a timeout: (the socket, whether it connected). The socket is kept when the
/// connect fails, so that its TCP_INFO (SYN retransmissions) can still be read.
fn connect(addr: SocketAddr, timeout: Duration) -> Result<(TcpStream, bool)> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket call; the fd is owned right after.
    let raw = unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    anyhow::ensure!(raw >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let (sa, len) = sockaddr(addr);
    // SAFETY: a sockaddr_storage holding an address of `len` bytes.
    let r = unsafe { libc::connect(fd.as_raw_fd(), (&raw const sa).cast(), len) };
    let in_progress =
        r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINPROGRESS);
    let connected = if r == 0 {
        true
    } else if in_progress && poll_one(fd.as_raw_fd(), libc::POLLOUT, timeout) != 0 {
        let mut err: libc::c_int = 0;
        let mut elen = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: SO_ERROR writes one c_int.
        unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&raw mut err).cast(),
                &raw mut elen,
            )
        };
        err == 0
    } else {
        false
    };
    Ok((TcpStream::from(fd), connected))
}

fn exchange(stream: &TcpStream, len: usize, timeout: Duration) -> std::io::Result<bool> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut s = stream;
    let sent = payload(len);
    s.write_all(&sent)?;
    stream.shutdown(Shutdown::Write)?;
    let mut got = Vec::with_capacity(len);
    s.read_to_end(&mut got)?;
    Ok(got == sent)
}

fn total_retrans(stream: &TcpStream) -> u32 {
    // SAFETY: tcp_info is plain data; all-zero is valid.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: TCP_INFO writes at most `len` bytes into `info`.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &raw mut len,
        )
    };
    if r == 0 {
        info.tcpi_total_retrans
    } else {
        0
    }
}

/// One UDP request from a fresh socket (a new flow, as a resolver's): whether the echo came.
fn udp(addr: SocketAddr, len: usize, timeout: Duration) -> std::io::Result<bool> {
    let len = match (len, addr.is_ipv4()) {
        (FULL_PACKET, true) => 1500 - 20 - 8,
        (FULL_PACKET, false) => 1500 - 40 - 8,
        (len, _) => len,
    };
    let sock = if addr.is_ipv4() {
        UdpSocket::bind("0.0.0.0:0")?
    } else {
        UdpSocket::bind("[::]:0")?
    };
    // Keep DF on large datagrams whatever the path MTU cache says.
    let (level, opt, val) = if addr.is_ipv4() {
        (
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_PROBE,
        )
    } else {
        (
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_PROBE,
        )
    };
    // SAFETY: an int option on our socket.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            opt,
            (&raw const val).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    sock.connect(addr)?;
    sock.set_read_timeout(Some(timeout))?;
    let sent = payload(len);
    sock.send(&sent)?;
    let mut buf = vec![0u8; len + 1];
    let n = sock.recv(&mut buf)?;
    Ok(buf[..n] == sent[..])
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe { std::ptr::write((&raw mut ss).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in6 and suitably aligned.
            unsafe { std::ptr::write((&raw mut ss).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}
