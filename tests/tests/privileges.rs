//! lbtrace with exactly the capabilities deploy/daemonset.yaml grants, started the way a container
//! runtime starts it (uid 0 holding only those, no_new_privs): every probe attaches, drops are
//! seen and symbolized, conntrack drops are told from other NETFILTER_DROPs, and the agent
//! serves its endpoints with the example config. Without each capability it either stops with
//! one line and exit code 2, or degrades as the README's "Privileges" table says.

use std::{
    collections::BTreeSet,
    net::{SocketAddr, UdpSocket},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use lbtest::{
    deploy::{self, added_capabilities, argv_with, container, lbtrace_with, manifest, object},
    http,
    lbtrace::{Finished, Watch},
    netns::{veth, Netns},
    require_root, traffic, unique,
};
use serde_json::Value;

const N: u32 = 7;

fn daemonset_caps() -> Vec<String> {
    let objects = manifest().unwrap();
    added_capabilities(container(object(&objects, "DaemonSet").unwrap()).unwrap())
}

fn without(caps: &[String], removed: &[&str]) -> Vec<String> {
    let kept: Vec<String> = caps
        .iter()
        .filter(|c| !removed.contains(&c.as_str()))
        .cloned()
        .collect();
    assert_eq!(
        kept.len() + removed.len(),
        caps.len(),
        "{removed:?} not in {caps:?}"
    );
    kept
}

fn sysctl(name: &str) -> i64 {
    let path = format!("/proc/sys/kernel/{name}");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .trim()
        .parse()
        .unwrap()
}

/// Whether /proc/kallsyms shows addresses to a reader with or without CAP_SYSLOG, as the kernel
/// decides (kallsyms_show_value): kptr_restrict 0 shows them when perf_event_paranoid <= 1 and
/// otherwise to CAP_SYSLOG, 1 only to CAP_SYSLOG, 2 to nobody.
fn kallsyms_visible(syslog: bool) -> bool {
    match sysctl("kptr_restrict") {
        0 => sysctl("perf_event_paranoid") <= 1 || syslog,
        1 => syslog,
        _ => false,
    }
}

/// `lbtrace ARGS` with exactly `caps`; `timeout` ends an agent that unexpectedly starts.
fn run_with(caps: &[String], args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("30")
        .args(argv_with(caps).unwrap())
        .args(args)
        .output()
        .unwrap()
}

fn doctor(caps: &[String]) -> Value {
    let out = run_with(caps, &["doctor", "--json"]);
    assert!(
        out.status.success(),
        "doctor with {caps:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// N TCP SYNs to a closed port on the loopback of a namespace of its own, with lbtrace holding
/// `caps` watching that namespace.
fn closed_port_drops(caps: &[String]) -> Finished {
    let ns = Netns::new("prv").unwrap();
    let inode = ns.inode.to_string();
    let w = Watch::start_via(lbtrace_with(caps).unwrap(), &["--json", "--netns", &inode]).unwrap();
    let dst: SocketAddr = "127.0.0.1:9".parse().unwrap();
    assert_eq!(ns.run(|| traffic::tcp_refused(dst, N)).unwrap().unwrap(), N);
    std::thread::sleep(Duration::from_millis(200));
    let f = w.stop_ok();
    assert_eq!(f.counted("NO_SOCKET"), u64::from(N), "{}", f.stdout);
    assert_eq!(f.drops("NO_SOCKET").count(), N as usize);
    for e in f.drops("NO_SOCKET") {
        assert_eq!(e["netns"], ns.inode);
    }
    f
}

/// Every NO_SOCKET location is `tcp_v4_rcv+0x…` when symbolized, a bare address otherwise.
fn assert_locations(f: &Finished, symbolized: bool) {
    assert_eq!(
        f.drops("NO_SOCKET").count(),
        N as usize,
        "locations to check: {}",
        f.stdout
    );
    for e in f.drops("NO_SOCKET") {
        let loc = e["location"].as_str().unwrap();
        if symbolized {
            assert!(loc.starts_with("tcp_v4_rcv+0x"), "{loc}");
        } else {
            let hex = loc.strip_prefix("0x").unwrap_or_else(|| panic!("{loc}"));
            assert!(u64::from_str_radix(hex, 16).is_ok(), "{loc}");
        }
    }
}

/// Doctor's probes but conntrack's, whose hooks (kprobes) only some kernels offer.
fn tracepoint_probes(d: &Value) -> Vec<&Value> {
    d["probes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["collector"] != "conntrack")
        .collect()
}

/// Conntrack drops are classified one way or the other: its hooks or its statistics.
fn assert_conntrack_path(d: &Value) {
    let attached = d["probes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["collector"] == "conntrack" && p["attached"] == true)
        .count();
    assert_eq!(attached, 1, "{d:#}");
}

#[test]
fn daemonset_capabilities_attach_every_probe_and_see_drops() {
    require_root();
    let caps = daemonset_caps();
    let d = doctor(&caps);
    assert_eq!(d["missing_capabilities"], serde_json::json!([]));
    let held: BTreeSet<&str> = d["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().trim_start_matches("CAP_"))
        .collect();
    assert_eq!(
        held,
        caps.iter().map(String::as_str).collect(),
        "exactly the DaemonSet's capabilities"
    );
    let probes = tracepoint_probes(&d);
    // tp_btf and classic tracepoint for each of drops, xmit, rx and neigh.
    assert_eq!(probes.len(), 8, "{probes:?}");
    for p in probes {
        assert_eq!(p["attached"], true, "{p}");
    }
    assert_conntrack_path(&d);
    let features = d["features"].as_object().unwrap();
    assert!(!features.is_empty(), "doctor lists no features: {d}");
    for (feature, status) in features {
        assert_eq!(status, &serde_json::json!({"Ok": null}), "{feature}");
    }
    assert_eq!(d["tracefs"]["ok"], true);
    assert_eq!(d["btf"]["ok"], true);
    let visible = kallsyms_visible(true);
    assert_eq!(
        d["kallsyms"]["detail"]
            .as_str()
            .unwrap()
            .contains("symbolized"),
        visible
    );
    assert_locations(&closed_port_drops(&caps), visible);
}

#[test]
fn without_syslog_locations_are_addresses() {
    require_root();
    let caps = without(&daemonset_caps(), &["SYSLOG"]);
    let visible = kallsyms_visible(false);
    let d = doctor(&caps);
    assert_eq!(
        d["kallsyms"]["detail"].as_str().unwrap().contains("hidden"),
        !visible
    );
    assert_locations(&closed_port_drops(&caps), visible);
}

#[test]
fn without_bpf_or_perfmon_one_line_and_exit_2() {
    require_root();
    // The kernel lets CAP_SYS_ADMIN stand in for both (bpf_capable, perfmon_capable).
    let d = doctor(&without(&daemonset_caps(), &["BPF", "PERFMON"]));
    let probes = tracepoint_probes(&d);
    assert_eq!(probes.len(), 8, "{probes:?}");
    assert!(probes.iter().all(|p| p["attached"] == true), "{probes:?}");
    assert_conntrack_path(&d);
    let base = without(&daemonset_caps(), &["SYS_ADMIN"]);
    for cap in ["BPF", "PERFMON"] {
        let caps = without(&base, &[cap]);
        for args in [
            &["watch", "--duration", "1"][..],
            &["agent", "--metrics-addr", "127.0.0.1:9"],
            &["doctor", "--json"],
        ] {
            let out = run_with(&caps, args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(2),
                "{args:?} with {caps:?}: {stderr}"
            );
            assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
            assert!(
                stderr.contains(&format!("CAP_{cap}")) && !stderr.contains("panicked"),
                "{args:?}: {stderr}"
            );
        }
    }
}

/// A namespace whose own UDP to port 5353 is SNATed to one address and port, so every flow after
/// the first fails to confirm (insert_failed), and whose UDP to port 7777 a plain nft rule drops
/// (a NETFILTER_DROP that is not conntrack's). The peer only absorbs what gets through.
struct Snat {
    ns: Netns,
    _peer: Netns,
}

const SNAT_PORT: u16 = 5353;
const DROP_PORT: u16 = 7777;

fn snat() -> Snat {
    let ns = Netns::new("pcs").unwrap();
    let peer = Netns::new("pcp").unwrap();
    veth(
        &ns,
        &unique("lpa"),
        &["10.200.71.1/24"],
        &peer,
        &unique("lpb"),
        &["10.200.71.2/24"],
    )
    .unwrap();
    ns.nft(&format!(
        "table ip lbt {{\n chain post {{ type nat hook postrouting priority 100; udp dport {SNAT_PORT} snat to 10.200.71.1:40000; }}\n chain out {{ type filter hook output priority 0; udp dport {DROP_PORT} drop; }}\n}}"
    ))
    .unwrap();
    Snat { ns, _peer: peer }
}

fn cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }).unwrap()
}

/// `n` new flows (one socket each) to `port` from every CPU in turn: the namespace's conntrack
/// statistics are per CPU, and so is lbtrace's baseline of them. Send errors are the drops.
fn flows_on_every_cpu(s: &Snat, port: u16, n: u32) -> u32 {
    s.ns.run(|| {
        let mut sent = 0;
        for cpu in 0..cpus() {
            // SAFETY: a zeroed cpu_set_t is empty; CPU_SET and sched_setaffinity get valid
            // pointers, and pid 0 pins only this thread.
            unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                assert_eq!(
                    libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
                    0
                );
            }
            for _ in 0..n {
                let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
                let _ = sock.send_to(b"x", ("10.200.71.2", port));
                sent += 1;
            }
        }
        sent
    })
    .unwrap()
}

/// Plain drops and insert failures on every CPU while lbtrace holding `caps` watches.
fn watch_conntrack(s: &Snat, caps: &[String]) -> (Finished, u32, u64) {
    let inode = s.ns.inode.to_string();
    let w = Watch::start_via(lbtrace_with(caps).unwrap(), &["--json", "--netns", &inode]).unwrap();
    let before = s.ns.conntrack_stat("insert_failed").unwrap();
    let plain = flows_on_every_cpu(s, DROP_PORT, 2);
    let snat = flows_on_every_cpu(s, SNAT_PORT, 2);
    std::thread::sleep(Duration::from_millis(200));
    let failed = s.ns.conntrack_stat("insert_failed").unwrap() - before;
    let f = w.stop_ok();
    assert_eq!(
        failed,
        u64::from(snat),
        "the mapping is held: every flow fails"
    );
    assert_eq!(
        f.counted("NETFILTER_DROP"),
        u64::from(plain) + failed,
        "{}",
        f.stdout
    );
    (f, plain, failed)
}

#[test]
fn conntrack_statistics_need_sys_admin() {
    require_root();
    let s = snat();
    // History from before lbtrace starts: insert failures on every CPU.
    flows_on_every_cpu(&s, SNAT_PORT, 3);
    let inode = s.ns.inode.to_string();

    let (f, _, failed) = watch_conntrack(&s, &daemonset_caps());
    // Baselines read in the namespace: only this window's failures are conntrack drops.
    let events = f
        .events
        .iter()
        .filter(|e| e["kind"] == "conntrack" && e["event"] == "insert_failed")
        .count();
    assert_eq!(events as u64, failed, "{}", f.stdout);
    assert_eq!(f.summary["conntrack_by_event"]["insert_failed"], failed);
    assert!(
        f.summary["conntrack_tables"][&inode]["insert_failed_per_cpu"].is_array(),
        "table pressure reported: {}",
        f.summary
    );

    // Without setns(): drops are still all counted, but the namespace's statistics are
    // unreadable, so no table pressure (and no baselines: see the README).
    let (f, _, _) = watch_conntrack(&s, &without(&daemonset_caps(), &["SYS_ADMIN"]));
    assert!(
        f.summary["conntrack_tables"].get(&inode).is_none(),
        "{}",
        f.summary
    );
}

#[test]
fn daemonset_capabilities_run_the_agent_with_the_example_config() {
    require_root();
    let ns = Netns::new("pag").unwrap();
    let config = deploy::dir().join("config.example.toml");
    let addr: SocketAddr = "127.0.0.1:9464".parse().unwrap();
    // In the namespace, as the DaemonSet's hostNetwork puts it in the node's; the variables are
    // the ones the manifest sets (NODE_NAME) or could (LBTRACE_NETNS keeps the count exact).
    let mut agent = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name))
        .args(argv_with(&daemonset_caps()).unwrap())
        .args(["agent", "--config"])
        .arg(&config)
        .env("NODE_NAME", "lbtest-node")
        .env("LBTRACE_NETNS", ns.inode.to_string())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Nothing below panics before the agent is stopped: a failed test must not leave it attached.
    let get = |path: &str| ns.run(|| http::get(addr, path)).ok().and_then(Result::ok);
    let start = Instant::now();
    let ready = loop {
        let ready = get("/readyz").map(|r| r.0) == Some(200);
        if ready
            || start.elapsed() > Duration::from_secs(30)
            || !matches!(agent.try_wait(), Ok(None))
        {
            break ready;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let healthz = get("/healthz").map(|r| r.0);
    let dst: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let sent = ns
        .run(|| traffic::tcp_refused(dst, N))
        .ok()
        .and_then(Result::ok);
    let want = format!(
        "lbtrace_drops_total{{vip=\"none\",reason=\"NO_SOCKET\",node=\"lbtest-node\"}} {N}"
    );
    let mut metrics = String::new();
    while ready && start.elapsed() < Duration::from_secs(30) && !metrics.lines().any(|l| l == want)
    {
        std::thread::sleep(Duration::from_millis(100));
        metrics = get("/metrics").map(|r| r.1).unwrap_or_default();
    }
    // SAFETY: signalling our own child (nsenter and setpriv exec into lbtrace).
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let out = agent.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(ready, "agent never ready: {stderr}");
    assert_eq!(healthz, Some(200));
    assert_eq!(sent, Some(N));
    assert!(
        metrics.lines().any(|l| l == want),
        "{want} not in:\n{metrics}"
    );
    assert!(out.status.success(), "{stderr}");
    // log_format = "json" from the example config.
    assert!(
        stderr.lines().count() > 0,
        "the agent logged nothing to check"
    );
    for line in stderr.lines() {
        assert!(
            serde_json::from_str::<Value>(line).is_ok(),
            "not JSON: {line}"
        );
    }
}
