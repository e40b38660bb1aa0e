//! Reliability, through the real binary: bad input wherever it enters (recordings, BTF, tracefs
//! formats, /proc/kallsyms) and faults injected in the kernel side (a probe that does not attach,
//! a full ring buffer, a namespace deleted mid-flight) and in the process (`kill -9`, two
//! instances at once). Each case gets a clear error or a documented degraded mode, never a panic,
//! and loses nothing it could count. The README's "Reliability" table lists them.
//!
//! Kernel files are replaced only inside a mount namespace of the lbtrace under test (`unshare
//! --mount`, private propagation), so nothing else on the machine sees the fault. Traffic stays in
//! namespaces made here, on 10.200.60.0/24 or their loopback.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use lbtest::{
    agent::{bpf_ids_of, loaded, Agent},
    http,
    lbtrace::{bin, run, Finished, Watch},
    netns::{veth, Netns},
    require_root, sh, traffic, unique,
};
use serde_json::Value;

const N: u32 = 20;
const VIP: &str = "10.200.60.100";

/// A directory of its own, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let p = std::env::temp_dir().join(unique("lbtrel"));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The exit code, and stderr being exactly one `lbtrace: error:` line containing `needle`.
fn one_error_line(out: &Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one line: {stderr}"
    );
    assert!(
        stderr.starts_with("lbtrace: error: ") && stderr.contains(needle),
        "`{needle}` not in: {stderr}"
    );
}

/// `lbtrace` in a mount namespace of its own where the shell commands `setup` ran first (a file
/// bind-mounted over a kernel one, tracefs unmounted): only this lbtrace sees the change.
fn in_mount_ns(setup: &str) -> Command {
    let mut c = Command::new("unshare");
    c.args(["--mount", "--propagation", "private", "sh", "-ec"])
        .arg(format!("{setup}\nexec \"$0\" \"$@\""))
        .arg(bin());
    c
}

/// Runs `lbtrace ARGS` under `setup` to completion (bounded: a hang is a failure).
fn run_in_mount_ns(setup: &str, args: &[&str]) -> Output {
    let mut c = Command::new("timeout");
    c.arg("60")
        .arg("unshare")
        .args(in_mount_ns(setup).get_args());
    c.args(args).output().unwrap()
}

