//! Fuzzing of every parser of outside input: ring-buffer records, recordings (NDJSON) through the
//! analysis and the reports, config files, tracefs `format` files, /proc/kallsyms and
//! /proc/net/stat/nf_conntrack. Nothing may panic, errors are one line, unknown values are kept.
//!
//! Each `fuzz_*` target runs a fixed number of random cases (what `cargo xtask test` and CI do),
//! or new cases for `LBTRACE_FUZZ_SECS` seconds (`cargo xtask fuzz --time S`). A failing case is
//! shrunk and its seed saved under `tests/fuzz-regressions/`, replayed first on every later run;
//! cases worth reading are kept by hand in `tests/corpus/` and replayed by the `corpus_*` tests.

use std::{
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Instant,
};

use agent_common::{
    ArpRecord, CtEvent, DropRecord, NeighRecord, ProbeId, ProcRecord, RecordKind, FAMILY_IPV4,
    FAMILY_IPV6,
};
use lbtrace::{
    analysis::Analyzer,
    config::Config,
    event::{
        decode::{decode, DecodeError, Event, IfName},
        record::{read_ndjson, Record},
        values::{ArpOp, L4Proto},
        Clock, Namer,
    },
    kernel::{
        btf::DropReasons, conntrack::parse_ct_stat, kallsyms::Kallsyms, tracefs::tracepoint_offsets,
    },
    output::{
        html,
        metrics::{Metrics, MetricsSink},
        ndjson::NdjsonSink,
        text::TextSink,
        timeline::text_timeline,
    },
    pipeline::{
        attribution::{parse_vip, VipSet},
        ownership::{Ownership, OwnershipConfig},
        Pipeline,
    },
};
use proptest::{
    prelude::*,
    test_runner::{Config as RunnerConfig, FileFailurePersistence, TestCaseResult, TestRunner},
};
use serde_json::{json, Value};

/// Where a target's failing seeds are kept (proptest's format: `cc SEED # shrinks to ...`).
macro_rules! regressions {
    ($target:literal) => {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fuzz-regressions/",
            $target,
            ".txt"
        )
    };
}

/// Runs `test` on `cases` values of `strategy`, again and again while `LBTRACE_FUZZ_SECS` lasts.
fn fuzz<S: Strategy>(
    regressions: &'static str,
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> TestCaseResult,
) {
    let budget = std::env::var("LBTRACE_FUZZ_SECS").ok().map(|s| {
        s.parse::<f64>()
            .expect("LBTRACE_FUZZ_SECS is a number of seconds")
    });
    let start = Instant::now();
    let mut total = 0u64;
    loop {
        let config = RunnerConfig {
            cases,
            failure_persistence: Some(Box::new(FileFailurePersistence::Direct(regressions))),
            ..RunnerConfig::default()
        };
        // A new runner draws a new random seed: every round tries new cases.
        if let Err(e) = TestRunner::new(config).run(&strategy, &test) {
            panic!("{e}\n(seed saved in {regressions})");
        }
        total += u64::from(cases);
        if budget.is_none_or(|b| start.elapsed().as_secs_f64() >= b) {
            break;
        }
    }
    let name = Path::new(regressions)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned());
    eprintln!(
        "fuzz {}: {total} cases in {:.1}s",
        name.unwrap_or_default(),
        start.elapsed().as_secs_f64()
    );
}

fn as_bytes<T: Copy>(v: &T) -> Vec<u8> {
    // SAFETY: the records are repr(C) plain integers with explicit padding: every byte is
    // initialized.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
}

fn from_bytes<T: Copy>(b: &[u8]) -> T {
    assert!(b.len() >= size_of::<T>());
    // SAFETY: length checked; any bit pattern is a valid record of plain integers.
    unsafe { b.as_ptr().cast::<T>().read_unaligned() }
}

