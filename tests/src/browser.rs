//! Headless Chromium (Debian's package), to open what lbtrace writes as a person would.

use std::{path::Path, process::Command};

use anyhow::{bail, Context, Result};

use crate::sh;

const CHROMIUM: &str = "/usr/bin/chromium";

/// Flags for a closed, offline machine: no sandbox as root, no background connections.
fn chromium() -> Result<Command> {
    if !Path::new(CHROMIUM).exists() {
        bail!("{CHROMIUM} is missing: run `cargo xtask setup`");
    }
    let mut c = Command::new(CHROMIUM);
    let profile = std::env::temp_dir().join(crate::unique("lbtchrome"));
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1200,1400",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    Ok(c)
}

/// The DOM after the page loaded.
pub fn dump_dom(page: &Path) -> Result<String> {
    let out = sh(chromium()?
        .arg("--dump-dom")
        .arg(format!("file://{}", page.display())))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A PNG screenshot of the page.
pub fn screenshot(page: &Path, png: &Path) -> Result<()> {
    sh(chromium()?
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", page.display())))?;
    let len = std::fs::metadata(png)
        .with_context(|| format!("no screenshot at {}", png.display()))?
        .len();
    if len < 1000 {
        bail!("screenshot {} is only {len} bytes", png.display());
    }
    Ok(())
}
