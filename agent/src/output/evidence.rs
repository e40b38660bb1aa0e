//! A finding's evidence for a person: sentences and small tables, times relative to the
//! incident (the first finding of the report), never raw JSON.

use std::fmt::Write as _;

use super::timeline::number;
use crate::{
    analysis::diagnosis::{Counts, Evidence, StaleArpEvidence},
    event::values::Time,
};

pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `+3.2 s` from the incident's start.
pub fn rel(t: Time, t0: f64) -> String {
    let d = t.as_secs_f64() - t0;
    if d < 0.0 {
        format!("−{:.1} s", -d)
    } else {
        format!("+{d:.1} s")
    }
}

/// `NO_SOCKET 12, TCP_RESET 3`, largest first.
fn counts(c: &Counts) -> String {
    let mut v: Vec<(&String, &u64)> = c.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let parts: Vec<String> = v.iter().map(|(k, n)| format!("{k} {n}")).collect();
    esc(&parts.join(", "))
}

fn table(o: &mut String, head: &[&str], rows: &[Vec<String>]) {
    o.push_str("<table class=\"evidence\"><tr>");
    for h in head {
        let _ = write!(o, "<th>{h}</th>");
    }
    o.push_str("</tr>");
    for r in rows {
        o.push_str("<tr>");
        for c in r {
            let _ = write!(o, "<td>{c}</td>");
        }
        o.push_str("</tr>");
    }
    o.push_str("</table>");
}

fn mac(m: Option<&String>) -> String {
    m.map_or_else(
        || "unknown".to_owned(),
        |m| format!("<code>{}</code>", esc(m)),
    )
}

/// The evidence of a finding as HTML (already escaped).
pub fn evidence_html(e: &Evidence, t0: f64) -> String {
    let mut o = String::new();
    match e {
        Evidence::Conntrack(c) => {
            let _ = write!(
                o,
                "<p>{} drops conntrack caused ({}), in network namespace {}.</p>",
                c.drops,
                counts(&c.events),
                counts(&c.netns)
            );
        }
        Evidence::Mtu(m) => {
            let _ = write!(
                o,
                "<p>{} packets were larger than a hop allows ({}), refused in {}.</p>",
                m.drops,
                counts(&m.reasons),
                counts(&m.functions)
            );
        }
        Evidence::StaleArp(s) => stale(&mut o, s, t0),
        Evidence::Failover(f) => {
            let mut what = format!("<p>The VIP moved {} time(s)", f.ownership_changes);
            if f.flapping {
                what.push_str(", often enough to be flapping");
            }
            if f.split_brain {
                what.push_str("; two hosts held it at once (split brain)");
            }
            let _ = write!(
                o,
                "{what}; {} drops within 10 s of a move.</p>",
                f.drops_near_changes
            );
            let rows: Vec<Vec<String>> = f
                .changes
                .iter()
                .map(|c| {
                    vec![
                        rel(c.time, t0),
                        mac(c.from.as_ref()),
                        mac(Some(&c.to)),
                        c.garps.to_string(),
                        c.because.as_ref().map_or(String::new(), |b| esc(&b.says)),
                    ]
                })
                .collect();
            if !rows.is_empty() {
                table(
                    &mut o,
                    &["when", "from", "to", "gratuitous announcements", "because"],
                    &rows,
                );
            }
        }
        Evidence::Churn(c) => {
            let _ = write!(
                o,
                "<p>{} packets reached backends with no listener ({}), in {} burst(s), at {}.</p>",
                c.drops,
                counts(&c.reasons),
                c.bursts,
                counts(&c.backends)
            );
        }
        Evidence::Policy(p) => {
            let _ = write!(
                o,
                "<p>{} packets to backends were dropped by a filter ({}), in namespace {}; {}.</p>",
                p.drops,
                counts(&p.backends),
                counts(&p.netns),
                if p.stopped {
                    "the drops stopped before the end, as when a policy arrives late"
                } else {
                    "they were still happening at the end"
                }
            );
        }
    }
    o
}

fn stale(o: &mut String, s: &StaleArpEvidence, t0: f64) {
    let moved = match (&s.moved_at, &s.new_mac) {
        (Some(t), Some(m)) => format!(
            "the VIP moved to <code>{}</code> at {}",
            esc(m),
            rel(*t, t0)
        ),
        _ => "no move was seen".to_owned(),
    };
    let _ = write!(
        o,
        "<p>Clients kept sending the VIP's traffic to {} for {} s; {moved}. {} packets were dropped there ({}); {} gratuitous announcement(s) after the move, {} client cache update(s) seen.</p>",
        mac(s.old_mac.as_ref()),
        number(s.window_s),
        s.drops_at_old_owner,
        counts(&s.reasons),
        s.garps_sent,
        s.client_updates_seen
    );
    let rows: Vec<Vec<String>> = s
        .clients
        .iter()
        .map(|c| {
            vec![
                esc(&c.client),
                mac(c.client_mac.as_ref()),
                mac(c.stale_mac.as_ref()),
                rel(c.first_seen, t0),
                rel(c.last_seen, t0),
                format!("{} s", number(c.window_s)),
                c.drops.to_string(),
            ]
        })
        .collect();
    if !rows.is_empty() {
        table(
            o,
            &[
                "client",
                "its MAC",
                "sent to (stale)",
                "from",
                "to",
                "window",
                "drops",
            ],
            &rows,
        );
    }
}