/// What the pipeline does with ring bytes, through its real code: decode, name, attribute,
/// track ownership, then the metrics, NDJSON and terminal sinks. Every NDJSON line must read
/// back as a record.
fn through_the_pipeline(bytes: &[u8]) {
    let kallsyms = Kallsyms::parse("ffffffff81000000 T _stext\nffffffff81000100 t tcp_v4_rcv\n");
    let namer = Namer::new(DropReasons::default(), kallsyms, Clock::now());
    let ownership = Ownership::new(OwnershipConfig::default(), true);
    let metrics = std::sync::Arc::new(std::sync::Mutex::new(Metrics::new(
        "n".into(),
        Vec::new(),
        0,
    )));
    let mut m = MetricsSink(metrics.clone());
    let mut json = NdjsonSink { out: Vec::new() };
    let mut text = TextSink {
        out: Vec::new(),
        colour: true,
    };
    let mut p = Pipeline::new(namer, wide_vips(), ownership)
        .sink(&mut m)
        .sink(&mut json)
        .sink(&mut text);
    p.process(bytes);
    // An OOM victim that is no speaker's is counted, not recorded.
    let shown = p.counts.decode_errors == 0 && p.speakers.counts.oom_others == 0;
    drop(p);
    assert!(metrics
        .lock()
        .unwrap()
        .render()
        .contains("lbtrace_events_total"));
    let out = String::from_utf8(json.out).expect("UTF-8 NDJSON");
    let (records, bad) = read_ndjson(&out);
    assert_eq!(bad, 0, "{out}");
    assert_eq!(records.is_empty(), !shown, "{out}");
    assert_eq!(out.lines().count(), records.len());
    assert!(text.out.is_empty() != shown);
}

/// Half of all addresses are VIPs, so attribution paths are taken.
fn wide_vips() -> VipSet {
    VipSet::from_nets(vec![
        parse_vip("0.0.0.0/1").unwrap(),
        parse_vip("::/1").unwrap(),
    ])
}

#[test]
fn fuzz_decode_arbitrary_bytes() {
    fuzz(
        regressions!("decode_arbitrary_bytes"),
        5000,
        prop::collection::vec(any::<u8>(), 0..400),
        |bytes| {
            match decode(&bytes) {
                Ok(_) => through_the_pipeline(&bytes),
                Err(DecodeError::Truncated { len, need, .. }) => {
                    prop_assert!(len < need && len == bytes.len())
                }
                Err(DecodeError::UnknownKind(k)) => prop_assert!(!(1..=4).contains(&k)),
            }
            Ok(())
        },
    );
}

/// A record of `kind` with every other byte random, possibly followed by extra bytes.
fn record(kind: u16) -> impl Strategy<Value = Vec<u8>> {
    let size = match RecordKind::try_from(kind) {
        Ok(RecordKind::Drop) => size_of::<DropRecord>(),
        Ok(RecordKind::Arp) => size_of::<ArpRecord>(),
        Ok(RecordKind::Neigh) => size_of::<NeighRecord>(),
        Ok(RecordKind::Proc) => size_of::<ProcRecord>(),
        Err(_) => 16,
    };
    (
        prop::collection::vec(any::<u8>(), size..size + 32),
        // Families and protocols the decoder branches on, more often than chance would.
        prop::sample::select(vec![0u8, FAMILY_IPV4, FAMILY_IPV6, 5, 255]),
        prop::sample::select(vec![0u8, 1, 6, 17, 58, 132, 253]),
    )
        .prop_map(move |(mut b, family, proto)| {
            b[8..10].copy_from_slice(&kind.to_ne_bytes());
            match RecordKind::try_from(kind) {
                Ok(RecordKind::Drop) => {
                    let mut r: DropRecord = from_bytes(&b);
                    r.pkt.family = family;
                    r.pkt.l4_proto = proto;
                    b[..size_of::<DropRecord>()].copy_from_slice(&as_bytes(&r));
                }
                Ok(RecordKind::Arp) => {
                    let mut r: ArpRecord = from_bytes(&b);
                    r.family = family;
                    b[..size_of::<ArpRecord>()].copy_from_slice(&as_bytes(&r));
                }
                _ => {}
            }
            b
        })
}

