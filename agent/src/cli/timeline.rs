//! `lbtrace timeline`: a VIP's timeline from one recording, or several nodes' merged.

use std::path::PathBuf;

use lbtrace::output::timeline::text_timeline;

use super::{
    diagnose::{analyze, diagnosis, source},
    prometheus::PromArgs,
};

pub fn timeline(files: &[PathBuf], prom: &PromArgs, vip: &str) -> anyhow::Result<()> {
    let vips = [vip.to_owned()];
    let (records, step) = source(files, prom, &vips)?;
    let a = analyze(&records, &vips);
    let d = diagnosis(&a, &vips, step);
    for l in d.first().map(|d| d.limits.as_slice()).unwrap_or_default() {
        println!("note: {l}");
    }
    print!("{}", text_timeline(&a, vip, &d));
    Ok(())
}
