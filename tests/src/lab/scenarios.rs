//! The failure scenarios: each builds a lab, breaks one service (VIP A) while a control VIP on
//! another node stays healthy, drives traffic at both, runs `lbtrace watch --json --vip …`, and
//! sets three accounts side by side per VIP:
//!
//! - the client's (ground truth): failed attempts plus TCP retransmissions, i.e. packets lost;
//! - the kernel's: the counter of the place that drops in this scenario (nft, conntrack or SNMP
//!   statistics of that namespace), read before and after;
//! - lbtrace's: `drop` and `conntrack` records carrying that `vip`.
//!
//! [`Outcome::checks`] says whether they agree within what the scenario allows.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, ensure, Result};
use serde_json::Value;

use super::{
    generator::{self, Load, Report, Totals},
    interrupted,
    topology::{
        node_ip4, pod_net4, snmp, ConntrackMax, Counter, Lab, Pod, Policy, Service, TABLE, VIP_A,
        VIP_A6, VIP_B, VIP_CTL, VIP_CTL6,
    },
};
use crate::{lbtrace::Watch, traffic};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    Healthy,
    FailoverGarp,
    StaleArp,
    LeaderFlap,
    EndpointChurn,
    ConntrackSnat,
    ConntrackFull,
    MtuMismatch,
    PolicyRace,
}

/// What a VIP is for in a scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Loses traffic: client, kernel and lbtrace must agree on how much.
    Affected,
    /// Takes a wrong path that loses nothing (an extra hop): only a kernel counter shows it.
    Hidden,
    /// Must lose nothing and show no drops.
    Control,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Affected => "affected",
            Role::Hidden => "hidden",
            Role::Control => "control",
        }
    }
}

/// Drops a healthy host makes as part of normal traffic (kernel-notes.md, "Noise"): counted
/// apart, never as loss. `(reason, function)`.
const NOISE: [(&str, &str); 3] = [
    // The pure ACK a server has processed and discards, once per connection.
    ("NOT_SPECIFIED", "tcp_rcv_state_process"),
    ("QUEUE_PURGE", "sk_stream_kill_queues"),
    ("NOT_SPECIFIED", "udp_destruct_common"),
];

/// Whether a record tagged with a VIP is the loss of that service's traffic (TCP or UDP), as
/// opposed to normal TCP discards ([`NOISE`]) or the network's own ICMP and neighbour discovery
/// (a node soliciting a client from the VIP's address, say).
fn is_service_loss(e: &Value) -> bool {
    let function = e["location"].as_str().unwrap_or("").split('+').next();
    let noise = NOISE
        .iter()
        .any(|&(r, f)| e["reason"] == r && function == Some(f));
    !noise && (e["proto"] == "tcp" || e["proto"] == "udp")
}

/// Seconds between the endpoint moving off a node and the speaker moving the VIP after it.
const FAILOVER_GAP: f64 = 1.0;
/// Lowered `nf_conntrack_max` (conntrack-full): above what the control node's table reaches in
/// a run, far below the flood.
const CONNTRACK_MAX: u64 = 1024;
/// How long node n0 keeps the flood's unreplied UDP entries (conntrack-full).
const FLOOD_UDP_TIMEOUT_S: u32 = 8;
const OVERLAY_MTU: u32 = 1450;
/// When n1p0 first stops listening (endpoint-churn).
const CHURN_FIRST: f64 = 3.03;

