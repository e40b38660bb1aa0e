//! The tracers under comparison, each started, measured and stopped the same way: no tracer,
//! `lbtrace watch --json` (stdout read and discarded), `lbtrace agent` (Prometheus metrics), the
//! bpftrace one-liner, and empty programs on the hooks a dropped packet crosses (the floor).

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc::{self, Sender},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::counts::{bpftrace_counts, lbtrace_summary, metrics_counts};
pub use super::counts::{kernel_reason_names, Counts};
pub(super) use super::counts::{label, samples};
pub use super::kind::{Kind, Scope};
use super::{kind::TX_PROBES, measure};

/// The peer: Debian's bpftrace 0.17 runs the one-liner as written (`args->reason` is the
/// tracepoint's `enum skb_drop_reason reason` field, printed as its number).
pub const BPFTRACE_PROGRAM: &str = "tracepoint:skb:kfree_skb { @[args->reason] = count(); }";

/// Whether this build of lbtrace has the `agent` subcommand.
pub fn agent_available(bin: &Path) -> bool {
    Command::new(bin)
        .args(["agent", "--help"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A marker drop seen on stdout: `(source port, when its line was read)`.
pub type MarkerSeen = (u16, Instant);

/// The drop records the bench read from a tracer's stdout, every one of them, by reason.
#[derive(Clone, Debug, Default)]
pub struct Received {
    pub records: u64,
    pub by_reason: BTreeMap<String, u64>,
}

impl Received {
    /// Counts one line if it is a drop record.
    fn line(&mut self, line: &[u8]) {
        if !contains(line, b"\"kind\":\"drop\"") {
            return;
        }
        self.records += 1;
        let reason = string_after(line, b"\"reason\":\"").unwrap_or_default();
        *self.by_reason.entry(reason).or_insert(0) += 1;
    }
}

/// Reads a child's output as it comes, keeping only the tail for the summary but counting every
/// drop record ([`Received`]); optionally signals a line containing `ready`, and reports marker
/// lines (`"dport":PORT,`) with the time they arrived.
struct Pump {
    tid: Arc<AtomicU32>,
    handle: JoinHandle<(Vec<u8>, Received)>,
}

const TAIL_KEEP: usize = 64 << 10;

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The string after `key` (which ends in its opening quote) in a JSON line.
fn string_after(line: &[u8], key: &[u8]) -> Option<String> {
    let at = line.windows(key.len()).position(|w| w == key)? + key.len();
    let end = line[at..].iter().position(|&b| b == b'"')?;
    Some(String::from_utf8_lossy(&line[at..at + end]).into_owned())
}

/// The number after `key` in a JSON line, e.g. `"sport":` → 40000.
fn number_after(line: &[u8], key: &[u8]) -> Option<u16> {
    let at = line.windows(key.len()).position(|w| w == key)? + key.len();
    let digits: String = line[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .map(|&b| char::from(b))
        .collect();
    digits.parse().ok()
}

impl Pump {
    fn start(
        mut stream: impl Read + Send + 'static,
        ready: Option<(&'static str, Sender<()>)>,
        markers: Option<(u16, Sender<MarkerSeen>)>,
    ) -> Self {
        let tid = Arc::new(AtomicU32::new(0));
        let tid_w = Arc::clone(&tid);
        let handle = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tid_w.store(unsafe { libc::gettid() } as u32, Ordering::Relaxed);
            let needle = markers.as_ref().map(|(p, _)| format!("\"dport\":{p},"));
            let mut ready = ready;
            let mut tail = Vec::with_capacity(2 * TAIL_KEEP);
            let mut line = Vec::new();
            let mut received = Received::default();
            let mut buf = vec![0u8; 256 << 10];
            loop {
                let n = match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let now = Instant::now();
                let chunk = &buf[..n];
                tail.extend_from_slice(chunk);
                if tail.len() > 2 * TAIL_KEEP {
                    tail.drain(..tail.len() - TAIL_KEEP);
                }
                if let Some((pattern, tx)) = &ready {
                    if contains(&tail, pattern.as_bytes()) {
                        let _ = tx.send(());
                        ready = None;
                    }
                }
                for part in chunk.split_inclusive(|&b| b == b'\n') {
                    line.extend_from_slice(part);
                    if line.last() != Some(&b'\n') {
                        break;
                    }
                    received.line(&line);
                    if let (Some(needle), Some((_, tx))) = (&needle, &markers) {
                        if contains(&line, needle.as_bytes()) {
                            if let Some(sport) = number_after(&line, b"\"sport\":") {
                                let _ = tx.send((sport, now));
                            }
                        }
                    }
                    line.clear();
                }
            }
            (tail, received)
        });
        Self { tid, handle }
    }

    fn cpu_ns(&self) -> u64 {
        match self.tid.load(Ordering::Relaxed) {
            0 => 0,
            tid => measure::thread_cpu_ns(std::process::id(), tid),
        }
    }

    fn finish(self) -> (String, Received) {
        let (tail, received) = self.handle.join().unwrap_or_default();
        (String::from_utf8_lossy(&tail).into_owned(), received)
    }
}

/// A pipe large enough that lbtrace does not block on it between two reads.
fn widen_pipe(fd: &impl AsRawFd) {
    // SAFETY: fcntl on a pipe fd we own; failure only leaves the default size.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
}

/// A started tracer (or none).
pub struct Running {
    pub kind: Kind,
    /// [`Kind::Hooks`]: the empty programs, attached while they live.
    _floors: Vec<super::floor::Floor>,
    child: Option<Child>,
    stdout: Option<Pump>,
    stderr: Option<Pump>,
    metrics: Option<SocketAddr>,
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Running {
    /// Starts `kind` and returns once its probes are attached. `markers`: report stdout lines
    /// of drops to that port (lbtrace watch only).
    pub fn start(
        kind: Kind,
        bin: &Path,
        scope: Scope,
        markers: Option<(u16, Sender<MarkerSeen>)>,
    ) -> Result<Self> {
        let mut args = kind.args(scope);
        if markers.is_some() {
            // Markers share their sampling key (VIP, NO_SOCKET, drop site) with the flood:
            // the latency run sends every drop as a record.
            args.extend(["--sample-limit".to_owned(), "0".to_owned()]);
        }
        Self::start_args(kind, bin, args, markers)
    }

    /// [`Running::start`] with its own command line (`ADDR` stands for the metrics address).
    pub fn start_args(
        kind: Kind,
        bin: &Path,
        args: Vec<String>,
        markers: Option<(u16, Sender<MarkerSeen>)>,
    ) -> Result<Self> {
        if matches!(kind, Kind::None | Kind::Hooks) {
            return Ok(Self {
                kind,
                _floors: if kind == Kind::Hooks {
                    super::floor::Floor::drop_path()?
                } else {
                    Vec::new()
                },
                child: None,
                stdout: None,
                stderr: None,
                metrics: None,
            });
        }
        let metrics = match kind {
            Kind::Agent | Kind::AgentNoTx => Some(SocketAddr::from(([127, 0, 0, 1], free_port()?))),
            _ => None,
        };
        let mut cmd = Command::new(if kind == Kind::Bpftrace {
            Path::new("bpftrace")
        } else {
            bin
        });
        for a in args {
            cmd.arg(match metrics {
                Some(m) if a == "ADDR" => m.to_string(),
                _ => a,
            });
        }
        if kind == Kind::AgentNoTx {
            cmd.env("LBTRACE_DISABLE_PROBES", TX_PROBES);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        let out = child.stdout.take().context("stdout")?;
        let err = child.stderr.take().context("stderr")?;
        widen_pipe(&out);
        let (ready_tx, ready_rx) = mpsc::channel();
        let (out_ready, err_ready) = match kind {
            Kind::Watch => (None, Some(("lbtrace: tracing", ready_tx))),
            // bpftrace says this just before it attaches; the grace below covers the attach.
            Kind::Bpftrace => (Some(("Attaching", ready_tx)), None),
            _ => (None, None),
        };
        let mut running = Self {
            kind,
            _floors: Vec::new(),
            stdout: Some(Pump::start(out, out_ready, markers)),
            stderr: Some(Pump::start(err, err_ready, None)),
            child: Some(child),
            metrics,
        };
        let ready = match metrics {
            Some(addr) => wait_ready(addr, Duration::from_secs(60)),
            None => ready_rx.recv_timeout(Duration::from_secs(60)).is_ok(),
        };
        if !ready {
            let name = kind.name();
            let out = running.kill();
            bail!("{name} did not become ready: {}", out.trim());
        }
        if kind == Kind::Bpftrace {
            std::thread::sleep(Duration::from_millis(750));
        }
        if let (Kind::AgentNoTx, Some(addr)) = (kind, metrics) {
            // A renamed probe would leave tx attached, and the baseline would be the agent.
            if let Err(e) = tx_refused(addr) {
                running.kill();
                return Err(e);
            }
        }
        Ok(running)
    }

    /// Where the agent serves /metrics.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// CPU time our threads spent reading the tracer's output (subtracted from busy time: with
    /// stdout on /dev/null nobody would read it).
    pub fn reader_cpu_ns(&self) -> u64 {
        self.stdout.as_ref().map_or(0, Pump::cpu_ns) + self.stderr.as_ref().map_or(0, Pump::cpu_ns)
    }

    fn kill(&mut self) -> String {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
        let err = self.stderr.take().map(Pump::finish).unwrap_or_default().0;
        let out = self.stdout.take().map(Pump::finish).unwrap_or_default().0;
        format!("{err}{out}")
    }

    /// Stops the tracer (SIGINT, as a person would) and returns its counts; `names` maps
    /// drop-reason codes to names (bpftrace prints codes).
    pub fn stop(mut self, names: &BTreeMap<u32, String>) -> Result<Option<Counts>> {
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        let scraped = self.metrics.map(settled_metrics);
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{} did not stop within 30 s of SIGINT", self.kind.name());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let (out, received) = self.stdout.take().map(Pump::finish).unwrap_or_default();
        let err = self.stderr.take().map(Pump::finish).unwrap_or_default().0;
        if !status.success() {
            bail!("{} exited with {status}: {}", self.kind.name(), err.trim());
        }
        let counts = match self.kind {
            Kind::None | Kind::Hooks => return Ok(None),
            Kind::Watch => Counts {
                received: Some(received),
                ..lbtrace_summary(&out)?
            },
            Kind::Agent | Kind::AgentNoTx => {
                metrics_counts(&scraped.context("no metrics address")??)
            }
            Kind::Bpftrace => bpftrace_counts(&out, names),
        };
        Ok(Some(counts))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.kill();
        }
    }
}

/// The agent binds its port before it loads its probes, but answers only once they are
/// attached: an answer from /readyz means ready.
fn wait_ready(addr: SocketAddr, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if http_get(addr, "/readyz").is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// That the agent at `addr` attached no tx probe.
fn tx_refused(addr: SocketAddr) -> Result<()> {
    no_tx_probe(&http_get(addr, "/metrics")?)
}

/// That the metrics list the tx probes (`lbtrace_probe_attached{collector="xmit"}`), all 0.
fn no_tx_probe(metrics: &str) -> Result<()> {
    let xmit: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("lbtrace_probe_attached{") && l.contains("collector=\"xmit\""))
        .collect();
    if xmit.is_empty() || xmit.iter().any(|l| !l.ends_with(" 0")) {
        bail!(
            "{TX_PROBES} did not leave the agent without a tx probe: {}",
            xmit.join("; ")
        );
    }
    Ok(())
}

/// The agent refreshes its kernel counters once a second: scrape until they account for every
/// record delivered or lost and have not moved for longer than a refresh (4 s at most). Two
/// equal scrapes inside one second prove nothing: both can show the refresh before the last
/// drops, and once every key is past its sample limit no record moves the other side either.
fn settled_metrics(addr: SocketAddr) -> Result<String> {
    const STILL: Duration = Duration::from_millis(1500);
    let end = Instant::now() + Duration::from_secs(4);
    let mut last: Option<(Option<u64>, Instant)> = None;
    loop {
        let text = http_get(addr, "/metrics")?;
        let c = metrics_counts(&text);
        let accounted = c.delivered.unwrap_or(0) + c.lost.unwrap_or(0);
        let complete = c.seen == Some(accounted + c.sampled_out.unwrap_or(0));
        let since = match last {
            Some((seen, at)) if seen == c.seen => at,
            _ => Instant::now(),
        };
        if (complete && since.elapsed() >= STILL) || Instant::now() > end {
            return Ok(text);
        }
        last = Some((c.seen, since));
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `GET path`: the body of a 200 answer.
pub(super) fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP answer")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("metrics: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_no_tx_baseline_needs_every_tx_probe_refused() {
        let line = |probe: &str, v: u8| {
            format!(
                "lbtrace_probe_attached{{probe=\"{probe}\",collector=\"xmit\",node=\"n\"}} {v}\n"
            )
        };
        let (btf, tp) = (
            "tp_btf/net_dev_start_xmit",
            "tracepoint/net/net_dev_start_xmit",
        );
        let refused = line(btf, 0) + &line(tp, 0);
        assert!(no_tx_probe(&refused).is_ok());
        assert!(no_tx_probe(&(line(btf, 0) + &line(tp, 1))).is_err());
        assert!(
            no_tx_probe("lbtrace_up 1\n").is_err(),
            "not listed: not proven"
        );
    }

    #[test]
    fn reads_the_stream_as_it_comes() {
        assert_eq!(
            number_after(b"{\"sport\":40123,\"dst\"", b"\"sport\":"),
            Some(40123)
        );
        let mut r = Received::default();
        for l in [
            &b"{\"kind\":\"drop\",\"reason\":\"NO_SOCKET\",\"x\":1}\n"[..],
            b"{\"kind\":\"drop\",\"reason\":\"NO_SOCKET\"}\n",
            b"{\"kind\":\"arp\"}\n",
            b"{\"kind\":\"summary\",\"drops_by_reason\":{\"NO_SOCKET\":2}}\n",
        ] {
            r.line(l);
        }
        assert_eq!((r.records, r.by_reason["NO_SOCKET"]), (2, 2));
    }

    #[test]
    fn every_record_is_counted_not_only_the_tail() {
        let line = "{\"kind\":\"drop\",\"reason\":\"NETFILTER_DROP\",\"pad\":\"................................\"}\n";
        let n = 20_000;
        let mut text = line.repeat(n);
        text.push_str("{\"kind\":\"summary\"}\n");
        assert!(text.len() > 4 * TAIL_KEEP);
        let (tail, received) =
            Pump::start(std::io::Cursor::new(text.into_bytes()), None, None).finish();
        assert!(tail.len() <= 2 * TAIL_KEEP);
        assert_eq!(received.records, n as u64);
        assert_eq!(received.by_reason["NETFILTER_DROP"], n as u64);
    }
}
