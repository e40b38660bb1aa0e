//! Traffic with known counts. Call these inside `Netns::run` so the sockets live in a namespace.

use std::{
    io::ErrorKind,
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::{bail, Result};

/// Connects `n` times to `addr`, expecting each to be refused (a closed port answers RST).
/// Returns the number refused.
pub fn tcp_refused(addr: SocketAddr, n: u32) -> Result<u32> {
    let mut refused = 0;
    for _ in 0..n {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => refused += 1,
            Err(e) => bail!("connect {addr}: {e}"),
            Ok(_) => bail!("connect {addr}: unexpectedly accepted"),
        }
    }
    Ok(refused)
}

/// Sends `n` datagrams of `len` bytes to `addr` from one unconnected socket (ICMP errors are
/// not reported back to it). Returns the number sent.
pub fn udp_send(addr: SocketAddr, n: u32, len: usize) -> Result<u32> {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let sock = UdpSocket::bind(bind)?;
    let payload = vec![0x5a; len];
    let mut sent = 0;
    for _ in 0..n {
        sock.send_to(&payload, addr)?;
        sent += 1;
    }
    Ok(sent)
}

/// Sends `n` IPv4 packets with IP protocol `proto` (no transport header) to `dst` through a raw
/// socket. Returns the number sent.
pub fn raw_ipv4(dst: std::net::Ipv4Addr, proto: u8, n: u32) -> Result<u32> {
    // SAFETY: plain socket calls with valid arguments; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, i32::from(proto)) };
    if fd < 0 {
        bail!("raw socket: {}", std::io::Error::last_os_error());
    }
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(dst.octets()),
        },
        sin_zero: [0; 8],
    };
    let payload = [0u8; 16];
    let mut sent = 0;
    for _ in 0..n {
        // SAFETY: valid buffer and sockaddr of the stated sizes.
        let r = unsafe {
            libc::sendto(
                fd,
                payload.as_ptr().cast(),
                payload.len(),
                0,
                (&raw const sa).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: closing our own fd.
            unsafe { libc::close(fd) };
            bail!("sendto {dst}: {e}");
        }
        sent += 1;
    }
    // SAFETY: closing our own fd.
    unsafe { libc::close(fd) };
    Ok(sent)
}

/// Opens `n` TCP connections to an echo server at `addr`, one after the other: each sends one
/// byte, half-closes and reads the echo to the end (as the lab's generator does). Returns the
/// number echoed.
pub fn tcp_echo(addr: SocketAddr, n: u32) -> Result<u32> {
    use std::io::{Read, Write};
    let mut echoed = 0;
    for _ in 0..n {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"x")?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut got = Vec::new();
        s.read_to_end(&mut got)?;
        echoed += u32::from(got == b"x");
    }
    Ok(echoed)
}
