//! Speaker lifecycle and memberlist drops (issue 19). A stand-in speaker (`garp-child`, a
//! separate process) announces a VIP with gratuitous ARP from an AF_PACKET socket in a
//! namespace of ours, then exits, is killed or is OOM-killed in a memory cgroup. Oracles: the
//! child's pid and wait status, the cgroup's own OOM count, the tracefs `oom:mark_victim`
//! line, nft counters; never lbtrace's own numbers.

use std::{
    fs,
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus},
    time::Duration,
};

use lbtest::{
    lbtrace::{Finished, Watch},
    netns::{veth, Netns},
    require_root, unique,
};
use serde_json::Value;

const COMM: &str = "garp-child";

/// A node namespace with a VIP's subnet on a veth to a peer namespace.
struct Node {
    ns: Netns,
    peer: Netns,
    ifname: String,
    vip: String,
}

fn node(third: u8) -> Node {
    require_root();
    let ns = Netns::new("sp").unwrap();
    let peer = Netns::new("pe").unwrap();
    let (a, b) = (unique("sa"), unique("sb"));
    let own = format!("10.200.{third}.1/24");
    veth(
        &ns,
        &a,
        &[&own],
        &peer,
        &b,
        &[&format!("10.200.{third}.2/24")],
    )
    .unwrap();
    Node {
        ns,
        peer,
        ifname: a,
        vip: format!("10.200.{third}.100"),
    }
}

/// Starts the stand-in speaker inside the node's namespace (`ip netns exec` execs it: the
/// child's pid is the speaker's): 3 GARPs for the node's VIP, a pause (lbtrace learns it),
/// then `action`.
fn speaker(n: &Node, delay_ms: u32, action: &str) -> Child {
    let delay = delay_ms.to_string();
    Command::new("ip")
        .args([
            "netns",
            "exec",
            &n.ns.name,
            env!("CARGO_BIN_EXE_garp-child"),
        ])
        .args([&n.ns.name, &n.ifname, &n.vip, "3", &delay, action])
        .spawn()
        .expect("start garp-child")
}

fn watch(extra: &[&str]) -> Watch {
    let mut args = vec!["--json"];
    args.extend_from_slice(extra);
    Watch::start(&args).expect("lbtrace watch starts")
}

fn speaker_events(f: &Finished, pid: u32) -> Vec<&Value> {
    f.events
        .iter()
        .filter(|e| e["kind"] == "speaker" && e["pid"] == pid)
        .collect()
}

fn one<'a>(events: &[&'a Value], event: &str) -> &'a Value {
    let found: Vec<_> = events.iter().filter(|e| e["event"] == event).collect();
    assert_eq!(found.len(), 1, "one {event} record: {events:#?}");
    found[0]
}

/// Checks what every speaker record of the child says about it.
fn assert_is_the_child(e: &Value, n: &Node) {
    assert_eq!(e["comm"], COMM, "{e}");
    assert_eq!(e["netns"], n.ns.inode, "the child's namespace: {e}");
    assert_eq!(e["vips"], serde_json::json!([n.vip]), "{e}");
}

fn wait(mut child: Child) -> ExitStatus {
    child.wait().expect("wait for garp-child")
}

fn exit_code(third: u8, mode: &str) {
    let n = node(third);
    let w = watch(&["--speaker-comm", COMM, "--probe-mode", mode]);
    let child = speaker(&n, 800, "exit:3");
    let pid = child.id();
    let status = wait(child);
    assert_eq!(status.code(), Some(3), "the workload's own exit");
    std::thread::sleep(Duration::from_millis(300));
    let f = w.stop_ok();
    let events = speaker_events(&f, pid);
    let start = one(&events, "start");
    assert_eq!(start["comm"], COMM);
    let exit = one(&events, "exit");
    assert_is_the_child(exit, &n);
    assert_eq!(exit["exit_code"], 3);
    assert!(exit["signal"].is_null(), "{exit}");
    // Process records are in the kernel's own count too: delivered + lost = seen.
    let n = |k: &str| f.summary[k].as_u64().unwrap();
    assert_eq!(
        n("events_delivered") + n("events_lost"),
        n("events_seen"),
        "{}",
        f.summary
    );
}

#[test]
fn an_exit_code_is_recorded_with_the_pid_and_the_vip_announced() {
    exit_code(71, "btf");
}

#[test]
fn the_classic_tracepoints_record_the_same_exit() {
    exit_code(77, "tracepoint");
}