impl Scenario {
    pub const ALL: [Scenario; 9] = [
        Scenario::Healthy,
        Scenario::FailoverGarp,
        Scenario::StaleArp,
        Scenario::LeaderFlap,
        Scenario::EndpointChurn,
        Scenario::ConntrackSnat,
        Scenario::ConntrackFull,
        Scenario::MtuMismatch,
        Scenario::PolicyRace,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Healthy => "healthy",
            Scenario::FailoverGarp => "failover-garp",
            Scenario::StaleArp => "stale-arp",
            Scenario::LeaderFlap => "leader-flap",
            Scenario::EndpointChurn => "endpoint-churn",
            Scenario::ConntrackSnat => "conntrack-snat",
            Scenario::ConntrackFull => "conntrack-full",
            Scenario::MtuMismatch => "mtu-mismatch",
            Scenario::PolicyRace => "policy-race",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        match Self::ALL.into_iter().find(|s| s.name() == name) {
            Some(s) => Ok(s),
            None => {
                let names: Vec<&str> = Self::ALL.iter().map(|s| s.name()).collect();
                bail!("no scenario {name}; the scenarios are {}", names.join(", "))
            }
        }
    }

    /// What happens, and where the kernel drops.
    pub fn about(self) -> &'static str {
        match self {
            Scenario::Healthy => "nothing breaks: every VIP must show no loss and no drops",
            Scenario::FailoverGarp => "A's pod moves n0 → n1 (policy Local: n0 drops A from then on); 1 s later the speaker moves A (v4 and v6) with 3 gratuitous ARPs/NAs: loss lasts about that second",
            Scenario::StaleArp => "as failover, but the speaker sends no GARP: the client keeps n0's MAC until its entry goes stale (≈10 s with base_reachable_time_ms=2000). A (Local) is dropped on n0; B (Cluster), moved too, is forwarded by n0 with an extra hop and loses nothing",
            Scenario::LeaderFlap => "the speaker flips A between n0 (its endpoint) and n1 (none: dropped) every 3 s, with one GARP each time",
            Scenario::EndpointChurn => "A's endpoint on n1 stops listening and comes back every 3 s while kube-proxy still sends it half of A's flows: RSTs and port unreachables in the pod",
            Scenario::ConntrackSnat => "from 2 s, n0 SNATs A's traffic to n1's pod to one address:port: every new flow there clashes at conntrack confirm (insert_failed)",
            Scenario::ConntrackFull => "at 3 s a burst of UDP flows from c1 to n0 fills n0's conntrack table (nf_conntrack_max lowered to 1024, restored after): new flows to A are dropped until the burst's entries expire (8 s)",
            Scenario::MtuMismatch => "from 2 s n0's path to n1's pods has MTU 1450: every large UDP request to A (1500 bytes, DF) is dropped there, small ones and TCP pass",
            Scenario::PolicyRace => "at 3 s a new pod joins A's endpoints before its network-policy allow rule (a drop rule on n0, lifted at 8 s)",
        }
    }

    /// What lbtrace needs to tie the drops to the VIP.
    pub fn needs(self) -> &'static str {
        match self {
            Scenario::Healthy => "nothing (no drops)",
            Scenario::FailoverGarp
            | Scenario::StaleArp
            | Scenario::LeaderFlap
            | Scenario::ConntrackFull => {
                "the VIP in the dropped packet (dropped before DNAT)"
            }
            Scenario::ConntrackSnat | Scenario::MtuMismatch | Scenario::PolicyRace => {
                "the skb's conntrack entry (dropped after DNAT, in the node)"
            }
            Scenario::EndpointChurn => {
                "the node's DNAT carried across the veth (dropped in the pod, conntrack reference gone)"
            }
        }
    }

    /// Which kernel counter stands for the drops.
    pub fn kernel_counter(self) -> &'static str {
        match self {
            Scenario::EndpointChurn => {
                "the endpoints' Udp NoPorts + Tcp OutRsts (/proc/net/snmp in the pods)"
            }
            Scenario::ConntrackSnat => "insert_failed of the owner node's conntrack statistics",
            Scenario::ConntrackFull => {
                "packets for the VIP before conntrack minus after it, on the owner node (nft)"
            }
            Scenario::MtuMismatch => "Ip FragFails of the owner node (/proc/net/snmp)",
            Scenario::PolicyRace => "the policy drop rule's counter for the VIP's endpoints (nft)",
            _ => "kube-proxy's no-endpoint drop, all nodes (nft)",
        }
    }

    pub fn default_duration(self) -> Duration {
        Duration::from_secs(match self {
            Scenario::Healthy | Scenario::FailoverGarp => 8,
            Scenario::ConntrackSnat | Scenario::MtuMismatch => 8,
            Scenario::PolicyRace => 11,
            Scenario::LeaderFlap | Scenario::EndpointChurn => 14,
            Scenario::StaleArp => 18,
            Scenario::ConntrackFull => 16,
        })
    }

    /// The lab's services at the start: A on n0, the control on n2 (and B on n0 for stale-arp).
    pub fn services(self) -> Vec<Service> {
        let a = |policy, endpoints: &[Pod]| Service {
            name: "a",
            vips: vec![VIP_A, VIP_A6],
            policy,
            endpoints: endpoints.to_vec(),
            owner: Some(0),
        };
        let ctl = Service {
            name: "ctl",
            vips: vec![VIP_CTL, VIP_CTL6],
            policy: Policy::Local,
            endpoints: vec![Pod::new(2, 0)],
            owner: Some(2),
        };
        let n0p0 = Pod::new(0, 0);
        let n1p0 = Pod::new(1, 0);
        let a = match self {
            Scenario::EndpointChurn | Scenario::ConntrackSnat => a(Policy::Cluster, &[n0p0, n1p0]),
            Scenario::MtuMismatch => a(Policy::Cluster, &[n1p0]),
            _ => a(Policy::Local, &[n0p0]),
        };
        let mut services = vec![a, ctl];
        if self == Scenario::StaleArp {
            services.push(Service {
                name: "b",
                vips: vec![VIP_B],
                policy: Policy::Cluster,
                endpoints: vec![Pod::new(1, 1)],
                owner: Some(0),
            });
        }
        services
    }

    /// The VIPs traffic goes to, with their roles.
    fn targets(self) -> Vec<(IpAddr, Role)> {
        let a = if self == Scenario::Healthy {
            Role::Control
        } else {
            Role::Affected
        };
        let mut t = vec![(VIP_A, a)];
        match self {
            Scenario::Healthy | Scenario::FailoverGarp => t.push((VIP_A6, a)),
            Scenario::StaleArp => t.push((VIP_B, Role::Hidden)),
            _ => {}
        }
        t.push((VIP_CTL, Role::Control));
        if matches!(self, Scenario::Healthy | Scenario::FailoverGarp) {
            t.push((VIP_CTL6, Role::Control));
        }
        t
    }

    fn load(self) -> Load {
        match self {
            // Every other UDP request is a full 1500-byte packet with DF (as QUIC sends them).
            // TCP stays small: a segment dropped for size makes the client's kernel learn the
            // path MTU, which changes the size of segments in flight in ways no counter shows.
            Scenario::MtuMismatch => Load {
                udp_payloads: vec![64, 1472],
                ..Load::default()
            },
            _ => Load::default(),
        }
    }

    /// Changes made before traffic starts; what is returned is held until the run ends.
    fn prepare(self, lab: &mut Lab) -> Result<Option<ConntrackMax>> {
        match self {
            Scenario::StaleArp => lab.set_client_reachable_ms(2000)?,
            Scenario::ConntrackFull => {
                lab.nodes[0].sysctl(
                    "net.netfilter.nf_conntrack_udp_timeout",
                    &FLOOD_UDP_TIMEOUT_S.to_string(),
                )?;
                return Ok(Some(ConntrackMax::set(CONNTRACK_MAX)?));
            }
            _ => {}
        }
        Ok(None)
    }

    /// What happens during the run, at times from the traffic's start.
    fn script(self, lab: &mut Lab, clock: &Clock, duration: Duration) -> Result<()> {
        let (n0p0, n0p1, n1p0) = (Pod::new(0, 0), Pod::new(0, 1), Pod::new(1, 0));
        match self {
            Scenario::Healthy => {}
            Scenario::FailoverGarp | Scenario::StaleArp => {
                clock.at(3.0)?;
                lab.set_endpoints("a", &[n1p0])?;
                clock.log("a's pod moved to n1: n0 has no endpoint for a (policy Local)");
                clock.at(3.0 + FAILOVER_GAP)?;
                let garps = if self == Scenario::FailoverGarp { 3 } else { 0 };
                let moved: Vec<&str> = ["a", "b"]
                    .into_iter()
                    .filter(|s| lab.service(s).is_ok())
                    .collect();
                for svc in moved {
                    lab.announce(svc, 1, garps)?;
                    clock.log(&format!(
                        "speaker: {svc} now on n1, {garps} gratuitous ARP/NA"
                    ));
                }
            }
            Scenario::LeaderFlap => {
                for (i, t) in every(3.0, 3.0, duration).enumerate() {
                    clock.at(t)?;
                    let node = if i % 2 == 0 { 1 } else { 0 };
                    lab.announce("a", node, 1)?;
                    clock.log(&format!("speaker: a now on n{node}, 1 gratuitous ARP"));
                }
            }
            Scenario::EndpointChurn => {
                // Between two of the generator's rounds (every 100 ms): no connection is half
                // way through its handshake when the listener closes.
                for (i, t) in every(CHURN_FIRST, 3.0, duration).enumerate() {
                    clock.at(t)?;
                    if i % 2 == 0 {
                        lab.stop_backend(n1p0);
                        clock.log("n1p0 stopped listening (still an endpoint)");
                    } else {
                        lab.start_backend(n1p0)?;
                        clock.log("n1p0 listens again");
                    }
                }
            }
            Scenario::ConntrackSnat => {
                clock.at(2.0)?;
                let pods = pod_net4(n1p0.node);
                let rule = format!(
                    "insert rule inet {TABLE} nat-postrouting meta l4proto {{ tcp, udp }} ip daddr {pods} meta mark 0x4000 snat ip to {}:40000",
                    node_ip4(0)
                );
                lab.add_rules(0, &[rule])?;
                clock.log(&format!("n0 SNATs traffic to {pods} to one address:port"));
            }
            Scenario::ConntrackFull => {
                clock.at(3.0)?;
                let flows = CONNTRACK_MAX + 64;
                let node = node_ip4(0);
                lab.clients[1].run(|| -> Result<()> {
                    for port in 10_000..10_000 + flows {
                        traffic::udp_send(SocketAddr::new(node.into(), port as u16), 1, 8)?;
                    }
                    Ok(())
                })??;
                clock.log(&format!(
                    "c1 sent {flows} UDP flows to n0: its conntrack table is full"
                ));
            }
            Scenario::MtuMismatch => {
                clock.at(2.0)?;
                lab.nodes[0].ip(&[
                    "route",
                    "replace",
                    &pod_net4(n1p0.node),
                    "via",
                    &node_ip4(1).to_string(),
                    "mtu",
                    &OVERLAY_MTU.to_string(),
                ])?;
                clock.log(&format!("n0's path to n1's pods: MTU {OVERLAY_MTU}"));
            }
            Scenario::PolicyRace => {
                clock.at(3.0)?;
                lab.deny(n0p1)?;
                lab.set_endpoints("a", &[n0p0, n0p1])?;
                clock.log("n0p1 joined a's endpoints; its allow rule is not there yet");
                clock.at(8.0)?;
                lab.allow(n0p1)?;
                clock.log("n0p1's allow rule arrived");
            }
        }
        Ok(())
    }

    /// The kernel's count of packets dropped for `vip` so far (see [`Scenario::kernel_counter`]).
    fn kernel(self, lab: &Lab, vip: IpAddr, role: Role) -> Result<u64> {
        let svc = lab.service_of(vip)?;
        let owner = svc.owner.unwrap_or(0);
        if role == Role::Hidden {
            return lab.counter_sum(Counter::Stray, vip);
        }
        Ok(match self {
            Scenario::EndpointChurn => {
                let mut sum = 0;
                for &pod in &svc.endpoints {
                    let ns = lab.pod(pod);
                    sum += snmp(ns, "Udp", "NoPorts")? + snmp(ns, "Tcp", "OutRsts")?;
                }
                sum
            }
            Scenario::ConntrackSnat => lab.nodes[owner].conntrack_stat("insert_failed")?,
            Scenario::ConntrackFull => lab
                .counter(owner, Counter::Arrive, vip)?
                .saturating_sub(lab.counter(owner, Counter::Tracked, vip)?),
            Scenario::MtuMismatch => snmp(&lab.nodes[owner], "Ip", "FragFails")?,
            Scenario::PolicyRace => svc
                .endpoints
                .iter()
                .map(|&p| lab.policy_drops(p))
                .sum::<Result<u64>>()?,
            _ => lab.counter_sum(Counter::NoEndpoint, vip)?,
        })
    }

    /// How long an affected VIP's loss may last (first to last lossy attempt), when the
    /// scenario bounds it: (at least, at most, why).
    fn loss_span(self) -> Option<(f64, f64, &'static str)> {
        match self {
            Scenario::FailoverGarp => Some((
                0.0,
                FAILOVER_GAP + 1.5,
                "the gratuitous ARP/NA moved the client at once",
            )),
            Scenario::StaleArp => Some((7.0, 14.0, "until the client's stale entry failed")),
            _ => None,
        }
    }

    /// Checks beyond the three accounts agreeing.
    fn extra_checks(self, vips: &[VipOutcome]) -> Vec<Check> {
        let Some((lo, hi, why)) = self.loss_span() else {
            return Vec::new();
        };
        vips.iter()
            .filter(|v| v.role == Role::Affected)
            .map(|v| {
                let span = v.loss_span.map(|(f, l)| (l - f).as_secs_f64());
                Check::new(
                    span.is_some_and(|s| (lo..=hi).contains(&s)),
                    format!(
                        "{}: loss over {:.1} s ({lo:.1}–{hi:.1} s: {why})",
                        v.vip,
                        span.unwrap_or(f64::NAN)
                    ),
                )
            })
            .collect()
    }
}

