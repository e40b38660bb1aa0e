//! Recordings (NDJSON) through `diagnose`, `timeline` and `report`, damaged or arbitrary.

use super::*;

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
pub(super) fn analyze_recording(bytes: &[u8]) {
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
