//! lbtrace's drop counts against the kernel's own account, on the real kernel.
//!
//! Each workload runs in namespaces it creates. For each, lbtrace's exact count for the workload's
//! reason must equal what the workload sent, the tracefs `skb/kfree_skb` events of the same window
//! (and an nft counter where there is one), and every record must carry the 5-tuple, netns and
//! interface that were used.

use std::net::{Ipv4Addr, SocketAddr};

use lbtest::{
    lbtrace::{Finished, Watch},
    netns::{veth, Netns},
    oracle::{count, TraceInstance},
    require_root, traffic,
};

const N: u32 = 25;

struct Window {
    lbtrace: Finished,
    kernel: Vec<lbtest::oracle::KfreeSkb>,
}

/// Runs `workload` with lbtrace (filtered to `ns`) and the tracefs oracle both recording.
fn observe(
    mode: &str,
    ns: &Netns,
    extra: &[&str],
    workload: impl FnOnce() -> u32,
) -> (u32, Window) {
    require_root();
    let inode = ns.inode.to_string();
    let mut args = vec!["--json", "--probe-mode", mode, "--netns", &inode];
    args.extend_from_slice(extra);
    let watch = Watch::start(&args).expect("lbtrace watch starts");
    let oracle = TraceInstance::kfree_skb().expect("tracefs instance");
    let sent = workload();
    // Give softirq processing a moment to finish before both stop.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let kernel = oracle.stop().expect("tracefs oracle");
    let lbtrace = watch.stop_ok();
    assert_eq!(
        lbtrace.summary["probe"],
        probe_of(mode),
        "--probe-mode {mode} must attach that probe: {}",
        lbtrace.summary
    );
    (sent, Window { lbtrace, kernel })
}

/// The drop probe `--probe-mode MODE` must attach.
fn probe_of(mode: &str) -> &'static str {
    match mode {
        "btf" => "tp_btf/kfree_skb",
        "tracepoint" => "tracepoint/skb/kfree_skb",
        _ => panic!("no probe mode {mode}"),
    }
}

fn assert_exact(w: &Window, reason: &str, function: &str, expected: u64) {
    let kernel = count(&w.kernel, reason, function);
    let delivered = w
        .lbtrace
        .drops(reason)
        .filter(|e| {
            e["location"]
                .as_str()
                .unwrap_or("")
                .starts_with(&format!("{function}+"))
        })
        .count() as u64;
    assert_eq!(
        kernel,
        expected,
        "tracefs saw {kernel} {reason} at {function}, workload made {expected}; tracefs had {:?}",
        lbtest::oracle::histogram(&w.kernel)
    );
    assert_eq!(
        w.lbtrace.counted(reason),
        expected,
        "lbtrace counted {reason}: {}",
        w.lbtrace.stdout
    );
    assert_eq!(
        delivered, expected,
        "lbtrace delivered {delivered} {reason} records at {function}"
    );
    assert_eq!(w.lbtrace.summary["events_lost"], 0);
}

fn tcp_closed_port_v4(mode: &str) {
    let ns = Netns::new("tcp").unwrap();
    let dst: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let (sent, w) = observe(mode, &ns, &[], || {
        ns.run(|| traffic::tcp_refused(dst, N)).unwrap().unwrap()
    });
    assert_eq!(sent, N);
    assert_exact(&w, "NO_SOCKET", "tcp_v4_rcv", u64::from(N));
    for e in w.lbtrace.drops("NO_SOCKET") {
        assert_eq!(e["proto"], "tcp");
        assert_eq!(e["family"], "ipv4");
        assert_eq!(e["dst"], "127.0.0.1");
        assert_eq!(e["src"], "127.0.0.1");
        assert_eq!(e["dport"], 9);
        assert_eq!(e["tcp_flags"], "S");
        assert_eq!(e["netns"], ns.inode);
        assert_eq!(e["ifname"], "lo");
        assert_eq!(e["ifindex"], 1);
    }
}

#[test]
fn tcp_syn_to_closed_port_btf() {
    tcp_closed_port_v4("btf");
}

#[test]
fn tcp_syn_to_closed_port_tracepoint() {
    tcp_closed_port_v4("tracepoint");
}

fn udp_closed_port(mode: &str) {
    let ns = Netns::new("udp").unwrap();
    let dst: SocketAddr = "127.0.0.1:7".parse().unwrap();
    let (sent, w) = observe(mode, &ns, &[], || {
        ns.run(|| traffic::udp_send(dst, N, 32)).unwrap().unwrap()
    });
    assert_exact(&w, "NO_SOCKET", "__udp4_lib_rcv", u64::from(sent));
    for e in w.lbtrace.drops("NO_SOCKET") {
        assert_eq!(e["proto"], "udp");
        assert_eq!(e["dport"], 7);
        assert_eq!(e["len"], 8 + 32);
        assert_eq!(e["netns"], ns.inode);
    }
}

