//! What lbtrace says about the kernel it runs on, against what that kernel says itself.
//!
//! These run on the host like every root test, and in each guest of `cargo xtask vm-test` (6.1,
//! 6.12, cloud and PREEMPT_RT): the oracle is the kernel's own tracefs format of `skb/kfree_skb`
//! (its drop-reason table and its fields), which lbtrace does not read for either.

use std::collections::BTreeMap;

use lbtest::{lbtrace, oracle::TRACEFS, require_root};
use serde_json::Value;

/// The kernel's `skb/kfree_skb` format file.
fn kfree_skb_format() -> String {
    let path = format!("{TRACEFS}/events/skb/kfree_skb/format");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `{ code, "NAME" }` pairs of the format's `__print_symbolic(REC->reason, ...)`.
fn tracefs_reasons(format: &str) -> BTreeMap<u64, String> {
    let sym = format
        .split("__print_symbolic(REC->reason,")
        .nth(1)
        .expect("kfree_skb's print fmt names its reasons");
    sym.split('{')
        .skip(1)
        .filter_map(|entry| {
            let (code, rest) = entry.split_once(',')?;
            let name = rest.split('"').nth(1)?;
            Some((code.trim().parse().ok()?, name.to_owned()))
        })
        .collect()
}

fn json_of(args: &[&str]) -> Value {
    let out = lbtrace::run(args).expect("lbtrace runs");
    assert!(
        out.status.success(),
        "lbtrace {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("lbtrace printed JSON")
}

#[test]
fn doctor_names_the_probe_in_use_and_why_not_the_others() {
    require_root();
    let d = json_of(&["doctor", "--json"]);
    assert_eq!(d["btf"]["ok"], true, "{d:#}");
    let probes = d["probes"].as_array().expect("probes");
    // Every probe is attached or says why not.
    for p in probes {
        let why = p["error"].as_str().unwrap_or("");
        assert!(p["attached"] == true || !why.is_empty(), "{p}");
    }
    // These kernels all have BTF and tp_btf: the preferred drop probe must attach.
    let attached = |name: &str| {
        probes
            .iter()
            .any(|p| p["probe"] == name && p["attached"] == true)
    };
    assert!(attached("tp_btf/kfree_skb"), "{d:#}");
    assert!(attached("tracepoint/skb/kfree_skb"), "{d:#}");
    // Every feature is on, or off with a reason.
    let features = d["features"].as_object().expect("features");
    assert_eq!(features.len(), 5, "{d:#}");
    for (name, f) in features {
        assert!(
            f.get("Ok").is_some() || f["Err"].as_str().is_some_and(|w| !w.is_empty()),
            "feature {name}: {f}"
        );
    }
}

#[test]
fn reasons_match_the_kernels_enum() {
    require_root();
    let kernel = tracefs_reasons(&kfree_skb_format());
    assert!(kernel.len() > 10, "tracefs lists {} reasons", kernel.len());
    let listed = json_of(&["reasons", "--json"]);
    let lbtrace: BTreeMap<u64, String> = listed["reasons"]
        .as_array()
        .expect("reasons")
        .iter()
        .map(|r| {
            (
                r["code"].as_u64().expect("code"),
                r["name"].as_str().expect("name").to_owned(),
            )
        })
        .collect();
    for (code, name) in &kernel {
        if name == "MAX" {
            // The enum's end marker, not a reason.
            continue;
        }
        assert_eq!(
            lbtrace.get(code),
            Some(name),
            "reason {code}: the kernel says {name}"
        );
    }
    // Nothing lbtrace names is unknown to the kernel's table.
    for (code, name) in &lbtrace {
        assert_eq!(
            kernel.get(code),
            Some(name),
            "lbtrace names {code} {name}, the kernel does not"
        );
    }
}

#[test]
fn doctor_states_how_drops_without_device_or_socket_are_placed() {
    require_root();
    let has_rx_sk = kfree_skb_format().contains(" rx_sk;");
    let d = json_of(&["doctor", "--json"]);
    let args = d["kfree_skb_args"].as_u64().expect("kfree_skb_args");
    assert_eq!(
        args >= 4,
        has_rx_sk,
        "doctor reads {args} kfree_skb arguments; tracefs has rx_sk: {has_rx_sk}"
    );
    let out = lbtrace::run(&["doctor"]).expect("lbtrace doctor");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("tp_btf/kfree_skb passes"))
        .unwrap_or_else(|| panic!("doctor does not state the kfree_skb arguments:\n{text}"));
    if has_rx_sk {
        assert!(
            line.contains("takes its namespace from the receiving socket"),
            "{line}"
        );
    } else {
        assert!(
            line.contains("no rx_sk") && line.contains("netns 0"),
            "{line}"
        );
    }
}

/// The most instructions the verifier walked for any program `pid` holds: the kernel's own
/// count, `verified_insns` in each program fd's fdinfo.
fn most_verified_insns(pid: u32) -> u64 {
    let dir = format!("/proc/{pid}/fdinfo");
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter_map(|info| {
            let line = info.lines().find(|l| l.starts_with("verified_insns:"))?;
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .max()
        .expect("the kernel reports verified_insns for lbtrace's programs")
}

/// The drop program in its longest configuration for the verifier (`watch` with a host, a VIP,
/// a namespace and a sample limit: the host filter, attribution and the counting path; a port
/// or protocol filter would shorten it) stays well inside the kernel's limit of 1,000,000
/// instructions walked. A change that nears it fails here, with the figure, before an older
/// kernel's verifier refuses the program.
#[test]
fn the_drop_program_leaves_the_verifier_headroom() {
    require_root();
    let inode = std::fs::metadata("/proc/self/ns/net")
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .expect("own netns")
        .to_string();
    let args = [
        "--json",
        "--probe-mode",
        "btf",
        "--netns",
        &inode,
        "--sample-limit",
        "5",
        "--host",
        "127.0.0.1",
        "--vip",
        "127.0.0.1",
    ];
    let watch = lbtrace::Watch::start(&args).expect("lbtrace watch starts");
    let most = most_verified_insns(watch.pid());
    watch.stop_ok();
    assert!(
        most < 900_000,
        "the verifier walked {most} instructions for a program of `watch {args:?}`: within 10% of its limit of 1,000,000"
    );
}
