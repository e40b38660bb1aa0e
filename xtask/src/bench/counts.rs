//! Drop counts as each tracer reports them: `lbtrace watch`'s summary, the agent's metrics,
//! bpftrace's map, and the kernel's own names of reason codes.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::tracer::Received;

/// Drop counts as a tracer reports them.
#[derive(Clone, Debug, Default)]
pub struct Counts {
    pub by_reason: BTreeMap<String, u64>,
    pub seen: Option<u64>,
    pub delivered: Option<u64>,
    pub lost: Option<u64>,
    /// Drops counted exactly but not sent as records (lbtrace's sampling).
    pub sampled_out: Option<u64>,
    /// Whether the counts cover only the bench's VIP (lbtrace) or the whole machine (bpftrace).
    pub scope: &'static str,
    /// The records the bench itself read from the tracer (`lbtrace watch` only).
    pub received: Option<Received>,
}

/// The summary object `lbtrace watch --json` prints last.
pub(super) fn lbtrace_summary(stdout: &str) -> Result<Counts> {
    let last = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .context("lbtrace printed nothing")?;
    let v: Value = serde_json::from_str(last).context("lbtrace's last line is not JSON")?;
    if v["kind"] != "summary" {
        bail!("lbtrace's last line is not its summary: {last}");
    }
    let by_reason = v["drops_by_reason"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    Ok(Counts {
        by_reason,
        seen: v["events_seen"].as_u64(),
        delivered: v["events_delivered"].as_u64(),
        lost: v["events_lost"].as_u64(),
        // Absent when nothing was sampled out.
        sampled_out: Some(v["events_sampled_out"].as_u64().unwrap_or(0)),
        scope: "netns + VIP (in-kernel filter)",
        received: None,
    })
}

/// The kernel's own names of drop-reason codes, as the `skb/kfree_skb` tracepoint prints them:
/// the `__print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, …)` of its tracefs format.
/// Names bpftrace's counts independently of lbtrace's reason table.
pub fn kernel_reason_names() -> Result<BTreeMap<u32, String>> {
    let mut last = None;
    for dir in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        let path = format!("{dir}/events/skb/kfree_skb/format");
        match std::fs::read_to_string(&path) {
            Ok(f) => return print_symbolic(&f, "REC->reason").with_context(|| path.clone()),
            Err(e) => last = Some(format!("{path}: {e}")),
        }
    }
    bail!(
        "no tracefs format for skb/kfree_skb: {}",
        last.unwrap_or_default()
    )
}

/// The `{ code, "NAME" }` pairs of `__print_symbolic(field, …)` in a tracefs format.
fn print_symbolic(format: &str, field: &str) -> Result<BTreeMap<u32, String>> {
    let start = format
        .find(&format!("__print_symbolic({field},"))
        .context("no __print_symbolic for the reason")?;
    let mut names = BTreeMap::new();
    let mut rest = &format[start..];
    // Pairs until the closing parenthesis of __print_symbolic (names hold no parentheses).
    let end = rest.find(')').unwrap_or(rest.len());
    rest = &rest[..end];
    while let Some(open) = rest.find('{') {
        let close = rest[open..].find('}').context("unclosed pair")? + open;
        let (code, name) = rest[open + 1..close]
            .split_once(',')
            .context("pair without a comma")?;
        let code = code.trim();
        let code = match code.strip_prefix("0x") {
            Some(hex) => u32::from_str_radix(hex, 16)?,
            None => code.parse()?,
        };
        names.insert(code, name.trim().trim_matches('"').to_owned());
        rest = &rest[close + 1..];
    }
    anyhow::ensure!(!names.is_empty(), "__print_symbolic names no reason");
    Ok(names)
}

