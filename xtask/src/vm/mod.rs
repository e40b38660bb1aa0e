//! `cargo xtask vm-test`: lbtrace's portability suite on the kernels users run (Debian 12's
//! 6.1 and 6.12, cloud and PREEMPT_RT), each booted under qemu with a busybox initramfs.
//!
//! Per kernel: fetch and unpack the package (cached under target/vm/), build an initramfs with
//! lbtrace, the suite's test binaries, their tools and the kernel's modules, boot it, read the
//! outcome from the serial console. Then a self-test: on one kernel, with the BTF edited so that
//! one member resolves to the wrong offset, the suite must fail. The "Kernels" table is written
//! to target/vm/kernels.md (and into the README with --update-readme).

mod initramfs;
mod kernels;
mod qemu;
mod report;
mod suite;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::util::{cargo, is_root, step};

/// Debian packages the VM test needs (also installed by `cargo xtask setup`).
pub const APT_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "xz-utils",
    "iputils-arping",
    "conntrack",
    // depmod: Debian's kernel packages leave modules.dep to their install scripts
    "kmod",
];

#[derive(Args, Clone, Debug)]
pub struct Opts {
    /// Which kernels: 6.1, 6.12, 6.1-rt, 6.12-rt (comma-separated) or all.
    #[arg(long, default_value = "all")]
    pub kernel: String,
    /// Rewrite the README's "Kernels" table from this run.
    #[arg(long)]
    pub update_readme: bool,
    /// Skip the self-test (the suite must catch a wrong struct offset).
    #[arg(long)]
    pub no_self_test: bool,
    /// Seconds one guest may run before it is killed and counted as failed.
    #[arg(long, default_value_t = 1500)]
    pub timeout: u64,
}

/// The kernel the self-test breaks: the suite passes there, so a failure is the fault's doing.
const SELF_TEST_KERNEL: &str = "6.12";

pub fn target_dir() -> PathBuf {
    // As `build` finds it: CARGO_TARGET_DIR is relative to the workspace, where cargo runs.
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| crate::root().join("target"), |d| crate::root().join(d))
}

/// Builds the integration tests (and the tests crate's binaries) without running them; returns
/// each binary the suite needs by name, with the fault-injection tool as `btf-fault`.
fn build_tests() -> Result<BTreeMap<String, PathBuf>> {
    step("vm-test: cargo test --no-run -p integration-tests");
    let out = crate::util::output(cargo().args([
        "test",
        "--release",
        "-p",
        "integration-tests",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]))?;
    let mut found = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        // A bin target is built twice here: itself, and its unit tests under the same name.
        let bin_tests = v["target"]["kind"][0] == "bin" && v["profile"]["test"] == true;
        if bin_tests {
            continue;
        }
        if let (Some(name), Some(exe)) = (v["target"]["name"].as_str(), v["executable"].as_str()) {
            found.insert(name.to_owned(), PathBuf::from(exe));
        }
    }
    let mut wanted: Vec<&str> = suite::binaries();
    wanted.push("btf-fault");
    wanted
        .into_iter()
        .map(|n| {
            let p = found
                .get(n)
                .with_context(|| format!("cargo built no test binary named {n}"))?;
            Ok((n.to_owned(), p.clone()))
        })
        .collect()
}

/// Boots `kernel` with `init` and parses what it reported.
fn run_guest(
    work: &Path,
    kernel: &kernels::Kernel,
    payload: &initramfs::Payload,
    fault: bool,
    timeout: Duration,
) -> Result<report::KernelResult> {
    let tag = if fault { "self-test" } else { kernel.label };
    let initrd = initramfs::build(&work.join(tag), kernel, payload, &suite::init_script(fault))?;
    let log = work.join(format!("{tag}.log"));
    eprintln!(
        "    booting {} ({}, {tag}); console: {}",
        kernel.release,
        kernel.package,
        log.display()
    );
    let boot = qemu::boot(&kernel.vmlinuz, &initrd, &log, timeout)?;
    let checks: Vec<&suite::Check> = if fault {
        vec![&suite::SELF_TEST]
    } else {
        suite::CHECKS.iter().collect()
    };
    Ok(report::KernelResult::parse(kernel.label, &checks, &boot))
}

pub fn vm_test(opts: &Opts) -> Result<()> {
    if !is_root() {
        bail!("must run as root: apt-get download and qemu's guests");
    }
    crate::setup::ensure_apt(APT_PACKAGES)?;
    let specs = kernels::select(&opts.kernel)?;
    let started = Instant::now();
    let lbtrace = crate::build()?;
    let mut tests = build_tests()?;
    let fault_tool = tests.remove("btf-fault").context("btf-fault")?;
    let payload = initramfs::Payload {
        lbtrace,
        tests,
        extra: vec![fault_tool],
    };
    let work = target_dir().join("vm");
    let cache = work.join("kernels");
    std::fs::create_dir_all(&cache)?;
    let timeout = Duration::from_secs(opts.timeout);
    let mut results = Vec::new();
    let mut self_test_kernel = None;
    for spec in &specs {
        step(&format!("vm-test: kernel {}", spec.label));
        let kernel = kernels::prepare(spec, &cache)?;
        let r = run_guest(&work, &kernel, &payload, false, timeout)?;
        eprint!("{}", r.detail());
        eprintln!(
            "    {}: {}/{} in {:.0} s",
            r.label,
            r.passed(),
            r.outcomes.len(),
            r.seconds
        );
        if spec.label == SELF_TEST_KERNEL {
            self_test_kernel = Some((kernel, r.ok()));
        }
        results.push(r);
    }
    let self_test = match (&self_test_kernel, opts.no_self_test) {
        (_, true) => None,
        (None, false) => Some("not run (needs --kernel 6.12 or all)".to_owned()),
        (Some((_, false)), false) => {
            Some("not run: the suite does not pass unbroken on 6.12".to_owned())
        }
        (Some((kernel, true)), false) => {
            step("vm-test: self-test (net_device.ifindex resolved at mtu's offset)");
            let r = run_guest(&work, kernel, &payload, true, timeout)?;
            eprint!("{}", r.detail());
            Some(match r.outcomes[0].passed {
                Some(false) => format!(
                    "pass: with `net_device.ifindex` resolved at `mtu`'s offset on {}, `{}` fails",
                    kernel.label,
                    suite::SELF_TEST.test
                ),
                Some(true) => "**FAIL**: the suite did not notice a wrong offset".to_owned(),
                None => "**FAIL**: the broken guest reported nothing".to_owned(),
            })
        }
    };
    let table = report::table(&results, self_test.as_deref());
    std::fs::write(work.join("kernels.md"), &table)?;
    eprintln!("\n{table}");
    eprintln!(
        "vm-test: {} kernel(s) in {:.0} s; table in {}",
        results.len(),
        started.elapsed().as_secs_f64(),
        work.join("kernels.md").display()
    );
    if opts.update_readme {
        report::update_readme(&crate::root().join("README.md"), &table)?;
        eprintln!("vm-test: README.md's Kernels table updated");
    }
    let failed: Vec<&str> = results
        .iter()
        .filter(|r| !r.ok())
        .map(|r| r.label.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("the portability suite failed on {}", failed.join(", "));
    }
    if self_test
        .as_deref()
        .is_some_and(|t| t.starts_with("**FAIL"))
    {
        bail!(
            "the suite's self-test failed: {}",
            self_test.unwrap_or_default()
        );
    }
    Ok(())
}
