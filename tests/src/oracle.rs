//! The kernel's own account of drops: a private tracefs instance recording `skb/kfree_skb`.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

use crate::unique;

pub const TRACEFS: &str = "/sys/kernel/tracing";

/// One `skb/kfree_skb` line as tracefs printed it (names from the kernel's print format).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KfreeSkb {
    pub reason: String,
    /// Function part of `location=func+0xoff/0xsize`.
    pub function: String,
    pub protocol: u16,
}

/// A tracefs instance of its own, so other tracers (and lbtrace) do not disturb it.
pub struct TraceInstance {
    dir: PathBuf,
}

impl TraceInstance {
    /// Starts recording `skb/kfree_skb`.
    pub fn kfree_skb() -> Result<Self> {
        let events = Path::new(TRACEFS).join("events");
        if !events.is_dir() {
            bail!("tracefs is not mounted at {TRACEFS}: run `cargo xtask setup`");
        }
        let dir = Path::new(TRACEFS).join("instances").join(unique("lbtest"));
        fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        let inst = Self { dir };
        // Large enough that a test's flood does not overrun it (checked in `stop`).
        fs::write(inst.dir.join("buffer_size_kb"), "16384")?;
        fs::write(inst.dir.join("events/skb/kfree_skb/enable"), "1")?;
        Ok(inst)
    }

    /// Stops recording and returns every event; fails if the buffer overran (the count would
    /// not be exact).
    pub fn stop(&self) -> Result<Vec<KfreeSkb>> {
        fs::write(self.dir.join("events/skb/kfree_skb/enable"), "0")?;
        for entry in fs::read_dir(self.dir.join("per_cpu"))? {
            let stats = fs::read_to_string(entry?.path().join("stats"))?;
            for line in stats.lines() {
                if let Some(v) = line.strip_prefix("overrun:") {
                    if v.trim() != "0" {
                        bail!("tracefs oracle overran ({line}): counts would not be exact");
                    }
                }
            }
        }
        let text = fs::read_to_string(self.dir.join("trace"))?;
        Ok(text.lines().filter_map(parse_kfree_skb).collect())
    }
}

impl Drop for TraceInstance {
    fn drop(&mut self) {
        let _ = fs::write(self.dir.join("events/skb/kfree_skb/enable"), "0");
        let _ = fs::remove_dir(&self.dir);
    }
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(key)? + key.len();
    line[start..].split_whitespace().next()
}

pub fn parse_kfree_skb(line: &str) -> Option<KfreeSkb> {
    if line.starts_with('#') || !line.contains("kfree_skb:") {
        return None;
    }
    let location = field(line, "location=")?;
    Some(KfreeSkb {
        reason: field(line, "reason: ")?.to_owned(),
        function: location.split('+').next()?.to_owned(),
        protocol: field(line, "protocol=")?.parse().ok()?,
    })
}

/// How many recorded drops have `reason` at `function`.
pub fn count(events: &[KfreeSkb], reason: &str, function: &str) -> u64 {
    events
        .iter()
        .filter(|e| e.reason == reason && e.function == function)
        .count() as u64
}

/// `(reason, function) → count`, for failure messages.
pub fn histogram(events: &[KfreeSkb]) -> std::collections::BTreeMap<(String, String), u64> {
    let mut h = std::collections::BTreeMap::new();
    for e in events {
        *h.entry((e.reason.clone(), e.function.clone())).or_insert(0) += 1;
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_trace_line() {
        let l = "  curl-12  [001] b.s2.  10.5: kfree_skb: skbaddr=0000 rx_sk=0000 protocol=2048 location=tcp_v4_rcv+0x99/0x1010 reason: NO_SOCKET";
        let e = parse_kfree_skb(l).unwrap();
        assert_eq!(e.reason, "NO_SOCKET");
        assert_eq!(e.function, "tcp_v4_rcv");
        assert_eq!(e.protocol, 2048);
    }
}
