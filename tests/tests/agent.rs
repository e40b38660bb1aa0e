//! `lbtrace agent`: two agents for two "nodes", scraped by a real Prometheus; health, SIGHUP,
//! SIGTERM, bad configuration.

use std::{
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use lbtest::{
    agent::{bpf_ids_of, loaded, Agent},
    http,
    lab::backend::Backend,
    lbtrace::bin,
    netns::{veth, Netns},
    oracle::{self, TraceInstance},
    prometheus::{self, Prometheus},
    require_root, traffic, unique,
};
use serde_json::Value;

/// client (10.200.20.1) — node1 (10.200.20.11, VIP1 dropped by policy)
///                      — node2 (10.200.21.11, VIP2 dropped by policy)
struct Nodes {
    client: Netns,
    node1: Netns,
    node2: Netns,
    /// node1's end of its link to the client.
    node1_if: String,
}

const VIP1: &str = "10.200.22.1";
const VIP2: &str = "10.200.22.2";
/// A healthy VIP on node1: an echo server answers it over TCP.
const VIP_CTL: &str = "10.200.22.3";

fn nodes() -> Nodes {
    require_root();
    let client = Netns::new("ac").unwrap();
    let node1 = Netns::new("an1").unwrap();
    let node2 = Netns::new("an2").unwrap();
    let node1_if = unique("ln1");
    veth(
        &client,
        &unique("lc1"),
        &["10.200.20.1/24"],
        &node1,
        &node1_if,
        &["10.200.20.11/24"],
    )
    .unwrap();
    veth(
        &client,
        &unique("lc2"),
        &["10.200.21.1/24"],
        &node2,
        &unique("ln2"),
        &["10.200.21.11/24"],
    )
    .unwrap();
    client
        .ip(&["route", "add", &format!("{VIP1}/32"), "via", "10.200.20.11"])
        .unwrap();
    client
        .ip(&["route", "add", &format!("{VIP2}/32"), "via", "10.200.21.11"])
        .unwrap();
    // externalTrafficPolicy: Local with no local endpoint: kube-proxy drops the VIP's traffic.
    for (node, vip) in [(&node1, VIP1), (&node2, VIP2)] {
        node.ip(&["addr", "add", &format!("{vip}/32"), "dev", "lo"])
            .unwrap();
        node.nft(&format!(
            "table ip kube {{\n counter dropped {{}}\n chain pre {{ type filter hook prerouting priority 0; ip daddr {vip} udp dport 80 counter name \"dropped\" drop; }}\n}}"
        ))
        .unwrap();
    }
    Nodes {
        client,
        node1,
        node2,
        node1_if,
    }
}

/// An agent for `node`, counting only the namespace `ns`.
fn start(node: &str, ns: &Netns, extra: &[&str]) -> Agent {
    let inode = ns.inode.to_string();
    let mut args = vec!["--node-name", node, "--netns", &inode];
    args.extend_from_slice(extra);
    Agent::start(&args, &[]).unwrap_or_else(|e| panic!("agent for {node}: {e:#}"))
}

fn send(n: &Nodes, vip: &str, count: u32) -> u32 {
    let dst: SocketAddr = format!("{vip}:80").parse().unwrap();
    n.client
        .run(|| traffic::udp_send(dst, count, 16).unwrap())
        .unwrap()
}

#[test]
fn two_agents_scraped_by_prometheus_count_each_vips_drops() {
    let n = nodes();
    // The control VIP: served on node1, so each TCP connection ends with the server's kernel
    // freeing the processed final ACK through the drop path (benign, not loss; most
    // connections do: 35 of 40 in one run).
    n.node1
        .ip(&["addr", "add", &format!("{VIP_CTL}/32"), "dev", "lo"])
        .unwrap();
    n.client
        .ip(&[
            "route",
            "add",
            &format!("{VIP_CTL}/32"),
            "via",
            "10.200.20.11",
        ])
        .unwrap();
    let echo = Backend::start(&n.node1, 80, 5353).unwrap();
    let vips = format!("{VIP1},{VIP2},{VIP_CTL}");
    let a1 = start("node1", &n.node1, &["--vip", &vips]);
    let a2 = start("node2", &n.node2, &["--vip", &vips]);
    let prom = Prometheus::start(&[a1.addr, a2.addr], &[]).unwrap();
    let trace = TraceInstance::kfree_skb().unwrap();
    let ctl: SocketAddr = format!("{VIP_CTL}:80").parse().unwrap();
    let conns = n
        .client
        .run(|| traffic::tcp_echo(ctl, 40).unwrap())
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let freed = trace.stop().unwrap();
    let benign = oracle::count(&freed, "NOT_SPECIFIED", "tcp_rcv_state_process");
    assert!(
        conns == 40 && benign > 0,
        "the kernel freed {benign} final ACKs through the drop path for {conns} connections: {:?}",
        oracle::histogram(&freed)
    );
    // Sent after the control's traffic: once Prometheus has these, it has seen that too.
    let (sent1, sent2) = (send(&n, VIP1, 17), send(&n, VIP2, 29));
    let truth1 = n.node1.nft_counter("ip", "kube", "dropped").unwrap();
    let truth2 = n.node2.nft_counter("ip", "kube", "dropped").unwrap();
    assert_eq!((truth1, truth2), (u64::from(sent1), u64::from(sent2)));

    // Wait for scrapes that include everything.
    let q = "sum by (vip) (lbtrace_drops_total{reason=\"NETFILTER_DROP\",vip!=\"none\"})";
    let start = Instant::now();
    let mut got = prom.query(q, "vip").unwrap();
    while (got.get(VIP1), got.get(VIP2)) != (Some(&truth1), Some(&truth2)) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "Prometheus has {got:?}, nft counted {truth1} and {truth2}"
        );
        std::thread::sleep(Duration::from_millis(500));
        got = prom.query(q, "vip").unwrap();
    }
    // The control VIP lost nothing: no loss in any series, at either node. The agent did see
    // the benign frees (its per-reason kernel count), it just does not call them loss.
    let all = prom
        .query("sum by (vip) (lbtrace_drops_total)", "vip")
        .unwrap();
    assert_eq!(all.get(VIP_CTL).copied().unwrap_or(0), 0, "{all:?}");
    let seen = prom
        .query(
            "sum by (node) (lbtrace_kernel_drops_total{reason=\"NOT_SPECIFIED\"})",
            "node",
        )
        .unwrap();
    assert!(seen.get("node1").is_some_and(|&n| n > 0), "{seen:?}");
    echo.stop();
    // Each node saw only its own VIP's drops.
    let by_node = prom
        .query("sum by (node) (lbtrace_drops_total{vip!=\"none\"})", "node")
        .unwrap();
    assert_eq!(by_node.get("node1"), Some(&truth1));
    assert_eq!(by_node.get("node2"), Some(&truth2));
    assert_eq!(
        a1.metric("lbtrace_probe_attached{probe=\"tp_btf/kfree_skb\""),
        Some(1)
    );
    // Ownership comes from what nodes transmit: no hook on every received packet by default.
    assert_eq!(
        a1.metric("lbtrace_probe_attached{probe=\"tp_btf/netif_receive_skb\""),
        None
    );
    assert_eq!(http::get(a1.addr, "/healthz").unwrap().0, 200);
    assert_eq!(http::get(a1.addr, "/nothing").unwrap().0, 404);

    let mut held = Vec::new();
    for a in [a1, a2] {
        let ids = bpf_ids_of(a.pid(), "prog_id").unwrap();
        assert!(ids.len() >= 3, "the agent holds its programs: {ids:?}");
        held.extend(ids);
        let (status, took, stderr) = a.stop().unwrap();
        assert!(status.success(), "agent exited with {status}: {stderr}");
        assert!(took < Duration::from_secs(2), "SIGTERM took {took:?}");
    }
    std::thread::sleep(Duration::from_millis(200));
    let loaded = loaded("prog").unwrap();
    let left: Vec<_> = held.iter().filter(|id| loaded.contains(id)).collect();
    assert!(
        left.is_empty(),
        "programs left behind after SIGTERM: {left:?}"
    );
}

