//! The scenarios where the speakers themselves move A (speaker-oom, memberlist-loss,
//! speaker-restart): the lab runs one speaker process per node (speakers.rs), breaks the
//! leader's, and checks that lbtrace's diagnosis gives each move of A the reason the lab
//! injected, within 1 s of it, against the kernel's and the speakers' own accounts.

use std::time::Duration;

use anyhow::{ensure, Context as _, Result};

use super::{
    accounts::Check,
    run::Clock,
    scenarios::Scenario,
    speakers::{now, Speakers, MEMBERLIST_PORT},
    topology::{node_ip4, Lab},
};

/// Memory limit of the leader's speaker's cgroup (speaker-oom).
pub(super) const OOM_LIMIT: u64 = 48 << 20;
/// The nft table on n0 and n1 that drops their heartbeats to each other (memberlist-loss).
pub(super) const HB_TABLE: &str = "lbtest-memberlist";
/// When the leader is broken, and (memberlist-loss) when the heartbeats flow again or
/// (speaker-restart) when the speaker starts again.
const BREAK: f64 = 3.0;
const HEAL: f64 = 9.0;

/// What the lab did to the speakers, as lbtrace's diagnosis must say it.
#[derive(Clone, Debug)]
pub struct Injected {
    /// The `because` reason each move it causes must carry.
    pub reason: &'static str,
    /// When (wall clock, seconds).
    pub t: f64,
    pub what: String,
    /// The process it hit, its wait status (raw) and when it was reaped.
    pub pid: Option<u32>,
    pub status: Option<std::process::ExitStatus>,
}

/// Starts the speakers (speaker-oom: n0's in a memory cgroup; memberlist-loss: the nft table
/// with an empty drop chain on n0 and n1).
pub(super) fn prepare(s: Scenario, lab: &mut Lab, prefix: &str) -> Result<()> {
    let cgroup = (s == Scenario::SpeakerOom).then_some((0, OOM_LIMIT));
    lab.speakers = Some(Speakers::start(lab, prefix, cgroup)?);
    if s == Scenario::MemberlistLoss {
        for n in [0, 1] {
            lab.nodes[n].nft(&format!(
                "table inet {HB_TABLE} {{\n counter hb {{ }}\n chain input {{\n  type filter hook input priority filter; policy accept;\n }}\n}}"
            ))?;
        }
    }
    Ok(())
}

fn speakers(lab: &mut Lab) -> Result<&mut Speakers> {
    lab.speakers
        .as_mut()
        .context("the speakers were not started")
}

pub(super) fn script(s: Scenario, lab: &mut Lab, clock: &Clock) -> Result<()> {
    clock.at(BREAK)?;
    match s {
        Scenario::SpeakerOom => oom(lab, clock),
        Scenario::SpeakerRestart => restart(lab, clock),
        _ => memberlist_loss(lab, clock),
    }
}

fn oom(lab: &mut Lab, clock: &Clock) -> Result<()> {
    let sp = speakers(lab)?;
    let pid = sp.pid(0);
    let t = sp.signal(0, libc::SIGUSR1)?;
    let (status, reaped) = sp.wait(0, Duration::from_secs(5))?;
    clock.log(&format!(
        "n0's speaker (pid {pid:?}) allocates in its {} MiB cgroup: ended {status} after {:.2} s",
        OOM_LIMIT >> 20,
        reaped - t
    ));
    sp.injected.push(Injected {
        reason: "announcer-oom-killed",
        t,
        what: "n0's speaker OOM-killed".to_owned(),
        pid,
        status: Some(status),
    });
    let sp = lab.speakers.take().context("speakers")?;
    sp.clear_node(lab, 0);
    lab.speakers = Some(sp);
    clock.log("n0's VIP addresses removed with its dead speaker");
    Ok(())
}

