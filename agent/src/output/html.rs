//! Text timelines and the self-contained HTML report (inline SVG, no scripts, no fetches).

use std::{collections::BTreeMap, fmt::Write as _};

use super::{
    evidence::{esc, evidence_html, rel},
    timeline::{clock, number},
};
use crate::{
    analysis::{Analyzer, Bucket, VipDiagnosis},
    event::Record,
};

const COLOURS: [&str; 12] = [
    "#d62728", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#393b79", "#ad494a",
];

/// One colour per reason for the whole report: every chart shows a reason in the same colour.
type Colours = BTreeMap<String, &'static str>;

fn colours(a: &Analyzer) -> Colours {
    let mut reasons: Vec<String> = Vec::new();
    for vip in a.vips() {
        if let Some(tl) = a.timeline(&vip) {
            reasons.extend(tl.total().drops_by_reason.into_keys());
        }
    }
    reasons.sort();
    reasons.dedup();
    reasons
        .into_iter()
        .enumerate()
        .map(|(i, r)| (r, COLOURS[i % COLOURS.len()]))
        .collect()
}

/// A stacked bar chart of drops by reason per bucket, with ownership moves as lines.
fn chart(a: &Analyzer, vip: &str, colour: &Colours) -> String {
    let Some(tl) = a.timeline(vip) else {
        return "<p>No events for this VIP.</p>".into();
    };
    let buckets: Vec<(u64, u64, &Bucket)> = tl.buckets().collect();
    let (Some(first), Some(last)) = (buckets.first(), buckets.last()) else {
        return "<p>No events for this VIP.</p>".into();
    };
    let (t0, t1) = (first.0, last.0 + last.1);
    let span = (t1 - t0).max(1) as f64;
    let max = buckets
        .iter()
        .map(|(_, _, b)| b.drops)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let reasons = reason_totals(&buckets);
    let (w, h, left, bottom) = (900.0, 240.0, 40.0, 20.0);
    let plot_w = w - left - 10.0;
    let plot_h = h - bottom - 10.0;
    // A move older than the oldest bucket kept (rolled off a long recording) sits at the left.
    let x = |t: u64| left + t.saturating_sub(t0) as f64 / span * plot_w;
    let mut svg = format!(
        "<svg class=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"drops by reason for {}\">",
        esc(vip)
    );
    let _ = write!(
        svg,
        "<line x1=\"{left}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"#333\"/><text x=\"2\" y=\"14\" font-size=\"11\">{}</text><text x=\"{left}\" y=\"{ty}\" font-size=\"11\">{}</text><text x=\"{r2}\" y=\"{ty}\" font-size=\"11\" text-anchor=\"end\">{}</text>",
        max as u64,
        clock(t0),
        clock(t1),
        b = h - bottom,
        r = w - 10.0,
        ty = h - 4.0,
        r2 = w - 10.0,
    );
    for (start, width, b) in &buckets {
        let bw = ((*width as f64) / span * plot_w).max(1.0);
        let mut y = h - bottom;
        for (reason, n) in &b.drops_by_reason {
            let bh = *n as f64 / max * plot_h;
            y -= bh;
            let _ = write!(
                svg,
                "<rect class=\"bar\" x=\"{:.1}\" y=\"{y:.1}\" width=\"{bw:.1}\" height=\"{bh:.1}\" fill=\"{}\"><title>{} {}: {n}</title></rect>",
                x(*start),
                colour.get(reason).unwrap_or(&"#999"),
                clock(*start),
                esc(reason),
            );
        }
    }
    for (t, from, to) in a.changes(vip) {
        let xt = x(t as u64);
        let from = from.map(|m| m.to_string());
        let _ = write!(
            svg,
            "<line class=\"failover\" x1=\"{xt:.1}\" y1=\"10\" x2=\"{xt:.1}\" y2=\"{}\" stroke=\"#000\" stroke-dasharray=\"4 3\"><title>VIP moved {} -&gt; {}</title></line>",
            h - bottom,
            esc(from.as_deref().unwrap_or("?")),
            esc(&to.to_string())
        );
    }
    svg.push_str("</svg>");
    legend(&mut svg, &reasons, colour);
    svg
}

/// Drops per reason over all buckets.
fn reason_totals<'a>(buckets: &[(u64, u64, &'a Bucket)]) -> BTreeMap<&'a str, u64> {
    let mut reasons: BTreeMap<&str, u64> = BTreeMap::new();
    for (_, _, b) in buckets {
        for (r, n) in &b.drops_by_reason {
            *reasons.entry(r).or_default() += n;
        }
    }
    reasons
}

fn legend(o: &mut String, reasons: &BTreeMap<&str, u64>, colour: &Colours) {
    o.push_str("<div class=\"legend\">");
    for (r, n) in reasons {
        let _ = write!(
            o,
            "<span><i style=\"background:{}\"></i>{} ({n})</span> ",
            colour.get(*r).unwrap_or(&"#999"),
            esc(r)
        );
    }
    o.push_str("<span><i class=\"dash\"></i>VIP moved</span></div>");
}

