//! `cargo xtask fuzz --time S`: the fuzz targets of agent/tests/fuzz/ for about S seconds in
//! all, instead of the fixed number of cases `cargo xtask test` (and CI) runs.

use std::process::Command;

use anyhow::{ensure, Result};

use crate::util;

/// The targets run two at a time (this machine has two cores).
const THREADS: u64 = 2;

/// `cargo test` of the fuzz targets, to which the test binary's arguments are appended.
fn targets() -> Command {
    let mut c = util::cargo();
    c.args([
        "test",
        "--release",
        "-p",
        "agent",
        "--test",
        "fuzz",
        "--",
        "fuzz_",
    ]);
    c
}

pub fn fuzz(secs: u64) -> Result<()> {
    ensure!(secs > 0, "--time must be at least 1 second");
    let list = util::output(targets().arg("--list"))?;
    let n = String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter(|l| l.ends_with(": test"))
        .count() as u64;
    ensure!(n > 0, "no fuzz_* target in agent/tests/fuzz/");
    let each = (secs * THREADS / n).max(1);
    util::step(&format!(
        "fuzz: {n} targets, {each} s each, {THREADS} at a time (failing cases are kept in agent/tests/fuzz-regressions/)"
    ));
    util::run(
        targets()
            .arg(format!("--test-threads={THREADS}"))
            .arg("--nocapture")
            .env("LBTRACE_FUZZ_SECS", each.to_string()),
    )
}