/// Every expression of deploy/'s alert rules and Grafana dashboard evaluates without error
/// against a Prometheus holding two agents' series, and reads only series an agent exports.
#[test]
fn rules_and_dashboard_evaluate_against_the_agents_series() {
    let n = nodes();
    let vips = format!("{VIP1},{VIP2}");
    let a1 = start("node1", &n.node1, &["--vip", &vips]);
    let a2 = start("node2", &n.node2, &["--vip", &vips]);
    let rules = prometheus::rules_file();
    let prom = Prometheus::start(&[a1.addr, a2.addr], std::slice::from_ref(&rules)).unwrap();
    send(&n, VIP1, 5);
    send(&n, VIP2, 7);
    // node1 announces VIP1 the way a speaker does: ownership, GARP and takeover series.
    let out = n
        .node1
        .exec("arping", &["-q", "-U", "-c", "2", "-I", &n.node1_if, VIP1])
        .unwrap();
    assert!(out.status.success(), "arping: {out:?}");
    let scraped = a1.get("/metrics").unwrap().1;
    let exported = prometheus::families(&scraped);
    for family in [
        "lbtrace_vip_drops_total",
        "lbtrace_garps_total",
        "lbtrace_vip_takeovers_total",
        "lbtrace_vip_owner_since_timestamp_seconds",
        "lbtrace_vip_owner_garps",
        "lbtrace_conntrack_entries_max",
    ] {
        assert!(
            exported.contains(family),
            "{family} not exported: {scraped}"
        );
    }
    prom.wait_for(
        "sum by (node) (lbtrace_vip_drops_total{path=\"vip\",vip!=\"none\"})",
        "node",
        Duration::from_secs(30),
        |g| g.get("node1") == Some(&5) && g.get("node2") == Some(&7),
    )
    .unwrap();
    prom.wait_for(
        "sum by (node) (lbtrace_garps_total)",
        "node",
        Duration::from_secs(30),
        |g| g.get("node1") == Some(&2),
    )
    .unwrap();

    // The rules, as Prometheus evaluates them every second: healthy, none with an error.
    std::thread::sleep(Duration::from_secs(3));
    let loaded = prom.rules().unwrap();
    assert_eq!(loaded.len(), 8, "{loaded:?}");
    for (name, health, err) in &loaded {
        assert_eq!(health, "ok", "rule {name}: {err}");
    }
    let text = std::fs::read_to_string(&rules).unwrap();
    let mut exprs: Vec<(String, String)> = prometheus::rule_exprs(&text);
    assert_eq!(exprs.len(), 8);
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(prometheus::dashboard_file()).unwrap())
            .unwrap();
    let (panels, var_metrics) = prometheus::dashboard_exprs(&dashboard);
    assert!(panels.len() >= 15, "{panels:?}");
    exprs.extend(
        panels
            .iter()
            .map(|(t, e)| (t.clone(), prometheus::grafana_to_promql(e))),
    );
    let mut used = std::collections::BTreeSet::new();
    for (what, e) in &exprs {
        if let Err(err) = prom.eval(e) {
            panic!("{what}: `{e}` does not evaluate: {err}");
        }
        used.extend(prometheus::metric_names(e));
    }
    used.extend(var_metrics);
    let unknown: Vec<_> = used.iter().filter(|m| !exported.contains(*m)).collect();
    assert!(unknown.is_empty(), "not exported by the agent: {unknown:?}");
    drop(prom);
    for a in [a1, a2] {
        let (status, _, stderr) = a.stop().unwrap();
        assert!(status.success(), "{stderr}");
    }
}

