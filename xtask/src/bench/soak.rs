//! `cargo xtask bench --soak`: the daemon under a steady load for a long time (10 minutes by
//! default): its memory must stay flat and its counts exact.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::json;

use super::{
    exact, measure,
    tracer::{self, Kind, Running},
    Ctx, Daemon, Lab, Opts, SETTLE,
};
use crate::util::step;

const MIB: u64 = 1 << 20;

pub fn soak(ctx: &Ctx, opts: &Opts) -> Result<()> {
    let kind = if tracer::agent_available(&ctx.bin) {
        Kind::Agent
    } else {
        Kind::Watch
    };
    let secs = opts.soak_secs.max(10);
    let lab = Lab::new()?;
    step(&format!(
        "bench --soak: {} under {} drops/s for {secs} s",
        kind.command(lab.scope()),
        opts.soak_rate
    ));
    let running = Running::start(kind, &ctx.bin, lab.scope(), None)?;
    let pid = running.pid().unwrap_or(0);
    let plan = lab.plan(Some(opts.soak_rate), Duration::from_secs(secs));
    let every = Duration::from_secs((secs / 20).clamp(1, 10));
    let start = Instant::now();
    let proc0 = measure::process(pid);
    let mut samples: Vec<(f64, u64)> = Vec::new();
    let sent = std::thread::scope(|s| {
        let h = s.spawn(|| lab.blaster.run(&plan));
        while !h.is_finished() {
            let rss = measure::rss(pid).0;
            let t = start.elapsed().as_secs_f64();
            if samples.len().is_multiple_of(6) {
                eprintln!("    {t:>6.0} s  RSS {:.2} MiB", rss as f64 / MIB as f64);
            }
            samples.push((t, rss));
            std::thread::sleep(
                every
                    .min(plan.duration.saturating_sub(start.elapsed()))
                    .max(Duration::from_millis(50)),
            );
        }
        h.join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("generator panicked")))
    })?;
    std::thread::sleep(SETTLE);
    let daemon = Daemon::measure(pid, &proc0);
    let counts = running.stop(&ctx.names)?.unwrap_or_default();
    let expected = lab.expected(&sent, &plan, 0);
    let is_exact = exact(&counts, &expected);
    // Memory after warm-up (a minute in, or a tenth of a short soak) against the end.
    let warm = (secs as f64 / 10.0).min(60.0);
    let baseline = samples
        .iter()
        .find(|(t, _)| *t >= warm)
        .or(samples.first())
        .map_or(0, |s| s.1);
    let (start_rss, end_rss) = (samples.first().map_or(0, |s| s.1), daemon.rss);
    let growth = end_rss.saturating_sub(baseline);
    let flat = growth <= MIB.max(baseline / 50);
    let result = json!({
        "tracer": kind.name(),
        "rate": opts.soak_rate,
        "duration_s": sent.elapsed.as_secs_f64(),
        "sent": sent.total(),
        "achieved_per_s": sent.per_s(),
        "expected": expected,
        "counted": counts.by_reason,
        "events_seen": counts.seen,
        "events_delivered": counts.delivered,
        "events_lost": counts.lost,
        "exact": is_exact,
        "rss_start_mb": start_rss as f64 / MIB as f64,
        "rss_after_warmup_mb": baseline as f64 / MIB as f64,
        "rss_end_mb": end_rss as f64 / MIB as f64,
        "rss_peak_mb": daemon.rss_peak as f64 / MIB as f64,
        "memory_flat": flat,
        "cpu_pct": daemon.rates.cpu_pct,
        "wakeups_per_s": daemon.rates.wakeups_per_s,
        "rss_samples": samples.iter().map(|(t, b)| json!([t, b])).collect::<Vec<_>>(),
    });
    let dir = crate::root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("soak.json"),
        serde_json::to_string_pretty(&result)? + "\n",
    )?;
    println!(
        "\nsoak: {} for {:.0} s at {:.0} drops/s: RSS {:.2} MiB at start, {:.2} after warm-up, {:.2} at the end (peak {:.2}): {}; counts {} (lost {}); daemon {:.2}% CPU, {:.0} wakeups/s\nWritten: {}",
        kind.name(),
        sent.elapsed.as_secs_f64(),
        sent.per_s(),
        start_rss as f64 / MIB as f64,
        baseline as f64 / MIB as f64,
        end_rss as f64 / MIB as f64,
        daemon.rss_peak as f64 / MIB as f64,
        if flat { "flat" } else { "GROWING" },
        if is_exact { "exact" } else { "DIFFER" },
        counts.lost.map_or("?".into(), |l| l.to_string()),
        daemon.rates.cpu_pct,
        daemon.rates.wakeups_per_s,
        dir.join("soak.json").display(),
    );
    anyhow::ensure!(
        is_exact,
        "soak: counts differ: expected {expected:?}, counted {:?}",
        counts.by_reason
    );
    anyhow::ensure!(flat, "soak: RSS grew by {growth} bytes after warm-up");
    Ok(())
}
