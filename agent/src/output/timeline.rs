//! A VIP's timeline as text: one line per non-empty bucket, moves and findings marked.

use std::fmt::Write as _;

use crate::{
    analysis::{nodes::NodeNames, Analyzer, Bucket, Finding, VipDiagnosis},
    event::values::Mac,
    output::text::endpoint_change,
};

/// A number as JSON writes it (`0.9`, `11.0`): the form the diagnosis always printed.
pub fn number(x: f64) -> String {
    serde_json::to_string(&x).unwrap_or_default()
}

/// `HH:MM:SS` (UTC) of a Unix second; computed, not formatted through a date, so that any
/// second a recording holds prints (humantime refuses years past 9999).
pub fn clock(sec: u64) -> String {
    format!(
        "{:02}:{:02}:{:02}",
        sec / 3600 % 24,
        sec / 60 % 60,
        sec % 60
    )
}

/// One line per non-empty bucket, with ownership moves, endpoint changes (kube-proxy's rules)
/// and findings marked.
pub fn text_timeline(a: &Analyzer, vip: &str, diagnosis: &[VipDiagnosis]) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "timeline for VIP {}", a.title(vip));
    let Some(tl) = a.timeline(vip) else {
        let _ = writeln!(o, "  (no events for this VIP)");
        return o;
    };
    let mut marks = marks(a, vip);
    marks.sort_by(|x, y| x.0.total_cmp(&y.0));
    let mut marks = marks.into_iter().peekable();
    for (start, width, b) in tl.buckets() {
        while let Some((t, line)) = marks.next_if(|(t, _)| *t as u64 <= start) {
            let _ = writeln!(o, "{}  >>> {line}", clock(t as u64));
        }
        let parts = bucket_parts(b, &a.nodes);
        if !parts.is_empty() {
            let w = if width > 1 {
                format!(" ({width}s)")
            } else {
                String::new()
            };
            let _ = writeln!(o, "{}{w}  {}", clock(start), parts.join("; "));
        }
    }
    for (t, line) in marks {
        let _ = writeln!(o, "{}  >>> {line}", clock(t as u64));
    }
    let findings: Vec<&Finding> = diagnosis
        .iter()
        .filter(|d| d.vip == vip)
        .flat_map(|d| &d.findings)
        .collect();
    if findings.is_empty() {
        let _ = writeln!(o, "no finding");
    }
    for f in findings {
        let on = if f.nodes.is_empty() {
            String::new()
        } else {
            format!(
                " on {}",
                f.nodes.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        };
        let _ = writeln!(
            o,
            "finding: {}{on} (confidence {}) {} .. {}: {}",
            f.cause.as_str(),
            number(f.confidence),
            f.first_seen,
            f.last_seen,
            f.hint
        );
    }
    o
}

/// The VIP's moves (with the node that holds each MAC, when known) and its Services' endpoint
/// changes, each with its time.
fn marks(a: &Analyzer, vip: &str) -> Vec<(f64, String)> {
    let on = |m: Mac, nodes: &NodeNames| match nodes.of_mac(m) {
        Some(n) => format!("{m} ({n})"),
        None => m.to_string(),
    };
    let moves = a.moves(vip).into_iter().map(|(t, from, to, because)| {
        let from = from.map_or("?".to_owned(), |m| on(m, &a.nodes));
        (
            t,
            format!(
                "VIP moved {from} -> {}; because: {}",
                on(to, &a.nodes),
                because.says
            ),
        )
    });
    let endpoints = a
        .endpoint_changes(vip)
        .iter()
        .map(|(t, e)| (*t, format!("endpoint {}", endpoint_change(e))));
    moves.chain(endpoints).collect()
}

/// What a bucket holds, as parts of its line.
fn bucket_parts(b: &Bucket, nodes: &NodeNames) -> Vec<String> {
    let join = |items: Vec<String>| items.join(", ");
    let mut parts = Vec::new();
    if b.drops > 0 {
        let reasons = b.drops_by_reason.iter().map(|(r, n)| format!("{r} {n}"));
        let netns = b
            .drops_by_netns
            .iter()
            .map(|(ns, n)| match nodes.of_netns(*ns) {
                Some(node) => format!("{node}/{ns}:{n}"),
                None => format!("{ns}:{n}"),
            });
        parts.push(format!(
            "drops {} [{}] netns [{}]",
            b.drops,
            join(reasons.collect()),
            join(netns.collect())
        ));
    }
    if !b.conntrack.is_empty() {
        let ev = b.conntrack.iter().map(|(e, n)| format!("{e} {n}"));
        parts.push(format!("conntrack [{}]", join(ev.collect())));
    }
    if b.garps > 0 {
        parts.push(format!("garp {}", b.garps));
    }
    if b.neigh_changes > 0 {
        parts.push(format!("client neighbour updates {}", b.neigh_changes));
    }
    parts
}