/// Times `first`, `first + period`, … of a periodic change, stopping 2 s before the end of the
/// run so that the last change's effect is seen.
fn every(first: f64, period: f64, duration: Duration) -> impl Iterator<Item = f64> {
    let last = duration.as_secs_f64() - 2.0;
    (0..)
        .map(move |i| first + period * f64::from(i))
        .take_while(move |t| *t <= last)
}

/// Scenario time: seconds from the traffic's start, and what happened when.
struct Clock {
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
    fn at(&self, secs: f64) -> Result<()> {
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

    fn log(&self, what: &str) {
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
}

#[derive(Clone, Debug)]
pub struct Check {
    pub ok: bool,
    pub what: String,
}

impl Check {
    fn new(ok: bool, what: String) -> Self {
        Self { ok, what }
    }
}

/// The three accounts for one VIP.
#[derive(Clone, Debug)]
pub struct VipOutcome {
    pub vip: IpAddr,
    pub role: Role,
    pub client: Totals,
    pub client_per_second: Vec<Totals>,
    /// Start of the first and last attempt that lost a packet.
    pub loss_span: Option<(Duration, Duration)>,
    pub kernel: u64,
    pub lbtrace: u64,
    pub lbtrace_by_reason: BTreeMap<String, u64>,
    /// Records that are not the service's loss (see `is_service_loss`), not in `lbtrace`.
    pub lbtrace_other: u64,
    pub lbtrace_per_second: Vec<u64>,
}

#[derive(Clone, Debug)]
pub struct Outcome {
    pub scenario: Scenario,
    pub duration: Duration,
    pub log: Vec<(Duration, String)>,
    pub vips: Vec<VipOutcome>,
    pub lbtrace_lost: u64,
    pub checks: Vec<Check>,
}

/// Builds the scenario's lab, runs it with lbtrace watching and tears everything down.
pub fn run(scenario: Scenario, opts: &Options) -> Result<Outcome> {
    let duration = opts.duration.unwrap_or(scenario.default_duration());
    let targets = scenario.targets();
    let mut lab = Lab::up(&opts.prefix, scenario.services())?;
    let _limits = scenario.prepare(&mut lab)?;
    let mut args = vec!["--json".to_owned()];
    for (vip, _) in &targets {
        args.push("--vip".to_owned());
        args.push(vip.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let watch = Watch::start(&args)?;
    let kernel = |lab: &Lab| -> Result<Vec<u64>> {
        targets
            .iter()
            .map(|&(vip, role)| scenario.kernel(lab, vip, role))
            .collect()
    };
    let before = kernel(&lab)?;
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
    let lbtrace_lost = finished.summary["events_lost"].as_u64().unwrap_or(0);
    let mut checks = accounting_checks(&vips, lbtrace_lost);
    checks.extend(scenario.extra_checks(&vips));
    checks.extend(diagnosis_checks(scenario, &vips, &finished.stdout)?);
    let log = clock.log.into_inner().unwrap_or_default();
    Ok(Outcome {
        scenario,
        duration,
        log,
        vips,
        lbtrace_lost,
        checks,
    })
}

impl Scenario {
    /// The cause the diagnosis must name first for the affected VIPs.
    fn expected_cause(self) -> Option<&'static str> {
        match self {
            Scenario::Healthy => None,
            Scenario::FailoverGarp | Scenario::LeaderFlap => Some("speaker-failover"),
            Scenario::StaleArp => Some("stale-arp"),
            Scenario::EndpointChurn => Some("endpoint-churn"),
            Scenario::ConntrackSnat | Scenario::ConntrackFull => Some("conntrack"),
            Scenario::MtuMismatch => Some("mtu-mismatch"),
            Scenario::PolicyRace => Some("policy-race"),
        }
    }
}

/// Runs `lbtrace diagnose` on what `watch --json` recorded: the injected cause must come first
/// for the affected VIPs and the control VIP must have no finding; for stale ARP, the measured
/// window must agree with the client's failure window within one bucket (1 s).
fn diagnosis_checks(scenario: Scenario, vips: &[VipOutcome], stream: &str) -> Result<Vec<Check>> {
    let file = std::env::temp_dir().join(format!("{}.ndjson", crate::unique("lbtdiag")));
    std::fs::write(&file, stream)?;
    let mut args = vec![
        "diagnose".to_owned(),
        file.display().to_string(),
        "--json".to_owned(),
    ];
    for v in vips {
        args.push("--vip".to_owned());
        args.push(v.vip.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = crate::lbtrace::run(&args);
    let _ = std::fs::remove_file(&file);
    let out = out?;
    ensure!(
        out.status.success(),
        "lbtrace diagnose failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let by_vip: BTreeMap<String, Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|d| (d["vip"].as_str().unwrap_or("").to_owned(), d))
        .collect();
    let mut checks = Vec::new();
    for v in vips {
        let d = by_vip.get(&v.vip.to_string());
        let findings = d
            .and_then(|d| d["findings"].as_array())
            .cloned()
            .unwrap_or_default();
        let causes: Vec<&str> = findings
            .iter()
            .filter_map(|f| f["cause"].as_str())
            .collect();
        match (v.role, scenario.expected_cause()) {
            (Role::Affected, Some(cause)) => {
                checks.push(Check::new(
                    causes.first() == Some(&cause),
                    format!("{}: diagnosis names {cause} first ({causes:?})", v.vip),
                ));
                if cause == "stale-arp" {
                    let window = findings[0]["evidence"]["window_s"].as_f64().unwrap_or(-1.0);
                    let client = v.loss_span.map_or(0.0, |(a, b)| (b - a).as_secs_f64());
                    checks.push(Check::new(
                        (window - client).abs() <= 1.0,
                        format!("{}: stale-ARP window {window:.1} s vs the client's {client:.1} s (within 1 s)", v.vip),
                    ));
                }
            }
            (Role::Control, _) | (Role::Affected, None) => checks.push(Check::new(
                causes.is_empty(),
                format!(
                    "{}: no finding for a VIP with nothing wrong ({causes:?})",
                    v.vip
                ),
            )),
            (Role::Hidden, _) => {}
        }
    }
    Ok(checks)
}

fn vip_outcome(
    vip: IpAddr,
    role: Role,
    report: &Report,
    kernel: u64,
    events: &[Value],
) -> VipOutcome {
    let seconds = report.duration.as_secs().max(1) as usize;
    let mut by_reason = BTreeMap::new();
    let mut per_second = vec![0; seconds];
    let mut other = 0;
    let vip_s = vip.to_string();
    for e in events.iter().filter(|e| {
        (e["kind"] == "drop" || e["kind"] == "conntrack") && e["vip"].as_str() == Some(&vip_s)
    }) {
        if !is_service_loss(e) {
            other += 1;
            continue;
        }
        let reason = match e["kind"].as_str() {
            Some("conntrack") => format!("conntrack {}", e["event"].as_str().unwrap_or("?")),
            _ => e["reason"].as_str().unwrap_or("?").to_owned(),
        };
        *by_reason.entry(reason).or_insert(0) += 1;
        if let Some(t) = e["time"].as_str().and_then(parse_rfc3339) {
            let s = t
                .duration_since(report.started)
                .unwrap_or_default()
                .as_secs() as usize;
            per_second[s.min(seconds - 1)] += 1;
        }
    }
    VipOutcome {
        vip,
        role,
        client: report.totals(vip),
        client_per_second: report.per_second(vip),
        loss_span: report.loss_span(vip),
        kernel,
        lbtrace: by_reason.values().sum(),
        lbtrace_by_reason: by_reason,
        lbtrace_other: other,
        lbtrace_per_second: per_second,
    }
}

fn accounting_checks(vips: &[VipOutcome], lbtrace_lost: u64) -> Vec<Check> {
    let mut checks = vec![Check::new(
        lbtrace_lost == 0,
        format!("lbtrace lost {lbtrace_lost} events (ring buffer)"),
    )];
    for v in vips {
        let (vip, lost, k, l) = (v.vip, v.client.lost(), v.kernel, v.lbtrace);
        match v.role {
            Role::Control => checks.push(Check::new(
                lost == 0 && k == 0 && l == 0,
                format!("{vip} (control): client lost {lost}, kernel {k}, lbtrace {l}: all 0"),
            )),
            Role::Hidden => checks.push(Check::new(
                lost == 0 && l == 0 && k > 0,
                format!("{vip} (hidden): client lost {lost} and lbtrace {l} are 0, yet {k} packets took the stale path"),
            )),
            Role::Affected => {
                checks.push(Check::new(
                    lost > 0,
                    format!("{vip}: the client lost {lost} packets ({} failed attempts + {} retransmissions)", v.client.failed, v.client.retrans),
                ));
checks.push(Check::new(
                    k == lost,
                    format!("{vip}: kernel {k} = client {lost}"),
                ));
                checks.push(Check::new(
                    l == k,
                    format!("{vip}: lbtrace {l} = kernel {k}"),
                ));
            }
        }
    }
    checks
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    /// What happened when, then per second the client's ok/failed and lbtrace's drops per VIP,
    /// then [`Outcome::summary`].
    pub fn render(&self) -> String {
        let mut o = String::new();
        let s = self.scenario;
        let _ = writeln!(o, "scenario {}: {}", s.name(), s.about());
        for (t, what) in &self.log {
            let _ = writeln!(o, "  {:>5.1}s  {what}", t.as_secs_f64());
        }
        let _ = write!(o, "\n  {:>4} ", "s");
        for v in &self.vips {
            let _ = write!(o, "│ {:<24}", format!("{} {}", v.vip, v.role.name()));
        }
        let _ = write!(o, "\n  {:>4} ", "");
        for _ in &self.vips {
            let _ = write!(
                o,
                "│ {:>5} {:>5} {:>5} {:>6} ",
                "ok", "fail", "retx", "drops"
            );
        }
        o.push('\n');
        for i in 0..self.duration.as_secs() as usize {
            let _ = write!(o, "  {i:>4} ");
            for v in &self.vips {
                let c = v.client_per_second.get(i).copied().unwrap_or_default();
                let d = v.lbtrace_per_second.get(i).copied().unwrap_or(0);
                let _ = write!(
                    o,
                    "│ {:>5} {:>5} {:>5} {:>6} ",
                    c.ok, c.failed, c.retrans, d
                );
            }
            o.push('\n');
        }
        o.push('\n');
        o + &self.summary()
    }

    /// Per VIP: the client's totals, the kernel counter and lbtrace's drops by reason; then the
    /// checks.
    pub fn summary(&self) -> String {
        let mut o = String::new();
        let s = self.scenario;
        let _ = writeln!(
            o,
            "  {:<16} {:<9} {:>8} {:>6} {:>6} {:>7} {:>5} │ {:>6} │ {:>7} {:>6}  by reason",
            "VIP",
            "role",
            "attempts",
            "ok",
            "failed",
            "retrans",
            "lost",
            "kernel",
            "lbtrace",
            "other"
        );
        for v in &self.vips {
            let reasons: Vec<String> = v
                .lbtrace_by_reason
                .iter()
                .map(|(r, n)| format!("{r} {n}"))
                .collect();
            let c = v.client;
            let _ = writeln!(
                o,
                "  {:<16} {:<9} {:>8} {:>6} {:>6} {:>7} {:>5} │ {:>6} │ {:>7} {:>6}  {}",
                v.vip.to_string(),
                v.role.name(),
                c.attempts,
                c.ok,
                c.failed,
                c.retrans,
                c.lost(),
                v.kernel,
                v.lbtrace,
                v.lbtrace_other,
                reasons.join(", ")
            );
        }
        let _ = writeln!(o, "  kernel: {}", s.kernel_counter());
        let _ = writeln!(
            o,
            "  other: records of the VIP that are not its lost traffic: ICMP, neighbour discovery, {}",
            NOISE.map(|(r, f)| format!("{r} at {f}")).join(", ")
        );
        let _ = writeln!(o, "  lbtrace needs: {}", s.needs());
        for c in &self.checks {
            let _ = writeln!(o, "  {} {}", if c.ok { "ok  " } else { "FAIL" }, c.what);
        }
        o
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction]Z` (lbtrace's `time`).
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let (date, time) = s.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.splitn(3, '-').map(str::parse::<i64>);
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.splitn(3, ':').map(str::parse::<i64>);
    let (h, mi, sec) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    // Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let secs = u64::try_from(days * 86_400 + h * 3600 + mi * 60 + sec).ok()?;
    let nanos = format!("{frac:0<9}").get(..9)?.parse().ok()?;
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lbtrace_time() {
        let t = parse_rfc3339("2026-11-26T03:16:08.123456789Z").unwrap();
        let d = t.duration_since(UNIX_EPOCH).unwrap();
        assert_eq!(d.as_secs(), 1_795_662_968);
        assert_eq!(d.subsec_nanos(), 123_456_789);
        let t = parse_rfc3339("1970-01-01T00:00:00Z").unwrap();
        assert_eq!(t, UNIX_EPOCH);
    }

    #[test]
    fn every_scenario_has_a_name_that_parses() {
        for s in Scenario::ALL {
            assert_eq!(Scenario::parse(s.name()).unwrap(), s);
        }
        assert!(Scenario::parse("nope").is_err());
    }
}
