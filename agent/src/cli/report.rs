//! `lbtrace report`: a self-contained HTML page from a recording.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use lbtrace::output::html;

use super::{
    diagnose::{analyze, diagnosis, source},
    prometheus::PromArgs,
};

pub fn report(
    files: &[PathBuf],
    prom: &PromArgs,
    output: &Path,
    vips: &[String],
) -> anyhow::Result<()> {
    let (records, step) = source(files, prom, vips)?;
    let a = analyze(&records, vips);
    let d = diagnosis(&a, vips, step);
    let mut names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    names.extend(prom.prometheus.clone());
    let title = format!("lbtrace report: {}", names.join(" + "));
    fs::write(output, html::html(&a, &d, &records, &title))
        .with_context(|| format!("writing {}", output.display()))?;
    eprintln!("lbtrace: wrote {}", output.display());
    Ok(())
}
