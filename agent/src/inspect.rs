//! `record`, `diagnose`, `timeline` and `report`: recordings in, explanations out.

use std::{
    fs,
    io::{self, BufWriter, Write},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use lbtrace::{
    analysis::{read_records, Analyzer},
    report,
};
use serde_json::Value;

use crate::{cmd::run_watch, cmd::UsageError, WatchArgs};

/// Reads a recording (or the agent's event file); corrupt lines are skipped and counted.
fn load(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text =
        fs::read(path).map_err(|e| UsageError(format!("cannot read {}: {e}", path.display())))?;
    let text = String::from_utf8_lossy(&text);
    let (records, bad) = read_records(&text);
    if records.is_empty() {
        return Err(UsageError(format!(
            "{} holds no lbtrace records ({bad} unreadable lines)",
            path.display()
        ))
        .into());
    }
    // Every header, not just a first line that may be the damaged one (or files concatenated).
    let unsupported = records
        .iter()
        .filter(|r| r["kind"] == "header")
        .find(|h| h["format"] != "lbtrace-ndjson" || h["version"].as_u64() != Some(1));
    if let Some(h) = unsupported {
        return Err(UsageError(format!(
            "{}: unsupported recording format {} version {}",
            path.display(),
            h["format"],
            h["version"]
        ))
        .into());
    }
    if bad > 0 {
        eprintln!(
            "lbtrace: warning: skipped {bad} unreadable lines of {}",
            path.display()
        );
    }
    Ok(records)
}

fn analyze(records: &[Value], vips: &[String]) -> Analyzer {
    let mut a = Analyzer::new(vips.iter().cloned());
    for r in records {
        a.add(r);
    }
    a
}

/// Keeps the diagnosis of `vips` only (all when empty).
fn select(diagnosis: Vec<Value>, vips: &[String]) -> Vec<Value> {
    if vips.is_empty() {
        return diagnosis;
    }
    diagnosis
        .into_iter()
        .filter(|d| vips.iter().any(|v| d["vip"] == v.as_str()))
        .collect()
}

fn print_diagnosis(diagnosis: &[Value], json: bool) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    for d in diagnosis {
        if json {
            writeln!(out, "{d}")?;
            continue;
        }
        let vip = d["vip"].as_str().unwrap_or("?");
        let findings = d["findings"].as_array().cloned().unwrap_or_default();
        if findings.is_empty() {
            writeln!(out, "VIP {vip}: no finding")?;
        }
        for (i, f) in findings.iter().enumerate() {
            writeln!(
                out,
                "VIP {vip} #{}: {} (confidence {}) from {} to {}\n    evidence: {}\n    hint: {}",
                i + 1,
                f["cause"].as_str().unwrap_or("?"),
                f["confidence"],
                f["first_seen"].as_str().unwrap_or(""),
                f["last_seen"].as_str().unwrap_or(""),
                f["evidence"],
                f["hint"].as_str().unwrap_or("")
            )?;
        }
    }
    Ok(())
}

pub fn record(output: &Path, args: WatchArgs) -> anyhow::Result<()> {
    let file = fs::File::create(output)
        .map_err(|e| UsageError(format!("cannot create {}: {e}", output.display())))?;
    let (summary, mut out, _) = run_watch(&args, BufWriter::new(file), true, Some(()))?;
    summary.write(&mut out, true)?;
    out.flush()?;
    summary.write(&mut io::stderr(), false)?;
    eprintln!("lbtrace: recorded to {}", output.display());
    Ok(())
}

pub fn diagnose(file: Option<PathBuf>, json: bool, args: WatchArgs) -> anyhow::Result<()> {
    let vips: Vec<String> = args
        .vips
        .iter()
        .chain(&args.tag_vips)
        .map(ToString::to_string)
        .collect();
    let records = match file {
        Some(f) => load(&f)?,
        None => {
            if args.duration.is_none() {
                return Err(UsageError(
                    "live diagnose needs --duration SECS (or give a recording FILE)".into(),
                )
                .into());
            }
            // Live: the same records `record` writes, kept in memory, then the same analysis.
            let (_, buf, _) = run_watch(&args, Vec::new(), true, Some(()))?;
            read_records(&String::from_utf8_lossy(&buf)).0
        }
    };
    let a = analyze(&records, &vips);
    print_diagnosis(&select(a.diagnose(), &vips), json)
}

pub fn timeline(file: &Path, vip: &str) -> anyhow::Result<()> {
    let records = load(file)?;
    let a = analyze(&records, &[vip.to_owned()]);
    let d = a.diagnose();
    print!("{}", report::text_timeline(&a, vip, &d));
    Ok(())
}

pub fn report(file: &Path, output: &Path, vips: &[String]) -> anyhow::Result<()> {
    let records = load(file)?;
    let a = analyze(&records, vips);
    let d = select(a.diagnose(), vips);
    let title = format!("lbtrace report: {}", file.display());
    fs::write(output, report::html(&a, &d, &records, &title))
        .with_context(|| format!("writing {}", output.display()))?;
    eprintln!("lbtrace: wrote {}", output.display());
    Ok(())
}
