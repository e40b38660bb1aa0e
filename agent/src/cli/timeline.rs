//! `lbtrace timeline`: a VIP's timeline from a recording.

use std::path::Path;

use lbtrace::output::timeline::text_timeline;

use super::diagnose::{analyze, load};

pub fn timeline(file: &Path, vip: &str) -> anyhow::Result<()> {
    let records = load(file)?;
    let a = analyze(&records, &[vip.to_owned()]);
    print!("{}", text_timeline(&a, vip, &a.diagnose()));
    Ok(())
}
