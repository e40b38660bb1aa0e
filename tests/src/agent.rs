//! Running `lbtrace agent` on a loopback port, and what the kernel says a process holds.

use std::{
    io::Read,
    net::SocketAddr,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{http, lbtrace::binary, sh};

/// A running agent; killed (SIGKILL) when dropped, so a failing test leaves nothing attached.
pub struct Agent {
    child: Child,
    pub addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
}

impl Agent {
    /// `lbtrace agent --metrics-addr 127.0.0.1:FREE ARGS` with `env` added, once /readyz answers.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        let addr: SocketAddr = format!("127.0.0.1:{}", http::free_port()?).parse()?;
        Self::start_on(addr, args, env)
    }

    /// Like [`Agent::start`], on `addr`.
    pub fn start_on(addr: SocketAddr, args: &[&str], env: &[(&str, &str)]) -> Result<Self> {
        let mut child = binary()?
            .args(["agent", "--metrics-addr", &addr.to_string()])
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting lbtrace agent")?;
        // Read stderr all along: a full pipe would block the agent's logging.
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().context("stderr")?;
        let sink = stderr.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
        let mut agent = Self {
            child,
            addr,
            stderr,
            reader: Some(reader),
        };
        let start = Instant::now();
        while agent.get("/readyz").map(|r| r.0).ok() != Some(200) {
            if let Some(status) = agent.child.try_wait()? {
                bail!("agent exited with {status}: {}", agent.stderr());
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!("agent not ready after 30 s: {}", agent.stderr());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(agent)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the agent logged so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        http::get(self.addr, path)
    }

    /// The value of the first `/metrics` line starting with `name_and_labels`; `None` when the
    /// series is missing or the scrape failed (never a silent 0: see [`metric_in`]).
    pub fn metric(&self, name_and_labels: &str) -> Option<u64> {
        metric_in(&self.get("/metrics").ok()?.1, name_and_labels)
    }

    /// The sum of every `/metrics` line starting with `name_and_labels`; `None` when there is
    /// none or the scrape failed.
    pub fn metric_sum(&self, name_and_labels: &str) -> Option<u64> {
        metric_sum_in(&self.get("/metrics").ok()?.1, name_and_labels)
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits for the exit, then returns the status and everything logged.
    fn wait(mut self) -> Result<(ExitStatus, String)> {
        let status = self.child.wait()?;
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        Ok((status, self.stderr()))
    }

    /// SIGTERM: the exit status, how long the exit took, and what was logged.
    pub fn stop(self) -> Result<(ExitStatus, Duration, String)> {
        let t = Instant::now();
        self.signal(libc::SIGTERM);
        let (status, stderr) = self.wait()?;
        Ok((status, t.elapsed(), stderr))
    }

    /// SIGKILL: no chance to detach anything.
    pub fn kill9(self) -> Result<ExitStatus> {
        self.signal(libc::SIGKILL);
        Ok(self.wait()?.0)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn values<'a>(text: &'a str, name_and_labels: &'a str) -> impl Iterator<Item = Option<u64>> + 'a {
    text.lines()
        .filter(move |l| l.starts_with(name_and_labels))
        .map(|l| l.rsplit(' ').next()?.parse::<f64>().ok().map(|v| v as u64))
}

/// The value of the first line of Prometheus `text` starting with `name_and_labels`: `None`
/// when there is no such series (or its value does not parse), `Some(0)` only for a series
/// whose value is 0.
pub fn metric_in(text: &str, name_and_labels: &str) -> Option<u64> {
    values(text, name_and_labels).next()?
}

/// The sum of every such line; `None` when there is none, or one does not parse.
pub fn metric_sum_in(text: &str, name_and_labels: &str) -> Option<u64> {
    values(text, name_and_labels).reduce(|a, b| Some(a? + b?))?
}

/// IDs a process holds of one kind of BPF object (`prog_id`, `link_id`, `map_id`), from its
/// fds' fdinfo.
pub fn bpf_ids_of(pid: u32, kind: &str) -> Result<Vec<u64>> {
    let prefix = format!("{kind}:");
    let mut ids = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))?.flatten() {
        let info = std::fs::read_to_string(fd.path()).unwrap_or_default();
        ids.extend(
            info.lines()
                .filter_map(|l| l.strip_prefix(&prefix))
                .filter_map(|v| v.trim().parse::<u64>().ok()),
        );
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// IDs of every loaded BPF object of `kind` (`prog`, `link`, `map`): the kernel's own list,
/// through bpftool.
pub fn loaded(kind: &str) -> Result<Vec<u64>> {
    let out = sh(Command::new("bpftool").args(["-j", kind, "show"]))?;
    let all: Value = serde_json::from_slice(&out.stdout)?;
    Ok(all
        .as_array()
        .context("bpftool printed no list")?
        .iter()
        .filter_map(|p| p["id"].as_u64())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_series_is_not_zero() {
        let text = "# HELP x\nlbtrace_probe_attached{probe=\"a\",collector=\"drops\"} 0\nlbtrace_probe_attached{probe=\"b\",collector=\"drops\"} 1\n";
        assert_eq!(
            metric_in(text, "lbtrace_probe_attached{probe=\"a\""),
            Some(0)
        );
        assert_eq!(
            metric_in(text, "lbtrace_probe_attached{probe=\"b\""),
            Some(1)
        );
        assert_eq!(metric_in(text, "lbtrace_probe_attached{probe=\"c\""), None);
        assert_eq!(metric_in("", "lbtrace_probe_attached"), None);
        assert_eq!(metric_sum_in(text, "lbtrace_probe_attached{"), Some(1));
        assert_eq!(metric_sum_in(text, "lbtrace_events_lost_total{"), None);
        assert_eq!(metric_in("x 1.5e3\n", "x"), Some(1500));
        assert_eq!(metric_in("x NaN-ish\n", "x"), None);
    }
}