/// `--node-netns` is a set (inode, `ip netns` name): both nodes' drops count, the client's
/// namespace (not in the set) counts nothing, not even in the kernel's per-reason totals.
#[test]
fn a_namespace_set_keeps_exactly_its_namespaces() {
    let n = nodes();
    let set = format!("{},{}", n.node1.inode, n.node2.name);
    let vips = format!("{VIP1},{VIP2}");
    let a = Agent::start(
        &["--node", "both", "--node-netns", &set, "--vip", &vips],
        &[],
    )
    .unwrap();
    // The control: an agent for the client's namespace sees its drops.
    let client_ns = n.client.inode.to_string();
    let c = Agent::start(&["--node", "client", "--node-netns", &client_ns], &[]).unwrap();
    let (sent1, sent2) = (send(&n, VIP1, 6), send(&n, VIP2, 9));
    // UDP to a closed port of the client itself: NO_SOCKET in the client's namespace.
    let own: SocketAddr = "10.200.20.1:9".parse().unwrap();
    let refused = n
        .client
        .run(|| traffic::udp_send(own, 4, 16).unwrap())
        .unwrap();
    assert_eq!(refused, 4);
    std::thread::sleep(Duration::from_millis(1500));
    let truth = (
        n.node1.nft_counter("ip", "kube", "dropped").unwrap(),
        n.node2.nft_counter("ip", "kube", "dropped").unwrap(),
    );
    assert_eq!(truth, (u64::from(sent1), u64::from(sent2)));
    let vip = |v: &str| a.metric_sum(&format!("lbtrace_drops_total{{vip=\"{v}\""));
    assert_eq!((vip(VIP1), vip(VIP2)), (Some(truth.0), Some(truth.1)));
    assert_eq!(
        a.metric("lbtrace_kernel_drops_total{reason=\"NO_SOCKET\""),
        None,
        "the client's namespace is not in the set"
    );
    assert_eq!(
        c.metric("lbtrace_kernel_drops_total{reason=\"NO_SOCKET\""),
        Some(4)
    );
    assert_eq!(c.metric_sum("lbtrace_drops_total{vip=\"10.200.22"), None);
    let (status, _, stderr) = a.stop().unwrap();
    assert!(status.success(), "{stderr}");
    // A name that is no namespace: one line, exit 2.
    let out = Command::new(bin())
        .args(["agent", "--node-netns", "no-such-netns-lbt"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.lines()
            .next()
            .unwrap_or("")
            .contains("no-such-netns-lbt"),
        "{err}"
    );
}

#[test]
fn sighup_reloads_vips_without_losing_counters() {
    let n = nodes();
    let dir = std::env::temp_dir().join(unique("lbtcfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("lbtrace.toml");
    std::fs::write(&cfg, format!("vips = [\"{VIP1}\"]\n")).unwrap();
    let events = dir.join("events.ndjson");
    let a = start(
        "node1",
        &n.node1,
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--events-file",
            events.to_str().unwrap(),
        ],
    );
    // The node's own address on lo takes VIP2 too, so both are dropped in node1.
    n.node1
        .ip(&["addr", "add", &format!("{VIP2}/32"), "dev", "lo"])
        .unwrap();
    n.node1
        .nft(&format!("table ip kube2 {{\n chain pre {{ type filter hook prerouting priority 0; ip daddr {VIP2} udp dport 80 drop; }}\n}}"))
        .unwrap();
    n.client
        .ip(&[
            "route",
            "replace",
            &format!("{VIP2}/32"),
            "via",
            "10.200.20.11",
        ])
        .unwrap();
    send(&n, VIP1, 5);
    send(&n, VIP2, 3);
    std::thread::sleep(Duration::from_millis(1500));
    let vip1 = format!("lbtrace_drops_total{{vip=\"{VIP1}\",reason=\"NETFILTER_DROP\"");
    let vip2 = format!("lbtrace_drops_total{{vip=\"{VIP2}\",reason=\"NETFILTER_DROP\"");
    assert_eq!(a.metric(&vip1), Some(5));
    // VIP2 is not configured yet: no series for it at all (its drops count under vip="none").
    assert_eq!(a.metric(&vip2), None);
    std::fs::write(&cfg, format!("vips = [\"{VIP1}\", \"{VIP2}\"]\n")).unwrap();
    a.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(500));
    send(&n, VIP2, 4);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(a.metric(&vip1), Some(5), "counters survive the reload");
    assert_eq!(a.metric(&vip2), Some(4));
    // A bad file on reload keeps the old configuration.
    std::fs::write(&cfg, "vips = [\"not-an-ip\"]\n").unwrap();
    a.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    send(&n, VIP2, 2);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(a.metric(&vip2), Some(6));
    let (status, _, _) = a.stop().unwrap();
    assert!(status.success());
    let lines = std::fs::read_to_string(&events).unwrap();
    let vip2_in_file = lines
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["vip"] == VIP2 && e["node"] == "node1")
        .count();
    assert_eq!(vip2_in_file, 6, "the event file carries node and vip");
    let _ = std::fs::remove_dir_all(&dir);
}

