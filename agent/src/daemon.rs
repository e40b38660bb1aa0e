//! `lbtrace agent`: the node daemon. Metrics for Prometheus, health, an optional rotated event
//! file, SIGHUP to reload the VIP list, SIGTERM/SIGINT to detach and exit.

use std::{
    fs::{self, File},
    io::{self, BufWriter, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::Context as _;
use ipnet::IpNet;
use lbtrace::{
    attribution::VipSet,
    btf::DropReasons,
    config::Config,
    metrics::Metrics,
    output::{Clock, Context},
    ownership::{Ownership, OwnershipConfig},
    privileges,
    probes::{self, KernelFilter, LoadOptions, ProbeMode, Tracer},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    cmd::{
        load_btf, load_kallsyms, require_privileges, stream, unix_now, Reader, TablePressure,
        UsageError,
    },
    AgentArgs, LogFormat,
};

/// The default keeps metrics on the node itself; all interfaces must be asked for.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";
const DEFAULT_EVENTS_MAX_BYTES: u64 = 64 << 20;
/// `/healthz` fails when the ring buffer has not been drained for this long.
const HEALTH_STALE_SECS: u64 = 10;

/// Flags (and their `LBTRACE_*` variables) over the config file over defaults.
struct Settings {
    vips: Vec<IpNet>,
    metrics_addr: SocketAddr,
    node: String,
    netns: Option<u32>,
    log_json: bool,
    events_file: Option<PathBuf>,
    events_max_bytes: u64,
    probe_mode: ProbeMode,
    ring_size: u32,
    arp: bool,
    discover_vips: bool,
}

fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

fn settings(args: &AgentArgs) -> anyhow::Result<Settings> {
    let file = match &args.config {
        Some(p) => Config::load(p).map_err(|e| UsageError(e.to_string()))?,
        None => Config::default(),
    };
    let f = &file.file;
    let mut vips = args.vips.clone();
    if vips.is_empty() {
        vips = file.vips.clone();
    }
    let metrics_addr = match (&args.metrics_addr, file.metrics_addr) {
        (Some(a), _) => *a,
        (None, Some(a)) => a,
        (None, None) => DEFAULT_METRICS_ADDR.parse()?,
    };
    let probe_mode = match (args.probe_mode, f.probe_mode.as_deref()) {
        (Some(m), _) => m,
        (None, Some("btf")) => ProbeMode::Btf,
        (None, Some("tracepoint")) => ProbeMode::Tracepoint,
        _ => ProbeMode::Auto,
    };
    Ok(Settings {
        vips,
        metrics_addr,
        node: args
            .node_name
            .clone()
            .or_else(|| f.node_name.clone())
            .or_else(|| std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()))
            .unwrap_or_else(hostname),
        netns: args.netns.or(f.netns),
        log_json: match args.log_format {
            Some(l) => l == LogFormat::Json,
            None => f.log_format.as_deref() == Some("json"),
        },
        events_file: args
            .events_file
            .clone()
            .or_else(|| f.events_file.as_ref().map(PathBuf::from)),
        events_max_bytes: args
            .events_max_bytes
            .or(f.events_max_bytes)
            .unwrap_or(DEFAULT_EVENTS_MAX_BYTES),
        probe_mode,
        ring_size: args.ring_size.or(f.ring_size).unwrap_or(4 << 20),
        arp: !(args.no_arp || f.no_arp == Some(true)),
        discover_vips: args.discover_vips || f.discover_vips == Some(true),
    })
}

/// NDJSON events, rotated to `PATH.1` once past the size (only between drains, so a line is
/// never split across files).
struct RotatingFile {
    path: PathBuf,
    max: u64,
    file: BufWriter<File>,
    written: u64,
}

impl RotatingFile {
    fn open(path: &Path, max: u64) -> io::Result<Self> {
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let written = file.metadata()?.len();
        Ok(Self {
            path: path.to_owned(),
            max,
            file: BufWriter::new(file),
            written,
        })
    }
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()?;
        if self.written > self.max {
            let mut rotated = self.path.clone().into_os_string();
            rotated.push(".1");
            fs::rename(&self.path, &rotated)?;
            *self = Self::open(&self.path, self.max)?;
        }
        Ok(())
    }
}