fn doctor_json(setup: &str) -> Value {
    let out = run_in_mount_ns(setup, &["doctor", "--json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// `N` TCP SYNs to a closed port on the loopback of `ns`.
fn closed_port(ns: &Netns) -> u32 {
    let dst: SocketAddr = "127.0.0.1:9".parse().unwrap();
    ns.run(|| traffic::tcp_refused(dst, N)).unwrap().unwrap()
}

/// `lbtrace watch --json --netns NS ARGS` (through `lbtrace`) while `N` drops happen in `ns`:
/// every one is counted and delivered.
fn watch_drops(lbtrace: Command, ns: &Netns, args: &[&str]) -> Finished {
    let inode = ns.inode.to_string();
    let mut all = vec!["--json", "--netns", &inode];
    all.extend_from_slice(args);
    let w = Watch::start_via(lbtrace, &all).unwrap();
    let sent = closed_port(ns);
    std::thread::sleep(Duration::from_millis(200));
    let f = w.stop().unwrap();
    assert!(f.status.success(), "{}", f.stderr);
    assert!(!f.stderr.contains("panicked"), "{}", f.stderr);
    assert_eq!(f.counted("NO_SOCKET"), u64::from(sent), "{}", f.stdout);
    assert_eq!(f.drops("NO_SOCKET").count(), sent as usize, "{}", f.stdout);
    assert_eq!(f.summary["events_lost"], 0);
    f
}

fn plain() -> Command {
    lbtest::lbtrace::binary().unwrap()
}

/// Files of agent/tests/corpus/DIR, the same ones the library's fuzz tests replay.
fn corpus(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../agent/tests/corpus")
        .join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty());
    files
}

#[test]
fn recordings_damaged_in_every_way_get_one_line_or_a_warning() {
    let tmp = TempDir::new();
    let html = tmp.path("report.html");
    let html = html.to_str().unwrap();
    for file in corpus("recordings") {
        let f = file.to_str().unwrap();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let expect = name.rsplit('.').nth(1).unwrap().to_owned();
        let commands: [&[&str]; 3] = [
            &["diagnose", f, "--json"],
            &["timeline", f, "--vip", VIP],
            &["report", f, "-o", html],
        ];
        for args in commands {
            let out = run(args).unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            // `report` says where it wrote, and nothing else when all went well.
            let stderr: String = stderr
                .lines()
                .filter(|l| !l.starts_with("lbtrace: wrote "))
                .map(|l| format!("{l}\n"))
                .collect();
            let what = format!("{} {name}", args[0]);
            assert!(!stderr.contains("panicked"), "{what}: {stderr}");
            match expect.as_str() {
                "clean" => {
                    assert!(out.status.success(), "{what}: {stderr}");
                    assert!(stderr.is_empty(), "{what}: {stderr}");
                }
                "damaged" => {
                    assert!(out.status.success(), "{what}: {stderr}");
                    assert_eq!(stderr.lines().count(), 1, "{what}: {stderr}");
                    assert!(
                        stderr.starts_with("lbtrace: warning: skipped ")
                            && stderr.contains("unreadable lines of"),
                        "{what}: {stderr}"
                    );
                }
                "empty" => one_error_line(&out, 2, "holds no lbtrace records"),
                "future" => one_error_line(&out, 2, "unsupported recording format"),
                other => panic!("{name}: expectation {other}"),
            }
            if out.status.success() && args[0] == "diagnose" {
                for line in String::from_utf8_lossy(&out.stdout).lines() {
                    let d: Value = serde_json::from_str(line).unwrap();
                    assert!(d["vip"].is_string() && d["findings"].is_array(), "{line}");
                }
            }
        }
    }
    one_error_line(
        &run(&["diagnose", "/nonexistent/rec.ndjson"]).unwrap(),
        2,
        "cannot read /nonexistent/rec.ndjson",
    );
    one_error_line(
        &run(&["timeline", "/", "--vip", VIP]).unwrap(),
        2,
        "cannot read /",
    );
    let good = corpus("recordings")
        .into_iter()
        .find(|p| p.to_string_lossy().ends_with(".clean.ndjson"))
        .unwrap();
    one_error_line(
        &run(&[
            "report",
            good.to_str().unwrap(),
            "-o",
            "/nonexistent/dir/r.html",
        ])
        .unwrap(),
        1,
        "writing /nonexistent/dir/r.html",
    );
}

/// A copy of the kernel's BTF with the name `from` renamed to `to` (same length): a kernel
/// whose BTF lacks that type or member, otherwise intact.
fn btf_renaming(tmp: &TempDir, from: &str, to: &str) -> PathBuf {
    assert_eq!(from.len(), to.len());
    let mut btf = std::fs::read("/sys/kernel/btf/vmlinux").unwrap();
    let needle = format!("\0{from}\0").into_bytes();
    let at = btf
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("`{from}` not in this kernel's BTF strings"));
    btf[at + 1..at + 1 + to.len()].copy_from_slice(to.as_bytes());
    let p = tmp.path(&format!("btf-without-{from}"));
    std::fs::write(&p, btf).unwrap();
    p
}

fn bind_over(file: &Path, target: &str) -> String {
    format!("mount --bind '{}' {target}", file.display())
}

#[test]
fn btf_without_a_needed_member_is_one_line_and_an_optional_one_degrades() {
    require_root();
    let tmp = TempDir::new();
    const BTF: &str = "/sys/kernel/btf/vmlinux";

    let no_member = bind_over(&btf_renaming(&tmp, "network_header", "network_headeX"), BTF);
    one_error_line(
        &run_in_mount_ns(&no_member, &["watch", "--duration", "1"]),
        1,
        "kernel BTF: struct sk_buff has no member `network_header`",
    );
    let d = doctor_json(&no_member);
    assert_eq!(d["btf"]["ok"], false);
    assert!(d["btf"]["detail"]
        .as_str()
        .unwrap()
        .contains("no member `network_header`"));

    let no_btf = format!("mount --bind /dev/null {BTF}");
    one_error_line(
        &run_in_mount_ns(&no_btf, &["watch", "--duration", "1"]),
        1,
        "cannot read kernel BTF at /sys/kernel/btf/vmlinux",
    );
    assert_eq!(doctor_json(&no_btf)["btf"]["ok"], false);

    // Conntrack's types missing: drops are still traced, conntrack classification is not.
    let no_ct = bind_over(&btf_renaming(&tmp, "tuplehash", "tuplehasX"), BTF);
    let ns = Netns::new("rbtf").unwrap();
    let f = watch_drops(in_mount_ns(&no_ct), &ns, &[]);
    assert!(
        f.stderr
            .contains("conntrack drop classification unavailable")
            && f.stderr.contains("no member `tuplehash`"),
        "{}",
        f.stderr
    );
    let d = doctor_json(&no_ct);
    assert!(
        d["features"]["conntrack_events"]["Err"]
            .as_str()
            .unwrap()
            .contains("tuplehash"),
        "{d}"
    );
    assert_eq!(d["features"]["arp"], serde_json::json!({"Ok": null}));
}

const NO_TRACEFS: &str =
    "umount -l /sys/kernel/tracing\nif mountpoint -q /sys/kernel/debug; then umount -l /sys/kernel/debug; fi";

#[test]
fn without_tracefs_the_tracepoint_mode_fails_clearly_and_auto_uses_tp_btf() {
    require_root();
    one_error_line(
        &run_in_mount_ns(
            NO_TRACEFS,
            &["watch", "--probe-mode", "tracepoint", "--duration", "1"],
        ),
        1,
        "tracepoint/skb/kfree_skb: tracefs is not mounted",
    );
    let ns = Netns::new("rtfs").unwrap();
    let f = watch_drops(in_mount_ns(NO_TRACEFS), &ns, &[]);
    assert_eq!(f.summary["probe"], "tp_btf/kfree_skb");
    let d = doctor_json(NO_TRACEFS);
    assert_eq!(d["tracefs"]["ok"], false);
    let probes = d["probes"].as_array().unwrap();
    assert!(probes
        .iter()
        .any(|p| p["probe"] == "tp_btf/kfree_skb" && p["attached"] == true));
    let tp = probes
        .iter()
        .find(|p| p["probe"] == "tracepoint/skb/kfree_skb")
        .unwrap();
    assert_eq!(tp["attached"], false);
    assert!(tp["error"]
        .as_str()
        .unwrap()
        .contains("tracefs is not mounted"));
}

/// The tracefs `format` of `event` without the lines mentioning `field`, bind-mounted over the
/// real one.
fn format_without(tmp: &TempDir, event: &str, field: &str) -> String {
    let path = format!("/sys/kernel/tracing/events/{event}/format");
    let real = std::fs::read_to_string(&path).unwrap();
    assert!(real.contains(field), "{path} has no {field}");
    let doctored: String = real
        .lines()
        .filter(|l| !l.contains(field))
        .map(|l| format!("{l}\n"))
        .collect();
    let p = tmp.path(&event.replace('/', "-"));
    std::fs::write(&p, doctored).unwrap();
    bind_over(&p, &path)
}

#[test]
fn tracefs_formats_that_differ_fail_their_probe_only() {
    require_root();
    let tmp = TempDir::new();
    let ns = Netns::new("rfmt").unwrap();
    let neigh = format_without(&tmp, "neigh/neigh_update", "primary_key6");
    let f = watch_drops(in_mount_ns(&neigh), &ns, &["--probe-mode", "tracepoint"]);
    assert_eq!(f.summary["probe"], "tracepoint/skb/kfree_skb");
    assert!(
        f.stderr.contains("neighbour updates unavailable"),
        "{}",
        f.stderr
    );
    let out = run_in_mount_ns(&neigh, &["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("FAIL probe    tracepoint/neigh/neigh_update (neigh): field `primary_key6` missing from the tracepoint format")),
        "{text}"
    );

    let kfree = format_without(&tmp, "skb/kfree_skb", "reason");
    one_error_line(
        &run_in_mount_ns(
            &kfree,
            &["watch", "--probe-mode", "tracepoint", "--duration", "1"],
        ),
        1,
        "field `reason` missing from the tracepoint format",
    );
    let f = watch_drops(in_mount_ns(&kfree), &ns, &[]);
    assert_eq!(f.summary["probe"], "tp_btf/kfree_skb");
}

fn assert_raw_locations(f: &Finished) {
    for e in f.drops("NO_SOCKET") {
        let loc = e["location"].as_str().unwrap();
        let hex = loc.strip_prefix("0x").unwrap_or_else(|| panic!("{loc}"));
        assert!(u64::from_str_radix(hex, 16).is_ok(), "{loc}");
    }
}

#[test]
fn kallsyms_empty_or_unreadable_prints_locations_as_addresses() {
    require_root();
    let ns = Netns::new("rksy").unwrap();
    // Readable but empty, as with kptr_restrict: a documented degraded mode, no warning needed.
    let empty = "mount --bind /dev/null /proc/kallsyms";
    assert_raw_locations(&watch_drops(in_mount_ns(empty), &ns, &[]));
    assert!(doctor_json(empty)["kallsyms"]["detail"]
        .as_str()
        .unwrap()
        .contains("locations print as addresses"));

    // Unreadable (a socket cannot be opened): a warning, then the same degraded mode.
    let tmp = TempDir::new();
    let sock = tmp.path("kallsyms.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let unreadable = bind_over(&sock, "/proc/kallsyms");
    let f = watch_drops(in_mount_ns(&unreadable), &ns, &[]);
    assert_raw_locations(&f);
    assert!(
        f.stderr.contains("/proc/kallsyms") && f.stderr.contains("locations print as addresses"),
        "{}",
        f.stderr
    );
    assert_eq!(doctor_json(&unreadable)["kallsyms"]["ok"], false);
}

/// (collector, preferred probe, fallback probe).
const COLLECTORS: [(&str, &str, &str); 8] = [
    ("drops", "tp_btf/kfree_skb", "tracepoint/skb/kfree_skb"),
    (
        "xmit",
        "tp_btf/net_dev_start_xmit",
        "tracepoint/net/net_dev_start_xmit",
    ),
    (
        "rx",
        "tp_btf/netif_receive_skb",
        "tracepoint/net/netif_receive_skb",
    ),
    (
        "neigh",
        "tp_btf/neigh_update",
        "tracepoint/neigh/neigh_update",
    ),
    (
        "exit",
        "tp_btf/sched_process_exit",
        "tracepoint/sched/sched_process_exit",
    ),
    (
        "exec",
        "tp_btf/sched_process_exec",
        "tracepoint/sched/sched_process_exec",
    ),
    ("oom", "tp_btf/mark_victim", "tracepoint/oom/mark_victim"),
    (
        "signal",
        "tp_btf/signal_generate",
        "tracepoint/signal/signal_generate",
    ),
];

const DISABLE: &str = "LBTRACE_DISABLE_PROBES";

/// The probe's `lbtrace_probe_attached` value; a missing series fails (it is never 0).
fn attached(a: &Agent, probe: &str) -> u64 {
    a.metric(&format!("lbtrace_probe_attached{{probe=\"{probe}\""))
        .unwrap_or_else(|| panic!("no lbtrace_probe_attached series for {probe}"))
}

fn with_env(key: &str, value: &str) -> Command {
    let mut c = plain();
    c.env(key, value);
    c
}

#[test]
fn each_forced_fallback_leaves_the_other_probes_attached() {
    require_root();
    let ns = Netns::new("rfb").unwrap();
    let inode = ns.inode.to_string();
    for (i, (collector, preferred, fallback)) in COLLECTORS.iter().enumerate() {
        // --arp-rx: the agent hooks received packets only when asked; here every collector is.
        let a = Agent::start(&["--netns", &inode, "--arp-rx"], &[(DISABLE, preferred)]).unwrap();
        assert_eq!(attached(&a, preferred), 0, "{collector}");
        assert_eq!(attached(&a, fallback), 1, "{collector} falls back");
        for (j, (other, p, fb)) in COLLECTORS.iter().enumerate() {
            if i != j {
                assert_eq!((attached(&a, p), attached(&a, fb)), (1, 0), "{other}");
            }
        }
        assert_eq!(a.get("/healthz").unwrap(), (200, "ok\n".to_owned()));
        let (status, _, stderr) = a.stop().unwrap();
        assert!(status.success(), "{stderr}");
    }
    // The drops themselves, through the fallback: all counted and delivered.
    let f = watch_drops(with_env(DISABLE, "tp_btf/kfree_skb"), &ns, &[]);
    assert_eq!(f.summary["probe"], "tracepoint/skb/kfree_skb");
    // --probe-mode forces every fallback (or none) at once.
    for mode in ["tracepoint", "btf"] {
        let a = Agent::start(&["--netns", &inode, "--arp-rx", "--probe-mode", mode], &[]).unwrap();
        for (collector, preferred, fallback) in COLLECTORS {
            let (on, off) = match mode {
                "btf" => (preferred, fallback),
                _ => (fallback, preferred),
            };
            assert_eq!(
                (attached(&a, on), attached(&a, off)),
                (1, 0),
                "{mode}: {collector}"
            );
        }
        assert_eq!(a.get("/healthz").unwrap(), (200, "ok\n".to_owned()));
    }
}

#[test]
fn a_collector_with_no_probe_is_reported_and_the_rest_keeps_running() {
    require_root();
    let ns = Netns::new("rnc").unwrap();
    let inode = ns.inode.to_string();
    let neither = "tp_btf/neigh_update,tracepoint/neigh/neigh_update";
    let a = Agent::start(&["--netns", &inode], &[(DISABLE, neither)]).unwrap();
    assert_eq!(attached(&a, "tp_btf/neigh_update"), 0);
    assert_eq!(attached(&a, "tracepoint/neigh/neigh_update"), 0);
    assert_eq!(attached(&a, "tp_btf/kfree_skb"), 1);
    let (code, body) = a.get("/healthz").unwrap();
    assert_eq!(code, 200, "still healthy: drops are traced");
    assert_eq!(
        body,
        "ok, degraded: no probe for neigh (tp_btf/neigh_update: disabled by LBTRACE_DISABLE_PROBES; tracepoint/neigh/neigh_update: disabled by LBTRACE_DISABLE_PROBES)\n"
    );
    let sent = u64::from(closed_port(&ns));
    let want = "lbtrace_drops_total{vip=\"none\",reason=\"NO_SOCKET\"";
    let start = Instant::now();
    while a.metric(want) != Some(sent) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?} of {sent} drops",
            a.metric(want)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        a.stderr().contains("neighbour updates unavailable"),
        "{}",
        a.stderr()
    );
    let (status, _, stderr) = a.stop().unwrap();
    assert!(status.success(), "{stderr}");

    let out = with_env(DISABLE, neither).arg("doctor").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for line in [
        "FAIL probe    tp_btf/neigh_update (neigh): disabled by LBTRACE_DISABLE_PROBES",
        "FAIL probe    tracepoint/neigh/neigh_update (neigh): disabled by LBTRACE_DISABLE_PROBES",
        "ok   probe    tp_btf/kfree_skb (drops): attached",
        "FAIL feature  neighbour updates: no neigh probe attached",
    ] {
        assert!(text.lines().any(|l| l == line), "`{line}` not in:\n{text}");
    }

    // Without any drop probe there is nothing to run: one line, exit 1.
    let port = http::free_port().unwrap().to_string();
    let out = Command::new("timeout")
        .arg("30")
        .arg(bin())
        .args(["agent", "--metrics-addr", &format!("127.0.0.1:{port}")])
        .env(DISABLE, "tp_btf/kfree_skb,tracepoint/skb/kfree_skb")
        .env("LBTRACE_LOG", "error")
        .output()
        .unwrap();
    one_error_line(&out, 1, "no drop probe could attach");
}

#[test]
fn a_full_ring_buffer_is_counted_by_the_agent() {
    require_root();
    let ns = Netns::new("rring").unwrap();
    let inode = ns.inode.to_string();
    let a = Agent::start(&["--netns", &inode, "--ring-size", "4096", "--no-arp"], &[]).unwrap();
    // The reader stopped: the kernel fills the 4 KiB ring and counts what does not fit.
    a.signal(libc::SIGSTOP);
    let dst: SocketAddr = "127.0.0.1:7".parse().unwrap();
    let sent = ns.run(|| traffic::udp_send(dst, 3000, 8)).unwrap();
    a.signal(libc::SIGCONT);
    let sent = u64::from(sent.unwrap());
    let start = Instant::now();
    let (mut kernel, mut delivered, mut lost, mut sampled, mut all) = (0, 0, 0, 0, 0);
    // Every drop is counted once: sent (delivered or lost) or left out by sampling.
    while kernel != sent || delivered + lost + sampled != all {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "sent {sent}: kernel NO_SOCKET {kernel}, all {all}, delivered {delivered}, lost {lost}, sampled out {sampled}"
        );
        std::thread::sleep(Duration::from_millis(300));
        kernel = a
            .metric("lbtrace_kernel_drops_total{reason=\"NO_SOCKET\"")
            .unwrap_or(0);
        all = a.metric_sum("lbtrace_kernel_drops_total{").unwrap_or(0);
        delivered = a.metric("lbtrace_events_total{kind=\"drop\"").unwrap_or(0);
        // Missing only until the first loss; asserted present (lost > 0) below.
        lost = a.metric_sum("lbtrace_events_lost_total{").unwrap_or(0);
        sampled = a.metric("lbtrace_events_sampled_out_total{").unwrap_or(0);
    }
    assert!(
        lost > 0,
        "a 4 KiB ring should overflow: delivered {delivered}"
    );
    assert!(delivered > 0);
    assert_eq!(a.get("/healthz").unwrap().0, 200);
}

