//! `cargo xtask lab`: the namespace lab by hand (`up`, `down`) and its scenarios run against
//! lbtrace (`run`). The lab itself is `lbtest::lab`, shared with the tests.

use std::{
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result};
use clap::Subcommand;
use lbtest::lab::{
    self,
    kubeproxy::ProxyMode,
    scenarios::{self, Options, Scenario},
    topology::{self, Lab},
    STATE_DIR, XTASK_PREFIX,
};

use crate::util::{require_root, step};

#[derive(Subcommand)]
pub enum LabCmd {
    /// List the scenarios.
    List,
    /// Build the lab (namespaces lbl-…) and leave it running, pods serving, until `lab down`.
    Up,
    /// Run a scenario in a lab of its own with `lbtrace watch` (build it first), then print what
    /// lbtrace found next to the ground truth.
    Run {
        scenario: String,
        /// Seconds of traffic, instead of the scenario's own.
        #[arg(long)]
        duration: Option<u64>,
        /// kube-proxy's mode on the nodes (nftables, iptables), instead of the scenario's own.
        #[arg(long)]
        kube_proxy: Option<String>,
    },
    /// Remove every lab namespace (lbl…), stop `lab up`'s servers and any lab speaker left
    /// running, remove their memory cgroups, restore changed sysctls.
    Down,
    /// Serve the pods of the lab `lab up` made, until killed (started by `lab up`).
    #[command(hide = true)]
    Hold,
}

/// The fixed prefix of the lab `lab up` makes, so that a later `lab down` finds it.
fn up_prefix() -> String {
    format!("{XTASK_PREFIX}-up")
}

fn holder_pidfile() -> PathBuf {
    PathBuf::from(STATE_DIR).join("holder.pid")
}

pub fn lab(cmd: LabCmd) -> Result<()> {
    if let LabCmd::List = cmd {
        for s in Scenario::ALL {
            println!("{:<15} {}", s.name(), s.about());
        }
        return Ok(());
    }
    require_root("the lab creates network namespaces")?;
    match cmd {
        LabCmd::List => Ok(()),
        LabCmd::Up => up(),
        LabCmd::Run {
            scenario,
            duration,
            kube_proxy,
        } => {
            let mode = kube_proxy.as_deref().map(ProxyMode::parse).transpose()?;
            let out = run(
                Scenario::parse(&scenario)?,
                duration.map(Duration::from_secs),
                mode,
            )?;
            print!("{}", out.render());
            anyhow::ensure!(out.passed(), "{}: some checks failed", scenario);
            Ok(())
        }
        LabCmd::Down => down(),
        LabCmd::Hold => {
            let _servers = topology::serve(&up_prefix())?;
            loop {
                std::thread::park();
            }
        }
    }
}

/// A scenario in a lab with a fresh name; Ctrl-C ends it early and still cleans up.
pub fn run(
    scenario: Scenario,
    duration: Option<Duration>,
    proxy_mode: Option<ProxyMode>,
) -> Result<scenarios::Outcome> {
    interrupt_on_ctrl_c();
    scenarios::run(
        scenario,
        &Options {
            prefix: lbtest::unique(XTASK_PREFIX),
            duration,
            cluster: false,
            proxy_mode,
        },
    )
}

/// SIGINT reaches lbtrace (which stops and prints its summary) and us: the scenario stops at
/// its next step and the lab is removed. A handler, unlike SIG_IGN, is not inherited by lbtrace.
pub fn interrupt_on_ctrl_c() {
    extern "C" fn on_sigint(_: libc::c_int) {
        lab::interrupt();
    }
    // SAFETY: installing a handler that only stores to an atomic (async-signal-safe).
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
}

fn up() -> Result<()> {
    down()?;
    let prefix = up_prefix();
    step(&format!("lab up: namespaces {prefix}-*"));
    let lab = Lab::up(&prefix, Scenario::Healthy.services())?;
    let services = lab.services.clone();
    lab.keep();
    // The pods' servers must outlive this process: a detached copy of us holds them.
    let holder = Command::new(std::env::current_exe()?)
        .args(["lab", "hold"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .context("starting the pods' servers")?;
    std::fs::create_dir_all(STATE_DIR)?;
    std::fs::write(holder_pidfile(), holder.id().to_string())?;
    for s in &services {
        let vips: Vec<String> = s.vips.iter().map(ToString::to_string).collect();
        let eps: Vec<String> = s.endpoints.iter().map(|p| p.name()).collect();
        println!(
            "service {:<4} {:<28} policy {:?}, endpoints {}, announced by n{}",
            s.name,
            vips.join(" "),
            s.policy,
            eps.join(" "),
            s.owner.unwrap_or(0)
        );
    }
    println!(
        "clients: ip netns exec {prefix}-c0 …  (TCP echo on VIP:80, UDP echo on VIP:53)\n\
         watch:   target/release/lbtrace watch --vip 10.200.0.100\n\
         remove:  cargo xtask lab down"
    );
    Ok(())
}

fn down() -> Result<()> {
    if let Ok(pid) = std::fs::read_to_string(holder_pidfile()) {
        if let Ok(pid) = pid.trim().parse::<i32>() {
            stop_holder(pid);
        }
        std::fs::remove_file(holder_pidfile())?;
    }
    for what in lab::speakers::clean_up(XTASK_PREFIX) {
        step(&format!("lab down: {what}"));
    }
    let removed = topology::remove_namespaces(XTASK_PREFIX)?;
    if !removed.is_empty() {
        step(&format!("lab down: removed {}", removed.join(" ")));
    }
    if let Some(v) = topology::restore_conntrack_max()? {
        step(&format!("lab down: nf_conntrack_max restored to {v}"));
    }
    Ok(())
}

/// Stops `lab up`'s holder if `pid` is still it (not a reused pid).
fn stop_holder(pid: i32) {
    let is_holder = std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.windows(9).any(|w| w == b"lab\0hold\0"));
    if !is_holder {
        return;
    }
    // SAFETY: signalling the process we started, identified above.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    for _ in 0..50 {
        if !PathBuf::from(format!("/proc/{pid}")).exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
