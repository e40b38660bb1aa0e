//! `cargo xtask demo`: the lab's stale-arp and failover-garp scenarios, each while an `lbtrace
//! watch` of its own streams its drops live, then each VIP's ground truth next to lbtrace.

use anyhow::{Context, Result};
use lbtest::{
    lab::{
        scenarios::Scenario,
        topology::{VIP_A, VIP_A6, VIP_B, VIP_CTL, VIP_CTL6},
    },
    lbtrace::Watch,
};

use crate::util::{require_root, step};

pub fn demo() -> Result<()> {
    require_root("the demo loads eBPF programs and creates network namespaces")?;
    crate::setup::setup()?;
    let bin = crate::build()?;
    // SAFETY: single-threaded at this point; the variable is read by lbtest.
    unsafe { std::env::set_var("LBTRACE_BIN", &bin) };
    crate::lab::interrupt_on_ctrl_c();

    let vips = [VIP_A, VIP_A6, VIP_B, VIP_CTL, VIP_CTL6].map(|v| v.to_string());
    let mut args = vec!["--color", "always"];
    for v in &vips {
        args.extend(["--vip", v]);
    }
    let mut outcomes = Vec::new();
    // One lbtrace per scenario: each lab's hosts have fresh MACs, which one watch over both
    // labs would take for moves of the VIPs.
    for s in [Scenario::StaleArp, Scenario::FailoverGarp] {
        step(&format!("demo: scenario {}: {}", s.name(), s.about()));
        step(&format!("demo: lbtrace watch {}", args.join(" ")));
        let live = Watch::start_live(&args)?;
        let out = crate::lab::run(s, None, None).with_context(|| s.name());
        step(&format!("demo: lbtrace's summary of {}", s.name()));
        let finished = live.stop()?;
        let out = out?;
        anyhow::ensure!(
            finished.status.success(),
            "lbtrace failed: {}",
            finished.stderr
        );
        eprint!("{}", out.render());
        outcomes.push(out);
    }
    step("demo: per VIP, what the client lost, what the kernel counted, what lbtrace reported");
    for out in &outcomes {
        eprintln!("{}:", out.scenario.name());
        eprint!("{}", out.summary());
    }
    step("demo: done; namespaces removed");
    Ok(())
}
