//! `/metrics`, `/healthz` and `/readyz` of the agent.

use std::{
    io,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{output::metrics::Metrics, pipeline::unix_now};

/// `/healthz` fails when the ring buffer has not been drained for this long.
const HEALTH_STALE_SECS: u64 = 10;

/// What `/healthz` and `/readyz` look at.
#[derive(Clone, Debug, Default)]
pub struct Health {
    /// Unix seconds of the pipeline's last drain.
    pub last_drain: Arc<AtomicU64>,
    /// The pipeline runs: probes attached, signals handled (a stop now detaches cleanly).
    pub ready: Arc<AtomicBool>,
}

/// Serves until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Mutex<Metrics>>,
    health: Health,
) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let _ =
                tokio::time::timeout(Duration::from_secs(5), respond(sock, metrics, health)).await;
        });
    }
}

/// A minimal HTTP/1.1 responder: GET /metrics, /healthz and /readyz, nothing else.
async fn respond(
    mut sock: tokio::net::TcpStream,
    metrics: Arc<Mutex<Metrics>>,
    health: Health,
) -> io::Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    while len < buf.len() {
        let n = sock.read(&mut buf[len..]).await?;
        if n == 0 {
            break;
        }
        len += n;
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .render(),
        ),
        ("GET", "/healthz") => {
            let age = unix_now().saturating_sub(health.last_drain.load(Ordering::Relaxed));
            let missing = metrics
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .missing_collectors();
            if age > HEALTH_STALE_SECS {
                (
                    "503 Service Unavailable",
                    "text/plain",
                    format!("ring buffer not drained for {age} s\n"),
                )
            } else if missing.is_empty() {
                ("200 OK", "text/plain", "ok\n".to_owned())
            } else {
                // Still healthy: drops are traced; what is missing is said, not restarted for.
                (
                    "200 OK",
                    "text/plain",
                    format!("ok, degraded: no probe for {}\n", missing.join(", ")),
                )
            }
        }
        ("GET", "/readyz") if health.ready.load(Ordering::Relaxed) => {
            ("200 OK", "text/plain", "ready\n".to_owned())
        }
        ("GET", "/readyz") => (
            "503 Service Unavailable",
            "text/plain",
            "starting\n".to_owned(),
        ),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".to_owned(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(response.as_bytes()).await?;
    sock.shutdown().await
}
