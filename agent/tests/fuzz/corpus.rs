//! The hand-kept cases of `tests/corpus/`, replayed.

use super::{recordings::analyze_recording, text::check_config, *};

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
