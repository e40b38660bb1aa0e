//! The host around the lab: namespaces, the conntrack limit the lab lowers (and restores),
//! and the kernel counters the oracles read.

use std::path::Path;

use anyhow::{Context, Result};

use super::{backend::Backend, topology::Pod, POD_TCP_PORT, POD_UDP_PORT, STATE_DIR};
use crate::netns::{Netns, SysctlGuard};

/// A field of `/proc/net/snmp6` (e.g. `Udp6NoPorts`, `Ip6InTooBigErrors`) in a namespace.
pub fn snmp6(ns: &Netns, field: &str) -> Result<u64> {
    let out = ns.exec("cat", &["/proc/net/snmp6"])?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some(field)).then(|| w.next())?
        })
        .with_context(|| format!("no {field} in /proc/net/snmp6"))?
        .parse()
        .context("snmp6 value")
}

/// A field of `/proc/net/snmp` (e.g. `Udp` `NoPorts`, `Ip` `FragFails`) in a namespace.
pub fn snmp(ns: &Netns, group: &str, field: &str) -> Result<u64> {
    let out = ns.exec("cat", &["/proc/net/snmp"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let prefix = format!("{group}:");
    let mut rows = text.lines().filter(|l| l.starts_with(&prefix));
    let (names, values) = rows.next().zip(rows.next()).context("no such group")?;
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == field)
        .with_context(|| format!("no {group} {field}"))?
        .1
        .parse()
        .context("snmp value")
}

/// Starts the echo servers of every pod of the lab `prefix` made by another process (`lab
/// up`), leaving its namespaces in place.
pub fn serve(prefix: &str) -> Result<Vec<Backend>> {
    Pod::all()
        .map(|pod| {
            let ns = Netns::open(&format!("{prefix}-{}", pod.name()))?;
            let b = Backend::start(&ns, POD_TCP_PORT, POD_UDP_PORT);
            ns.keep();
            b
        })
        .collect()
}

/// Namespaces whose name starts with `prefix`.
pub fn namespaces(prefix: &str) -> Result<Vec<String>> {
    let dir = Path::new("/run/netns");
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    Ok(names)
}

/// Deletes every namespace whose name starts with `prefix`; returns their names.
pub fn remove_namespaces(prefix: &str) -> Result<Vec<String>> {
    let names = namespaces(prefix)?;
    for n in &names {
        Netns::open(n)?; // dropped at once: deleted
    }
    Ok(names)
}

const CONNTRACK_MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";

fn conntrack_backup() -> std::path::PathBuf {
    Path::new(STATE_DIR).join("nf_conntrack_max")
}

/// `nf_conntrack_max` lowered for a scenario, restored when dropped. The limit is global (and
/// writable only from the initial namespace), so the original also goes to a file under
/// [`STATE_DIR`] that `lab down` restores from if this process dies first.
pub struct ConntrackMax {
    _restore: SysctlGuard,
}

impl ConntrackMax {
    pub fn set(max: u64) -> Result<Self> {
        // A backup means an earlier run died with the limit lowered: put it back first, so
        // that it is the value restored at the end.
        restore_conntrack_max()?;
        let current = std::fs::read_to_string(CONNTRACK_MAX).context(CONNTRACK_MAX)?;
        std::fs::create_dir_all(STATE_DIR)?;
        std::fs::write(conntrack_backup(), current.trim())?;
        Ok(Self {
            _restore: SysctlGuard::set(CONNTRACK_MAX, &max.to_string())?,
        })
    }
}

impl Drop for ConntrackMax {
    fn drop(&mut self) {
        // The guard restores the value when it drops, right after this.
        let _ = std::fs::remove_file(conntrack_backup());
    }
}

/// Puts back an `nf_conntrack_max` a dead run left lowered; returns the value restored.
pub fn restore_conntrack_max() -> Result<Option<String>> {
    let backup = conntrack_backup();
    let Ok(value) = std::fs::read_to_string(&backup) else {
        return Ok(None);
    };
    std::fs::write(CONNTRACK_MAX, value.trim()).context(CONNTRACK_MAX)?;
    std::fs::remove_file(&backup)?;
    Ok(Some(value.trim().to_owned()))
}

/// What the finished lab `prefix` may have left behind: its namespaces, a lowered conntrack
/// limit (compared with `conntrack_max_before`), a backup file.
pub fn leftovers(prefix: &str, conntrack_max_before: &str) -> Result<Vec<String>> {
    let mut left = namespaces(&format!("{prefix}-"))?;
    left.extend(super::speakers::cgroups_left(&format!("{prefix}-")));
    let now = conntrack_max()?;
    if now != conntrack_max_before.trim() {
        left.push(format!(
            "nf_conntrack_max is {now} (was {})",
            conntrack_max_before.trim()
        ));
    }
    if conntrack_backup().exists() {
        left.push(conntrack_backup().display().to_string());
    }
    Ok(left)
}

/// The current `nf_conntrack_max`, to compare with after a run.
pub fn conntrack_max() -> Result<String> {
    Ok(std::fs::read_to_string(CONNTRACK_MAX)
        .context(CONNTRACK_MAX)?
        .trim()
        .to_owned())
}