#[test]
fn fuzz_decode_valid_records_keep_every_value() {
    let kinds = prop_oneof![Just(1u16), Just(2u16), Just(3u16), Just(4u16), any::<u16>()];
    fuzz(
        regressions!("decode_valid_records"),
        5000,
        kinds.prop_flat_map(record),
        |bytes| {
            let kind = u16::from_ne_bytes([bytes[8], bytes[9]]);
            let event = match decode(&bytes) {
                Err(DecodeError::UnknownKind(k)) => {
                    prop_assert_eq!(k, kind);
                    prop_assert!(RecordKind::try_from(kind).is_err());
                    return Ok(());
                }
                other => other.expect("a whole record of a known kind decodes"),
            };
            let ifname_ok = |name: &Option<IfName>, raw: &[u8; 16]| match name.map(|n| n.to_text())
            {
                Some(n) => !n.is_empty() && !n.contains('\0') && raw[0] != 0,
                None => raw[0] == 0,
            };
            match &event {
                Event::Drop(d) => {
                    let r: DropRecord = from_bytes(&bytes);
                    prop_assert_eq!(d.ts_ns, r.header.ts_ns);
                    prop_assert_eq!(d.probe, ProbeId::try_from(r.header.probe));
                    prop_assert_eq!(
                        (d.reason, d.location, d.ifindex, d.netns),
                        (r.reason, r.location, r.ifindex, r.netns)
                    );
                    prop_assert!(ifname_ok(&d.ifname, &r.ifname));
                    let ct: Option<Result<CtEvent, u8>> =
                        (r.ct_event != 0).then(|| CtEvent::try_from(r.ct_event));
                    prop_assert_eq!(d.ct.event, ct);
                    let ip = matches!(r.pkt.family, FAMILY_IPV4 | FAMILY_IPV6);
                    prop_assert_eq!(d.packet.src.is_some(), ip);
                    if ip && r.pkt.l4_proto != 0 {
                        prop_assert_eq!(d.packet.proto.map(L4Proto::number), Some(r.pkt.l4_proto));
                    } else {
                        prop_assert_eq!(d.packet.proto, None);
                    }
                    prop_assert_eq!(d.packet.len, r.pkt.len);
                }
                Event::Arp(a) => {
                    let r: ArpRecord = from_bytes(&bytes);
                    prop_assert_eq!((a.netns, a.ifindex), (r.netns, r.ifindex));
                    prop_assert!(ifname_ok(&a.ifname, &r.ifname));
                    let known = matches!(
                        (r.family, r.op),
                        (FAMILY_IPV4, 1 | 2) | (FAMILY_IPV6, 135 | 136)
                    );
                    prop_assert_eq!(known, !matches!(a.op, ArpOp::Other(_)));
                    if let ArpOp::Other(op) = a.op {
                        prop_assert_eq!(op, r.op);
                    }
                }
                Event::Neigh(n) => {
                    let r: NeighRecord = from_bytes(&bytes);
                    prop_assert_eq!(n.netns, (r.netns != 0).then_some(r.netns));
                    prop_assert_eq!((n.old_state, n.new_state), (r.old_state, r.new_state));
                    prop_assert!(ifname_ok(&n.ifname, &r.ifname));
                }
                Event::Proc(p) => {
                    let r: ProcRecord = from_bytes(&bytes);
                    prop_assert_eq!((p.pid, p.netns, p.signal), (r.pid, r.netns, r.signal));
                    prop_assert!(ifname_ok(&p.comm, &r.comm));
                    prop_assert_eq!(p.oom.total_vm_kb, r.total_vm_kb);
                }
            }
            // One byte short of its kind's record: an error, never a guess.
            let need = match &event {
                Event::Drop(_) => size_of::<DropRecord>(),
                Event::Arp(_) => size_of::<ArpRecord>(),
                Event::Neigh(_) => size_of::<NeighRecord>(),
                Event::Proc(_) => size_of::<ProcRecord>(),
            };
            let short = decode(&bytes[..need - 1]);
            prop_assert!(
                matches!(short, Err(DecodeError::Truncated { .. })),
                "{short:?}"
            );
            through_the_pipeline(&bytes);
            Ok(())
        },
    );
}

/// Times the analysis meets: ordinary ones, the epoch, the last second RFC 3339 can write.
fn time_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (0u64..600).prop_map(|s| Value::from(humantime::format_rfc3339_nanos(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000 + s)
        ).to_string())),
        1 => prop::sample::select(vec![
            "1970-01-01T00:00:00Z",
            "9999-12-31T23:59:59Z",
            "9999-12-31T23:59:59.999999999Z",
            "2026-02-30T00:00:00Z",
            "2026-11-26T03:16:08.123456789+01:00",
            "",
        ]).prop_map(Value::from),
        1 => junk(),
    ]
}

/// A value of the wrong type, or an extreme one.
fn junk() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        Just(Value::from(u64::MAX)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::from),
        Just(json!([1, "a", null])),
        Just(json!({"k": {"nested": [true]}})),
    ]
}