fn agent_fails(args: &[&str], needle: &str) {
    let out = Command::new(bin())
        .arg("agent")
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    // One line saying what is wrong (clap adds a pointer to --help after a blank line).
    let first = stderr.lines().next().unwrap_or("");
    assert!(
        first.contains(needle),
        "{args:?}: `{needle}` not in {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_configuration_and_a_taken_port_are_one_line_and_exit_2() {
    require_root();
    let dir = std::env::temp_dir().join(unique("lbtbad"));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        (
            "vips = []\nfrobnicate = true\n",
            "unknown field `frobnicate`",
        ),
        (
            "vips = [\"10.0.0.0/40\"]\n",
            "vips[0]: `10.0.0.0/40` is not an IP address or CIDR",
        ),
        ("metrics_addr = \"nowhere\"\n", "metrics_addr"),
        ("vips = [\n", "line"),
    ];
    for (text, needle) in cases {
        let p = dir.join("bad.toml");
        std::fs::write(&p, text).unwrap();
        agent_fails(&["--config", p.to_str().unwrap()], needle);
    }
    agent_fails(&["--config", "/nonexistent/lbtrace.toml"], "No such file");
    agent_fails(&["--vip", "10.0.0.256"], "not an IP address or CIDR");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    agent_fails(&["--metrics-addr", &addr], "cannot listen on");
    // Environment variables are flags too.
    let out = Command::new(bin())
        .arg("agent")
        .env("LBTRACE_METRICS_ADDR", &addr)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&addr));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn past_the_sample_limit_the_metrics_still_equal_nft_and_tracefs() {
    let n = nodes();
    // Five records per key, CPU and second: a few thousand drops go far past it.
    let a = start("node1", &n.node1, &["--vip", VIP1, "--sample-limit", "5"]);
    let trace = TraceInstance::kfree_skb().unwrap();
    let sent = u64::from(send(&n, VIP1, 4000));
    let nft = n.node1.nft_counter("ip", "kube", "dropped").unwrap();
    let events = trace.stop().unwrap();
    // IPv4 only: IPv6 multicast elsewhere on the host may meet a drop rule of its own.
    let ipv4: Vec<_> = events
        .iter()
        .filter(|e| e.protocol == 0x0800)
        .cloned()
        .collect();
    let kernel = oracle::count(&ipv4, "NETFILTER_DROP", "nft_do_chain");
    assert_eq!(
        (nft, kernel),
        (sent, sent),
        "the workload and the kernel agree: {:?}",
        oracle::histogram(&events)
    );

    let series = format!("lbtrace_drops_total{{vip=\"{VIP1}\",reason=\"NETFILTER_DROP\"");
    let start = Instant::now();
    while a.metric(&series) != Some(nft) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "lbtrace_drops_total {:?}, nft {nft}",
            a.metric(&series)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let sampled = a.metric("lbtrace_events_sampled_out_total{").unwrap();
    let delivered = a.metric("lbtrace_events_total{kind=\"drop\"").unwrap_or(0);
    assert!(sampled > 0, "sampling was active");
    assert!(
        delivered > 0 && delivered < sent,
        "only samples: {delivered}"
    );
    // Every matched drop is either a delivered sample or sampled out (nothing was lost).
    // Records count as they arrive and the kernel's counters are read once a second, so a
    // stray drop in the namespace (IPv6 multicast) can put one side briefly ahead: the
    // identity must hold once both have caught up.
    let start = Instant::now();
    loop {
        let sampled = a.metric("lbtrace_events_sampled_out_total{").unwrap();
        let delivered = a.metric("lbtrace_events_total{kind=\"drop\"").unwrap_or(0);
        let all = a.metric_sum("lbtrace_kernel_drops_total{").unwrap();
        let lost = a.metric_sum("lbtrace_events_lost_total{").unwrap_or(0);
        if delivered + lost + sampled == all {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "delivered {delivered} + lost {lost} + sampled out {sampled} != seen {all}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // The runs the kernel skipped, as the kernel itself counts them (bpftool's view).
    let missed = a.metric("lbtrace_program_missed_runs_total{program=\"kfree_skb_btf\"");
    assert_eq!(missed, Some(recursion_misses("kfree_skb_btf")));
    let (status, _, stderr) = a.stop().unwrap();
    assert!(status.success(), "{stderr}");
}

/// `recursion_misses` of the loaded programs named `name`, from `bpftool prog show` (absent
/// when zero).
fn recursion_misses(name: &str) -> u64 {
    let out = Command::new("bpftool")
        .args(["prog", "show", "-j"])
        .output()
        .expect("bpftool runs");
    let progs: Value = serde_json::from_slice(&out.stdout).expect("bpftool's JSON");
    progs
        .as_array()
        .expect("a list of programs")
        .iter()
        .filter(|p| p["name"] == name)
        .map(|p| p["recursion_misses"].as_u64().unwrap_or(0))
        .sum()
}
