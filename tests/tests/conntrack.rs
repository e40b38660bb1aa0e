//! Conntrack-caused drops and VIP attribution through DNAT, against the kernel's own
//! conntrack statistics and what the workload saw.

use std::{net::SocketAddr, time::Duration};

use lbtest::{
    lbtrace::{self, Finished, Watch},
    netns::{veth, Netns, SysctlGuard},
    require_root, traffic, unique,
};

/// client (10.200.5.1) — router (10.200.5.2 | 10.200.6.1) — server (10.200.6.2)
struct Routed {
    client: Netns,
    router: Netns,
    /// Held so the namespace lives as long as the test.
    _server: Netns,
}

fn routed() -> Routed {
    require_root();
    let client = Netns::new("cc").unwrap();
    let router = Netns::new("cr").unwrap();
    let server = Netns::new("cs").unwrap();
    veth(
        &client,
        &unique("lcc"),
        &["10.200.5.1/24"],
        &router,
        &unique("lcr"),
        &["10.200.5.2/24"],
    )
    .unwrap();
    veth(
        &router,
        &unique("lrs"),
        &["10.200.6.1/24"],
        &server,
        &unique("lsr"),
        &["10.200.6.2/24"],
    )
    .unwrap();
    client
        .ip(&["route", "add", "default", "via", "10.200.5.2"])
        .unwrap();
    server
        .ip(&["route", "add", "default", "via", "10.200.6.1"])
        .unwrap();
    router.sysctl("net.ipv4.ip_forward", "1").unwrap();
    Routed {
        client,
        router,
        _server: server,
    }
}

fn watch(ns: &Netns, extra: &[&str]) -> Watch {
    let inode = ns.inode.to_string();
    let mut args = vec!["--json", "--netns", &inode];
    args.extend_from_slice(extra);
    Watch::start(&args).unwrap()
}

/// How NETFILTER_DROPs are classified as conntrack events (the `conntrack` collector).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CtPath {
    /// Conntrack's own verdicts, from kprobes on `__nf_conntrack_confirm` and
    /// `__nf_conntrack_alloc`.
    Hooks,
    /// The namespace's per-CPU conntrack statistics, compared on each drop.
    Statistics,
}

impl CtPath {
    fn probe(self) -> &'static str {
        match self {
            Self::Hooks => "kretprobe/__nf_conntrack_confirm+__nf_conntrack_alloc",
            Self::Statistics => "stats/nf_conntrack",
        }
    }
}

/// Where the kernel exposes kprobes to perf; without it there is no hook path.
const KPROBE_PMU: &str = "/sys/bus/event_source/devices/kprobe";

fn kprobes_offered() -> bool {
    std::path::Path::new(KPROBE_PMU).exists()
}

/// The path lbtrace picks on this kernel, or the statistics when the hooks are forced off.
fn expected_path(forced_statistics: bool) -> CtPath {
    if forced_statistics || !kprobes_offered() {
        CtPath::Statistics
    } else {
        CtPath::Hooks
    }
}

/// A watch of `ns` whose log names the probes; with `forced_statistics`, the conntrack hooks
/// are disabled as if the kernel had refused them.
fn watch_path(ns: &Netns, extra: &[&str], forced_statistics: bool) -> Watch {
    let inode = ns.inode.to_string();
    let mut args = vec!["--json", "--netns", &inode];
    args.extend_from_slice(extra);
    let mut cmd = lbtrace::binary().unwrap();
    cmd.env("LBTRACE_LOG", "info");
    if forced_statistics {
        cmd.env("LBTRACE_DISABLE_PROBES", CtPath::Hooks.probe());
    }
    Watch::start_via(cmd, &args).unwrap()
}