/// The whole report: per VIP, the chart, the findings and the top flows.
pub fn html(a: &Analyzer, diagnosis: &[VipDiagnosis], records: &[Record], title: &str) -> String {
    let mut o = String::new();
    let _ = write!(
        o,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title><style>\
body{{font-family:sans-serif;margin:2em;color:#222}}h2{{border-bottom:1px solid #ccc}}\
table{{border-collapse:collapse;margin:.5em 0;max-width:100%}}td p{{margin:.2em 0}}table.evidence{{font-size:12px}}table.evidence td,tr.finding td:nth-child(3),tr.finding td:nth-child(4){{white-space:nowrap}}td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}}\
.legend span{{margin-right:1em;font-size:12px}}.legend i{{display:inline-block;width:10px;height:10px;margin-right:4px}}\
.legend i.dash{{border-top:2px dashed #000;height:0;width:14px}}.none{{color:#080}}</style></head><body><h1>{t}</h1>",
        t = esc(title)
    );
    let colour = colours(a);
    // The incident starts with the first finding of any VIP: every time is relative to it.
    let t0 = diagnosis
        .iter()
        .flat_map(|d| &d.findings)
        .map(|f| f.first_seen.as_secs_f64())
        .fold(f64::INFINITY, f64::min);
    if t0.is_finite() {
        let _ = write!(
            o,
            "<p>Times in the findings are relative to the incident's start, {} UTC (the first drop of any finding).</p>",
            clock(t0 as u64)
        );
    }
    // A diagnosis from metrics says what they cannot show (the same for every VIP).
    for l in diagnosis
        .first()
        .map(|d| d.limits.as_slice())
        .unwrap_or_default()
    {
        let _ = write!(o, "<p class=\"limit\">note: {}</p>", esc(l));
    }
    for d in diagnosis {
        let vip = d.vip.as_str();
        let _ = write!(
            o,
            "<section class=\"vip\" data-vip=\"{}\"><h2>VIP {}</h2>",
            esc(vip),
            esc(&d.title())
        );
        o.push_str(&chart(a, vip, &colour));
        findings_table(&mut o, d, t0);
        top_flows(&mut o, vip, records);
        o.push_str("</section>");
    }
    o.push_str("</body></html>\n");
    o
}

fn findings_table(o: &mut String, d: &VipDiagnosis, t0: f64) {
    if d.findings.is_empty() {
        o.push_str("<p class=\"none\">No finding: nothing wrong was seen for this VIP.</p>");
        return;
    }
    o.push_str("<h3>Findings (most likely first)</h3><table><tr><th>cause</th><th>confidence</th><th>first seen</th><th>last seen</th><th>evidence</th><th>what to do</th></tr>");
    for f in &d.findings {
        let _ = write!(
            o,
            "<tr class=\"finding\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"evidence\">{}</td><td>{}</td></tr>",
            esc(f.cause.as_str()),
            number(f.confidence),
            rel(f.first_seen, t0),
            rel(f.last_seen, t0),
            evidence_html(&f.evidence, t0),
            esc(&f.hint),
        );
    }
    o.push_str("</table>");
    let statements: Vec<&String> = d.findings.iter().flat_map(|f| &f.statements).collect();
    if !statements.is_empty() {
        o.push_str("<ul class=\"statements\">");
        for s in statements {
            let _ = write!(o, "<li>{}</li>", esc(s));
        }
        o.push_str("</ul>");
    }
}

/// The flows that lost the most packets for the VIP (loss only).
fn top_flows(o: &mut String, vip: &str, records: &[Record]) {
    let mut flows: BTreeMap<String, u64> = BTreeMap::new();
    for r in records {
        let (Record::Drop(d) | Record::Conntrack(d)) = r else {
            continue;
        };
        if !d.is_loss() || d.vip.map(|v| v.to_string()).as_deref() != Some(vip) {
            continue;
        }
        let port = |p: Option<u16>| p.map_or("null".to_owned(), |p| p.to_string());
        let key = format!(
            "{} {}:{} -> {}:{} {}",
            d.proto.map_or("-".to_owned(), |p| p.to_string()),
            d.src.map_or("-".to_owned(), |a| a.to_string()),
            port(d.sport),
            d.dst.map_or("-".to_owned(), |a| a.to_string()),
            port(d.dport),
            d.reason
        );
        *flows.entry(key).or_default() += 1;
    }
    let mut top: Vec<_> = flows.into_iter().collect();
    top.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    if top.is_empty() {
        return;
    }
    o.push_str("<h3>Top flows</h3><table><tr><th>flow</th><th>drops</th></tr>");
    for (flow, n) in top.iter().take(10) {
        let _ = write!(o, "<tr><td>{}</td><td>{n}</td></tr>", esc(flow));
    }
    o.push_str("</table>");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{event::record::read_ndjson, output::timeline::text_timeline};

    #[test]
    fn report_has_a_chart_per_vip_and_escapes_text() {
        let mut a = Analyzer::new(["10.200.0.100".to_owned()]);
        let (recs, bad) = read_ndjson(
            r#"{"time": "2027-01-15T08:00:00Z", "kind": "drop", "reason": "NO_SOCKET", "netns": 1, "vip": "10.200.0.100", "dst": "10.200.0.100", "proto": "tcp"}
{"time": "2027-01-15T08:00:01Z", "kind": "drop", "reason": "<b>", "netns": 1, "vip": "10.200.0.100", "dst": "10.200.0.100"}"#,
        );
        assert_eq!((recs.len(), bad), (2, 0));
        for r in &recs {
            a.add(r);
        }
        let d = a.diagnose();
        let page = html(&a, &d, &recs, "lbtrace report");
        assert_eq!(page.matches("<svg class=\"chart\"").count(), 1);
        assert_eq!(page.matches("class=\"bar\"").count(), 2);
        assert!(!page.contains("<b>") && page.contains("&lt;b&gt;"));
        assert!(!page.contains("<script"), "self-contained, no scripts");
        let text = text_timeline(&a, "10.200.0.100", &d);
        assert!(text.contains("drops 1 [NO_SOCKET 1]"), "{text}");
    }
}
