//! `cargo xtask setup`: every prerequisite, installed idempotently and checked first so a second
//! run takes about a second.

use std::{env, path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

use crate::util::{exists, is_root, output, run, step, succeeds};

/// Debian packages lbtrace builds or tests with.
const APT_PACKAGES: &[&str] = &[
    // bpf-linker is built against it
    "llvm-22-dev",
    // lab and tests
    "iproute2",
    "nftables",
    // the lab's kube-proxy in iptables mode (Debian's nft backend)
    "iptables",
    "conntrack",
    "iputils-arping",
    "ndisc6",
    "bpftool",
    // the agent's end-to-end test scrapes it with a real Prometheus
    "prometheus",
    // `lbtrace top` is driven in it by a test
    "tmux",
    // the HTML report is opened in headless Chromium by a test
    "chromium",
    // the deploy test runs `systemd-analyze verify` on deploy/lbtrace.service
    "systemd",
];

const BPF_LINKER_VERSION: &str = "0.13";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

pub fn setup() -> Result<()> {
    step("setup: prerequisites");
    apt()?;
    kubectl()?;
    rust()?;
    bpf_linker()?;
    tracefs()?;
    Ok(())
}

fn apt_missing<'a>(packages: &[&'a str]) -> Vec<&'a str> {
    packages
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query")
                .args(["-W", "-f=${db:Status-Abbrev}", p])
                .output();
            !matches!(out, Ok(o) if o.status.success() && o.stdout.starts_with(b"ii"))
        })
        .collect()
}

fn apt() -> Result<()> {
    ensure_apt(APT_PACKAGES)?;
    ensure_apt(crate::vm::APT_PACKAGES)
}

/// Installs the Debian packages of `packages` that are missing; quick when none is.
pub fn ensure_apt(packages: &[&str]) -> Result<()> {
    let missing = apt_missing(packages);
    if missing.is_empty() {
        eprintln!("    apt packages present: {}", packages.join(" "));
        return Ok(());
    }
    if !is_root() {
        bail!(
            "apt packages missing ({}) and not root: run `cargo xtask setup` as root",
            missing.join(" ")
        );
    }
    eprintln!("    apt-get install {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// kubectl for the offline manifest check: any on PATH will do (its `--local` commands work alike
/// from 1.20 on, and another package may own /usr/bin/kubectl), else Debian's kubernetes-client.
fn kubectl() -> Result<()> {
    if succeeds(Command::new("kubectl").args(["version", "--client"])) {
        eprintln!("    kubectl: present");
        return Ok(());
    }
    ensure_apt(&["kubernetes-client"])
}

fn rust() -> Result<()> {
    let installed = output(Command::new("rustup").args(["toolchain", "list"]))?;
    let installed = String::from_utf8_lossy(&installed.stdout).into_owned();
    if !installed.lines().any(|l| l.starts_with("nightly")) {
        eprintln!("    rustup toolchain install nightly");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    for (toolchain, component) in [
        ("nightly", "rust-src"),
        ("nightly", "clippy"),
        ("stable", "clippy"),
        ("stable", "rustfmt"),
    ] {
        let out = output(Command::new("rustup").args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            toolchain,
        ]))?;
        let have = String::from_utf8_lossy(&out.stdout);
        if !have.lines().any(|l| l.starts_with(component)) {
            eprintln!("    rustup component add {component} --toolchain {toolchain}");
            run(Command::new("rustup").args([
                "component",
                "add",
                component,
                "--toolchain",
                toolchain,
            ]))?;
        }
    }
    eprintln!("    rust toolchains: present");
    Ok(())
}

fn cargo_bin() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

fn bpf_linker() -> Result<()> {
    let bin = cargo_bin().join("bpf-linker");
    if let Ok(out) = Command::new(&bin).arg("--version").output() {
        let v = String::from_utf8_lossy(&out.stdout);
        if out.status.success() && v.contains(&format!(" {BPF_LINKER_VERSION}.")) {
            eprintln!("    bpf-linker: {}", v.trim());
            return Ok(());
        }
    }
    eprintln!("    cargo install bpf-linker {BPF_LINKER_VERSION} (LLVM 22)");
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            &format!("^{BPF_LINKER_VERSION}"),
            "--no-default-features",
            "--features",
            "llvm-22",
            "--force",
        ])
        .env("LLVM_PREFIX", LLVM_PREFIX))
    .context("installing bpf-linker")
}

fn tracefs() -> Result<()> {
    if exists("/sys/kernel/tracing/events") {
        eprintln!("    tracefs: mounted");
        return Ok(());
    }
    if !is_root() {
        eprintln!(
            "    tracefs: not mounted (needs root: mount -t tracefs nodev /sys/kernel/tracing)"
        );
        return Ok(());
    }
    if succeeds(Command::new("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])) {
        eprintln!("    tracefs: mounted now");
        Ok(())
    } else {
        bail!("cannot mount tracefs on /sys/kernel/tracing")
    }
}