pub fn agent(args: AgentArgs) -> anyhow::Result<()> {
    let s = settings(&args)?;
    crate::init_logging(s.log_json, "info");
    require_privileges()?;
    // Bind before loading anything: a taken port is a usage error, with nothing left behind.
    let listener = std::net::TcpListener::bind(s.metrics_addr).map_err(|e| {
        UsageError(format!(
            "cannot listen on {} for metrics: {e}",
            s.metrics_addr
        ))
    })?;
    listener.set_nonblocking(true)?;
    privileges::raise_memlock();
    let btf = load_btf()?;
    let reasons = DropReasons::from_btf(&btf)?;
    let kallsyms = load_kallsyms();
    let opts = LoadOptions {
        mode: s.probe_mode,
        filter: KernelFilter {
            netns: s.netns,
            ..KernelFilter::default()
        },
        ring_bytes: s.ring_size,
        wakeup_bytes: u64::from(s.ring_size / 4),
        arp: s.arp,
    };
    let mut tracer = Tracer::load(&btf, &reasons, &opts)?;
    // The parsed BTF is tens of MB; everything needed from it is in the programs now.
    drop(btf);
    for (what, r) in tracer.features.list() {
        if let Err(e) = r {
            tracing::warn!("{what} unavailable: {e}");
        }
    }
    let ring = tracer.take_ring()?;
    let metrics = Arc::new(Mutex::new(Metrics::new(
        s.node.clone(),
        tracer.statuses.clone(),
        tracer.maps_bytes(),
    )));
    let out: Box<dyn Write> = match &s.events_file {
        Some(p) => Box::new(
            RotatingFile::open(p, s.events_max_bytes)
                .with_context(|| format!("opening the event file {}", p.display()))?,
        ),
        None => Box::new(io::sink()),
    };
    let last_drain = Arc::new(AtomicU64::new(unix_now()));
    let config_path = args.config.clone();
    let flag_vips = args.vips.clone();
    let reader = Reader {
        ctx: Context {
            reasons: &reasons,
            kallsyms: &kallsyms,
            clock: Clock::now(),
        },
        vips: VipSet::from_nets(s.vips.clone()),
        select_vips: false,
        out,
        json: true,
        colour: false,
        limit: None,
        delivered: 0,
        printed: 0,
        decode_errors: 0,
        out_closed: false,
        by_vip: Default::default(),
        tables: TablePressure::start(),
        ownership: Ownership::new(OwnershipConfig::default(), s.discover_vips),
        node: Some(s.node.clone()),
        metrics: Some(metrics.clone()),
        last_drain: last_drain.clone(),
        // VIPs given as flags win, as at start; otherwise the file is read again.
        reload: Some(Box::new(move || {
            if !flag_vips.is_empty() {
                return Ok(VipSet::from_nets(flag_vips.clone()));
            }
            let vips = match &config_path {
                Some(p) => Config::load(p)?.vips,
                None => Vec::new(),
            };
            Ok(VipSet::from_nets(vips))
        })),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the event loop")?;
    tracing::info!(
        node = %s.node,
        metrics = %s.metrics_addr,
        probe = probes::probe_name(tracer.active),
        vips = s.vips.len(),
        "lbtrace agent running"
    );
    let (mut reader, mut ring) = rt.block_on(async {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        tokio::spawn(serve(listener, metrics.clone(), last_drain));
        stream(reader, ring, None, &tracer, || {}).await
    })?;
    tracer.detach();
    std::thread::sleep(Duration::from_millis(20));
    reader.drain(&mut ring);
    let _ = reader.out.flush();
    tracing::info!(
        delivered = reader.delivered,
        "lbtrace agent stopped; programs detached"
    );
    Ok(())
}

async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Mutex<Metrics>>,
    last_drain: Arc<AtomicU64>,
) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        let last_drain = last_drain.clone();
        tokio::spawn(async move {
            let _ =
                tokio::time::timeout(Duration::from_secs(5), respond(sock, metrics, last_drain))
                    .await;
        });
    }
}

/// A minimal HTTP/1.1 responder: GET /metrics, /healthz and /readyz, nothing else.
async fn respond(
    mut sock: tokio::net::TcpStream,
    metrics: Arc<Mutex<Metrics>>,
    last_drain: Arc<AtomicU64>,
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
            let age = unix_now().saturating_sub(last_drain.load(Ordering::Relaxed));
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
        ("GET", "/readyz") => ("200 OK", "text/plain", "ready\n".to_owned()),
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