/// `typical` mostly, sometimes junk, sometimes absent (`None`).
fn field(typical: Vec<&'static str>) -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        6 => prop::sample::select(typical).prop_map(|s| Some(Value::from(s))),
        1 => junk().prop_map(Some),
        1 => Just(None),
    ]
}

fn number_field() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        6 => (0u64..4).prop_map(|n| Some(Value::from(4_026_531_840 + n))),
        1 => junk().prop_map(Some),
        1 => Just(None),
    ]
}

const VIPS: [&str; 3] = ["10.200.60.100", "10.200.60.101", "fd00:200::60:100"];

/// One NDJSON record as `watch --json`, `record` or the agent write them, some fields bent.
fn ndjson_record() -> impl Strategy<Value = Value> {
    let kinds = vec![
        "drop",
        "conntrack",
        "arp",
        "vip_owner",
        "neigh",
        "finding",
        "summary",
        "header",
        "future_kind",
    ];
    let macs = vec![
        "02:00:00:00:00:0a",
        "02:00:00:00:00:0b",
        "ff:ff:ff:ff:ff:ff",
    ];
    (
        (
            field(kinds),
            time_value().prop_map(Some),
            field(VIPS.to_vec()),
            field(vec![
                "NO_SOCKET",
                "NETFILTER_DROP",
                "IP_INADDRERRORS",
                "PKT_TOO_BIG",
                "TCP_RESET",
                "NOT_SPECIFIED",
            ]),
            field(vec!["insert_failed", "table_full", "unknown-9"]),
            number_field(),
            field(vec!["10.200.60.100", "10.200.61.2", "fd00:200::60:100"]),
            field(vec!["10.200.60.1", "10.200.60.100"]),
        ),
        (
            field(vec![
                "nft_do_chain+0x1",
                "tcp_v4_rcv+0x99",
                "ip_fragment",
                "0xffff",
            ]),
            field(macs.clone()),
            field(macs),
            number_field(),
            number_field(),
            field(vec!["tx", "rx"]),
            field(vec!["reply", "request", "neighbor-advertisement"]),
            field(vec!["flapping", "split-brain", "other"]),
        ),
        (
            any::<bool>(),
            any::<bool>(),
            prop::option::of(0u64..5),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(
                (kind, time, vip, reason, event, netns, dst, src),
                (location, old_mac, new_mac, old_netns, new_netns, direction, op, finding),
                (gratuitous, bridged, icmp_type, v1),
            )| {
                let mut o = serde_json::Map::new();
                let mut put = |k: &str, v: Option<Value>| {
                    if let Some(v) = v {
                        o.insert(k.to_owned(), v);
                    }
                };
                put("kind", kind);
                put("time", time);
                put("vip", vip);
                put("reason", reason);
                put("event", event);
                put("netns", netns);
                put("dst", dst);
                put("src", src);
                put("location", location);
                put("old_mac", old_mac);
                put("new_mac", new_mac);
                put("sender_mac", Some(Value::from("02:00:00:00:00:0b")));
                put("old_netns", old_netns);
                put("new_netns", new_netns);
                put("direction", direction);
                put("op", op);
                put("finding", finding);
                put("gratuitous", Some(Value::from(gratuitous)));
                put("bridged", Some(Value::from(bridged)));
                put("icmp_type", icmp_type.map(Value::from));
                put("icmp_code", Some(Value::from(4)));
                put("format", Some(Value::from("lbtrace-ndjson")));
                put("version", Some(Value::from(if v1 { 1 } else { 2 })));
                put("vips", Some(json!(VIPS)));
                Value::Object(o)
            },
        )
}

/// How a recording file gets damaged.
#[derive(Clone, Debug)]
enum Damage {
    None,
    /// Cut at this fraction of its length (mid-line, mid-character).
    Truncate(f64),
    /// These bytes overwritten with this one.
    Flip(Vec<prop::sample::Index>, u8),
    /// A line of junk inserted.
    Insert(prop::sample::Index, Vec<u8>),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        2 => Just(Damage::None),
        1 => (0.0f64..1.0).prop_map(Damage::Truncate),
        1 => (prop::collection::vec(any::<prop::sample::Index>(), 1..8), any::<u8>())
            .prop_map(|(i, b)| Damage::Flip(i, b)),
        1 => (any::<prop::sample::Index>(), prop::collection::vec(any::<u8>(), 0..40))
            .prop_map(|(i, b)| Damage::Insert(i, b)),
    ]
}

