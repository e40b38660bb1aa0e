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
        let mut events: Vec<KfreeSkb> = text.lines().filter_map(parse_kfree_skb).collect();
        if events.iter().any(|e| !is_symbol(&e.function)) {
            let symbols = Kallsyms::read()?;
            for e in &mut events {
                if !is_symbol(&e.function) {
                    e.function = symbols.function_at(&e.function)?;
                }
            }
        }
        Ok(events)
    }
}

/// Kernels before 6.2 print `location` with `%p` (an address, hashed unless the kernel was
/// booted with `no_hash_pointers`) where later ones print `%pS` (`func+0xoff/0xsize`).
fn is_symbol(location: &str) -> bool {
    let address = location.len() >= 8 && location.bytes().all(|b| b.is_ascii_hexdigit());
    !address && !location.starts_with('(')
}

/// The kernel's text symbols by address, to name a `%p` location as `%pS` would.
struct Kallsyms(Vec<(u64, String)>);

impl Kallsyms {
    fn read() -> Result<Self> {
        let text = fs::read_to_string("/proc/kallsyms").context("reading /proc/kallsyms")?;
        let mut syms: Vec<(u64, String)> = text
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let addr = u64::from_str_radix(f.next()?, 16).ok()?;
                let kind = f.next()?;
                let name = f.next()?;
                (addr != 0 && matches!(kind, "t" | "T")).then(|| (addr, name.to_owned()))
            })
            .collect();
        if syms.is_empty() {
            bail!("/proc/kallsyms shows no addresses (kptr_restrict): the oracle cannot name locations");
        }
        syms.sort_unstable();
        Ok(Self(syms))
    }

    /// The function containing `location`, a raw address as `%p` prints it.
    fn function_at(&self, location: &str) -> Result<String> {
        let addr = u64::from_str_radix(location, 16)
            .ok()
            .filter(|a| *a >> 48 == 0xffff);
        let Some(addr) = addr else {
            bail!(
                "tracefs printed kfree_skb's location as `{location}`, a hashed pointer: \
                 boot this kernel with no_hash_pointers so the oracle can name it"
            );
        };
        let i = self.0.partition_point(|(a, _)| *a <= addr);
        match i.checked_sub(1).map(|i| &self.0[i].1) {
            Some(name) => Ok(name.clone()),
            None => bail!("no kernel symbol at or below {location}"),
        }
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

    #[test]
    fn a_location_printed_with_p_is_an_address_to_resolve() {
        assert!(is_symbol("tcp_v4_rcv"));
        assert!(!is_symbol("ffffffff81a2b3c4"));
        assert!(!is_symbol("(____ptrval____)"));
        let k = Kallsyms(vec![
            (0xffff_ffff_8100_0000, "a".into()),
            (0xffff_ffff_8100_0100, "b".into()),
        ]);
        assert_eq!(k.function_at("ffffffff81000104").unwrap(), "b");
        assert_eq!(k.function_at("ffffffff810000ff").unwrap(), "a");
        assert!(k.function_at("000000004f3eb6aa").is_err());
        assert!(k.function_at("(____ptrval____)").is_err());
    }
}