fn killed_by(sig: i32) {
    let n = node(if sig == libc::SIGKILL { 72 } else { 73 });
    // No --speaker-comm: the speaker is learnt from its announcements alone.
    let w = watch(&[]);
    let child = speaker(&n, 200, "wait");
    let pid = child.id();
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
    let status = wait(child);
    assert_eq!(status.signal(), Some(sig), "the workload was killed by it");
    std::thread::sleep(Duration::from_millis(300));
    let f = w.stop_ok();
    let events = speaker_events(&f, pid);
    assert!(
        events.iter().all(|e| e["event"] != "start"),
        "learnt after it started"
    );
    let signal = one(&events, "signal");
    assert_is_the_child(signal, &n);
    assert_eq!(signal["signal"], sig);
    assert_eq!(signal["sender_pid"], std::process::id(), "we sent it");
    let exit = one(&events, "exit");
    assert_is_the_child(exit, &n);
    assert_eq!(exit["signal"], sig);
    assert!(exit["exit_code"].is_null());
}

#[test]
fn sigkill_is_recorded_as_sent_and_as_the_cause_of_the_exit() {
    killed_by(libc::SIGKILL);
}

#[test]
fn sigterm_is_recorded_as_sent_and_as_the_cause_of_the_exit() {
    killed_by(libc::SIGTERM);
}

/// A cgroup v1 memory cgroup of ours with a limit, removed when dropped (its processes are
/// gone by then: the test waits for them).
struct MemCgroup(PathBuf);

const MEMCG_ROOT: &str = "/sys/fs/cgroup/memory";

impl MemCgroup {
    fn new(limit: u64) -> Self {
        assert!(
            Path::new(MEMCG_ROOT)
                .join("memory.limit_in_bytes")
                .is_file(),
            "this test needs the cgroup v1 memory controller at {MEMCG_ROOT}"
        );
        let path = Path::new(MEMCG_ROOT).join(unique("lbtoom"));
        fs::create_dir(&path).expect("create the memory cgroup");
        let cg = Self(path);
        cg.write("memory.limit_in_bytes", &limit.to_string());
        // Without swap accounting the limit alone applies; with it, swap must not help.
        let memsw = cg.0.join("memory.memsw.limit_in_bytes");
        if memsw.exists() {
            cg.write("memory.memsw.limit_in_bytes", &limit.to_string());
        }
        cg
    }

    fn write(&self, file: &str, value: &str) {
        fs::write(self.0.join(file), value).unwrap_or_else(|e| panic!("{file}: {e}"));
    }

