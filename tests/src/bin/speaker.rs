//! The lab's speaker, one per node, run inside the node's namespace (MetalLB L2-like):
//!
//! `speaker --node N --peers IP0,IP1,… --vip VIP=n,n,… … --log FILE [--port 7946]
//! [--interval-ms 100] [--dead-after 5] [--refresh-ms 1000] [--iface eth0]`
//!
//! Every interval it sends a UDP heartbeat to every peer on the memberlist port. A peer not
//! heard for `dead-after` intervals is dead. Per VIP the first live node of its candidate list
//! leads: the leader adds the VIP to its interface and announces it (3 gratuitous ARPs /
//! unsolicited NAs from an `AF_PACKET` socket, then one every `refresh-ms`); a node that stops
//! leading removes it. SIGTERM: it tells its peers it leaves, withdraws and exits 0. SIGUSR1:
//! it allocates memory until something stops it (the OOM scenario). Each decision is a JSON
//! line in FILE (the lab's ground truth).

use std::{
    collections::BTreeSet,
    io::Write as _,
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _, Result};
use lbtest::lab::speaker::announce_here;

static TERM: AtomicBool = AtomicBool::new(false);
static BALLOON: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    TERM.store(true, Ordering::Relaxed);
}

extern "C" fn on_usr1(_: libc::c_int) {
    BALLOON.store(true, Ordering::Relaxed);
}

struct Config {
    node: usize,
    peers: Vec<IpAddr>,
    vips: Vec<(IpAddr, Vec<usize>)>,
    log: std::path::PathBuf,
    port: u16,
    interval: Duration,
    dead_after: u32,
    refresh: Duration,
    iface: String,
}

fn parse() -> Result<Config> {
    let mut c = Config {
        node: usize::MAX,
        peers: Vec::new(),
        vips: Vec::new(),
        log: "/dev/null".into(),
        port: 7946,
        interval: Duration::from_millis(100),
        dead_after: 5,
        refresh: Duration::from_millis(1000),
        iface: "eth0".to_owned(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let v = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--node" => c.node = v.parse()?,
            "--peers" => {
                c.peers = v.split(',').map(str::parse).collect::<Result<_, _>>()?;
            }
            "--vip" => {
                let (ip, order) = v.split_once('=').context("--vip VIP=n,n,…")?;
                let order = order.split(',').map(str::parse).collect::<Result<_, _>>()?;
                c.vips.push((ip.parse()?, order));
            }
            "--log" => c.log = v.into(),
            "--port" => c.port = v.parse()?,
            "--interval-ms" => c.interval = Duration::from_millis(v.parse()?),
            "--dead-after" => c.dead_after = v.parse()?,
            "--refresh-ms" => c.refresh = Duration::from_millis(v.parse()?),
            "--iface" => c.iface = v,
            _ => bail!("unknown argument {flag}"),
        }
    }
    if c.node >= c.peers.len() {
        bail!("--node must index --peers");
    }
    Ok(c)
}

/// The speaker's log: one JSON object per line, with the wall-clock time.
struct Log(std::fs::File);

impl Log {
    fn say(&mut self, event: &str, vip: Option<IpAddr>, detail: &str) {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let line = serde_json::json!({
            "t": t,
            "pid": std::process::id(),
            "event": event,
            "vip": vip.map(|v| v.to_string()),
            "detail": detail,
        });
        let _ = writeln!(self.0, "{line}");
    }
}

struct Speaker {
    c: Config,
    sock: UdpSocket,
    log: Log,
    last_seen: Vec<Option<Instant>>,
    alive: BTreeSet<usize>,
    leading: BTreeSet<IpAddr>,
    started: Instant,
    refreshed: Instant,
}

