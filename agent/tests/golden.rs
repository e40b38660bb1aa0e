//! The JSON contract and the analysis against a recording made by the previous lbtrace (a lab
//! run of five scenarios): every line reads back as a [`Record`] and writes out field for field
//! the same, and `diagnose --json`, `diagnose`, `timeline` and `report` print exactly the
//! outputs kept beside it. Those were printed by the previous release; a change of the
//! diagnosis on purpose rewrites them in the same commit, which says why (the first: drops on
//! their way back to the client are no policy race).

use std::{fs, path::Path, process::Command};

use lbtrace::event::record::{read_ndjson, Record};
use serde_json::Value;

const DIR: &str = "tests/corpus/golden";
const RECORDING: &str = "tests/corpus/golden/lab.ndjson";
const VIPS: [&str; 5] = [
    "10.200.0.100",
    "fd00:200::100",
    "10.200.0.101",
    "fd00:200::101",
    "10.200.0.102",
];

fn golden(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(DIR).join(name);
    fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Runs lbtrace from the package directory, where the golden files were made (the report's
/// title names the recording's path).
fn lbtrace(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_lbtrace"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run lbtrace");
    assert!(
        out.status.success(),
        "lbtrace {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty() || args[0] == "report",
        "lbtrace {args:?} warned: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

#[test]
fn every_line_of_the_previous_release_reads_back_field_for_field() {
    let text = golden("lab.ndjson");
    for (i, line) in text.lines().enumerate() {
        let record: Record =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("line {}: {e}\n{line}", i + 1));
        assert!(!matches!(record, Record::Unknown), "line {}", i + 1);
        let again: Value = serde_json::to_value(&record).unwrap();
        let before: Value = serde_json::from_str(line).unwrap();
        assert_eq!(again, before, "line {}", i + 1);
    }
    let (records, bad) = read_ndjson(&text);
    assert_eq!((records.len(), bad), (text.lines().count(), 0));
}

/// The speaker lifecycle and memberlist records (issue 19): every field written, read back the
/// same.
#[test]
fn speaker_records_read_back_field_for_field() {
    let text = golden("speaker.ndjson");
    for (i, line) in text.lines().enumerate() {
        let record: Record =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("line {}: {e}\n{line}", i + 1));
        assert!(
            matches!(record, Record::Speaker(_) | Record::SpeakerLink(_)),
            "line {}",
            i + 1
        );
        let again: Value = serde_json::to_value(&record).unwrap();
        let before: Value = serde_json::from_str(line).unwrap();
        assert_eq!(again, before, "line {}", i + 1);
    }
}

#[test]
fn diagnose_timeline_and_report_print_what_they_printed() {
    assert_eq!(
        lbtrace(&["diagnose", "--json", RECORDING]),
        golden("lab.diagnose.json")
    );
    assert_eq!(
        lbtrace(&["diagnose", RECORDING]),
        golden("lab.diagnose.txt")
    );
    for vip in VIPS {
        let want = golden(&format!("lab.timeline.{}.txt", vip.replace(':', "_")));
        assert_eq!(
            lbtrace(&["timeline", "--vip", vip, RECORDING]),
            want,
            "{vip}"
        );
    }
    let out = std::env::temp_dir().join(format!("lbtrace-golden-{}.html", std::process::id()));
    lbtrace(&["report", RECORDING, "-o", out.to_str().unwrap()]);
    let page = fs::read_to_string(&out).unwrap();
    let _ = fs::remove_file(&out);
    assert!(page == golden("lab.report.html"), "the report changed");
}
