//! The failure scenarios (what each one is, does and counts; a run is in run.rs, its verdict in
//! verdict.rs): each builds a lab, breaks one service (VIP A, IPv4 and IPv6) while a
//! control VIP (both families) on another node stays healthy, drives traffic at both, runs `lbtrace watch --json --vip …`, and
//! sets three accounts side by side per VIP:
//!
//! - the client's (ground truth): failed attempts plus TCP retransmissions, i.e. packets lost;
//! - the kernel's: the counter of the place that drops in this scenario (nft, conntrack or SNMP
//!   statistics of that namespace), read before and after;
//! - lbtrace's: `drop` and `conntrack` records carrying that `vip`.
//!
//! [`Outcome::checks`] says whether they agree within what the scenario allows.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{bail, Result};

pub use super::accounts::{Check, Role, VipOutcome};
pub use super::run::{run, Options, Outcome};
use super::{
    generator::{self, Load},
    inject::{every, family, lose_node, rst_counters, snat_counters, take_out},
    run::Clock,
    speaker_scenarios,
    topology::{
        node_ip4, node_ip6, pod_net4, pod_net6, snmp, snmp6, ConntrackMax, Counter, Lab, Pod,
        Policy, Service, TABLE, VIP_A, VIP_A6, VIP_B, VIP_B6, VIP_CTL, VIP_CTL6,
    },
};
use crate::traffic;

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
    LateStart,
    NodeLoss,
    SpeakerOom,
    MemberlistLoss,
    SpeakerRestart,
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
/// late-start: when lbtrace starts (the client resolved the VIPs at 0 s), and when A moves.
pub(super) const LATE_WATCH: f64 = 2.0;
const LATE_MOVE: f64 = 4.0;
/// late-start: the nft table that takes n0 out and counts what still reaches it.
pub(super) const OUT_TABLE: &str = "lbtest-out";
/// node-loss: the bridge's table that counts frames still sent to the lost node's MAC.
pub(super) const LOST_TABLE: &str = "lbtest-lost";
/// node-loss: when n0's link goes down (the speaker moves A `FAILOVER_GAP` later).
pub(super) const NODE_LOSS: f64 = 3.0;
/// How long after n1p0 stops listening kube-proxy's sync removes it (endpoint-churn).
pub const CHURN_PROPAGATION: f64 = 1.5;