impl Speaker {
    fn new(c: Config) -> Result<Self> {
        let me = SocketAddr::new(c.peers[c.node], c.port);
        let sock = UdpSocket::bind(me).with_context(|| format!("bind {me}"))?;
        sock.set_read_timeout(Some(Duration::from_millis(5)))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&c.log)
            .with_context(|| c.log.display().to_string())?;
        let n = c.peers.len();
        Ok(Self {
            sock,
            log: Log(log),
            last_seen: vec![None; n],
            alive: BTreeSet::from([c.node]),
            leading: BTreeSet::new(),
            started: Instant::now(),
            refreshed: Instant::now(),
            c,
        })
    }

    fn send_all(&self, msg: &str) {
        for (n, ip) in self.c.peers.iter().enumerate() {
            if n != self.c.node {
                let _ = self
                    .sock
                    .send_to(msg.as_bytes(), SocketAddr::new(*ip, self.c.port));
            }
        }
    }

    /// Reads heartbeats until the next tick is due.
    fn listen(&mut self, until: Instant) {
        let mut buf = [0u8; 64];
        while Instant::now() < until && !TERM.load(Ordering::Relaxed) {
            let Ok((len, _)) = self.sock.recv_from(&mut buf) else {
                continue;
            };
            let msg = String::from_utf8_lossy(&buf[..len]);
            let mut w = msg.split_whitespace();
            let (kind, n) = (w.next(), w.next().and_then(|n| n.parse::<usize>().ok()));
            match (kind, n) {
                (Some("hb"), Some(n)) if n < self.last_seen.len() => {
                    self.last_seen[n] = Some(Instant::now());
                }
                (Some("leave"), Some(n)) if n < self.last_seen.len() => self.last_seen[n] = None,
                _ => {}
            }
        }
    }

    /// Who is alive now; changes are logged.
    fn membership(&mut self) {
        let dead_after = self.c.interval * self.c.dead_after;
        let alive: BTreeSet<usize> = (0..self.c.peers.len())
            .filter(|&n| {
                n == self.c.node || self.last_seen[n].is_some_and(|t| t.elapsed() < dead_after)
            })
            .collect();
        for n in alive.difference(&self.alive) {
            self.log.say("peer-alive", None, &format!("n{n}"));
        }
        for n in self.alive.difference(&alive) {
            self.log.say("peer-dead", None, &format!("n{n}"));
        }
        self.alive = alive;
    }

    fn ip(&self, op: &str, vip: IpAddr) {
        let cidr = match vip {
            IpAddr::V4(_) => format!("{vip}/32"),
            IpAddr::V6(_) => format!("{vip}/128"),
        };
        let mut args = vec!["addr", op, cidr.as_str(), "dev", self.c.iface.as_str()];
        if vip.is_ipv6() && op == "add" {
            args.push("nodad");
        }
        // `add` of an address already there (placed by the lab at start) fails: fine.
        let _ = std::process::Command::new("ip")
            .args(&args)
            .stderr(std::process::Stdio::null())
            .status();
    }

    fn announce(&mut self, vip: IpAddr, count: u32) {
        if let Err(e) = announce_here(&self.c.iface, vip, count) {
            self.log
                .say("error", Some(vip), &format!("announce: {e:#}"));
        }
    }

    /// Per VIP: lead it when this node is the first live candidate, else let it go.
    fn decide(&mut self) {
        let alive: Vec<String> = self.alive.iter().map(|n| format!("n{n}")).collect();
        let view = format!("alive {}", alive.join(","));
        for (vip, order) in self.c.vips.clone() {
            let leader = order.iter().copied().find(|n| self.alive.contains(n));
            let mine = leader == Some(self.c.node);
            if mine && !self.leading.contains(&vip) {
                self.ip("add", vip);
                self.announce(vip, 3);
                self.leading.insert(vip);
                self.log.say("acquire", Some(vip), &view);
            } else if !mine && self.leading.remove(&vip) {
                self.ip("del", vip);
                self.log.say("withdraw", Some(vip), &view);
            }
        }
        if self.refreshed.elapsed() >= self.c.refresh {
            self.refreshed = Instant::now();
            for vip in self.leading.clone() {
                self.announce(vip, 1);
            }
        }
    }

    fn leave(&mut self) {
        self.send_all(&format!("leave {}", self.c.node));
        for vip in std::mem::take(&mut self.leading) {
            self.ip("del", vip);
            self.log.say("withdraw", Some(vip), "leaving (SIGTERM)");
        }
        self.log.say("exit", None, "SIGTERM");
    }

    fn run(&mut self) {
        self.log.say("start", None, &format!("n{}", self.c.node));
        // Joining: hear the others before deciding anything.
        let join = self.c.interval * self.c.dead_after;
        loop {
            if TERM.load(Ordering::Relaxed) {
                self.leave();
                return;
            }
            if BALLOON.load(Ordering::Relaxed) {
                self.log.say("balloon", None, "allocating until stopped");
                balloon();
            }
            let tick = Instant::now() + self.c.interval;
            self.send_all(&format!("hb {}", self.c.node));
            self.listen(tick);
            self.membership();
            if self.started.elapsed() >= join {
                self.decide();
            }
        }
    }
}

/// Allocates and touches memory, 1 MiB at a time, until the kernel stops the process.
fn balloon() -> ! {
    let mut kept: Vec<Vec<u8>> = Vec::new();
    loop {
        kept.push(std::hint::black_box(vec![1u8; 1 << 20]));
    }
}

fn main() -> Result<()> {
    let c = parse()?;
    // SAFETY: the handlers only store to atomics (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t);
        libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t);
    }
    Speaker::new(c)?.run();
    Ok(())
}
