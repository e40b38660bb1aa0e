//! `lbtrace diagnose`: the likely cause per VIP, live (`--duration`) or from recordings.

use std::{
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
};

use lbtrace::{
    analysis::{
        from_metrics,
        merge::{merge, Recording},
        Analyzer, VipDiagnosis,
    },
    event::record::{read_ndjson, Record},
    output::timeline::number,
    pipeline::Stop,
};

use super::{
    common::{trace, UsageError},
    prometheus::{self, PromArgs},
    WatchArgs,
};

/// Reads a recording (or the agent's event file); unreadable lines are skipped and counted.
pub(crate) fn load(path: &Path) -> anyhow::Result<Vec<Record>> {
    let bytes =
        fs::read(path).map_err(|e| UsageError(format!("cannot read {}: {e}", path.display())))?;
    let (records, bad) = read_ndjson(&String::from_utf8_lossy(&bytes));
    if records.is_empty() {
        return Err(UsageError(format!(
            "{} holds no lbtrace records ({bad} unreadable lines)",
            path.display()
        ))
        .into());
    }
    // Every header, not just a first line that may be the damaged one (or files concatenated).
    let unsupported = records.iter().find_map(|r| match r {
        Record::Header(h) if !h.supported() => Some(h),
        _ => None,
    });
    if let Some(h) = unsupported {
        return Err(UsageError(format!(
            "{}: unsupported recording format {:?} version {}",
            path.display(),
            h.format,
            h.version
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

/// Reads recordings of one or several nodes; several are merged into one stream (in time
/// order, ownership from every node's announcements), with a warning when their clocks
/// disagree.
pub(crate) fn load_all(paths: &[PathBuf]) -> anyhow::Result<Vec<Record>> {
    if paths.is_empty() {
        return Err(UsageError("give recordings, or --prometheus URL".into()).into());
    }
    let mut recordings = Vec::new();
    for p in paths {
        recordings.push(Recording {
            name: p.display().to_string(),
            records: load(p)?,
        });
    }
    let merged = merge(recordings);
    for w in &merged.warnings {
        eprintln!("lbtrace: warning: {w}");
    }
    Ok(merged.records)
}

/// The analysis of `records`, with `vips` watched even when nothing happened to them.
pub(crate) fn analyze(records: &[Record], vips: &[String]) -> Analyzer {
    let mut a = Analyzer::new(vips.iter().cloned());
    for r in records {
        a.add(r);
    }
    a
}

/// Keeps the diagnosis of `vips` only (all when empty).
pub(crate) fn select(diagnosis: Vec<VipDiagnosis>, vips: &[String]) -> Vec<VipDiagnosis> {
    if vips.is_empty() {
        return diagnosis;
    }
    diagnosis
        .into_iter()
        .filter(|d| vips.contains(&d.vip))
        .collect()
}

fn print_diagnosis(diagnosis: &[VipDiagnosis], json: bool) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    // The limits are the same for every VIP: said once in text.
    if let (false, Some(d)) = (json, diagnosis.first()) {
        for l in &d.limits {
            writeln!(out, "note: {l}")?;
        }
    }
    for d in diagnosis {
        if json {
            serde_json::to_writer(&mut out, d)?;
            writeln!(out)?;
            continue;
        }
        if d.findings.is_empty() {
            writeln!(out, "VIP {}: no finding", d.title())?;
        }
        for (i, f) in d.findings.iter().enumerate() {
            writeln!(
                out,
                "VIP {} #{}: {} (confidence {}) from {} to {}\n    evidence: {}\n    hint: {}",
                d.title(),
                i + 1,
                f.cause.as_str(),
                number(f.confidence),
                f.first_seen,
                f.last_seen,
                serde_json::to_string(&f.evidence)?,
                f.hint
            )?;
            if !f.nodes.is_empty() {
                let nodes: Vec<&str> = f.nodes.iter().map(String::as_str).collect();
                writeln!(out, "    nodes: {}", nodes.join(", "))?;
            }
            for s in &f.statements {
                writeln!(out, "    finding: {s}")?;
            }
        }
    }
    Ok(())
}

/// Records from `--prometheus`, or else from the recordings; with the bucket width when they
/// come from metrics.
pub(crate) fn source(
    files: &[PathBuf],
    prom: &PromArgs,
    vips: &[String],
) -> anyhow::Result<(Vec<Record>, Option<f64>)> {
    if prom.prometheus.is_none() {
        return Ok((load_all(files)?, None));
    }
    if !files.is_empty() {
        return Err(UsageError("give recordings or --prometheus URL, not both".into()).into());
    }
    let (records, step) = prometheus::records(prom, vips)?;
    Ok((records, Some(step)))
}

/// The diagnosis of `a`, lowered and with its limits when the records came from metrics.
pub(crate) fn diagnosis(a: &Analyzer, vips: &[String], step: Option<f64>) -> Vec<VipDiagnosis> {
    let d = select(a.diagnose(), vips);
    match step {
        Some(step) => d
            .into_iter()
            .map(|d| from_metrics::lowered(d, step))
            .collect(),
        None => d,
    }
}

pub fn diagnose(files: Vec<PathBuf>, prom: &PromArgs, args: WatchArgs) -> anyhow::Result<()> {
    let vips: Vec<String> = args
        .vips
        .iter()
        .chain(&args.tag_vips)
        .map(ToString::to_string)
        .collect();
    if prom.prometheus.is_some() || !files.is_empty() {
        let (records, step) = source(&files, prom, &vips)?;
        let a = analyze(&records, &vips);
        return print_diagnosis(&diagnosis(&a, &vips, step), args.json);
    }
    if args.duration.is_none() {
        return Err(UsageError(
            "live diagnose needs --duration SECS (or give a recording FILE, or --prometheus URL)"
                .into(),
        )
        .into());
    }
    // Live: the records `record` would write go straight into the same analysis.
    let mut a = Analyzer::new(vips.iter().cloned());
    trace(&args, vec![&mut a], true, &Stop::new())?;
    print_diagnosis(&select(a.diagnose(), &vips), args.json)
}
