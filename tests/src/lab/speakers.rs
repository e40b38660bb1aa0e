//! The speaker processes of a lab (tests/src/bin/speaker.rs), one per node, and the memory
//! cgroup one of them may run in. Their logs are the ground truth of every move: who decided
//! what, when. Everything is stopped and removed when dropped, whatever happened.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::Value;

use super::{
    speaker_scenarios::Injected,
    topology::{node_ip4, Lab, NODES, UPLINK},
};

/// The memberlist port the speakers elect over (MetalLB's default).
pub const MEMBERLIST_PORT: u16 = 7946;
/// Heartbeat period and how many missed ones make a peer dead.
pub const HEARTBEAT_MS: u64 = 100;
pub const DEAD_AFTER: u32 = 5;
/// A leader re-announces its VIPs this often.
pub const REFRESH_MS: u64 = 1000;
/// Where cgroup v1's memory controller is mounted on this host.
const MEMCG_ROOT: &str = "/sys/fs/cgroup/memory";

/// The speaker binary: `LAB_SPEAKER_BIN`, else next to the lbtrace under test (`cargo xtask
/// build` builds both), else next to the running test.
pub fn bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("LAB_SPEAKER_BIN") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe()?;
    let candidates = [
        crate::lbtrace::bin().with_file_name("speaker"),
        exe.with_file_name("speaker"),
        exe.parent()
            .and_then(Path::parent)
            .map(|d| d.join("speaker"))
            .unwrap_or_default(),
    ];
    candidates.into_iter().find(|p| p.is_file()).context(
        "the lab's speaker binary is missing: run `cargo xtask build` (or set LAB_SPEAKER_BIN)",
    )
}

/// One line of a speaker's log.
#[derive(Clone, Debug)]
pub struct LogLine {
    pub node: usize,
    pub t: f64,
    pub pid: u32,
    pub event: String,
    pub vip: Option<IpAddr>,
    pub detail: String,
}

/// A memory cgroup (v1) made for one speaker; removed when dropped.
pub struct MemCgroup {
    pub path: PathBuf,
}

impl MemCgroup {
    /// `{MEMCG_ROOT}/{name}` limited to `limit` bytes (no swap on this host; swappiness 0
    /// anyway). Fails loudly without cgroup v1's memory controller.
    pub fn create(name: &str, limit: u64) -> Result<Self> {
        ensure!(
            Path::new(MEMCG_ROOT)
                .join("memory.limit_in_bytes")
                .is_file(),
            "{MEMCG_ROOT} is not cgroup v1's memory controller: speaker-oom needs it"
        );
        let path = Path::new(MEMCG_ROOT).join(name);
        std::fs::create_dir(&path).with_context(|| path.display().to_string())?;
        let cg = Self { path };
        cg.write("memory.limit_in_bytes", &limit.to_string())?;
        cg.write("memory.swappiness", "0")?;
        Ok(cg)
    }

    fn write(&self, file: &str, value: &str) -> Result<()> {
        std::fs::write(self.path.join(file), value)
            .with_context(|| format!("{}/{file} = {value}", self.path.display()))
    }

    pub fn add(&self, pid: u32) -> Result<()> {
        self.write("cgroup.procs", &pid.to_string())
    }

    /// A number of one of the cgroup's files (`memory.max_usage_in_bytes`), or of a `key value`
    /// line of it (`memory.oom_control` `oom_kill`).
    pub fn read(&self, file: &str, key: Option<&str>) -> Result<u64> {
        let text = std::fs::read_to_string(self.path.join(file))?;
        let value = match key {
            None => text.trim(),
            Some(k) => text
                .lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix(' '))
                .with_context(|| format!("no {k} in {file}"))?,
        };
        value
            .trim()
            .parse()
            .with_context(|| format!("{file}: {value}"))
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        // Anything still in it goes back to the root first: a cgroup with tasks stays.
        if let Ok(procs) = std::fs::read_to_string(self.path.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = std::fs::write(Path::new(MEMCG_ROOT).join("cgroup.procs"), pid);
            }
        }
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The memory cgroups a lab `prefix` may have left behind (named `{prefix}-…`).
pub fn cgroups_left(prefix: &str) -> Vec<String> {
    std::fs::read_dir(MEMCG_ROOT)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .map(|n| format!("{MEMCG_ROOT}/{n}"))
                .collect()
        })
        .unwrap_or_default()
}

/// One speaker process per node.
pub struct Speakers {
    procs: Vec<Option<Child>>,
    nodes: Vec<String>,
    vips: Vec<(IpAddr, Vec<usize>)>,
    dir: PathBuf,
    bin: PathBuf,
    /// The cgroup a node's speaker runs in (speaker-oom).
    pub cgroup: Option<(usize, MemCgroup)>,
    /// What the scenario did to them, in order.
    pub injected: Vec<Injected>,
}

