//! Attaching: per collector, the first probe that works on this kernel, as the probe mode
//! allows.

use std::collections::BTreeMap;

use agent_common::{CtVerdict, ProbeId, MAP_CT_VERDICT};
use aya::{
    maps::{PerCpuArray, PerCpuValues},
    Ebpf,
};

use super::{
    collectors::{
        attach_btf, attach_kprobes, attach_tracepoint, disabled_by_env, error_chain, probe_name,
        Hook, ProbeSpec, COLLECTORS, DISABLE_PROBES_ENV,
    },
    Feature, LoadOptions, Offered, ProbeError, RX_COLLECTOR,
};
use crate::event::record::{ProbeState, ProbeStatus};

/// Per collector, the first probe that attaches (as `mode` allows); every attempt's outcome.
pub(super) fn attach_all(
    ebpf: &mut Ebpf,
    btf: Option<&aya::Btf>,
    opts: &LoadOptions,
    offered: &Offered,
) -> Result<(Vec<ProbeStatus>, BTreeMap<&'static str, ProbeId>), ProbeError> {
    let mode = opts.mode;
    let mut statuses = Vec::new();
    let mut active = BTreeMap::new();
    // Nothing to hook on receive without ARP, or when receive is not asked for.
    let rx = opts.arp && opts.arp_rx;
    for collector in COLLECTORS.iter().filter(|c| rx || c.name != RX_COLLECTOR) {
        for spec in collector.probes {
            let name = probe_name(spec.id);
            let state = if active.contains_key(collector.name) {
                ProbeState::NotNeeded
            } else if !mode.allows(spec) {
                ProbeState::NotTried(mode.to_string())
            } else if disabled_by_env(name) {
                ProbeState::Disabled(DISABLE_PROBES_ENV.to_owned())
            } else {
                match attach_one(ebpf, btf, offered, spec) {
                    Ok(()) => ProbeState::Attached,
                    Err(e) => ProbeState::Failed(e),
                }
            };
            if state.attached() {
                active.insert(collector.name, spec.id);
            }
            statuses.push(ProbeStatus {
                collector: collector.name.into(),
                probe: name.into(),
                state,
            });
        }
        if collector.required && !active.contains_key(collector.name) {
            let why = statuses
                .iter()
                .filter(|s| &*s.collector == collector.name)
                .filter_map(|s| s.state.why().map(|e| format!("{}: {e}", s.probe)))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(ProbeError::NoProbe(why));
        }
    }
    Ok((statuses, active))
}

/// Attaches one probe of a collector.
fn attach_one(
    ebpf: &mut Ebpf,
    btf: Option<&aya::Btf>,
    offered: &Offered,
    spec: &ProbeSpec,
) -> Result<(), String> {
    match spec.hook {
        Hook::BtfTracepoint { function } => {
            match (btf, offered.layouts.get(format!("btf/{function}").as_str())) {
                (_, Some(Err(e))) => Err(e.clone()),
                (Some(kbtf), _) => attach_btf(ebpf, spec.program, function, kbtf),
                (None, _) => Err("kernel BTF unavailable to the loader".to_owned()),
            }
        }
        Hook::Tracepoint { category, name } => {
            match offered.layouts.get(format!("{category}/{name}").as_str()) {
                Some(Err(e)) => Err(e.clone()),
                _ => attach_tracepoint(ebpf, spec.program, category, name),
            }
        }
        Hook::Kprobes { attach } => match &offered.ct_stats {
            Feature::Off(why) => Err(format!("conntrack drop classification is off: {why}")),
            Feature::On => {
                attach_kprobes(ebpf, attach)?;
                use_ct_verdicts(ebpf)
            }
        },
        Hook::Statistics => Result::from(offered.ct_stats.clone()),
    }
}

/// Tells the drop program, on every CPU, to classify from the hooks' verdicts.
fn use_ct_verdicts(ebpf: &mut Ebpf) -> Result<(), String> {
    let map = ebpf
        .map_mut(MAP_CT_VERDICT)
        .ok_or_else(|| format!("map {MAP_CT_VERDICT} missing from the object"))?;
    let mut slots: PerCpuArray<_, CtVerdict> =
        PerCpuArray::try_from(map).map_err(|e| error_chain(&e))?;
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e.to_string())?;
    let hooked = CtVerdict {
        hooked: 1,
        ..CtVerdict::default()
    };
    let values = PerCpuValues::try_from(vec![hooked; cpus]).map_err(|e| e.to_string())?;
    slots.set(0, values, 0).map_err(|e| error_chain(&e))
}