fn damaged(records: &[Value], d: &Damage) -> Vec<u8> {
    let mut text: Vec<u8> = records
        .iter()
        .flat_map(|r| format!("{r}\n").into_bytes())
        .collect();
    match d {
        Damage::None => {}
        Damage::Truncate(f) => text.truncate((text.len() as f64 * f) as usize),
        Damage::Flip(at, b) if !text.is_empty() => {
            for i in at {
                let i = i.index(text.len());
                text[i] = *b;
            }
        }
        Damage::Insert(at, junk) => {
            let i = if text.is_empty() {
                0
            } else {
                at.index(text.len())
            };
            let mut line = junk.clone();
            line.push(b'\n');
            text.splice(i..i, line);
        }
        Damage::Flip(..) => {}
    }
    text
}

/// What `diagnose`, `timeline` and `report` do with a file, with the invariants that must hold
/// whatever it holds.
fn analyze_recording(bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    let (records, bad) = read_ndjson(&text);
    let lines = text.lines().filter(|l| !l.trim().is_empty()).count();
    assert_eq!(
        records.len() + bad,
        lines,
        "every line is a record or counted"
    );
    let watched: Vec<String> = VIPS.iter().map(|v| (*v).to_owned()).collect();
    let mut a = Analyzer::new(watched.clone());
    for r in &records {
        a.add(r);
    }
    // Nothing lost: every drop record with a VIP is in exactly one bucket.
    let attributed = records
        .iter()
        .filter(|r| matches!(r, Record::Drop(_) | Record::Conntrack(_)) && r.vip().is_some())
        .count() as u64;
    let bucketed: u64 = a
        .vips()
        .iter()
        .filter_map(|v| a.timeline(v))
        .map(|t| t.total().drops)
        .sum();
    assert_eq!(bucketed, attributed);
    let d = a.diagnose();
    for entry in &d {
        // Every diagnosis writes as JSON and reads back the same.
        let line = serde_json::to_string(entry).unwrap();
        let back: lbtrace::analysis::VipDiagnosis = serde_json::from_str(&line).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), line);
    }
    for vip in a.vips() {
        let t = text_timeline(&a, &vip, &d);
        assert!(t.starts_with("timeline for VIP"));
    }
    let page = html::html(&a, &d, &records, "fuzz <report>");
    assert!(page.ends_with("</html>\n") && !page.contains("<script") && !page.contains("<report>"));
}

#[test]
fn fuzz_recordings_through_diagnose_timeline_and_report() {
    fuzz(
        regressions!("recordings"),
        600,
        (prop::collection::vec(ndjson_record(), 0..40), damage()),
        |(records, d)| {
            analyze_recording(&damaged(&records, &d));
            Ok(())
        },
    );
}

#[test]
fn fuzz_recordings_of_arbitrary_bytes() {
    fuzz(
        regressions!("recordings_bytes"),
        2000,
        prop::collection::vec(any::<u8>(), 0..600),
        |bytes| {
            analyze_recording(&bytes);
            Ok(())
        },
    );
}

/// `key = value` lines of a config, with keys and values right, wrong or bent.
fn config_text() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        8 => prop::sample::select(vec![
            "vips",
            "metrics_addr",
            "node_name",
            "netns",
            "log_format",
            "events_file",
            "events_max_bytes",
            "probe_mode",
            "ring_size",
            "no_arp",
            "discover_vips",
        ])
        .prop_map(str::to_owned),
        1 => "[a-z_\\[\\]. \"=]{0,10}",
    ];
    let value = prop_oneof![
        prop::sample::select(vec![
            "[\"10.200.60.100\", \"10.200.61.0/28\"]",
            "[\"fd00:200::60:100/128\"]",
            "[\"10.0.0.300\"]",
            "[\"a\\nb\"]",
            "[\"\\u00e9\\t\"]",
            "[]",
            "[[1]]",
            "\"127.0.0.1:9464\"",
            "\"[::1]:80\"",
            "\"line\\nbreak\"",
            "\"\"",
            "\"auto\"",
            "\"tracepoint\"",
            "\"json\"",
            "4096",
            "4097",
            "0",
            "-1",
            "4294967296",
            "18446744073709551616",
            "1e3",
            "nan",
            "true",
            "1979-05-27T07:32:00Z",
            "{ a = 1 }",
            "'''multi\nline'''",
            "\"unterminated",
            "[",
        ])
        .prop_map(str::to_owned),
        "[ -~]{0,16}",
    ];
    prop::collection::vec((key, value, any::<bool>()), 0..8).prop_map(|lines| {
        lines
            .into_iter()
            .map(|(k, v, table)| {
                if table {
                    format!("{k} = {v}\n")
                } else {
                    format!("[{k}]\n{v}\n")
                }
            })
            .collect()
    })
}