impl Speakers {
    /// Starts a speaker on every node of `lab` for every VIP of its services (candidates: the
    /// service's initial owner first, then the others in order) and waits until each VIP has
    /// its leader. `cgroup`: (node, limit in bytes) of a memory cgroup for that node's speaker.
    pub fn start(lab: &Lab, prefix: &str, cgroup: Option<(usize, u64)>) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("{prefix}-speakers"));
        std::fs::create_dir_all(&dir)?;
        let mut vips = Vec::new();
        for s in &lab.services {
            let first = s.owner.unwrap_or(0);
            let order: Vec<usize> = std::iter::once(first)
                .chain((0..NODES).filter(|&n| n != first))
                .collect();
            vips.extend(s.vips.iter().map(|&v| (v, order.clone())));
        }
        let mut sp = Self {
            procs: (0..NODES).map(|_| None).collect(),
            nodes: lab.nodes.iter().map(|n| n.name.clone()).collect(),
            vips,
            dir,
            bin: bin()?,
            cgroup: None,
            injected: Vec::new(),
        };
        if let Some((n, limit)) = cgroup {
            sp.cgroup = Some((n, MemCgroup::create(&format!("{prefix}-speaker"), limit)?));
        }
        for n in 0..NODES {
            sp.start_node(n)?;
        }
        let count = sp.vips.len();
        sp.wait_log(Duration::from_secs(5), |l| {
            l.iter().filter(|x| x.event == "acquire").count() >= count
        })?;
        Ok(sp)
    }

    /// Starts node `n`'s speaker (again); returns its pid.
    pub fn start_node(&mut self, n: usize) -> Result<u32> {
        ensure!(self.procs[n].is_none(), "n{n}'s speaker is running");
        let peers: Vec<String> = (0..NODES).map(|i| node_ip4(i).to_string()).collect();
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.nodes[n]])
            .arg(&self.bin)
            .args(["--node", &n.to_string(), "--peers", &peers.join(",")])
            .args(["--port", &MEMBERLIST_PORT.to_string()])
            .args(["--interval-ms", &HEARTBEAT_MS.to_string()])
            .args(["--dead-after", &DEAD_AFTER.to_string()])
            .args(["--refresh-ms", &REFRESH_MS.to_string(), "--iface", UPLINK])
            .arg("--log")
            .arg(self.log_file(n));
        for (vip, order) in &self.vips {
            let order: Vec<String> = order.iter().map(ToString::to_string).collect();
            cmd.args(["--vip", &format!("{vip}={}", order.join(","))]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        let pid = child.id();
        self.procs[n] = Some(child);
        if let Some((_, cg)) = self.cgroup.as_ref().filter(|(c, _)| *c == n) {
            cg.add(pid)?;
        }
        Ok(pid)
    }

    fn log_file(&self, n: usize) -> PathBuf {
        self.dir.join(format!("n{n}.log"))
    }

    pub fn pid(&self, n: usize) -> Option<u32> {
        self.procs[n].as_ref().map(Child::id)
    }

    /// Sends `signal` to node `n`'s speaker; returns when it was sent (wall clock).
    pub fn signal(&self, n: usize, signal: i32) -> Result<f64> {
        let pid = self.pid(n).context("no speaker there")?;
        let at = now();
        // SAFETY: signalling a child we started and have not reaped.
        if unsafe { libc::kill(pid as i32, signal) } != 0 {
            bail!("kill {pid}: {}", std::io::Error::last_os_error());
        }
        Ok(at)
    }

    /// Waits up to `timeout` for node `n`'s speaker to end; returns its wait status and when
    /// it was reaped.
    pub fn wait(&mut self, n: usize, timeout: Duration) -> Result<(ExitStatus, f64)> {
        let child = self.procs[n].as_mut().context("no speaker there")?;
        let end = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                self.procs[n] = None;
                return Ok((status, now()));
            }
            ensure!(Instant::now() < end, "n{n}'s speaker did not end");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Every speaker's log so far, in time order.
    pub fn log(&self) -> Result<Vec<LogLine>> {
        let mut all = Vec::new();
        for n in 0..NODES {
            let Ok(text) = std::fs::read_to_string(self.log_file(n)) else {
                continue;
            };
            for l in text.lines() {
                let v: Value = serde_json::from_str(l).context("speaker log")?;
                all.push(LogLine {
                    node: n,
                    t: v["t"].as_f64().unwrap_or(0.0),
                    pid: v["pid"].as_u64().unwrap_or(0) as u32,
                    event: v["event"].as_str().unwrap_or("").to_owned(),
                    vip: v["vip"].as_str().and_then(|s| s.parse().ok()),
                    detail: v["detail"].as_str().unwrap_or("").to_owned(),
                });
            }
        }
        all.sort_by(|a, b| a.t.total_cmp(&b.t));
        Ok(all)
    }

    /// Polls the logs until `done` holds.
    pub fn wait_log(&self, timeout: Duration, done: impl Fn(&[LogLine]) -> bool) -> Result<()> {
        let end = Instant::now() + timeout;
        while !done(&self.log()?) {
            ensure!(
                Instant::now() < end,
                "the speakers' logs did not show it in time"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Removes what a speaker that died without withdrawing left configured on its node (a
    /// MetalLB speaker's announcements end with its process; the lab's addresses do not).
    pub fn clear_node(&self, lab: &Lab, n: usize) {
        for (vip, _) in &self.vips {
            let len = if vip.is_ipv4() { 32 } else { 128 };
            let _ = lab.nodes[n].ip(&["addr", "del", &format!("{vip}/{len}"), "dev", UPLINK]);
        }
    }
}

impl Drop for Speakers {
    fn drop(&mut self) {
        for child in self.procs.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The cgroup (a field) is removed after this, once its process is gone.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Wall-clock seconds since the epoch, as the speakers' logs and lbtrace's records have it.
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// After a run that died: stops the speakers of labs `prefix…` (their logs live in
/// `{tmp}/{prefix}…-speakers`) and removes their memory cgroups. Returns what it did.
pub fn clean_up(prefix: &str) -> Vec<String> {
    let mut done = Vec::new();
    let marker = std::env::temp_dir().join(prefix).display().to_string();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let ours = args.first().is_some_and(|a| a.ends_with("/speaker"))
            && args
                .iter()
                .any(|a| a.starts_with(&marker) && a.contains("-speakers/"));
        if ours {
            // SAFETY: signalling a process identified above as a lab speaker.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            done.push(format!("speaker {pid} stopped"));
        }
    }
    for cg in cgroups_left(prefix) {
        drop(MemCgroup {
            path: cg.clone().into(),
        });
        done.push(format!("{cg} removed"));
    }
    done
}