fn restart(lab: &mut Lab, clock: &Clock) -> Result<()> {
    let sp = speakers(lab)?;
    let pid = sp.pid(0);
    let t = sp.signal(0, libc::SIGTERM)?;
    let (status, _) = sp.wait(0, Duration::from_secs(5))?;
    clock.log(&format!("SIGTERM to n0's speaker (pid {pid:?}): {status}"));
    sp.injected.push(Injected {
        reason: "announcer-signalled",
        t,
        what: "SIGTERM to n0's speaker".to_owned(),
        pid,
        status: Some(status),
    });
    clock.at(HEAL)?;
    let sp = speakers(lab)?;
    let t = now();
    let pid = sp.start_node(0)?;
    clock.log(&format!("n0's speaker started again (pid {pid})"));
    sp.injected.push(Injected {
        reason: "announcer-restarted",
        t,
        what: "n0's speaker started again".to_owned(),
        pid: Some(pid),
        status: None,
    });
    Ok(())
}

fn memberlist_loss(lab: &mut Lab, clock: &Clock) -> Result<()> {
    let t = now();
    for (n, other) in [(0, 1), (1, 0)] {
        lab.nodes[n].nft(&format!(
            "add rule inet {HB_TABLE} input ip saddr {} udp dport {MEMBERLIST_PORT} counter name hb drop",
            node_ip4(other)
        ))?;
    }
    clock.log(&format!(
        "n0 and n1 drop each other's heartbeats (UDP {MEMBERLIST_PORT})"
    ));
    speakers(lab)?.injected.push(Injected {
        reason: "memberlist-dropped",
        t,
        what: "heartbeats between n0 and n1 dropped".to_owned(),
        pid: None,
        status: None,
    });
    clock.at(HEAL)?;
    for n in [0, 1] {
        lab.nodes[n].nft(&format!("flush chain inet {HB_TABLE} input"))?;
    }
    clock.log("heartbeats between n0 and n1 flow again");
    Ok(())
}

/// The ground truth next to lbtrace's records: what the kernel and the speakers counted.
pub(super) fn truth_checks(
    s: Scenario,
    lab: &Lab,
    events: &[serde_json::Value],
) -> Result<Vec<Check>> {
    let sp = lab.speakers.as_ref().context("speakers")?;
    let speaker = |event: &str, pid: Option<u32>| {
        events
            .iter()
            .filter(|e| e["kind"] == "speaker" && e["event"] == event)
            .filter(|e| pid.is_none_or(|p| e["pid"].as_u64() == Some(u64::from(p))))
            .cloned()
            .collect::<Vec<_>>()
    };
    let mut checks = Vec::new();
    match s {
        Scenario::SpeakerOom => {
            let inj = sp.injected.first().context("nothing injected")?;
            let (_, cg) = sp.cgroup.as_ref().context("no cgroup")?;
            let kills = cg.read("memory.oom_control", Some("oom_kill"))?;
            let peak = cg.read("memory.max_usage_in_bytes", None)?;
            let sig = inj.status.and_then(|st| {
                use std::os::unix::process::ExitStatusExt;
                st.signal()
            });
            let oom = speaker("oom-kill", inj.pid);
            let figure = |k: &str| oom.first().map_or(0, |e| e["oom"][k].as_u64().unwrap_or(0));
            let (anon_kb, file_kb) = (figure("anon_rss_kb"), figure("file_rss_kb"));
            checks.push(Check::new(
                sig == Some(libc::SIGKILL) && kills == 1 && oom.len() == 1,
                format!(
                    "speaker pid {:?} killed by signal {sig:?} (9); cgroup oom_kill {kills} (1); lbtrace oom-kill records for it {} (1)",
                    inj.pid,
                    oom.len()
                ),
            ));
            // What the balloon allocated is anonymous memory, charged to the cgroup.
            let ratio = (anon_kb * 1024) as f64 / peak as f64;
            checks.push(Check::new(
                (0.5..=1.02).contains(&ratio),
                format!(
                    "lbtrace's anon-rss at the kill {anon_kb} kB (file {file_kb} kB) vs the cgroup's peak {} kB (limit {} kB): ratio {ratio:.2} (0.5–1.02)",
                    peak / 1024,
                    OOM_LIMIT / 1024
                ),
            ));
        }
        Scenario::SpeakerRestart => {
            let term = sp.injected.first().context("nothing injected")?;
            let code = term.status.and_then(|s| s.code());
            let signals: Vec<_> = speaker("signal", term.pid)
                .into_iter()
                .filter(|e| e["signal"] == 15)
                .collect();
            let exits = speaker("exit", term.pid);
            let started = sp.injected.get(1).and_then(|i| i.pid);
            let starts = speaker("start", started);
            checks.push(Check::new(
                code == Some(0) && signals.len() == 1 && exits.len() == 1 && starts.len() == 1,
                format!(
                    "speaker pid {:?} exited with {code:?} (0) after SIGTERM: lbtrace SIGTERM records {} (1), exits {} (1); the new pid {started:?} started: {} (1)",
                    term.pid,
                    signals.len(),
                    exits.len(),
                    starts.len()
                ),
            ));
        }
        _ => {
            let nft: u64 = [0, 1]
                .iter()
                .map(|&n| lab.nodes[n].nft_counter("inet", HB_TABLE, "hb"))
                .sum::<Result<u64>>()?;
            let links = events
                .iter()
                .filter(|e| e["kind"] == "speaker_link")
                .count() as u64;
            checks.push(Check::new(
                nft > 0 && links == nft,
                format!("heartbeats dropped: nft counter {nft} (> 0) = lbtrace speaker_link records {links}"),
            ));
        }
    }
    let acquired = sp.log()?.iter().filter(|l| l.event == "acquire").count();
    ensure!(acquired > 0, "the speakers' logs show no decision");
    Ok(checks)
}