/// The path a watch used, as its log says; it must be the one expected on this kernel.
fn assert_path(f: &Finished, forced_statistics: bool) -> CtPath {
    let want = expected_path(forced_statistics);
    let attached = format!("probe {} attached", want.probe());
    assert!(
        f.stderr.contains(&attached),
        "`{attached}` not in:\n{}",
        f.stderr
    );
    if want == CtPath::Statistics {
        let why = if forced_statistics {
            "disabled by LBTRACE_DISABLE_PROBES"
        } else {
            "this kernel offers no kprobes"
        };
        let refused = format!("probe {} not attached: {why}", CtPath::Hooks.probe());
        assert!(
            f.stderr.contains(&refused),
            "`{refused}` not in:\n{}",
            f.stderr
        );
    }
    want
}

fn conntrack_events<'a>(
    f: &'a Finished,
    event: &'a str,
) -> impl Iterator<Item = &'a serde_json::Value> + 'a {
    f.events
        .iter()
        .filter(move |e| e["kind"] == "conntrack" && e["event"] == event)
}

#[test]
fn snat_exhaustion_counts_insert_failed_exactly() {
    snat_exhaustion(false);
}

/// SNAT exhaustion through `path`: (insert_failed events lbtrace reported, the kernel's delta).
fn snat_exhaustion(forced_statistics: bool) -> (CtPath, u64, u64) {
    let r = routed();
    // Every flow to the server is SNATed to one address and port: once the first flow holds
    // the mapping, each new flow fails to confirm. Flows to port 7777 a plain rule drops: the
    // negative case, NETFILTER_DROPs in the same namespace that conntrack did not cause.
    r.router
        .nft("table ip lbt {\n chain post { type nat hook postrouting priority 100; udp dport 5353 snat to 10.200.6.1:40000; }\n chain fw { type filter hook forward priority 0; udp dport 7777 counter drop; }\n}")
        .unwrap();
    let dst: SocketAddr = "10.200.6.2:5353".parse().unwrap();
    let plain_dst: SocketAddr = "10.200.6.2:7777".parse().unwrap();
    let before = r.router.conntrack_stat("insert_failed").unwrap();
    let drop_before = r.router.conntrack_stat("drop").unwrap();
    let w = watch_path(&r.router, &[], forced_statistics);
    const FLOWS: u32 = 12;
    const PLAIN: u32 = 5;
    // One socket per flow: distinct source ports.
    let (sent, plain) = r
        .client
        .run(|| {
            let plain = (0..PLAIN)
                .map(|_| traffic::udp_send(plain_dst, 1, 8).unwrap())
                .sum::<u32>();
            // All sockets stay open until every flow is sent, so each has its own source port
            // (closed ones may be reused, and the check below counts ports).
            let socks: Vec<_> = (0..FLOWS)
                .map(|_| std::net::UdpSocket::bind("0.0.0.0:0").unwrap())
                .collect();
            let sent = socks
                .iter()
                .map(|s| u32::from(s.send_to(&[0x5a; 8], dst).unwrap() == 8))
                .sum::<u32>();
            (sent, plain)
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let f = w.stop_ok();
    let path = assert_path(&f, forced_statistics);
    let delta = r.router.conntrack_stat("insert_failed").unwrap() - before;
    let drop_delta = r.router.conntrack_stat("drop").unwrap() - drop_before;
    assert_eq!(plain, PLAIN);
    assert_eq!(sent, FLOWS);
    assert_eq!(
        delta,
        u64::from(FLOWS - 1),
        "the kernel's insert_failed delta"
    );
    let events: Vec<_> = conntrack_events(&f, "insert_failed").collect();
    assert_eq!(events.len() as u64, delta, "{}", f.stdout);
    assert_eq!(f.summary["conntrack_by_event"]["insert_failed"], delta);
    let mut sports = std::collections::HashSet::new();
    for e in &events {
        assert_eq!(e["reason"], "NETFILTER_DROP");
        assert_eq!(e["proto"], "udp");
        // Dropped at confirm, after SNAT rewrote the packet.
        assert_eq!(e["src"], "10.200.6.1");
        assert_eq!(e["sport"], 40000);
        assert_eq!(e["dst"], "10.200.6.2");
        assert_eq!(e["dport"], 5353);
        assert_eq!(e["netns"], r.router.inode);
        // The clashing entry: its original direction is the attempt's own 5-tuple.
        assert_eq!(e["orig"]["src"], "10.200.5.1");
        assert_eq!(e["orig"]["dst"], "10.200.6.2");
        assert_eq!(e["orig"]["dport"], 5353);
        assert_eq!(e["reply"]["dst"], "10.200.6.1");
        assert_eq!(e["reply"]["dport"], 40000);
        sports.insert(e["orig"]["sport"].as_u64().unwrap());
    }
    assert_eq!(sports.len(), events.len(), "one record per attempt");
    // The negative case. The clashes moved the namespace's `drop` statistic too (by the same
    // delta), which is what a full table moves: they must still not be table_full. And the
    // plain rule's NETFILTER_DROPs are drops, not conntrack events.
    assert_eq!(drop_delta, delta, "the kernel's drop delta");
    assert_eq!(
        f.summary["conntrack_by_event"]["table_full"], 0,
        "{}",
        f.summary
    );
    let plain_drops: Vec<_> = f.events.iter().filter(|e| e["dport"] == 7777).collect();
    assert_eq!(plain_drops.len() as u32, PLAIN, "{}", f.stdout);
    for e in plain_drops {
        assert_eq!(
            e["kind"], "drop",
            "a plain nft drop is no conntrack event: {e}"
        );
        assert_eq!(e["reason"], "NETFILTER_DROP");
    }
    assert_eq!(
        f.counted("NETFILTER_DROP"),
        u64::from(PLAIN) + delta,
        "{}",
        f.summary
    );
    (path, events.len() as u64, delta)
}

#[test]
fn full_table_counts_table_full_exactly() {
    full_table(false);
}

/// A full table through `path`: (table_full events lbtrace reported, the kernel's delta).
fn full_table(forced_statistics: bool) -> (CtPath, u64, u64) {
    let r = routed();
    // Conntrack on in the router, with no NAT: entries for every forwarded flow.
    r.router
        .nft("table ip lbt {\n chain fw { type filter hook forward priority 0; ct state new counter accept; }\n}")
        .unwrap();
    let dst: SocketAddr = "10.200.6.2:7".parse().unwrap();
    // Warm up: the router's table holds these unreplied UDP entries for 30 s.
    r.client
        .run(|| {
            (0..3).for_each(|_| {
                traffic::udp_send(dst, 1, 8).unwrap();
            })
        })
        .unwrap();
    let before = r.router.conntrack_stat("drop").unwrap();
    let w = watch_path(&r.router, &["--event", "table_full"], forced_statistics);
    // The limit is global but compared with this namespace's own count: 3 entries fill it.
    let guard = SysctlGuard::set("/proc/sys/net/netfilter/nf_conntrack_max", "3").unwrap();
    const FLOWS: u32 = 20;
    r.client
        .run(|| {
            (0..FLOWS).for_each(|_| {
                traffic::udp_send(dst, 1, 8).unwrap();
            })
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // Table pressure is read with the limit still low.
    let f = w.stop_ok();
    drop(guard);
    let path = assert_path(&f, forced_statistics);
    let delta = r.router.conntrack_stat("drop").unwrap() - before;
    assert!(delta > 0, "the table should have been full");
    let events: Vec<_> = conntrack_events(&f, "table_full").collect();
    assert_eq!(events.len() as u64, delta, "{}", f.stdout);
    assert_eq!(f.summary["conntrack_by_event"]["table_full"], delta);
    // Table pressure: the router's table at its limit, and its per-CPU `drop` counts moved by
    // exactly the kernel's delta.
    let table = &f.summary["conntrack_tables"][r.router.inode.to_string()];
    assert_eq!(table["max"], 3, "{}", f.summary);
    assert!(table["peak_entries"].as_u64().unwrap() >= 3, "{table}");
    let drops: u64 = table["drop_per_cpu"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(drops, delta, "{table}");
    assert!(f.stderr.contains("% full"), "a warning line: {}", f.stderr);
    assert!(
        f.events.iter().all(|e| e["kind"] == "conntrack"),
        "--event keeps only conntrack records"
    );
    for e in &events {
        assert_eq!(e["src"], "10.200.5.1");
        assert_eq!(e["dst"], "10.200.6.2");
        // No entry could be allocated: there is no tuple to report.
        assert_eq!(e["orig"], serde_json::Value::Null);
    }
    (path, events.len() as u64, delta)
}

#[test]
fn hooks_and_statistics_count_the_same() {
    require_root();
    // Where the kernel offers kprobes, lbtrace's own choice is the hooks and the forced run
    // the statistics; elsewhere only the statistics exist, and the test says so.
    let runs: &[bool] = if kprobes_offered() {
        &[false, true]
    } else {
        eprintln!(
            "this kernel offers no kprobes ({KPROBE_PMU} is missing): only the statistics path \
             exists; it is checked against the kernel's counters, and lbtrace must say why the \
             hooks are not attached"
        );
        &[false]
    };
    let mut seen = Vec::new();
    for &forced in runs {
        let (path, insert_failed, if_kernel) = snat_exhaustion(forced);
        let (path2, table_full, tf_kernel) = full_table(forced);
        assert_eq!(path, path2);
        eprintln!(
            "{path:?}: insert_failed {insert_failed} (kernel {if_kernel}), table_full \
             {table_full} (kernel {tf_kernel})"
        );
        seen.push((path, insert_failed, table_full));
    }
    // Each run was exact against the kernel's counters; the insert failures, which the
    // workload makes deterministic, are the same number on both paths.
    let insert_failed: Vec<u64> = seen.iter().map(|s| s.1).collect();
    assert!(insert_failed.windows(2).all(|w| w[0] == w[1]), "{seen:?}");
    let paths: Vec<CtPath> = seen.iter().map(|s| s.0).collect();
    let want: &[CtPath] = if kprobes_offered() {
        &[CtPath::Hooks, CtPath::Statistics]
    } else {
        &[CtPath::Statistics]
    };
    assert_eq!(paths, want);
}

/// client — node (DNAT VIP:80 → pod:8080) — pod without a listener.
fn dnat_to_pod_without_listener(v6: bool) {
    require_root();
    let client = Netns::new("dc").unwrap();
    let node = Netns::new("dn").unwrap();
    let pod = Netns::new("dp").unwrap();
    let (c_addr, n_addr, n_pod, p_addr, vip, pod_ip) = if v6 {
        (
            "fd00:200::5:1/112",
            "fd00:200::5:2/112",
            "fd00:200::8:1/112",
            "fd00:200::8:2/112",
            "fd00:200::7:100",
            "fd00:200::8:2",
        )
    } else {
        (
            "10.200.5.1/24",
            "10.200.5.2/24",
            "10.200.8.1/24",
            "10.200.8.2/24",
            "10.200.7.100",
            "10.200.8.2",
        )
    };
    veth(
        &client,
        &unique("ldc"),
        &[c_addr],
        &node,
        &unique("ldn"),
        &[n_addr],
    )
    .unwrap();
    veth(
        &node,
        &unique("lnp"),
        &[n_pod],
        &pod,
        &unique("lpn"),
        &[p_addr],
    )
    .unwrap();
    let gw_c = n_addr.split('/').next().unwrap();
    let gw_p = n_pod.split('/').next().unwrap();
    client
        .ip(&["route", "add", "default", "via", gw_c])
        .unwrap();
    pod.ip(&["route", "add", "default", "via", gw_p]).unwrap();
    let (family, fwd) = if v6 {
        ("ip6", "net.ipv6.conf.all.forwarding")
    } else {
        ("ip", "net.ipv4.ip_forward")
    };
    node.sysctl(fwd, "1").unwrap();
    let dnat_to = if v6 {
        format!("[{pod_ip}]:8080")
    } else {
        format!("{pod_ip}:8080")
    };
    node.nft(&format!(
        "table {family} kube {{\n chain pre {{ type nat hook prerouting priority -100; {family} daddr {vip} tcp dport 80 dnat to {dnat_to}; }}\n}}"
    ))
    .unwrap();
    let vip_dst: SocketAddr = if v6 {
        format!("[{vip}]:80")
    } else {
        format!("{vip}:80")
    }
    .parse()
    .unwrap();
    let direct: SocketAddr = if v6 {
        format!("[{pod_ip}]:8080")
    } else {
        format!("{pod_ip}:8080")
    }
    .parse()
    .unwrap();
    // Both paths answer before anything is counted: neighbour discovery and the node's switch to
    // forwarding settle first (an IPv6 SYN sent at once can time out on a loaded host).
    client
        .run(|| {
            for addr in [direct, vip_dst] {
                let answered = (0..5).any(|_| traffic::tcp_refused(addr, 1).is_ok());
                assert!(answered, "{addr} never answered");
            }
        })
        .unwrap();
    // --tag-vip attributes without selecting: the control flow stays visible.
    let w = watch(&pod, &["--tag-vip", vip]);
    const N: u32 = 9;
    let (via_vip, control) = client
        .run(|| {
            (
                traffic::tcp_refused(vip_dst, N).unwrap(),
                traffic::tcp_refused(direct, 4).unwrap(),
            )
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let f = w.stop_ok();
    assert_eq!((via_vip, control), (N, 4), "every attempt was refused");
    let drops: Vec<_> = f.drops("NO_SOCKET").collect();
    assert_eq!(drops.len(), (N + 4) as usize, "{}", f.stdout);
    let attributed: Vec<_> = drops.iter().filter(|e| e["vip"] == vip).collect();
    assert_eq!(
        attributed.len() as u32,
        N,
        "one attributed drop per failed attempt: {}",
        f.stdout
    );
    for e in &attributed {
        assert_eq!(e["dst"], pod_ip);
        assert_eq!(e["dport"], 8080);
        assert_eq!(e["orig"]["dst"], vip);
        assert_eq!(e["orig"]["dport"], 80);
        assert_eq!(e["nat_netns"], node.inode);
        assert_eq!(e["netns"], pod.inode);
    }
    // The control flow to the pod's own address never becomes a VIP's.
    let control_drops: Vec<_> = drops.iter().filter(|e| e["vip"].is_null()).collect();
    assert_eq!(control_drops.len(), 4);
    assert!(control_drops.iter().all(|e| e["orig"].is_null()));

    // And `--vip` selects exactly the attributed ones, in the kernel.
    let w = Watch::start(&["--json", "--netns", &pod.inode.to_string(), "--vip", vip]).unwrap();
    client
        .run(|| {
            (
                traffic::tcp_refused(vip_dst, N).unwrap(),
                traffic::tcp_refused(direct, 4).unwrap(),
            )
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let f = w.stop_ok();
    assert_eq!(f.events.len() as u32, N, "{}", f.stdout);
    assert!(f.events.iter().all(|e| e["vip"] == vip));
    assert_eq!(f.summary["drops_by_vip"][vip]["NO_SOCKET"], N);
}

#[test]
fn dnat_drops_in_pod_netns_carry_the_vip() {
    dnat_to_pod_without_listener(false);
}

#[test]
fn dnat_drops_in_pod_netns_carry_the_vip_ipv6() {
    dnat_to_pod_without_listener(true);
}
