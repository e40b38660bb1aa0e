//! `cargo xtask`: setup, build, test and demo for lbtrace, from a fresh machine.

mod bench;
mod demo;
mod fuzz;
mod lab;
mod setup;
mod util;
mod vm;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "lbtrace's build and test tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install every prerequisite (apt packages, rust-src, bpf-linker, tracefs); fast when done.
    Setup,
    /// Build the eBPF object and the agent into target/release/lbtrace.
    Build,
    /// Setup, build, fmt, clippy, unit tests and the root integration tests.
    Test {
        /// Only run integration tests whose name contains this.
        #[arg(long)]
        filter: Option<String>,
        /// Skip fmt and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Skip the kernel matrix (`vm-test --kernel all`, about 5 minutes).
        #[arg(long)]
        no_vm: bool,
    },
    /// Build, then run the lab's stale-arp and failover-garp scenarios while lbtrace streams
    /// the drops live, then the per-VIP summary.
    Demo,
    /// The namespace lab: list, up, run SCENARIO, down.
    Lab {
        #[command(subcommand)]
        cmd: lab::LabCmd,
    },
    /// Fuzz the record decoder, recordings and config parser for about TIME seconds.
    Fuzz {
        #[arg(long, default_value_t = 60, value_name = "SECS")]
        time: u64,
    },
    /// Boot Debian's 6.1 and 6.12 kernels (cloud and PREEMPT_RT) under qemu and run the
    /// portability suite in each; writes target/vm/kernels.md.
    VmTest(vm::Opts),
    /// Measure lbtrace's cost against no tracer and bpftrace; writes target/bench/.
    Bench {
        /// Shorter runs (under three minutes), same figures.
        #[arg(long)]
        quick: bool,
        /// Also compare with the previous run (kept as target/bench/results.prev.json).
        #[arg(long)]
        compare: bool,
        /// Instead: run the daemon under a steady load for a long time; memory must stay flat.
        #[arg(long)]
        soak: bool,
        /// Soak length in seconds.
        #[arg(long, default_value_t = 600, requires = "soak")]
        soak_secs: u64,
        /// Soak load in drops per second.
        #[arg(long, default_value_t = 50_000, requires = "soak")]
        soak_rate: u64,
        /// Instead: only the scale phase (1,000 VIPs behind DNAT); prints its targets.
        #[arg(long, conflicts_with = "soak")]
        scale: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::setup(),
        Command::Build => setup::setup().and_then(|()| build().map(|_| ())),
        Command::Test {
            filter,
            no_lint,
            no_vm,
        } => test(filter.as_deref(), no_lint, no_vm),
        Command::Demo => demo::demo(),
        Command::Lab { cmd } => lab::lab(cmd),
        Command::Fuzz { time } => fuzz::fuzz(time),
        Command::VmTest(opts) => vm::vm_test(&opts),
        Command::Bench {
            quick,
            compare,
            soak,
            soak_secs,
            soak_rate,
            scale,
        } => bench::bench(bench::Opts {
            quick,
            compare,
            soak,
            soak_secs,
            soak_rate,
            scale,
        }),
    };
    if let Err(e) = result {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// Builds the agent (which builds and embeds the eBPF object) and returns the binary's path.
pub fn build() -> Result<PathBuf> {
    util::step("build: cargo build --release -p agent (eBPF object embedded)");
    util::run(util::cargo().args([
        "build",
        "--release",
        "-p",
        "agent",
        "-p",
        "integration-tests",
    ]))?;
    // Where cargo put it: CARGO_TARGET_DIR (relative to the workspace, where cargo runs) or
    // the workspace's target/.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root().join("target"), |d| root().join(d));
    let bin = target.join("release/lbtrace");
    anyhow::ensure!(bin.is_file(), "{} was not built", bin.display());
    Ok(bin)
}

fn test(filter: Option<&str>, no_lint: bool, no_vm: bool) -> Result<()> {
    setup::setup()?;
    let bin = build()?;
    if !no_lint {
        util::step("fmt: cargo fmt --all -- --check");
        util::run(util::cargo().args(["fmt", "--all", "--", "--check"]))?;
        util::step("clippy: cargo clippy --workspace --all-targets -- -D warnings");
        util::run(util::cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--release",
            "--",
            "-D",
            "warnings",
        ]))?;
        util::step("clippy (eBPF, nightly, bpfel-unknown-none)");
        util::run(
            util::cargo_nightly()
                .current_dir(root().join("agent-ebpf"))
                .args([
                    "clippy",
                    "--release",
                    "--target",
                    "bpfel-unknown-none",
                    "-Z",
                    "build-std=core",
                    "--",
                    "-D",
                    "warnings",
                ]),
        )?;
    }
    util::step("unit tests: cargo test --workspace --exclude integration-tests");
    util::run(util::cargo().args([
        "test",
        "--release",
        "--workspace",
        "--exclude",
        "integration-tests",
    ]))?;
    util::require_root("the integration tests load eBPF programs and create network namespaces")?;
    util::step("integration tests (root, real kernel): cargo test -p integration-tests");
    for targets in integration_targets()? {
        let mut cmd = util::cargo();
        cmd.args(["test", "--release", "-p", "integration-tests"])
            .args(targets)
            .args(["--", "--test-threads=1"]);
        if let Some(f) = filter {
            cmd.arg(f);
        }
        cmd.env("LBTRACE_BIN", &bin);
        util::run(&mut cmd)?;
    }
    if no_vm || filter.is_some() {
        return Ok(());
    }
    util::step("kernel matrix: vm-test --kernel all");
    vm::vm_test(&vm::Opts {
        kernel: "all".to_owned(),
        update_readme: false,
        no_self_test: false,
        timeout: 1500,
    })
}

/// The integration test targets in two runs: the lab first, then the library's tests and every
/// other file of `tests/tests`. Run after the other root suites, the lab's timed scenarios have
/// come out one packet off the kernel's own count, either way (README, "Known limits").
fn integration_targets() -> Result<[Vec<String>; 2]> {
    let dir = root().join("tests/tests");
    let mut rest = vec!["--lib".to_owned()];
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| {
            let path = e.ok()?.path();
            (path.extension()? == "rs").then(|| path.file_stem()?.to_str().map(str::to_owned))?
        })
        .filter(|name| name != LAB_TARGET)
        .collect();
    names.sort();
    for name in names {
        rest.extend(["--test".to_owned(), name]);
    }
    Ok([vec!["--test".to_owned(), LAB_TARGET.to_owned()], rest])
}

/// The lab's test target.
const LAB_TARGET: &str = "lab";
