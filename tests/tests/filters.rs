//! Kernel-side filters keep exactly what they should, a tiny ring buffer's losses are counted,
//! and bad input gets one clear line and exit code 2.

use std::net::SocketAddr;

use lbtest::{
    lbtrace::{run, Watch},
    netns::Netns,
    oracle::{count, TraceInstance},
    require_root, traffic,
};

/// A mix of drops: TCP and UDP to closed ports on two ports, and nft-dropped UDP.
fn mixed_workload(ns: &Netns) -> (u32, u32, u32, u32) {
    ns.run(|| {
        let tcp9 = traffic::tcp_refused("127.0.0.1:9".parse().unwrap(), 7).unwrap();
        let udp9 = traffic::udp_send("127.0.0.1:9".parse().unwrap(), 11, 8).unwrap();
        let udp10 = traffic::udp_send("127.0.0.1:10".parse().unwrap(), 13, 8).unwrap();
        let nft = traffic::udp_send("127.0.0.1:7777".parse().unwrap(), 5, 8).unwrap();
        (tcp9, udp9, udp10, nft)
    })
    .unwrap()
}

fn mixed_ns() -> Netns {
    let ns = Netns::new("flt").unwrap();
    ns.nft("table ip lbt {\n chain input { type filter hook input priority 0; udp dport 7777 drop; }\n}")
        .unwrap();
    ns
}

fn run_filtered(ns: &Netns, filter: &[&str]) -> lbtest::lbtrace::Finished {
    require_root();
    let inode = ns.inode.to_string();
    let mut args = vec!["--json", "--netns", &inode];
    args.extend_from_slice(filter);
    let w = Watch::start(&args).unwrap();
    mixed_workload(ns);
    std::thread::sleep(std::time::Duration::from_millis(200));
    w.stop_ok()
}

#[test]
fn filters_keep_exactly_what_they_match() {
    let ns = mixed_ns();
    // (filter, expected count, predicate every kept record must satisfy)
    type Check = fn(&serde_json::Value) -> bool;
    let cases: [(&[&str], u64, Check); 6] = [
        (&[], 7 + 11 + 13 + 5, |_| true),
        (&["--reason", "no_socket"], 7 + 11 + 13, |e| {
            e["reason"] == "NO_SOCKET"
        }),
        (&["--reason", "NETFILTER_DROP"], 5, |e| {
            e["reason"] == "NETFILTER_DROP"
        }),
        (&["--proto", "tcp"], 7, |e| e["proto"] == "tcp"),
        (&["--port", "9"], 7 + 11, |e| {
            e["dport"] == 9 || e["sport"] == 9
        }),
        (&["--proto", "udp", "--port", "10"], 13, |e| {
            e["proto"] == "udp" && e["dport"] == 10
        }),
    ];
    for (filter, expected, keep) in cases {
        let f = run_filtered(&ns, filter);
        assert_eq!(
            f.events.len() as u64,
            expected,
            "filter {filter:?}: {}",
            f.stdout
        );
        assert!(
            f.events.iter().all(keep),
            "filter {filter:?} kept a record it should drop"
        );
        assert_eq!(f.summary["events_seen"], expected, "filter {filter:?}");
        assert_eq!(f.summary["events_delivered"], expected, "filter {filter:?}");
    }
}

#[test]
fn host_and_vip_filters_match_source_or_destination() {
    require_root();
    let a = Netns::new("ha").unwrap();
    let b = Netns::new("hb").unwrap();
    let (ifa, ifb) = (lbtest::unique("lha"), lbtest::unique("lhb"));
    lbtest::netns::veth(
        &a,
        &ifa,
        &["10.200.3.1/24", "10.200.3.11/24"],
        &b,
        &ifb,
        &["10.200.3.2/24", "10.200.3.100/24"],
    )
    .unwrap();
    let inode = b.inode.to_string();
    for (flag, addr, expected) in [
        ("--host", "10.200.3.2", 6u64),
        ("--host", "10.200.3.100", 4),
        ("--vip", "10.200.3.100", 4),
        ("--host", "10.200.3.1", 10),
        ("--host", "10.200.3.99", 0),
    ] {
        let w = Watch::start(&["--json", "--netns", &inode, flag, addr]).unwrap();
        a.run(|| {
            traffic::udp_send("10.200.3.2:5000".parse().unwrap(), 6, 8).unwrap();
            traffic::udp_send("10.200.3.100:5000".parse().unwrap(), 4, 8).unwrap();
        })
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let f = w.stop_ok();
        // ARP between the two hosts matches the address too; count the drops.
        let drops: Vec<_> = f.events.iter().filter(|e| e["kind"] == "drop").collect();
        assert_eq!(drops.len() as u64, expected, "{flag} {addr}: {}", f.stdout);
        for e in drops {
            assert!(
                e["src"] == addr || e["dst"] == addr,
                "{flag} {addr} kept {e}"
            );
            if flag == "--vip" {
                assert_eq!(e["vip"], addr);
            } else {
                assert_eq!(e["vip"], serde_json::Value::Null);
            }
        }
    }
}

