//! `cargo xtask demo`: the lab's stale-arp and failover-garp scenarios while `lbtrace watch`
//! streams their drops live, then each VIP's ground truth next to lbtrace.

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
    step(&format!("demo: lbtrace watch {}", args.join(" ")));
    let live = Watch::start_live(&args)?;
    let mut outcomes = Vec::new();
    for s in [Scenario::StaleArp, Scenario::FailoverGarp] {
        step(&format!("demo: scenario {}: {}", s.name(), s.about()));
        let out = crate::lab::run(s, None).with_context(|| s.name());
        let out = match out {
            Ok(o) => o,
            Err(e) => {
                let _ = live.stop();
                return Err(e);
            }
        };
        eprint!("{}", out.render());
        outcomes.push(out);
    }
    step("demo: lbtrace's summary");
    let finished = live.stop()?;
    anyhow::ensure!(
        finished.status.success(),
        "lbtrace failed: {}",
        finished.stderr
    );
    step("demo: per VIP, what the client lost, what the kernel counted, what lbtrace reported");
    for out in &outcomes {
        eprintln!("{}:", out.scenario.name());
        eprint!("{}", out.summary());
    }
    step("demo: done; namespaces removed");
    Ok(())
}