#[test]
fn udp_to_closed_port_btf() {
    udp_closed_port("btf");
}

#[test]
fn udp_to_closed_port_tracepoint() {
    udp_closed_port("tracepoint");
}

fn nft_drop(mode: &str, v6: bool) {
    let ns = Netns::new("nft").unwrap();
    let (family, dst) = if v6 {
        ("ip6", "[::1]:7777")
    } else {
        ("ip", "127.0.0.1:7777")
    };
    ns.nft(&format!(
        "table {family} lbt {{\n counter dropped {{}}\n chain input {{ type filter hook input priority 0; udp dport 7777 counter name \"dropped\" drop; }}\n}}"
    ))
    .unwrap();
    let dst: SocketAddr = dst.parse().unwrap();
    let (sent, w) = observe(mode, &ns, &[], || {
        ns.run(|| traffic::udp_send(dst, N, 10)).unwrap().unwrap()
    });
    let nft = ns.nft_counter(family, "lbt", "dropped").unwrap();
    assert_eq!(nft, u64::from(sent), "nft counter against what was sent");
    assert_exact(&w, "NETFILTER_DROP", "nft_do_chain", nft);
    for e in w.lbtrace.drops("NETFILTER_DROP") {
        assert_eq!(e["family"], if v6 { "ipv6" } else { "ipv4" });
        assert_eq!(e["dst"], if v6 { "::1" } else { "127.0.0.1" });
        assert_eq!(e["dport"], 7777);
        assert_eq!(e["proto"], "udp");
    }
}

#[test]
fn nftables_drop_rule_btf() {
    nft_drop("btf", false);
}

#[test]
fn nftables_drop_rule_tracepoint() {
    nft_drop("tracepoint", false);
}

#[test]
fn nftables_drop_rule_ipv6_btf() {
    nft_drop("btf", true);
}

#[test]
fn nftables_drop_rule_ipv6_tracepoint() {
    nft_drop("tracepoint", true);
}

fn tcp_closed_port_v6(mode: &str) {
    let ns = Netns::new("tcp6").unwrap();
    let dst: SocketAddr = "[::1]:9".parse().unwrap();
    let (sent, w) = observe(mode, &ns, &[], || {
        ns.run(|| traffic::tcp_refused(dst, N)).unwrap().unwrap()
    });
    assert_exact(&w, "NO_SOCKET", "tcp_v6_rcv", u64::from(sent));
    for e in w.lbtrace.drops("NO_SOCKET") {
        assert_eq!(e["family"], "ipv6");
        assert_eq!(e["src"], "::1");
        assert_eq!(e["dport"], 9);
        assert_eq!(e["tcp_flags"], "S");
    }
}

#[test]
fn tcp_syn_to_closed_port_ipv6_btf() {
    tcp_closed_port_v6("btf");
}

#[test]
fn tcp_syn_to_closed_port_ipv6_tracepoint() {
    tcp_closed_port_v6("tracepoint");
}

/// Two namespaces joined by veth: the drop happens in the receiver, seen on its veth end.
fn over_veth(mode: &str) {
    let a = Netns::new("va").unwrap();
    let b = Netns::new("vb").unwrap();
    let (ifa, ifb) = (lbtest::unique("lva"), lbtest::unique("lvb"));
    veth(&a, &ifa, &["10.200.1.1/24"], &b, &ifb, &["10.200.1.2/24"]).unwrap();
    let dst: SocketAddr = "10.200.1.2:4000".parse().unwrap();
    let (sent, w) = observe(mode, &b, &[], || {
        a.run(|| traffic::udp_send(dst, N, 20)).unwrap().unwrap()
    });
    assert_exact(&w, "NO_SOCKET", "__udp4_lib_rcv", u64::from(sent));
    for e in w.lbtrace.drops("NO_SOCKET") {
        assert_eq!(e["src"], "10.200.1.1");
        assert_eq!(e["dst"], "10.200.1.2");
        assert_eq!(e["dport"], 4000);
        assert_eq!(e["netns"], b.inode);
        assert_eq!(e["ifname"], ifb.as_str());
    }
}

#[test]
fn drop_in_other_netns_over_veth_btf() {
    over_veth("btf");
}

#[test]
fn drop_in_other_netns_over_veth_tracepoint() {
    over_veth("tracepoint");
}