#[test]
fn tiny_ring_buffer_counts_every_loss() {
    require_root();
    let ns = Netns::new("fld").unwrap();
    let inode = ns.inode.to_string();
    let oracle = TraceInstance::kfree_skb().unwrap();
    // Every drop through the ring (`--sample-limit 0`): the ring itself must overflow and
    // the loss be counted, which sampling would otherwise prevent.
    let args = [
        "--json",
        "--netns",
        &inode,
        "--ring-size",
        "4096",
        "--sample-limit",
        "0",
    ];
    let w = Watch::start(&args).unwrap();
    // A stopped reader cannot keep up: the kernel must count what does not fit.
    w.pause();
    let sent = ns
        .run(|| traffic::udp_send("127.0.0.1:9".parse::<SocketAddr>().unwrap(), 20_000, 1))
        .unwrap()
        .unwrap();
    w.resume();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let f = w.stop_ok();
    let kernel = count(&oracle.stop().unwrap(), "NO_SOCKET", "__udp4_lib_rcv");
    let seen = f.summary["events_seen"].as_u64().unwrap();
    let delivered = f.summary["events_delivered"].as_u64().unwrap();
    let lost = f.summary["events_lost"].as_u64().unwrap();
    assert_eq!(u64::from(sent), kernel, "tracefs against what was sent");
    assert_eq!(seen, kernel, "lbtrace's kernel count against tracefs");
    assert_eq!(
        f.counted("NO_SOCKET"),
        kernel,
        "exact per-reason count survives overload"
    );
    assert!(
        lost > 0,
        "a 4 KiB ring should overflow under 20k drops: {}",
        f.summary
    );
    assert_eq!(delivered + lost, seen, "{}", f.summary);
    assert_eq!(f.events.len() as u64, delivered);
    let by_cpu: u64 = f.summary["lost_by_cpu"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(by_cpu, lost);
}

fn assert_usage_error(args: &[&str], needle: &str) {
    let out = run(args).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(
        stderr.contains(needle),
        "{args:?}: `{needle}` not in: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    assert!(out.stdout.is_empty(), "{args:?} printed to stdout");
}

#[test]
fn bad_input_gets_one_clear_line() {
    require_root();
    assert_usage_error(
        &["watch", "--reason", "NOT_A_REASON"],
        "unknown drop reason `NOT_A_REASON`; this kernel has: NOT_SPECIFIED, NO_SOCKET",
    );
    assert_usage_error(&["watch", "--port", "70000"], "70000");
    assert_usage_error(&["watch", "--host", "10.200.0.300"], "invalid IP address");
    assert_usage_error(&["watch", "--proto", "tcpx"], "not tcp, udp");
    assert_usage_error(&["watch", "--ring-size", "1000"], "power of two");
    assert_usage_error(&["watch", "--duration", "0"], "positive number of seconds");
    assert_usage_error(&["watch", "--duration", "soon"], "not a number of seconds");
    assert_usage_error(&["watch", "--probe-mode", "kprobe"], "possible values");
    assert_usage_error(&["frobnicate"], "unrecognized subcommand");
}

/// IDs of loaded programs with lbtrace's names (other tracers may come and go meanwhile).
fn lbtrace_programs() -> std::collections::BTreeSet<u64> {
    let out =
        lbtest::sh(std::process::Command::new("bpftool").args(["-j", "prog", "show"])).unwrap();
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    progs
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| {
            let name = p["name"].as_str().unwrap_or("");
            ["kfree_skb", "net_dev_xmit", "netif_receive", "neigh_update"]
                .iter()
                .any(|n| name.starts_with(n))
        })
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

#[test]
fn without_privileges_one_line_and_nothing_attached() {
    require_root();
    let before = lbtrace_programs();
    let bin = lbtest::lbtrace::bin();
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(&bin)
        .args(["watch", "--duration", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("CAP_BPF") && stderr.contains("CAP_PERFMON"),
        "{stderr}"
    );
    let new: Vec<_> = lbtrace_programs().difference(&before).copied().collect();
    assert!(new.is_empty(), "programs left loaded: {new:?}");
}
