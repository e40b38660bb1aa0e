//! One end-to-end run per lab scenario (`lbtest::lab`): for each VIP, lbtrace's drops must
//! match the client's losses (failed attempts plus retransmissions) and the kernel's counter for
//! the place that drops, the control VIP must show nothing, and nothing of the lab may be left
//! behind (namespaces, the lowered conntrack limit, its backup).

use lbtest::{
    lab::{
        kubeproxy::ProxyMode,
        kubeproxy_checks,
        scenarios::{self, Options, Scenario},
        topology,
    },
    require_root, unique,
};

/// One run of `scenario` in a lab of its own; nothing of it may be left behind.
fn run_once(scenario: Scenario, proxy_mode: Option<ProxyMode>) -> scenarios::Outcome {
    let conntrack_max = topology::conntrack_max().unwrap();
    let prefix = unique("lbtlab");
    let outcome = scenarios::run(
        scenario,
        &Options {
            prefix: prefix.clone(),
            duration: None,
            cluster: false,
            proxy_mode,
        },
    );
    let left = topology::leftovers(&prefix, &conntrack_max).unwrap();
    let outcome = outcome.unwrap();
    println!("{}", outcome.render());
    // LAB_STREAM_DIR=DIR keeps each run's recording (`lbtrace watch --json`) for a look after.
    if let Some(dir) = std::env::var_os("LAB_STREAM_DIR") {
        let file = std::path::Path::new(&dir).join(format!("{}.ndjson", scenario.name()));
        std::fs::write(&file, &outcome.stream).unwrap();
    }
    assert!(left.is_empty(), "left behind: {left:?}");
    outcome
}

/// A scenario must pass; a failed run gets one more in a fresh lab, and both are printed.
/// Runs of hundreds of timed flows on a shared 2-core host have been seen, rarely, one packet
/// apart between two of the three accounts (the kernel's and lbtrace's); a broken lbtrace fails
/// both runs. Every retry is said in the test's output.
fn check(scenario: Scenario, proxy_mode: Option<ProxyMode>) {
    require_root();
    let first = run_once(scenario, proxy_mode);
    if first.passed() {
        return;
    }
    println!("RETRY: {} failed once; running it again", scenario.name());
    let second = run_once(scenario, proxy_mode);
    assert!(
        second.passed(),
        "failed twice:\n{}\n{}",
        first.render(),
        second.render()
    );
}

/// One `#[test]` per scenario, so that each can be run and reported on its own.
macro_rules! scenario_tests {
    ($($test:ident: $scenario:ident),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                check(Scenario::$scenario, None);
            }
        )*
    };
}

scenario_tests! {
    healthy: Healthy,
    failover_garp: FailoverGarp,
    stale_arp: StaleArp,
    leader_flap: LeaderFlap,
    endpoint_churn: EndpointChurn,
    conntrack_snat: ConntrackSnat,
    conntrack_full: ConntrackFull,
    mtu_mismatch: MtuMismatch,
    policy_race: PolicyRace,
    late_start: LateStart,
    node_loss: NodeLoss,
    speaker_oom: SpeakerOom,
    memberlist_loss: MemberlistLoss,
    speaker_restart: SpeakerRestart,
}

/// endpoint-churn runs kube-proxy's iptables mode; its names, endpoint records and diagnosis
/// are checked in nftables mode too.
#[test]
fn endpoint_churn_nftables() {
    check(Scenario::EndpointChurn, Some(ProxyMode::Nftables));
}

/// `--discover-vips` learns every LoadBalancer IP in kube-proxy's rules and nothing else, in
/// both of kube-proxy's modes.
fn discovery(mode: ProxyMode) {
    require_root();
    let conntrack_max = topology::conntrack_max().unwrap();
    let prefix = unique("lbtdisc");
    let check = kubeproxy_checks::discovery(&prefix, mode);
    let left = topology::leftovers(&prefix, &conntrack_max).unwrap();
    let check = check.unwrap();
    println!("{} {}", if check.ok { "ok  " } else { "FAIL" }, check.what);
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(check.ok, "{}", check.what);
}

#[test]
fn discover_vips_nftables() {
    discovery(ProxyMode::Nftables);
}

#[test]
fn discover_vips_iptables() {
    discovery(ProxyMode::Iptables);
}
