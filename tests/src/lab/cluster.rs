//! The lab as a cluster: one `lbtrace agent` per node, limited to that node's namespaces (its
//! own and its pods'), each writing its event file, all scraped by Debian's real Prometheus with
//! deploy/'s rules loaded. Runs beside the scenario's host-wide `watch`.

use std::{
    fmt,
    net::IpAddr,
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};

use super::topology::{Lab, Pod, NODES};
use crate::{
    agent::Agent,
    prometheus::{self, Prometheus},
    unique,
};

/// The agents while the scenario runs.
pub struct Cluster {
    agents: Vec<Agent>,
    files: Vec<PathBuf>,
    prom: Prometheus,
    from: f64,
    dir: PathBuf,
}

/// What a run left: Prometheus with the agents' series, the per-node event files, the run's
/// time range. The files go when this is dropped.
pub struct Finished {
    pub prom: Prometheus,
    /// One event file per node, `n0`, `n1`, `n2` in order.
    pub files: Vec<PathBuf>,
    pub from: f64,
    pub to: f64,
    dir: PathBuf,
}

impl fmt::Debug for Finished {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cluster run {:.0}..{:.0} on {}, files {:?}",
            self.from,
            self.to,
            self.prom.url(),
            self.files
        )
    }
}

impl Drop for Finished {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The node's name in the lab (`n0`, …).
pub fn node_name(n: usize) -> String {
    format!("n{n}")
}

impl Cluster {
    /// Starts an agent per node for `vips`, and Prometheus scraping them every second.
    pub fn start(lab: &Lab, vips: &[IpAddr]) -> Result<Self> {
        let dir = std::env::temp_dir().join(unique("lbtcluster"));
        std::fs::create_dir_all(&dir)?;
        let vips: Vec<String> = vips.iter().map(ToString::to_string).collect();
        let vips = vips.join(",");
        let mut agents = Vec::new();
        let mut files = Vec::new();
        for n in 0..NODES {
            let mut set = vec![lab.nodes[n].inode.to_string()];
            set.extend(
                Pod::all()
                    .filter(|p| p.node == n)
                    .map(|p| lab.pod(p).inode.to_string()),
            );
            let file = dir.join(format!("{}.ndjson", node_name(n)));
            let name = node_name(n);
            let args = [
                "--node",
                name.as_str(),
                "--node-netns",
                &set.join(","),
                "--vip",
                &vips,
                "--events-file",
                file.to_str().context("temp path")?,
            ];
            agents.push(Agent::start(&args, &[]).with_context(|| format!("agent for {name}"))?);
            files.push(file);
        }
        let addrs: Vec<_> = agents.iter().map(|a| a.addr).collect();
        let prom = Prometheus::start(&addrs, &[prometheus::rules_file()])?;
        // Every agent scraped once before the scenario starts.
        prom.wait_for(
            "count(lbtrace_build_info)",
            "",
            Duration::from_secs(30),
            |g| g.values().next() == Some(&(NODES as u64)),
        )?;
        Ok(Self {
            agents,
            files,
            prom,
            from: now(),
            dir,
        })
    }

    /// After the traffic: the last scrapes, then the agents stop (their files complete).
    pub fn finish(self) -> Result<Finished> {
        let to = now();
        std::thread::sleep(Duration::from_secs(3));
        for a in self.agents {
            let (status, _, stderr) = a.stop()?;
            anyhow::ensure!(status.success(), "agent failed: {stderr}");
        }
        Ok(Finished {
            prom: self.prom,
            files: self.files,
            from: self.from,
            to: to + 2.0,
            dir: self.dir,
        })
    }
}
