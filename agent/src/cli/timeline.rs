//! `lbtrace timeline`: a VIP's timeline from one recording, or several nodes' merged.

use std::path::PathBuf;

use lbtrace::output::timeline::text_timeline;

use super::diagnose::{analyze, load_all};

pub fn timeline(files: &[PathBuf], vip: &str) -> anyhow::Result<()> {
    let records = load_all(files)?;
    let a = analyze(&records, &[vip.to_owned()]);
    print!("{}", text_timeline(&a, vip, &a.diagnose()));
    Ok(())
}
