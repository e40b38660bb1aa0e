//! `lbtrace report`: a self-contained HTML page from a recording.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use lbtrace::output::html;

use super::diagnose::{analyze, load_all, select};

pub fn report(files: &[PathBuf], output: &Path, vips: &[String]) -> anyhow::Result<()> {
    let records = load_all(files)?;
    let a = analyze(&records, vips);
    let d = select(a.diagnose(), vips);
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    let title = format!("lbtrace report: {}", names.join(" + "));
    fs::write(output, html::html(&a, &d, &records, &title))
        .with_context(|| format!("writing {}", output.display()))?;
    eprintln!("lbtrace: wrote {}", output.display());
    Ok(())
}