#[test]
fn drops_from_a_namespace_deleted_mid_flight_still_decode() {
    require_root();
    let a = Netns::new("rgoa").unwrap();
    let b = Netns::new("rgob").unwrap();
    let (ifa, ifb) = (unique("lra"), unique("lrb"));
    veth(&a, &ifa, &["10.200.60.1/24"], &b, &ifb, &["10.200.60.2/24"]).unwrap();
    let (inode, names) = (b.inode, [a.name.clone(), b.name.clone()]);
    let w = Watch::start(&["--json", "--netns", &inode.to_string()]).unwrap();
    // The reader is stopped while the drops happen and while both namespaces go away.
    w.pause();
    let dst: SocketAddr = "10.200.60.2:4000".parse().unwrap();
    let sent = a.run(|| traffic::udp_send(dst, N, 20)).unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    drop(a);
    drop(b);
    let listed = sh(Command::new("ip").args(["netns", "list"])).unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        names.iter().all(|n| !listed.contains(n.as_str())),
        "{listed}"
    );
    let ns = sh(Command::new("lsns").args(["-t", "net", "-n", "-o", "NS"])).unwrap();
    let held: BTreeSet<String> = String::from_utf8_lossy(&ns.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert!(
        !held.contains(&inode.to_string()),
        "netns {inode} still held"
    );
    std::thread::sleep(Duration::from_millis(500));
    w.resume();
    let f = w.stop().unwrap();
    assert!(f.status.success(), "{}: {}", f.status, f.stderr);
    assert_eq!(f.counted("NO_SOCKET"), u64::from(sent), "{}", f.stdout);
    assert_eq!(f.drops("NO_SOCKET").count(), sent as usize, "{}", f.stdout);
    assert_eq!(f.summary["decode_errors"], 0);
    for e in f.drops("NO_SOCKET") {
        assert_eq!(e["netns"], inode);
        assert_eq!(e["ifname"], ifb.as_str(), "the name the kernel copied");
        assert_eq!(e["src"], "10.200.60.1");
        assert_eq!(e["dst"], "10.200.60.2");
        assert_eq!(e["dport"], 4000);
    }
}