fn check_config(text: &str) -> TestCaseResult {
    match Config::parse(text) {
        Ok(c) => {
            prop_assert_eq!(c.vips.len(), c.file.vips.as_ref().map_or(0, Vec::len));
            if let Some(r) = c.file.ring_size {
                prop_assert!(r >= 4096 && r.is_power_of_two());
            }
            if let Some(m) = &c.file.probe_mode {
                prop_assert!(["auto", "btf", "tracepoint"].contains(&m.as_str()));
            }
        }
        Err(e) => prop_assert!(!e.is_empty() && !e.contains('\n'), "not one line: {e:?}"),
    }
    Ok(())
}

#[test]
fn fuzz_config_files() {
    fuzz(regressions!("config"), 2000, config_text(), |text| {
        check_config(&text)
    });
}

#[test]
fn fuzz_config_arbitrary_text() {
    fuzz(regressions!("config_text"), 2000, ".{0,200}", |text| {
        check_config(&text)
    });
}

/// A tracefs `format` file, fields in any order and spacing, some missing or renamed.
fn format_text() -> impl Strategy<Value = (String, Vec<(String, u32)>)> {
    let decl = prop::sample::select(vec![
        ("void * ", "skbaddr", ""),
        ("void *", "location", ""),
        ("enum skb_drop_reason ", "reason", ""),
        ("u8 ", "lladdr", "[32]"),
        ("__data_loc char[] ", "dev", ""),
        ("unsigned short ", "common_type", ""),
        ("int ", "family", ""),
    ]);
    let line = (decl, 0u32..4096, 0usize..3, any::<bool>());
    prop::collection::vec(line, 0..10).prop_map(|fields| {
        let mut text = String::from("name: kfree_skb\nID: 1\nformat:\n");
        let mut expect = Vec::new();
        for ((ty, name, suffix), off, spaces, garbled) in fields {
            let ws = " ".repeat(spaces);
            if garbled {
                text.push_str(&format!("\tfield:{ty}{name}{suffix};{ws}offset:x{off};\n"));
            } else {
                text.push_str(&format!(
                    "\tfield:{ty}{name}{suffix};{ws}\toffset:{off};\tsize:8;\tsigned:0;\n"
                ));
                expect.push((name.to_owned(), off));
            }
        }
        text.push_str("\nprint fmt: \"skbaddr=%p\", REC->skbaddr\n");
        (text, expect)
    })
}

#[test]
fn fuzz_tracefs_formats() {
    const WANTED: [&str; 5] = ["skbaddr", "location", "reason", "lladdr", "dev"];
    fuzz(
        regressions!("tracefs"),
        1000,
        format_text(),
        |(text, expect)| {
            match tracepoint_offsets(&text, &WANTED) {
                Ok(found) => {
                    for w in WANTED {
                        // The last declaration of a field wins, as the kernel would list it once.
                        let last = expect.iter().rev().find(|(n, _)| n == w).map(|(_, o)| *o);
                        prop_assert_eq!(found.get(w).copied(), last);
                    }
                }
                Err(e) => {
                    prop_assert!(
                        e.contains("missing from the tracepoint format") && !e.contains('\n')
                    );
                    prop_assert!(WANTED.iter().any(|w| !expect.iter().any(|(n, _)| n == w)));
                }
            }
            Ok(())
        },
    );
}

#[test]
fn fuzz_tracefs_arbitrary_text() {
    fuzz(regressions!("tracefs_text"), 1000, ".{0,300}", |text| {
        if let Err(e) = tracepoint_offsets(&text, &["skbaddr", "reason"]) {
            prop_assert!(!e.contains('\n'));
        }
        Ok(())
    });
}

