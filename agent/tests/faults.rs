//! Faults the library must survive without root: a BTF without a type or member, a collector
//! with no probe, recordings past every bound, one VIP announced by two hosts. The same faults through the real binary are in tests/tests/reliability.rs.

use std::path::Path;

use lbtrace::{
    analysis::{diagnosis::Evidence, Analyzer, Cause, COARSE_BUCKETS, FINE_BUCKETS},
    event::{
        record::{ProbeState, ProbeStatus},
        Record,
    },
    kernel::btf::{BtfError, DropReasons, KernelBtf, VMLINUX_BTF},
    output::{html, metrics::Metrics, timeline::text_timeline},
};
use serde_json::json;

/// A record from its JSON, as a recording holds it.
fn rec(v: serde_json::Value) -> Record {
    serde_json::from_value(v).expect("a record")
}

fn kernel_btf() -> KernelBtf {
    KernelBtf::load(Path::new(VMLINUX_BTF))
        .expect("this kernel exposes BTF (the tests need one that does)")
}

#[test]
fn btf_without_a_struct_or_member_names_what_is_missing() {
    let btf = kernel_btf();
    assert!(btf.member_offset("sk_buff", "network_header").is_ok());
    match btf.member_offset("lbtrace_no_such_struct", "len") {
        Err(e @ BtfError::MissingType { .. }) => {
            assert_eq!(
                e.to_string(),
                "kernel BTF has no struct named `lbtrace_no_such_struct`"
            )
        }
        other => panic!("{:?}", other.map_err(|e| e.to_string())),
    }
    for (strukt, path) in [
        ("sk_buff", "lbtrace_no_such_member"),
        // Through anonymous members and nested structs: the full path is named.
        ("sock", "__sk_common.lbtrace_nope"),
        // A member that is not a struct cannot be walked into.
        ("sk_buff", "len.inner"),
    ] {
        let e = btf.member_offset(strukt, path).unwrap_err();
        assert!(matches!(e, BtfError::MissingMember { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            format!("kernel BTF: struct {strukt} has no member `{path}`")
        );
    }
    let e = btf.enum_values("lbtrace_no_such_enum").unwrap_err();
    assert_eq!(
        e.to_string(),
        "kernel BTF has no enum named `lbtrace_no_such_enum`"
    );
    assert!(btf.struct_size("lbtrace_no_such_struct").is_err());
    assert!(DropReasons::from_btf(&btf).unwrap().iter().count() > 50);
}

#[test]
fn btf_files_that_are_not_btf_are_an_error() {
    let dir = std::env::temp_dir().join(format!("lbtrace-btf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let real = std::fs::read(VMLINUX_BTF).unwrap();
    let cases: [(&str, &[u8]); 4] = [
        ("empty", b""),
        ("text", b"not btf at all\n"),
        ("header-only", &real[..24]),
        ("half", &real[..real.len() / 2]),
    ];
    for (name, bytes) in cases {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        // Loading or the first look-up fails; nothing panics.
        let result = KernelBtf::load(&p).and_then(|b| b.member_offset("sk_buff", "head"));
        assert!(result.is_err(), "{name}: {result:?}");
    }
    assert!(matches!(
        KernelBtf::load(Path::new("/nonexistent/vmlinux")),
        Err(BtfError::Read { .. })
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A status as the contract writes it: `attached` and `error`.
fn status(collector: &str, probe: &str, error: Option<&str>) -> ProbeStatus {
    serde_json::from_value(
        json!({"collector": collector, "probe": probe, "attached": error.is_none(), "error": error}),
    )
    .expect("a probe status")
}

#[test]
fn a_collector_without_probes_is_reported_not_fatal() {
    let statuses = vec![
        status("drops", "tp_btf/kfree_skb", None),
        status(
            "drops",
            "tracepoint/skb/kfree_skb",
            Some("not needed: a preferred probe is attached"),
        ),
        status(
            "neigh",
            "tp_btf/neigh_update",
            Some("disabled by LBTRACE_DISABLE_PROBES"),
        ),
        status(
            "neigh",
            "tracepoint/neigh/neigh_update",
            Some("not tried: --probe-mode btf"),
        ),
    ];
    let tried: Vec<&str> = statuses
        .iter()
        .filter(|s| s.state.tried())
        .map(|s| &*s.probe)
        .collect();
    assert_eq!(statuses[1].state, ProbeState::NotNeeded);
    assert_eq!(statuses[3].state, ProbeState::NotTried("btf".into()));
    assert_eq!(tried, ["tp_btf/kfree_skb", "tp_btf/neigh_update"]);
    let m = Metrics::new("n".into(), statuses, 0);
    assert_eq!(
        m.missing_collectors(),
        ["neigh (tp_btf/neigh_update: disabled by LBTRACE_DISABLE_PROBES; tracepoint/neigh/neigh_update: not tried: --probe-mode btf)"]
    );
    let text = m.render();
    assert!(text.contains(
        "lbtrace_probe_attached{probe=\"tp_btf/neigh_update\",collector=\"neigh\",node=\"n\"} 0"
    ));
    assert!(text.contains(
        "lbtrace_probe_attached{probe=\"tp_btf/kfree_skb\",collector=\"drops\",node=\"n\"} 1"
    ));
}

/// RFC 3339 time `s` seconds into a recording.
fn at(s: u64) -> String {
    humantime::format_rfc3339(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000 + s),
    )
    .to_string()
}

/// Two hosts announcing one VIP, as a recording holds it: diagnose names the split brain with
/// both MACs, not one owner (the live side is in ownership's unit tests and tests/tests/arp.rs).
#[test]
fn a_vip_on_two_nodes_is_reported_not_merged() {
    let vip = "10.200.60.100";
    let mut a = Analyzer::new([vip.to_owned()]);
    a.add(&rec(json!({"time": at(0), "kind": "vip_owner", "vip": vip, "old_mac": null, "new_mac": "02:00:00:00:00:0a", "new_netns": 10})));
    a.add(&rec(json!({"time": at(1), "kind": "vip_owner", "vip": vip, "old_mac": "02:00:00:00:00:0a", "old_netns": 10, "new_mac": "02:00:00:00:00:0b", "new_netns": 11})));
    a.add(&rec(
        json!({"time": at(1), "kind": "finding", "finding": "split-brain", "vip": vip}),
    ));
    a.add(&rec(json!({"time": at(2), "kind": "vip_owner", "vip": vip, "old_mac": "02:00:00:00:00:0b", "old_netns": 11, "new_mac": "02:00:00:00:00:0a", "new_netns": 10})));
    let d = a.diagnose();
    let f = &d[0].findings[0];
    assert_eq!(f.cause, Cause::SpeakerFailover, "{f:?}");
    let Evidence::Failover(e) = &f.evidence else {
        panic!("{f:?}")
    };
    assert!(e.split_brain);
    assert_eq!(
        e.macs.iter().collect::<Vec<_>>(),
        ["02:00:00:00:00:0a", "02:00:00:00:00:0b"]
    );
}

/// A recording longer than the bounds keep (days of one drop a minute, a move at the start):
/// old buckets are dropped, the chart and the timeline still draw, nothing panics.
#[test]
fn recordings_past_every_bound_still_report() {
    let vip = "10.200.60.100";
    let mut a = Analyzer::new([vip.to_owned()]);
    let mut records = vec![rec(
        json!({"time": at(0), "kind": "vip_owner", "vip": vip, "old_mac": "02:00:00:00:00:aa", "old_netns": 1, "new_mac": "02:00:00:00:00:bb", "new_netns": 2}),
    )];
    let minutes = (FINE_BUCKETS + COARSE_BUCKETS + 10) as u64;
    for m in 0..minutes {
        records.push(rec(
            json!({"time": at(60 + m * 60), "kind": "drop", "reason": "NO_SOCKET", "netns": 2, "dst": "10.200.61.2", "vip": vip}),
        ));
    }
    for r in &records {
        a.add(r);
    }
    let tl = a.timeline(vip).unwrap();
    assert_eq!(tl.fine.len(), FINE_BUCKETS);
    assert_eq!(tl.coarse.len(), COARSE_BUCKETS);
    let d = a.diagnose();
    let page = html::html(&a, &d, &records, "long");
    assert!(page.contains("class=\"failover\""));
    assert!(text_timeline(&a, vip, &d).contains("VIP moved 02:00:00:00:00:aa -> 02:00:00:00:00:bb"));
}
