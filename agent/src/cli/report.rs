//! `lbtrace report`: a self-contained HTML page from a recording.

use std::{fs, path::Path};

use anyhow::Context as _;
use lbtrace::output::html;

use super::diagnose::{analyze, load, select};

pub fn report(file: &Path, output: &Path, vips: &[String]) -> anyhow::Result<()> {
    let records = load(file)?;
    let a = analyze(&records, vips);
    let d = select(a.diagnose(), vips);
    let title = format!("lbtrace report: {}", file.display());
    fs::write(output, html::html(&a, &d, &records, &title))
        .with_context(|| format!("writing {}", output.display()))?;
    eprintln!("lbtrace: wrote {}", output.display());
    Ok(())
}