#[test]
fn fuzz_kallsyms_and_conntrack_stats() {
    fuzz(
        regressions!("proc_files"),
        1000,
        (
            prop::collection::vec((any::<u64>(), "[tTwWdDb?]{1,2}", "[a-z_.]{0,8}"), 0..20),
            ".{0,100}",
            prop::collection::vec(any::<u64>(), 0..8),
        ),
        |(syms, noise, probes)| {
            let text: String = syms
                .iter()
                .map(|(a, k, n)| format!("{a:016x} {k} {n}\n"))
                .chain(std::iter::once(noise.clone()))
                .collect();
            let k = Kallsyms::parse(&text);
            for addr in probes.iter().chain(syms.iter().map(|(a, _, _)| a)) {
                let s = k.symbolize(*addr);
                prop_assert!(!s.is_empty() && !s.contains('\n'));
                if k.function(*addr).is_none() || *addr == 0 {
                    prop_assert!(s.starts_with("0x"), "{s}");
                }
            }
            let _ = parse_ct_stat(&text);
            let _ = parse_ct_stat(&format!("entries insert_failed drop early_drop\n{noise}"));
            Ok(())
        },
    );
}

/// Every file of `tests/corpus/DIR`, sorted.
fn corpus(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(dir);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} is empty", dir.display());
    files
}

/// The expectation a corpus file's name states: `NAME.EXPECT.EXT`.
fn expectation(p: &Path) -> String {
    let name = p.file_name().unwrap().to_string_lossy();
    let parts: Vec<&str> = name.split('.').collect();
    assert!(parts.len() >= 3, "{name}: name it NAME.EXPECT.EXT");
    parts[parts.len() - 2].to_owned()
}

/// Hex bytes, whitespace and `#` comments ignored.
fn hex(text: &str) -> Vec<u8> {
    let digits: String = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .flat_map(|l| l.chars().filter(|c| !c.is_whitespace()))
        .collect();
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn corpus_records() {
    for p in corpus("records") {
        let bytes = hex(&fs::read_to_string(&p).unwrap());
        let got = decode(&bytes);
        let what = match &got {
            Ok(Event::Drop(_)) => "drop",
            Ok(Event::Arp(_)) => "arp",
            Ok(Event::Neigh(_)) => "neigh",
            Ok(Event::Proc(_)) => "proc",
            Err(DecodeError::Truncated { .. }) => "truncated",
            Err(DecodeError::UnknownKind(_)) => "unknown-kind",
        };
        assert_eq!(what, expectation(&p), "{}: {got:?}", p.display());
        if got.is_ok() {
            through_the_pipeline(&bytes);
        }
    }
}

#[test]
fn corpus_recordings() {
    for p in corpus("recordings") {
        let bytes = fs::read(&p).unwrap();
        analyze_recording(&bytes);
        let (records, bad) = read_ndjson(&String::from_utf8_lossy(&bytes));
        let expect = expectation(&p);
        let got = match (records.len(), bad) {
            (0, _) => "empty",
            (_, 0) => "clean",
            _ => "damaged",
        };
        // `future` files are refused by their header, which the binary checks.
        if expect != "future" {
            assert_eq!(got, expect, "{}", p.display());
        }
    }
}

#[test]
fn corpus_configs() {
    for p in corpus("configs") {
        let text = fs::read_to_string(&p).unwrap();
        let got = Config::parse(&text);
        match expectation(&p).as_str() {
            "ok" => assert!(got.is_ok(), "{}: {:?}", p.display(), got.err()),
            "err" => {
                let e = got
                    .err()
                    .unwrap_or_else(|| panic!("{} parsed", p.display()));
                assert!(!e.contains('\n'), "{}: {e:?}", p.display());
            }
            other => panic!("{}: expectation {other}", p.display()),
        }
        check_config(&text).unwrap();
    }
}

#[test]
fn fuzz_vip_strings() {
    fuzz(
        regressions!("vip_strings"),
        1000,
        "[0-9a-f:./ \\n]{0,24}",
        |s| {
            match parse_vip(&s) {
                Ok(net) => prop_assert!(
                    net.addr()
                        == s.trim()
                            .split('/')
                            .next()
                            .unwrap()
                            .parse::<IpAddr>()
                            .unwrap()
                ),
                Err(e) => prop_assert!(!e.is_empty()),
            }
            Ok(())
        },
    );
}
