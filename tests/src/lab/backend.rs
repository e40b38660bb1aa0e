//! A pod's workload: a TCP echo server and a UDP echo server, which can be stopped and started
//! again (endpoint churn) while traffic still arrives.
//!
//! The sockets are created inside the pod's namespace and stay there; the threads serving them
//! run anywhere.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result};

use crate::netns::Netns;

/// How often a server looks at its stop flag.
const TICK: Duration = Duration::from_millis(50);
/// A client that goes quiet this long is given up on.
const IDLE: Duration = Duration::from_secs(3);

/// Echo servers on `[::]:tcp_port` and `[::]:udp_port` (dual stack) in one namespace.
pub struct Backend {
    stop: Arc<AtomicBool>,
    /// The TCP listener's fd, open until the threads see `stop`.
    listener: i32,
    threads: Vec<JoinHandle<()>>,
}

impl Backend {
    pub fn start(ns: &Netns, tcp_port: u16, udp_port: u16) -> Result<Self> {
        let (listener, udp) = ns
            .run(|| -> std::io::Result<_> {
                Ok((
                    TcpListener::bind(("::", tcp_port))?,
                    UdpSocket::bind(("::", udp_port))?,
                ))
            })?
            .with_context(|| format!("binding echo servers in {}", ns.name))?;
        listener.set_nonblocking(true)?;
        udp.set_read_timeout(Some(TICK))?;
        let fd = listener.as_raw_fd();
        let stop = Arc::new(AtomicBool::new(false));
        let threads = vec![
            std::thread::spawn({
                let stop = stop.clone();
                move || serve_tcp(&listener, &stop)
            }),
            std::thread::spawn({
                let stop = stop.clone();
                move || serve_udp(&udp, &stop)
            }),
        ];
        Ok(Self {
            stop,
            listener: fd,
            threads,
        })
    }

    /// Closes the listening sockets (new connections are refused from here on) and waits for
    /// the connections in progress.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        if self.threads.is_empty() {
            return; // halted already: the fd is closed, maybe reused
        }
        // Stop listening now, not at the server's next look at `stop`: from here SYNs get a
        // RST. (The fd is still open: its thread closes it only after seeing `stop`.)
        // SAFETY: shutdown on an fd we know to be open.
        unsafe { libc::shutdown(self.listener, libc::SHUT_RD) };
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.halt();
    }
}

fn serve_tcp(listener: &TcpListener, stop: &AtomicBool) {
    // Connection threads are scoped: when this returns, none is left holding a socket (which
    // would keep the pod's namespace alive after it is deleted).
    std::thread::scope(|s| {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((conn, _)) => {
                    s.spawn(move || {
                        let _ = echo(conn);
                    });
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    wait_readable(listener.as_raw_fd(), TICK);
                }
                Err(_) => std::thread::sleep(TICK),
            }
        }
    });
}

/// Echoes until the client's end of stream, then closes.
fn echo(mut conn: TcpStream) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(IDLE))?;
    conn.set_write_timeout(Some(IDLE))?;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return conn.shutdown(Shutdown::Both);
        }
        conn.write_all(&buf[..n])?;
    }
}

fn serve_udp(sock: &UdpSocket, stop: &AtomicBool) {
    let mut buf = [0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], from);
        }
    }
}

/// Waits until `fd` is readable or `timeout` passes.
pub(crate) fn wait_readable(fd: i32, timeout: Duration) {
    poll_one(fd, libc::POLLIN, timeout);
}

/// `poll` on one fd; returns its revents (0 on timeout).
pub(crate) fn poll_one(fd: i32, events: i16, timeout: Duration) -> i16 {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&raw mut p, 1, ms) };
    if r > 0 {
        p.revents
    } else {
        0
    }
}