/// Every move of an affected VIP in `lbtrace diagnose --json` (`diagnosis`: per VIP) has the
/// reason of an injection within 1 s of it; every injection explains at least one move; every
/// takeover in the speakers' logs (an `acquire` after `since`) is a move lbtrace saw within 1 s.
pub(super) fn because_checks(
    lab: &Lab,
    affected: &[std::net::IpAddr],
    diagnosis: &std::collections::BTreeMap<String, serde_json::Value>,
    since: f64,
) -> Result<Vec<Check>> {
    let sp = lab.speakers.as_ref().context("speakers")?;
    let log = sp.log()?;
    let mut checks = Vec::new();
    for vip in affected {
        let moves: Vec<(f64, String, f64)> = diagnosis
            .get(&vip.to_string())
            .and_then(|d| d["findings"].as_array())
            .into_iter()
            .flatten()
            .filter(|f| f["cause"] == "speaker-failover")
            .filter_map(|f| f["evidence"]["changes"].as_array())
            .flatten()
            .map(|c| {
                let b = &c["because"];
                (
                    secs(&c["time"]),
                    b["reason"].as_str().unwrap_or("none").to_owned(),
                    secs(&b["at"]),
                )
            })
            .collect();
        let wrong: Vec<String> = moves
            .iter()
            .filter(|(_, reason, at)| {
                !sp.injected
                    .iter()
                    .any(|i| i.reason == reason && (at - i.t).abs() <= 1.0)
            })
            .map(|(t, reason, at)| {
                format!(
                    "{reason} at {:+.2} s (move {:+.2} s)",
                    at - since,
                    t - since
                )
            })
            .collect();
        checks.push(Check::new(
            !moves.is_empty() && wrong.is_empty(),
            format!(
                "{vip}: {} moves, each because an injection within 1 s (wrong: {wrong:?})",
                moves.len()
            ),
        ));
        for i in &sp.injected {
            let hits = moves
                .iter()
                .filter(|(_, r, at)| r == i.reason && (at - i.t).abs() <= 1.0)
                .count();
            checks.push(Check::new(
                hits > 0,
                format!(
                    "{vip}: {} at {:+.2} s: {hits} move(s) say {}",
                    i.what,
                    i.t - since,
                    i.reason
                ),
            ));
        }
        let takeovers: Vec<f64> = log
            .iter()
            .filter(|l| l.event == "acquire" && l.vip == Some(*vip) && l.t > since)
            .map(|l| l.t)
            .collect();
        let unseen = takeovers
            .iter()
            .filter(|t| {
                !moves
                    .iter()
                    .any(|(m, _, _)| m - *t >= -0.1 && m - *t <= 1.0)
            })
            .count();
        checks.push(Check::new(
            unseen == 0,
            format!(
                "{vip}: takeovers in the speakers' logs {}, each a move lbtrace saw within 1 s ({unseen} not)",
                takeovers.len()
            ),
        ));
    }
    Ok(checks)
}

fn secs(v: &serde_json::Value) -> f64 {
    v.as_str()
        .and_then(super::accounts::parse_rfc3339)
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(f64::NAN, |d| d.as_secs_f64())
}