    /// The kernel's own count of OOM kills in this cgroup (`memory.oom_control`).
    fn oom_kills(&self) -> u64 {
        let text = fs::read_to_string(self.0.join("memory.oom_control")).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
            .expect("oom_kill in memory.oom_control")
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A tracefs instance recording `oom:mark_victim`: the kernel's own account of the victim.
struct OomTrace(PathBuf);

impl OomTrace {
    fn start() -> Self {
        let root = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
            .iter()
            .map(Path::new)
            .find(|p| p.join("instances").is_dir())
            .expect("tracefs mounted");
        let dir = root.join("instances").join(unique("lbtoom"));
        fs::create_dir(&dir).expect("tracefs instance");
        fs::write(dir.join("events/oom/mark_victim/enable"), "1").expect("enable mark_victim");
        Self(dir)
    }

    /// `field=value` pairs of the line for `pid`.
    fn victim(&self, pid: u32) -> Option<Vec<(String, String)>> {
        let text = fs::read_to_string(self.0.join("trace")).unwrap_or_default();
        let line = text
            .lines()
            .find(|l| l.contains("mark_victim:") && l.contains(&format!("pid={pid} ")))?;
        let fields = line.split("mark_victim:").nth(1)?;
        Some(
            fields
                .split_whitespace()
                .filter_map(|kv| kv.split_once(['=', ':']))
                .map(|(k, v)| (k.to_owned(), v.trim_end_matches("kB").to_owned()))
                .collect(),
        )
    }
}

impl Drop for OomTrace {
    fn drop(&mut self) {
        let _ = fs::write(self.0.join("events/oom/mark_victim/enable"), "0");
        let _ = fs::remove_dir(&self.0);
    }
}

#[test]
fn an_oom_kill_in_a_memory_cgroup_is_recorded_with_the_kernels_figures() {
    let n = node(74);
    let cg = MemCgroup::new(48 << 20);
    let trace = OomTrace::start();
    let w = watch(&[]);
    let child = speaker(&n, 1000, "alloc");
    let pid = child.id();
    cg.write("cgroup.procs", &pid.to_string());
    let status = wait(child);
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "the OOM killer ended it"
    );
    assert_eq!(cg.oom_kills(), 1, "the cgroup's own OOM count");
    std::thread::sleep(Duration::from_millis(300));
    let f = w.stop_ok();
    let events = speaker_events(&f, pid);
    let oom = one(&events, "oom-kill");
    assert_is_the_child(oom, &n);
    let kernel = trace.victim(pid).expect("tracefs saw the victim");
    let field = |k: &str| -> i64 {
        let v = kernel.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        v.and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{k} in {kernel:?}"))
    };
    let figures = &oom["oom"];
    for (ours, theirs) in [
        ("total_vm_kb", "total-vm"),
        ("anon_rss_kb", "anon-rss"),
        ("file_rss_kb", "file-rss"),
        ("shmem_rss_kb", "shmem-rss"),
        ("pgtables_kb", "pgtables"),
        ("oom_score_adj", "oom_score_adj"),
    ] {
        assert_eq!(figures[ours].as_i64(), Some(field(theirs)), "{ours}: {oom}");
    }
    let anon = figures["anon_rss_kb"].as_u64().unwrap();
    assert!(
        anon > 16 << 10 && anon <= 48 << 10,
        "anon RSS near the limit: {anon} kB"
    );
    let exit = one(&events, "exit");
    assert_eq!(exit["signal"], libc::SIGKILL);
}

#[test]
fn memberlist_drops_are_speaker_links_counted_as_nft_counts_them() {
    require_root();
    let a = Netns::new("ma").unwrap();
    let b = Netns::new("mb").unwrap();
    let (ia, ib) = (unique("ma"), unique("mb"));
    veth(&a, &ia, &["10.200.75.1/24"], &b, &ib, &["10.200.75.2/24"]).unwrap();
    b.nft(
        "table inet lbtml {\n counter ml {}\n counter other {}\n chain in {\n  type filter hook input priority 0;\n  udp dport 7946 counter name ml drop\n  udp dport 9 counter name other drop\n }\n}\n",
    )
    .unwrap();
    let netns = format!("{},{}", a.inode, b.inode);
    let w = watch(&["--netns", &netns]);
    let sent = a
        .run(|| {
            lbtest::traffic::udp_send("10.200.75.2:7946".parse().unwrap(), 40, 64).unwrap()
                + lbtest::traffic::udp_send("10.200.75.2:9".parse().unwrap(), 10, 64).unwrap()
        })
        .unwrap();
    assert_eq!(sent, 50);
    std::thread::sleep(Duration::from_millis(300));
    let f = w.stop_ok();
    let ml = b.nft_counter("inet", "lbtml", "ml").unwrap();
    let other = b.nft_counter("inet", "lbtml", "other").unwrap();
    assert_eq!((ml, other), (40, 10), "what nft dropped");
    let links: Vec<_> = f
        .events
        .iter()
        .filter(|e| e["kind"] == "speaker_link")
        .collect();
    assert_eq!(
        links.len() as u64,
        ml,
        "one speaker_link per memberlist drop"
    );
    for l in &links {
        assert_eq!(
            (&l["src"], &l["dst"]),
            (&"10.200.75.1".into(), &"10.200.75.2".into())
        );
        assert_eq!((&l["proto"], &l["port"]), (&"udp".into(), &7946.into()));
        assert_eq!(l["reason"], "NETFILTER_DROP");
        assert_eq!(l["src_node"], a.name.as_str(), "named after its namespace");
        assert_eq!(l["dst_node"], b.name.as_str());
    }
    let ordinary = f
        .drops("NETFILTER_DROP")
        .filter(|d| d["dport"] == 9)
        .count();
    assert_eq!(ordinary as u64, other, "other drops stay drops");

    // The agent samples drops (here one per key and second) but never memberlist ones: its
    // counter per node pair equals nft's, while a flood of other drops is sampled out.
    let agent = lbtest::agent::Agent::start(&["--sample-limit", "1", "--netns", &netns], &[])
        .expect("agent starts");
    a.run(|| {
        lbtest::traffic::udp_send("10.200.75.2:7946".parse().unwrap(), 60, 64).unwrap()
            + lbtest::traffic::udp_send("10.200.75.2:9".parse().unwrap(), 200, 64).unwrap()
    })
    .unwrap();
    let ml_now = b.nft_counter("inet", "lbtml", "ml").unwrap() - ml;
    assert_eq!(ml_now, 60);
    let series = format!(
        "lbtrace_speaker_link_drops_total{{src_node=\"{}\",dst_node=\"{}\",reason=\"NETFILTER_DROP\"",
        a.name, b.name
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while agent.metric(&series) != Some(ml_now) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(agent.metric(&series), Some(ml_now), "{series}");
    agent.stop().unwrap();
}

#[test]
fn without_the_process_and_oom_probes_doctor_says_so_and_the_rest_works() {
    const OFF: &str = "tp_btf/sched_process_exit,tracepoint/sched/sched_process_exit,\
                       tp_btf/sched_process_exec,tracepoint/sched/sched_process_exec,\
                       tp_btf/mark_victim,tracepoint/oom/mark_victim";
    require_root();
    let out = lbtest::lbtrace::binary()
        .unwrap()
        .arg("doctor")
        .env("LBTRACE_DISABLE_PROBES", OFF)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for p in OFF.split(',') {
        let line = text
            .lines()
            .find(|l| l.contains(&format!(" {p} ")))
            .unwrap_or_else(|| panic!("doctor names {p}:\n{text}"));
        assert!(
            line.starts_with("FAIL") && line.contains("disabled by LBTRACE_DISABLE_PROBES"),
            "{line}"
        );
    }
    assert!(
        text.lines()
            .any(|l| l.contains("speaker lifecycle") && l.starts_with("FAIL")),
        "{text}"
    );
    let signal = text
        .lines()
        .find(|l| l.contains(" tp_btf/signal_generate "))
        .unwrap();
    assert!(signal.starts_with("ok"), "the others stay: {signal}");

    // The agent's metrics say the same, and it runs.
    let agent = lbtest::agent::Agent::start(&[], &[("LBTRACE_DISABLE_PROBES", OFF)]).unwrap();
    for (probe, collector) in [
        ("tp_btf/sched_process_exit", "exit"),
        ("tracepoint/oom/mark_victim", "oom"),
    ] {
        let series = format!("lbtrace_probe_attached{{probe=\"{probe}\",collector=\"{collector}\"");
        assert_eq!(agent.metric(&series), Some(0), "{series}");
    }
    let series = "lbtrace_probe_attached{probe=\"tp_btf/signal_generate\",collector=\"signal\"";
    assert_eq!(agent.metric(series), Some(1));
    assert_eq!(agent.metric("lbtrace_oom_kills_total"), Some(0));
    let (code, health) = agent.get("/healthz").unwrap();
    assert_eq!(code, 200, "{health}");
    assert!(
        health.starts_with("ok, degraded: no probe for "),
        "{health}"
    );
    for c in ["exec (", "exit (", "oom ("] {
        assert!(health.contains(c), "{c}: {health}");
    }
    assert!(!health.contains("signal ("), "{health}");
    agent.stop().unwrap();

    // Drops and announcements still come through, counted as the workload made them.
    let n = node(76);
    n.peer
        .nft("table inet lbtdis {\n counter c {}\n chain in {\n  type filter hook input priority 0;\n  udp dport 9 counter name c drop\n }\n}\n")
        .unwrap();
    let mut cmd = lbtest::lbtrace::binary().unwrap();
    cmd.env("LBTRACE_DISABLE_PROBES", OFF);
    let netns = format!("{},{}", n.ns.inode, n.peer.inode);
    let w = Watch::start_via(cmd, &["--json", "--netns", &netns]).unwrap();
    let sent =
        n.ns.run(|| lbtest::traffic::udp_send("10.200.76.2:9".parse().unwrap(), 25, 64).unwrap())
            .unwrap();
    let status = wait(speaker(&n, 0, "exit:0"));
    assert!(status.success());
    std::thread::sleep(Duration::from_millis(300));
    let f = w.stop_ok();
    let dropped = n.peer.nft_counter("inet", "lbtdis", "c").unwrap();
    assert_eq!((sent as u64, dropped), (25, 25));
    let drops = f
        .drops("NETFILTER_DROP")
        .filter(|d| d["dport"] == 9)
        .count();
    assert_eq!(drops as u64, dropped);
    let garps = f
        .events
        .iter()
        .filter(|e| e["kind"] == "arp" && e["gratuitous"] == true && e["direction"] == "tx")
        .filter(|e| e["sender_ip"] == n.vip.as_str())
        .count();
    assert_eq!(garps, 3, "the three GARPs the child sent");
    assert!(
        f.events
            .iter()
            .all(|e| e["kind"] != "speaker" || e["event"] == "signal"),
        "no exit or start without their probes"
    );
}
