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

mod corpus;
mod recordings;
mod records;
mod text;

/// Runs `test` on `cases` values of `strategy`, again and again while `LBTRACE_FUZZ_SECS` lasts.
pub(crate) fn fuzz<S: Strategy>(
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
