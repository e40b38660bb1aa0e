//! `reasons` and `doctor`: what this kernel offers, and which probes attach.

use std::io::{self, Write};

use anyhow::bail;
use lbtrace::{
    event::record::{ProbeState, ProbeStatus},
    kernel::{
        btf::{DropReasons, VMLINUX_BTF},
        kallsyms::Kallsyms,
        privileges, tracefs,
    },
    probes::{self, KernelFilter, LoadOptions, ProbeMode, Tracer},
};

use super::common::{load_btf, proc_text, UsageError};

#[derive(serde::Serialize)]
struct ReasonList<'a> {
    reasons: Vec<Reason<'a>>,
    subsystems: Vec<Subsystem<'a>>,
}

#[derive(serde::Serialize)]
struct Reason<'a> {
    code: u32,
    name: &'a str,
}

#[derive(serde::Serialize)]
struct Subsystem<'a> {
    id: u32,
    name: &'a str,
}

pub fn reasons(json: bool) -> anyhow::Result<()> {
    let btf = load_btf()?;
    let reasons = DropReasons::from_btf(&btf)?;
    let mut out = io::stdout().lock();
    if json {
        let list = ReasonList {
            reasons: reasons
                .iter()
                .map(|(code, name)| Reason { code, name })
                .collect(),
            subsystems: reasons
                .subsystems()
                .map(|(id, name)| Subsystem { id, name })
                .collect(),
        };
        serde_json::to_writer(&mut out, &list)?;
        writeln!(out)?;
    } else {
        for (code, name) in reasons.iter() {
            writeln!(out, "{code:>5}  {name}")?;
        }
        for (id, name) in reasons.subsystems() {
            writeln!(out, "subsystem {id} ({name}): codes {:#x}..", id << 16)?;
        }
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct Doctor {
    kernel: String,
    btf: Check,
    tracefs: Check,
    kallsyms: Check,
    capabilities: Vec<&'static str>,
    missing_capabilities: Vec<&'static str>,
    drop_reasons: usize,
    /// Arguments of tp_btf kfree_skb: 4 with `rx_sk`, 3 on older kernels.
    kfree_skb_args: Option<usize>,
    probes: Vec<ProbeStatus>,
    features: Option<probes::Features>,
}

#[derive(serde::Serialize)]
struct Check {
    ok: bool,
    detail: String,
}

impl Check {
    fn from<T, E: std::fmt::Display>(r: Result<T, E>, ok: impl FnOnce(T) -> String) -> Self {
        match r {
            Ok(v) => Self {
                ok: true,
                detail: ok(v),
            },
            Err(e) => Self {
                ok: false,
                detail: e.to_string(),
            },
        }
    }
}

/// Each drop hook on its own, so doctor shows every fallback, not just the first that works.
fn probe_checks(
    btf: &lbtrace::kernel::btf::KernelBtf,
) -> (Vec<ProbeStatus>, Option<probes::Features>) {
    privileges::raise_memlock();
    let mut statuses = Vec::new();
    let mut features = None;
    let reasons = DropReasons::from_btf(btf).unwrap_or_default();
    for mode in [ProbeMode::Btf, ProbeMode::Tracepoint] {
        let opts = LoadOptions {
            ring_bytes: 1 << 16,
            wakeup_bytes: 0,
            ..LoadOptions::new(mode, KernelFilter::default())
        };
        match Tracer::load(btf, &reasons, &opts) {
            Ok(mut t) => {
                // Hooks every mode tries (conntrack's) are listed once.
                for s in t.statuses.iter().filter(|s| s.state.tried()) {
                    if !statuses.iter().any(|k: &ProbeStatus| k.probe == s.probe) {
                        statuses.push(s.clone());
                    }
                }
                features.get_or_insert_with(|| t.features.clone());
                t.detach();
            }
            Err(e) => statuses.push(ProbeStatus {
                collector: "drops".into(),
                probe: probes::probe_name(match mode {
                    ProbeMode::Btf => agent_common::ProbeId::KfreeSkbBtf,
                    _ => agent_common::ProbeId::KfreeSkbTracepoint,
                })
                .into(),
                state: ProbeState::Failed(probes::error_chain(&e)),
            }),
        }
    }
    (statuses, features)
}

pub fn doctor(json: bool) -> anyhow::Result<()> {
    let caps = privileges::effective();
    let missing = privileges::missing_for_tracing(caps);
    let btf = load_btf();
    let mut reasons_n = 0;
    let btf_check = match &btf {
        Ok(b) => {
            let mut cfg = agent_common::ProbeConfig::zeroed();
            let offsets = probes::offsets::kernel_offsets(b, &mut cfg);
            reasons_n = DropReasons::from_btf(b)
                .map(|r| r.iter().count())
                .unwrap_or(0);
            Check::from(offsets, |()| {
                format!("{VMLINUX_BTF}: struct offsets resolved, {reasons_n} drop reasons")
            })
        }
        Err(e) => Check {
            ok: false,
            detail: format!("{e:#}"),
        },
    };
    let (probes, features) = match (&btf, missing.is_empty()) {
        (Ok(b), true) => probe_checks(b),
        _ => (Vec::new(), None),
    };
    let report = Doctor {
        kernel: proc_text("/proc/sys/kernel/osrelease"),
        btf: btf_check,
        tracefs: Check::from(
            tracefs::tracefs_root().ok_or_else(tracefs::tracefs_problem),
            |p| p.display().to_string(),
        ),
        kallsyms: Check::from(Kallsyms::load(), |k| {
            if k.is_empty() {
                "readable, but addresses are hidden (kptr_restrict): locations print as addresses"
                    .to_owned()
            } else {
                "readable: locations are symbolized".to_owned()
            }
        }),
        capabilities: privileges::describe(caps),
        missing_capabilities: missing.clone(),
        drop_reasons: reasons_n,
        kfree_skb_args: btf
            .as_ref()
            .ok()
            .and_then(|b| b.tracepoint_args("kfree_skb").ok()),
        probes,
        features,
    };
    let mut out = io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        report.write_text(&mut out)?;
    }
    if !missing.is_empty() {
        bail!(UsageError(format!(
            "cannot test the probes without {}",
            missing.join(", ")
        )));
    }
    if !report.probes.iter().any(|s| s.state.attached()) {
        bail!("no drop probe attaches on this kernel");
    }
    Ok(())
}

impl Doctor {
    fn write_text(&self, out: &mut impl Write) -> io::Result<()> {
        let mark = |ok: bool| if ok { "ok  " } else { "FAIL" };
        writeln!(out, "kernel        {}", self.kernel)?;
        writeln!(out, "{} BTF      {}", mark(self.btf.ok), self.btf.detail)?;
        writeln!(
            out,
            "{} tracefs  {}",
            mark(self.tracefs.ok),
            self.tracefs.detail
        )?;
        writeln!(
            out,
            "{} kallsyms {}",
            mark(self.kallsyms.ok),
            self.kallsyms.detail
        )?;
        let missing = &self.missing_capabilities;
        writeln!(
            out,
            "{} caps     {}",
            mark(missing.is_empty()),
            if missing.is_empty() {
                self.capabilities.join(" ")
            } else {
                format!("missing {}", missing.join(", "))
            }
        )?;
        match self.kfree_skb_args {
            Some(n) if n >= 4 => writeln!(
                out,
                "ok   args     tp_btf/kfree_skb passes rx_sk: a drop with no device and no \
                 socket takes its namespace from the receiving socket"
            )?,
            Some(n) => writeln!(
                out,
                "note args     tp_btf/kfree_skb passes {n} arguments, no rx_sk: a drop with no \
                 device and no socket is reported with netns 0"
            )?,
            None => {}
        }
        for s in &self.probes {
            match s.state.why() {
                None => writeln!(out, "ok   probe    {} ({}): attached", s.probe, s.collector)?,
                Some(e) => writeln!(out, "FAIL probe    {} ({}): {e}", s.probe, s.collector)?,
            }
        }
        if let Some(f) = &self.features {
            for (what, f) in f.list() {
                match f {
                    probes::Feature::On => writeln!(out, "ok   feature  {what}")?,
                    probes::Feature::Off(e) => writeln!(out, "FAIL feature  {what}: {e}")?,
                }
            }
        }
        Ok(())
    }
}