/// bpftrace's map as printed on exit: `@[3]: 1234`.
pub(super) fn bpftrace_counts(stdout: &str, names: &BTreeMap<u32, String>) -> Counts {
    let mut by_reason = BTreeMap::new();
    for l in stdout.lines() {
        let Some((key, n)) = l
            .trim()
            .strip_prefix("@[")
            .and_then(|r| r.split_once("]: "))
        else {
            continue;
        };
        let (Ok(code), Ok(n)) = (key.parse::<u32>(), n.trim().parse::<u64>()) else {
            continue;
        };
        let name = names
            .get(&code)
            .cloned()
            .unwrap_or_else(|| code.to_string());
        *by_reason.entry(name).or_insert(0) += n;
    }
    Counts {
        by_reason,
        scope: "machine-wide",
        ..Counts::default()
    }
}

/// The samples of metric `name` in Prometheus text: `(labels, value)`.
pub(super) fn samples<'a>(
    text: &'a str,
    name: &'a str,
) -> impl Iterator<Item = (&'a str, u64)> + 'a {
    text.lines().filter_map(move |l| {
        let (labels, value) = l.strip_prefix(name)?.rsplit_once(' ')?;
        if !labels.is_empty() && !labels.starts_with('{') {
            return None;
        }
        Some((labels, value.parse::<f64>().ok()? as u64))
    })
}

pub(super) fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels.split(&format!("{key}=\"")).nth(1)?.split('"').next()
}

/// The agent's metrics: exact per-reason counts from `lbtrace_kernel_drops_total`, delivered
/// drop records from `lbtrace_events_total{kind="drop"}`, lost from `lbtrace_events_lost_total`.
pub(super) fn metrics_counts(text: &str) -> Counts {
    let mut by_reason = BTreeMap::new();
    for (labels, n) in samples(text, "lbtrace_kernel_drops_total") {
        if let Some(r) = label(labels, "reason") {
            *by_reason.entry(r.to_owned()).or_insert(0) += n;
        }
    }
    let delivered = samples(text, "lbtrace_events_total")
        .filter(|(l, _)| label(l, "kind") == Some("drop"))
        .map(|(_, n)| n)
        .sum();
    let lost = samples(text, "lbtrace_events_lost_total")
        .map(|(_, n)| n)
        .sum();
    let sampled_out = samples(text, "lbtrace_events_sampled_out_total")
        .map(|(_, n)| n)
        .sum();
    Counts {
        seen: Some(by_reason.values().sum()),
        by_reason,
        delivered: Some(delivered),
        lost: Some(lost),
        sampled_out: Some(sampled_out),
        scope: "netns (in-kernel filter)",
        received: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_tracers_print() {
        let names = print_symbolic(
            "print fmt: \"reason: %s\", __print_symbolic(REC->reason, { 2, \"NOT_SPECIFIED\" }, { 3, \"NO_SOCKET\" }, { 0x10, \"IP_RPFILTER\" })",
            "REC->reason",
        )
        .unwrap();
        assert_eq!(names[&16], "IP_RPFILTER");
        let b = bpftrace_counts("Attaching 1 probe...\n\n\n@[12]: 5\n@[3]: 100\n", &names);
        assert_eq!(b.by_reason["NO_SOCKET"], 100);
        assert_eq!(b.by_reason["12"], 5);
        let w = lbtrace_summary(
            "{\"kind\":\"drop\"}\n{\"kind\":\"summary\",\"drops_by_reason\":{\"NO_SOCKET\":7},\"events_seen\":7,\"events_delivered\":6,\"events_lost\":1}\n",
        )
        .unwrap();
        assert_eq!(
            (w.by_reason["NO_SOCKET"], w.seen, w.lost),
            (7, Some(7), Some(1))
        );
        let m = metrics_counts(concat!(
            "# HELP x\n",
            "lbtrace_drops_total{vip=\"a\",reason=\"NO_SOCKET\"} 4\n",
            "lbtrace_kernel_drops_total{reason=\"NO_SOCKET\",node=\"n\"} 6\n",
            "lbtrace_events_total{kind=\"drop\",node=\"n\"} 5\n",
            "lbtrace_events_total{kind=\"arp\",node=\"n\"} 9\n",
            "lbtrace_events_lost_total{cpu=\"0\",node=\"n\"} 1\n",
        ));
        assert_eq!(
            (m.by_reason["NO_SOCKET"], m.seen, m.delivered, m.lost),
            (6, Some(6), Some(5), Some(1))
        );
    }
}
