//! One run of a scenario: the lab up, lbtrace watching (and, with `cluster`, one agent per
//! node), the traffic, the script, the three accounts read and checked, everything torn down.

use std::{
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};

use super::{
    accounts::{accounting_checks, vip_outcome, Check, Role, VipOutcome},
    cluster,
    generator::{self, Load},
    interrupted,
    scenarios::{Scenario, LATE_WATCH},
    topology::Lab,
    verdict::{diagnosis_checks, flood_checks, mac_of},
};
use crate::lbtrace::Watch;

/// Scenario time: seconds from the traffic's start, and what happened when.
pub(super) struct Clock {
    t0: Instant,
    log: std::sync::Mutex<Vec<(Duration, String)>>,
}

impl Clock {
    fn start() -> Self {
        Self {
            t0: Instant::now(),
            log: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Sleeps until `secs` after the start; fails when the run is interrupted.
    pub(super) fn at(&self, secs: f64) -> Result<()> {
        let due = self.t0 + Duration::from_secs_f64(secs);
        while Instant::now() < due {
            ensure!(!interrupted(), "interrupted");
            std::thread::sleep(
                due.saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(100)),
            );
        }
        Ok(())
    }

    pub(super) fn log(&self, what: &str) {
        if let Ok(mut l) = self.log.lock() {
            l.push((self.t0.elapsed(), what.to_owned()));
        }
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    /// Namespaces are `{prefix}-…`.
    pub prefix: String,
    /// Instead of the scenario's own.
    pub duration: Option<Duration>,
    /// Also run one agent per node, scraped by Prometheus ([`cluster`]).
    pub cluster: bool,
    /// kube-proxy's mode on the nodes, instead of the scenario's own.
    pub proxy_mode: Option<super::kubeproxy::ProxyMode>,
}

#[derive(Clone, Debug)]
pub struct Outcome {
    pub scenario: Scenario,
    pub duration: Duration,
    pub log: Vec<(Duration, String)>,
    pub vips: Vec<VipOutcome>,
    /// The summary's `events_lost`; `None` when it is missing (a failed check).
    pub lbtrace_lost: Option<u64>,
    pub checks: Vec<Check>,
    /// The host-wide `watch --json --vip …` stream (a recording).
    pub stream: String,
    /// With [`Options::cluster`]: the per-node agents' series and event files.
    pub cluster: Option<Arc<cluster::Finished>>,
}

/// How long the kernel is left alone before a scenario starts. Started straight after other
/// root tests (the conntrack ones above all), conntrack-full's exact counts came out one drop
/// per VIP short of the kernel's (lbtrace's in-kernel counters too, no program run skipped):
/// in 7 of 17 runs, and in 0 of 8 after a pause of 3 s or more. The cause is not found; see
/// the README's "Known limits".
const SETTLE: Duration = Duration::from_secs(3);

/// Builds the scenario's lab, runs it with lbtrace watching and tears everything down.
pub fn run(scenario: Scenario, opts: &Options) -> Result<Outcome> {
    std::thread::sleep(SETTLE);
    let duration = opts.duration.unwrap_or(scenario.default_duration());
    let targets = scenario.targets();
    let mode = opts.proxy_mode.unwrap_or(scenario.proxy_mode());
    let mut lab = Lab::up_with(&opts.prefix, scenario.services(), mode)?;
    let _limits = scenario.prepare(&mut lab)?;
    // Every drop, benign ones too: the lab classes them itself and checks lbtrace's class.
    let mut args = vec![
        "--json".to_owned(),
        "--all-drops".to_owned(),
        "--kube-proxy-interval".to_owned(),
        super::kubeproxy_checks::LBTRACE_INTERVAL.to_owned(),
    ];
    for (vip, _) in &targets {
        args.push("--vip".to_owned());
        args.push(vip.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let vip_list: Vec<IpAddr> = targets.iter().map(|t| t.0).collect();
    let agents = if opts.cluster {
        Some(cluster::Cluster::start(&lab, &vip_list)?)
    } else {
        None
    };
    let kernel = |lab: &Lab| -> Result<Vec<u64>> {
        targets
            .iter()
            .map(|&(vip, role)| scenario.kernel(lab, vip, role))
            .collect()
    };
    let late = scenario == Scenario::LateStart;
    let mut watch = None;
    if !late {
        watch = Some(Watch::start(&args)?);
    }
    let mut before = kernel(&lab)?;
    let vips: Vec<IpAddr> = targets.iter().map(|t| t.0).collect();
    let gen = generator::start(
        &lab.clients[0],
        &vips,
        Load {
            duration,
            ..scenario.load()
        },
    )?;
    let clock = Clock::start();
    let t0_wall = super::speakers::now();
    if late {
        // The client resolves the VIPs with its first requests, before lbtrace runs.
        clock.at(LATE_WATCH)?;
        watch = Some(Watch::start(&args)?);
        before = kernel(&lab)?;
        clock.log("lbtrace started");
    }
    let watch = watch.context("lbtrace was not started")?;
    let scripted = scenario.script(&mut lab, &clock, duration);
    // Always wait for the traffic: it stops by itself (or on interrupt).
    let report = gen.join();
    scripted?;
    let report = report?;
    // lbtrace got the same Ctrl-C and stopped early: its counts would not compare.
    ensure!(!interrupted(), "interrupted");
    // The last answers and drops are processed within microseconds; be generous.
    std::thread::sleep(Duration::from_millis(300));
    let after = kernel(&lab)?;
    let finished = watch.stop()?;
    let cluster = agents.map(cluster::Cluster::finish).transpose()?;
    ensure!(
        finished.status.success(),
        "lbtrace failed: {}",
        finished.stderr
    );
    let vips: Vec<VipOutcome> = targets
        .iter()
        .zip(before.iter().zip(&after))
        .map(|(&(vip, role), (b, a))| {
            vip_outcome(vip, role, &report, a.saturating_sub(*b), &finished.events)
        })
        .collect();
    let lbtrace_lost = finished.summary["events_lost"].as_u64();
    let mut checks = accounting_checks(&vips, lbtrace_lost);
    checks.extend(scenario.extra_checks(&vips));
    checks.extend(super::accounts::summary_checks(&vips, &finished.summary));
    checks.extend(super::accounts::class_checks(&finished.events));
    if scenario == Scenario::NodeLoss {
        checks.extend(flood_checks(&vips, &finished.events));
    }
    let old_owner = match scenario {
        Scenario::LateStart => Some(mac_of(&lab.nodes[0])?),
        _ => None,
    };
    checks.extend(diagnosis_checks(
        scenario,
        &vips,
        &finished.stdout,
        old_owner,
    )?);
    if lab.speakers.is_some() {
        checks.extend(speaker_checks(scenario, &lab, &vips, &finished, t0_wall)?);
    }
    if let Some((reason, at)) = scenario.expected_because() {
        let moved: Vec<IpAddr> = vips
            .iter()
            .filter(|v| matches!(v.role, Role::Affected | Role::Unseen))
            .map(|v| v.vip)
            .collect();
        let diagnosis = super::verdict::diagnose_json(&finished.stdout, &moved)?;
        let at = at.map(|a| t0_wall + a);
        checks.extend(super::verdict::because_checks(
            &moved, &diagnosis, reason, at,
        ));
    }
    let log = clock.log.into_inner().unwrap_or_default();
    checks.extend(super::kubeproxy_checks::checks(
        &lab,
        clock.t0,
        &log,
        &finished.events,
        &finished.stdout,
    )?);
    Ok(Outcome {
        scenario,
        duration,
        log,
        vips,
        lbtrace_lost,
        checks,
        stream: finished.stdout,
        cluster: cluster.map(Arc::new),
    })
}

/// The speaker scenarios' ground truth and the reason of each move (`lbtrace diagnose`).
fn speaker_checks(
    scenario: Scenario,
    lab: &Lab,
    vips: &[VipOutcome],
    finished: &crate::lbtrace::Finished,
    since: f64,
) -> Result<Vec<Check>> {
    let mut checks = super::speaker_scenarios::truth_checks(scenario, lab, &finished.events)?;
    let moved: Vec<IpAddr> = vips
        .iter()
        .filter(|v| v.role == Role::Moved)
        .map(|v| v.vip)
        .collect();
    let diagnosis = super::verdict::diagnose_json(&finished.stdout, &moved)?;
    checks.extend(super::speaker_scenarios::because_checks(
        lab, &moved, &diagnosis, since,
    )?);
    Ok(checks)
}

impl Scenario {
    /// kube-proxy's mode on the lab's nodes: endpoint-churn runs iptables mode.
    pub fn proxy_mode(self) -> super::kubeproxy::ProxyMode {
        match self {
            Scenario::EndpointChurn => super::kubeproxy::ProxyMode::Iptables,
            _ => super::kubeproxy::ProxyMode::Nftables,
        }
    }

    /// The `because` every move of an affected VIP must carry in the scenarios that move it
    /// the old way (the lab itself moves the address and sends the announcements), with when
    /// (seconds from the traffic's start) the evidence must begin, within 1 s.
    pub(super) fn expected_because(self) -> Option<(&'static str, Option<f64>)> {
        match self {
            Scenario::FailoverGarp
            | Scenario::StaleArp
            | Scenario::LeaderFlap
            | Scenario::LateStart => Some(("announcer-changed", None)),
            Scenario::NodeLoss => Some(("node-link-lost", Some(super::scenarios::NODE_LOSS))),
            _ => None,
        }
    }

    /// The cause the diagnosis must name first for the affected VIPs.
    pub(super) fn expected_cause(self) -> Option<&'static str> {
        match self {
            Scenario::Healthy => None,
            Scenario::FailoverGarp
            | Scenario::LeaderFlap
            | Scenario::NodeLoss
            | Scenario::SpeakerOom
            | Scenario::MemberlistLoss
            | Scenario::SpeakerRestart => Some("speaker-failover"),
            Scenario::StaleArp | Scenario::LateStart => Some("stale-arp"),
            Scenario::EndpointChurn => Some("endpoint-churn"),
            Scenario::ConntrackSnat | Scenario::ConntrackFull => Some("conntrack"),
            Scenario::MtuMismatch => Some("mtu-mismatch"),
            Scenario::PolicyRace => Some("policy-race"),
        }
    }
}