impl Scenario {
    pub const ALL: [Scenario; 14] = [
        Scenario::Healthy,
        Scenario::FailoverGarp,
        Scenario::StaleArp,
        Scenario::LeaderFlap,
        Scenario::EndpointChurn,
        Scenario::ConntrackSnat,
        Scenario::ConntrackFull,
        Scenario::MtuMismatch,
        Scenario::PolicyRace,
        Scenario::LateStart,
        Scenario::NodeLoss,
        Scenario::SpeakerOom,
        Scenario::MemberlistLoss,
        Scenario::SpeakerRestart,
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
            Scenario::LateStart => "late-start",
            Scenario::NodeLoss => "node-loss",
            Scenario::SpeakerOom => "speaker-oom",
            Scenario::MemberlistLoss => "memberlist-loss",
            Scenario::SpeakerRestart => "speaker-restart",
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

    pub fn default_duration(self) -> Duration {
        Duration::from_secs(match self {
            Scenario::Healthy | Scenario::FailoverGarp | Scenario::NodeLoss => 8,
            Scenario::SpeakerOom => 8,
            Scenario::MemberlistLoss | Scenario::SpeakerRestart => 14,
            Scenario::ConntrackSnat | Scenario::MtuMismatch => 8,
            Scenario::PolicyRace => 11,
            Scenario::LeaderFlap | Scenario::EndpointChurn => 14,
            Scenario::StaleArp | Scenario::LateStart => 18,
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
            // Whichever of n0 and n1 holds A serves it from its own pod: a move loses nothing.
            Scenario::SpeakerOom | Scenario::MemberlistLoss | Scenario::SpeakerRestart => {
                a(Policy::Local, &[n0p0, n1p0])
            }
            _ => a(Policy::Local, &[n0p0]),
        };
        let mut services = vec![a, ctl];
        if self == Scenario::StaleArp {
            services.push(Service {
                name: "b",
                vips: vec![VIP_B, VIP_B6],
                policy: Policy::Cluster,
                endpoints: vec![Pod::new(1, 1)],
                owner: Some(0),
            });
        }
        services
    }

    /// The VIPs traffic goes to, with their roles: every failure is injected over IPv4 and
    /// IPv6 alike, and each family is accounted for on its own.
    pub(super) fn targets(self) -> Vec<(IpAddr, Role)> {
        let a = match self {
            Scenario::Healthy => Role::Control,
            Scenario::NodeLoss => Role::Unseen,
            Scenario::SpeakerOom | Scenario::MemberlistLoss | Scenario::SpeakerRestart => {
                Role::Moved
            }
            _ => Role::Affected,
        };
        let mut t = vec![(VIP_A, a), (VIP_A6, a)];
        if self == Scenario::StaleArp {
            t.extend([(VIP_B, Role::Hidden), (VIP_B6, Role::Hidden)]);
        }
        t.extend([(VIP_CTL, Role::Control), (VIP_CTL6, Role::Control)]);
        t
    }

    pub(super) fn load(self) -> Load {
        match self {
            // Every other UDP request is a full 1500-byte packet with DF (as QUIC sends them).
            // TCP stays small: a segment dropped for size makes the client's kernel learn the
            // path MTU, which changes the size of segments in flight in ways no counter shows.
            Scenario::MtuMismatch => Load {
                udp_payloads: vec![64, generator::FULL_PACKET],
                ..Load::default()
            },
            _ => Load::default(),
        }
    }

    /// Changes made before traffic starts; what is returned is held until the run ends.
    pub(super) fn prepare(self, lab: &mut Lab) -> Result<Option<ConntrackMax>> {
        match self {
            Scenario::StaleArp => lab.set_client_reachable_ms(2000)?,
            Scenario::LateStart => {
                lab.set_client_reachable_ms(2000)?;
                lab.nodes[0].nft(&format!(
                    "table inet {OUT_TABLE} {{\n counter out4 {{ }}\n counter out6 {{ }}\n counter probes6 {{ }}\n chain raw {{\n  type filter hook prerouting priority raw - 10; policy accept;\n }}\n}}"
                ))?;
            }
            Scenario::NodeLoss => lab.lan.nft(&format!(
                "table bridge {LOST_TABLE} {{\n counter lost4 {{ }}\n counter lost6 {{ }}\n chain pre {{\n  type filter hook prerouting priority 0; policy accept;\n }}\n}}"
            ))?,
            // Every pod: the endpoints change during the run, and each one counted must count.
            Scenario::EndpointChurn => {
                for pod in &lab.pods {
                    pod.nft(&rst_counters())?;
                }
            }
            Scenario::ConntrackSnat => {
                let (n0, n1) = snat_counters(1);
                lab.add_rules(0, &[n0])?;
                lab.add_rules(1, &[n1])?;
            }
            Scenario::ConntrackFull => {
                lab.nodes[0].sysctl(
                    "net.netfilter.nf_conntrack_udp_timeout",
                    &FLOOD_UDP_TIMEOUT_S.to_string(),
                )?;
                return Ok(Some(ConntrackMax::set(CONNTRACK_MAX)?));
            }
            Scenario::SpeakerOom | Scenario::MemberlistLoss | Scenario::SpeakerRestart => {
                let prefix = lab.lan.name.trim_end_matches("-lan").to_owned();
                speaker_scenarios::prepare(self, lab, &prefix)?;
            }
            _ => {}
        }
        Ok(None)
    }

    /// What happens during the run, at times from the traffic's start.
    pub(super) fn script(self, lab: &mut Lab, clock: &Clock, duration: Duration) -> Result<()> {
        let (n0p0, n0p1, n1p0) = (Pod::new(0, 0), Pod::new(0, 1), Pod::new(1, 0));
        match self {
            Scenario::Healthy => {}
            Scenario::SpeakerOom | Scenario::MemberlistLoss | Scenario::SpeakerRestart => {
                speaker_scenarios::script(self, lab, clock)?;
            }
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
                // way through its handshake when the listener closes. The endpoint leaves
                // kube-proxy's rules a sync later (the propagation delay), and comes back once
                // it listens again.
                for (i, t) in every(CHURN_FIRST, 6.0, duration).enumerate() {
                    clock.at(t)?;
                    lab.stop_backend(n1p0);
                    clock.log("n1p0 stopped listening (still an endpoint)");
                    clock.at(t + CHURN_PROPAGATION)?;
                    lab.set_endpoints("a", &[n0p0])?;
                    clock.log(&format!(
                        "kube-proxy sync: n1p0 removed from a's endpoints, {CHURN_PROPAGATION:.1} s after it stopped listening (propagation {i})"
                    ));
                    clock.at(t + 2.0 * CHURN_PROPAGATION)?;
                    lab.start_backend(n1p0)?;
                    lab.set_endpoints("a", &[n0p0, n1p0])?;
                    clock.log("n1p0 listens again; kube-proxy sync: added back to a's endpoints");
                }
            }
            Scenario::ConntrackSnat => {
                clock.at(2.0)?;
                let (pods, pods6) = (pod_net4(n1p0.node), pod_net6(n1p0.node));
                let rules = [
                    format!(
                        "insert rule inet {TABLE} nat-postrouting meta l4proto {{ tcp, udp }} ip daddr {pods} meta mark 0x4000 snat ip to {}:40000",
                        node_ip4(0)
                    ),
                    format!(
                        "insert rule inet {TABLE} nat-postrouting meta l4proto {{ tcp, udp }} ip6 daddr {pods6} meta mark 0x4000 snat ip6 to [{}]:40000",
                        node_ip6(0)
                    ),
                ];
                lab.add_rules(0, &rules)?;
                clock.log(&format!(
                    "n0 SNATs traffic to {pods} and {pods6} to one address:port each"
                ));
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
                for (net, via) in [
                    (pod_net4(n1p0.node), node_ip4(1).to_string()),
                    (pod_net6(n1p0.node), node_ip6(1).to_string()),
                ] {
                    let mtu = OVERLAY_MTU.to_string();
                    lab.nodes[0].ip(&["route", "replace", &net, "via", &via, "mtu", &mtu])?;
                }
                clock.log(&format!("n0's path to n1's pods: MTU {OVERLAY_MTU}"));
            }
            Scenario::NodeLoss => {
                clock.at(NODE_LOSS)?;
                lose_node(lab, 0)?;
                clock.log("n0's link is down (node loss)");
                clock.at(NODE_LOSS + FAILOVER_GAP)?;
                lab.set_endpoints("a", &[n1p0])?;
                lab.announce("a", 1, 3)?;
                clock.log("speaker: a now on n1, 3 gratuitous ARP/NA");
            }
            Scenario::LateStart => {
                clock.at(LATE_MOVE)?;
                lab.announce("a", 1, 0)?;
                take_out(lab, 0, &[VIP_A, VIP_A6])?;
                lab.set_endpoints("a", &[n1p0])?;
                clock.log("speaker: a now on n1, no gratuitous ARP/NA; n0 taken out (forwarding off, A untracked there)");
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
    pub(super) fn kernel(self, lab: &Lab, vip: IpAddr, role: Role) -> Result<u64> {
        let svc = lab.service_of(vip)?;
        let owner = svc.owner.unwrap_or(0);
        if role == Role::Hidden {
            return lab.counter_sum(Counter::Stray, vip);
        }
        Ok(match self {
            // Tcp OutRsts is one counter for both families: the pods count their RSTs per
            // family in nft instead.
            Scenario::EndpointChurn => {
                let mut sum = 0;
                for &pod in &svc.endpoints {
                    let ns = lab.pod(pod);
                    sum += match vip {
                        IpAddr::V4(_) => snmp(ns, "Udp", "NoPorts")?,
                        IpAddr::V6(_) => snmp6(ns, "Udp6NoPorts")?,
                    };
                    sum += ns.nft_counter("inet", "lbtest", &format!("rst{}", family(vip)))?;
                }
                sum
            }
            // The namespace's insert_failed is one counter for both families: per family, the
            // packets n0 passed towards n1's pods after NAT, minus those that reached n1.
            Scenario::ConntrackSnat if owner != 0 => {
                lab.nodes[owner].conntrack_stat("insert_failed")?
            }
            Scenario::ConntrackSnat => {
                let f = family(vip);
                let left = lab.nodes[0].nft_counter("inet", TABLE, &format!("ctleft{f}"))?;
                let arrived = lab.nodes[1].nft_counter("inet", TABLE, &format!("ctarrived{f}"))?;
                left.saturating_sub(arrived)
            }
            Scenario::ConntrackFull => lab
                .counter(owner, Counter::Arrive, vip)?
                .saturating_sub(lab.counter(owner, Counter::Tracked, vip)?),
            Scenario::MtuMismatch => match vip {
                IpAddr::V4(_) => snmp(&lab.nodes[owner], "Ip", "FragFails")?,
                // The route's MTU is not locked, so ip6_forward lets the packet through and
                // ip6_fragment refuses it (ICMPv6 packet too big; NOT_SPECIFIED, Ip6FragFails).
                IpAddr::V6(_) => snmp6(&lab.nodes[owner], "Ip6FragFails")?,
            },
            Scenario::NodeLoss if svc.name == "a" => {
                lab.lan
                    .nft_counter("bridge", LOST_TABLE, &format!("lost{}", family(vip)))?
            }
            // The node's own count of what it dropped as not its address. (The nft counter of
            // what reached it also counts a packet forwarded in the instant between the rule
            // and the sysctl that stops forwarding.)
            Scenario::LateStart if svc.name == "a" => match vip {
                IpAddr::V4(_) => snmp(&lab.nodes[0], "Ip", "InAddrErrors")?,
                // Less the client's unicast neighbour probes for the VIP, dropped there too.
                IpAddr::V6(_) => snmp6(&lab.nodes[0], "Ip6InAddrErrors")?
                    .saturating_sub(lab.nodes[0].nft_counter("inet", OUT_TABLE, "probes6")?),
            },
            Scenario::PolicyRace => svc
                .endpoints
                .iter()
                .map(|&p| lab.policy_drops(p, vip))
                .sum::<Result<u64>>()?,
            _ => lab.counter_sum(Counter::NoEndpoint, vip)?,
        })
    }

    /// How long an affected VIP's loss may last (first to last lossy attempt), when the
    /// scenario bounds it: (at least, at most, why).
    fn loss_span(self) -> Option<(f64, f64, &'static str)> {
        match self {
            Scenario::FailoverGarp | Scenario::NodeLoss => Some((
                0.0,
                FAILOVER_GAP + 1.5,
                "the gratuitous ARP/NA moved the client at once",
            )),
            Scenario::StaleArp | Scenario::LateStart => {
                Some((7.0, 14.0, "until the client's stale entry failed"))
            }
            _ => None,
        }
    }

    /// Checks beyond the three accounts agreeing.
    pub(super) fn extra_checks(self, vips: &[VipOutcome]) -> Vec<Check> {
        let Some((lo, hi, why)) = self.loss_span() else {
            return Vec::new();
        };
        vips.iter()
            .filter(|v| matches!(v.role, Role::Affected | Role::Unseen))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scenario_has_a_name_that_parses() {
        for s in Scenario::ALL {
            assert_eq!(Scenario::parse(s.name()).unwrap(), s);
        }
        assert!(Scenario::parse("nope").is_err());
    }
}