/// An IP protocol nobody handles: IP_NOPROTO in the receiver.
fn unknown_protocol(mode: &str) {
    let a = Netns::new("pa").unwrap();
    let b = Netns::new("pb").unwrap();
    let (ifa, ifb) = (lbtest::unique("lpa"), lbtest::unique("lpb"));
    veth(&a, &ifa, &["10.200.2.1/24"], &b, &ifb, &["10.200.2.2/24"]).unwrap();
    let dst = Ipv4Addr::new(10, 200, 2, 2);
    let (sent, w) = observe(mode, &b, &[], || {
        a.run(|| traffic::raw_ipv4(dst, 253, N)).unwrap().unwrap()
    });
    assert_exact(&w, "IP_NOPROTO", "ip_local_deliver_finish", u64::from(sent));
    for e in w.lbtrace.drops("IP_NOPROTO") {
        assert_eq!(e["proto"], "proto-253");
        assert_eq!(e["sport"], serde_json::Value::Null);
        assert_eq!(e["src"], "10.200.2.1");
    }
}

#[test]
fn unknown_ip_protocol_btf() {
    unknown_protocol("btf");
}

#[test]
fn unknown_ip_protocol_tracepoint() {
    unknown_protocol("tracepoint");
}

/// Above its sample limit `watch` shows a bounded number of records, each marked sampled,
/// and still counts every drop: the summary's per-reason and per-VIP totals equal the nft
/// counter, what was sent and the tracefs count, and a `totals` record says how many drops no
/// record shows.
#[test]
fn watch_above_its_sample_limit_counts_every_drop_exactly() {
    const LIMIT: u64 = 10;
    const SENT: u32 = 3000;
    let ns = Netns::new("sample").unwrap();
    ns.nft("table ip lbt {\n counter dropped {}\n chain input { type filter hook input priority 0; udp dport 7777 counter name \"dropped\" drop; }\n}")
        .unwrap();
    let limit = LIMIT.to_string();
    let args = ["--sample-limit", &limit, "--vip", "127.0.0.1"];
    let (sent, w) = observe("btf", &ns, &args, || {
        ns.run(|| {
            let closed = traffic::udp_send("127.0.0.1:7".parse().unwrap(), SENT, 16)?;
            Ok::<_, anyhow::Error>(
                closed + traffic::udp_send("127.0.0.1:7777".parse().unwrap(), SENT, 16)?,
            )
        })
        .unwrap()
        .unwrap()
    });
    assert_eq!(sent, 2 * SENT);
    let nft = ns.nft_counter("ip", "lbt", "dropped").unwrap();
    assert_eq!(nft, u64::from(SENT), "nft counter against what was sent");
    let l = &w.lbtrace;
    let cpus = std::thread::available_parallelism().unwrap().get() as u64;
    // Per key and CPU, LIMIT records in each window of about a second the run touched.
    let windows = l.summary["duration_s"].as_f64().unwrap().ceil() as u64 + 2;
    for (reason, function, expected) in [
        ("NO_SOCKET", "__udp4_lib_rcv", u64::from(SENT)),
        ("NETFILTER_DROP", "nft_do_chain", nft),
    ] {
        assert_eq!(
            count(&w.kernel, reason, function),
            expected,
            "tracefs {reason}"
        );
        assert_eq!(
            l.counted(reason),
            expected,
            "summary {reason}: {}",
            l.summary
        );
        assert_eq!(
            l.summary["drops_by_vip"]["127.0.0.1"][reason], expected,
            "per VIP {reason}: {}",
            l.summary
        );
        let records = l.drops(reason).count() as u64;
        assert!(
            records >= 1 && records <= LIMIT * cpus * windows,
            "{records} {reason} records for a limit of {LIMIT} per CPU and window"
        );
        assert!(
            l.drops(reason).all(|e| e["sampled"] == true),
            "{}",
            l.stdout
        );
    }
    let seen = l.summary["events_seen"].as_u64().unwrap();
    let (delivered, lost, sampled_out) = (
        l.summary["events_delivered"].as_u64().unwrap(),
        l.summary["events_lost"].as_u64().unwrap(),
        l.summary["events_sampled_out"].as_u64().unwrap(),
    );
    assert!(sampled_out > 0, "{}", l.summary);
    assert_eq!(seen, delivered + lost + sampled_out, "{}", l.summary);
    // The last totals record says what the summary says.
    let totals = l.events.iter().rev().find(|e| e["kind"] == "totals");
    let totals = totals.unwrap_or_else(|| panic!("no totals record: {}", l.stdout));
    assert_eq!(totals["events_sampled_out"], sampled_out);
    assert_eq!(totals["drops_by_reason"], l.summary["drops_by_reason"]);
}
