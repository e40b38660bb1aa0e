//! Reading kube-proxy's rules again and again, on a thread of its own: every `interval` in the
//! namespaces that had them, every [`RESCAN`] in all (new nodes, new pods). Never per packet.

use std::{
    collections::BTreeMap,
    io,
    path::Path,
    process::Command,
    sync::mpsc::{self, Receiver, Sender},
    time::{Duration, Instant},
};

use super::{iptables, nft, NodeRules};
use crate::{event::values::Time, kernel::netns};

pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

/// A re-read interval in seconds (fractions allowed; 0: rules not read at all).
pub fn interval(secs: f64) -> Result<Duration, String> {
    if secs.is_finite() && (0.0..=3600.0).contains(&secs) {
        Ok(Duration::from_secs_f64(secs))
    } else {
        Err(format!(
            "`{secs}` is not a number of seconds from 0 to 3600"
        ))
    }
}
/// How often every namespace is looked at, not only those known to hold kube-proxy's rules.
const RESCAN: Duration = Duration::from_secs(10);

/// kube-proxy's rules in every namespace that has them, as read by `at` (the end of the
/// sweep over the namespaces: what changed in it had changed by then).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub at: Time,
    /// By namespace inode.
    pub nodes: BTreeMap<u32, NodeRules>,
}

/// Which tools are there; each missing one is warned about once.
#[derive(Clone, Copy)]
struct Tools {
    nft: bool,
    iptables: bool,
}

fn run(cmd: &str, args: &[&str]) -> io::Result<String> {
    let out = Command::new(cmd).args(args).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn missing(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
}

/// kube-proxy's rules in the current namespace (of this thread).
fn read_here(tools: &mut Tools) -> NodeRules {
    let mut r = NodeRules::default();
    // iptables-nft's tables show in the nft ruleset: iptables-save only runs where they are.
    let mut iptables_too = !tools.nft;
    if tools.nft {
        match run("nft", &["-j", "list", "ruleset"]) {
            Ok(json) => {
                if let Err(e) = nft::parse(&json, &mut r) {
                    tracing::warn!("kube-proxy rules: {e}");
                }
                iptables_too = json.contains("\"KUBE-SERVICES\"");
            }
            Err(e) if missing(&e) => {
                tracing::warn!("`nft` is not installed: kube-proxy's nftables rules are not read (names and endpoint changes come from iptables mode only)");
                tools.nft = false;
                iptables_too = true;
            }
            Err(e) => tracing::debug!("{e}"),
        }
    }
    if iptables_too && tools.iptables {
        for cmd in ["iptables-save", "ip6tables-save"] {
            match run(cmd, &[]) {
                Ok(text) => iptables::parse(&text, &mut r),
                Err(e) if missing(&e) => {
                    tracing::warn!(
                        "`{cmd}` is not installed: kube-proxy's iptables rules are not read"
                    );
                    tools.iptables = false;
                    break;
                }
                Err(e) => tracing::debug!("{e}"),
            }
        }
    }
    r
}

fn read_netns(path: &Path, tools: &mut Tools) -> Option<NodeRules> {
    let mut t = *tools;
    let r = netns::in_netns(path, || {
        let r = read_here(&mut t);
        (r, t)
    });
    match r {
        Ok((rules, t)) => {
            *tools = t;
            Some(rules).filter(|r| !r.is_empty())
        }
        Err(e) => {
            tracing::debug!("kube-proxy rules in {}: {e}", path.display());
            None
        }
    }
}

/// Starts the reader. Snapshots come on the returned channel, in order (the pipeline takes
/// them every 50 ms: no backlog builds); the thread ends when the receiver is gone.
pub fn spawn(interval: Duration) -> io::Result<Receiver<Snapshot>> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("kube-proxy-rules".into())
        .spawn(move || poll(interval, &tx))?;
    Ok(rx)
}

fn poll(interval: Duration, tx: &Sender<Snapshot>) {
    let mut tools = Tools {
        nft: true,
        iptables: true,
    };
    let mut known: BTreeMap<u32, std::path::PathBuf> = BTreeMap::new();
    let mut last_scan: Option<Instant> = None;
    let mut warned_skips = 0;
    loop {
        let started = Instant::now();
        let all = last_scan.is_none_or(|t| t.elapsed() >= RESCAN);
        let candidates = if all {
            last_scan = Some(started);
            netns::namespaces()
        } else {
            known.clone()
        };
        let mut nodes = BTreeMap::new();
        for (ino, path) in &candidates {
            if let Some(rules) = read_netns(path, &mut tools) {
                nodes.insert(*ino, rules);
            }
        }
        // A change seen in this sweep was made before its end, never before its start.
        let at = Time::now();
        // A read that failed (the rules were being rewritten) keeps its node known until
        // the next full scan.
        if all {
            known = candidates
                .into_iter()
                .filter(|(ino, _)| nodes.contains_key(ino))
                .collect();
        }
        let skipped: u64 = nodes.values().map(|r: &NodeRules| r.skipped).sum();
        if skipped > warned_skips {
            tracing::warn!("kube-proxy rules: {skipped} rules of an unknown shape skipped");
            warned_skips = skipped;
        }
        if tx.send(Snapshot { at, nodes }).is_err() {
            return;
        }
        if !tools.nft && !tools.iptables {
            tracing::warn!("neither nft nor iptables-save is installed: no Service names");
            return;
        }
        std::thread::sleep(interval.saturating_sub(started.elapsed()));
    }
}