/// Files pinned in bpffs (lbtrace pins nothing; none may appear).
fn pinned() -> BTreeSet<PathBuf> {
    fn walk(dir: &Path, out: &mut BTreeSet<PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            }
            out.insert(p);
        }
    }
    let mut out = BTreeSet::new();
    walk(Path::new("/sys/fs/bpf"), &mut out);
    out
}

#[test]
fn kill_9_leaves_nothing_behind_and_the_next_start_works() {
    require_root();
    let ns = Netns::new("rk9").unwrap();
    let inode = ns.inode.to_string();
    let pins = pinned();
    let a = Agent::start(&["--netns", &inode], &[]).unwrap();
    let addr = a.addr;
    let held: Vec<(&str, Vec<u64>)> = ["prog", "link", "map"]
        .into_iter()
        .map(|k| (k, bpf_ids_of(a.pid(), &format!("{k}_id")).unwrap()))
        .collect();
    assert!(held[0].1.len() >= 3, "programs held: {held:?}");
    assert!(!held[2].1.is_empty(), "maps held: {held:?}");
    let status = a.kill9().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    // Links, programs and maps belong to the process's fds: the kernel releases them with the
    // last fd (maps once no program uses them), asynchronously.
    let start = Instant::now();
    loop {
        let left: Vec<(&str, Vec<u64>)> = held
            .iter()
            .map(|(k, ids)| {
                let now = loaded(k).unwrap();
                (
                    *k,
                    ids.iter().copied().filter(|i| now.contains(i)).collect(),
                )
            })
            .filter(|(_, ids): &(&str, Vec<u64>)| !ids.is_empty())
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "left after kill -9: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(pinned(), pins, "nothing pinned");
    // Same port, same namespace: starts, attaches, counts.
    let a = Agent::start_on(addr, &["--netns", &inode], &[]).unwrap();
    assert_eq!(attached(&a, "tp_btf/kfree_skb"), 1);
    let sent = u64::from(closed_port(&ns));
    let want = "lbtrace_drops_total{vip=\"none\",reason=\"NO_SOCKET\"";
    let start = Instant::now();
    while a.metric(want) != Some(sent) {
        assert!(start.elapsed() < Duration::from_secs(10), "{}", a.stderr());
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(a);

    // `watch` too: killed mid-stream, then a new one counts exactly.
    let w = Watch::start(&["--json", "--netns", &inode]).unwrap();
    closed_port(&ns);
    drop(w);
    watch_drops(plain(), &ns, &[]);
}

#[test]
fn two_instances_at_once_both_work_and_a_taken_port_is_refused() {
    require_root();
    let ns = Netns::new("rtwo").unwrap();
    let inode = ns.inode.to_string();
    let args = ["--json", "--netns", inode.as_str()];
    let w1 = Watch::start(&args).unwrap();
    let w2 = Watch::start(&args).unwrap();
    let sent = u64::from(closed_port(&ns));
    std::thread::sleep(Duration::from_millis(200));
    for w in [w1, w2] {
        let f = w.stop().unwrap();
        assert!(f.status.success(), "{}", f.stderr);
        assert_eq!(f.counted("NO_SOCKET"), sent, "{}", f.stdout);
        assert_eq!(f.drops("NO_SOCKET").count() as u64, sent);
    }

    let a = Agent::start(&["--netns", &inode], &[]).unwrap();
    let before = bpf_ids_of(a.pid(), "prog_id").unwrap();
    let out = Command::new("timeout")
        .arg("30")
        .arg(bin())
        .args(["agent", "--metrics-addr", &a.addr.to_string()])
        .output()
        .unwrap();
    one_error_line(
        &out,
        2,
        &format!(
            "cannot listen on {} for metrics: Address already in use",
            a.addr
        ),
    );
    assert_eq!(a.get("/healthz").unwrap().0, 200, "the first one goes on");
    assert_eq!(bpf_ids_of(a.pid(), "prog_id").unwrap(), before);
}
