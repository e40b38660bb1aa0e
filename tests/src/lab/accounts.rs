//! The three accounts of a scenario per VIP (the client's, the kernel's, lbtrace's), how
//! lbtrace's records of a VIP are classed, and the checks over them.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;

use super::generator::{Report, Totals};

/// What a VIP is for in a scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Loses traffic: client, kernel and lbtrace must agree on how much.
    Affected,
    /// Takes a wrong path that loses nothing (an extra hop): only a kernel counter shows it.
    Hidden,
    /// Must lose nothing and show no drops.
    Control,
    /// Moves between nodes that each serve it: the three accounts agree (on nothing lost, as a
    /// rule), and the diagnosis names the move's cause.
    Moved,
    /// Loses traffic where no host lbtrace sees can drop it (node loss: frames to a host gone
    /// from the LAN): client and kernel agree, lbtrace counts no loss (only the copies the
    /// bridge floods to bystanders, local noise), and its diagnosis still names the cause.
    Unseen,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Affected => "affected",
            Role::Hidden => "hidden",
            Role::Control => "control",
            Role::Unseen => "unseen",
            Role::Moved => "moved",
        }
    }
}

/// Drops a healthy host makes as part of normal traffic (kernel-notes.md, "Noise"): counted
/// apart, never as loss. `(reason, function)`.
pub const NOISE: [(&str, &str); 5] = [
    // The pure ACK a server has processed and discards, once per connection.
    ("NOT_SPECIFIED", "tcp_rcv_state_process"),
    ("QUEUE_PURGE", "sk_stream_kill_queues"),
    ("NOT_SPECIFIED", "udp_destruct_common"),
    // A copy of a frame for another host's MAC, flooded by the bridge (node-loss).
    ("OTHERHOST", "ip_rcv_core"),
    ("OTHERHOST", "ip6_rcv_core"),
];

/// What a `drop` or `conntrack` record tagged with a VIP stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// The loss of that service's traffic (TCP or UDP).
    Loss,
    /// Normal TCP and UDP discards ([`NOISE`]): not loss.
    Noise,
    /// Anything else tagged with the VIP (ICMP, neighbour discovery: a node soliciting a client
    /// from the VIP's address, say). Not the service's traffic, but still a drop: none is
    /// allowed on a control VIP.
    Other,
}

pub fn classify(e: &Value) -> Class {
    let function = e["location"].as_str().unwrap_or("").split('+').next();
    let noise = NOISE
        .iter()
        .any(|&(r, f)| e["reason"] == r && function == Some(f));
    if noise {
        Class::Noise
    } else if e["proto"] == "tcp" || e["proto"] == "udp" {
        Class::Loss
    } else {
        Class::Other
    }
}

#[derive(Clone, Debug)]
pub struct Check {
    pub ok: bool,
    pub what: String,
}

impl Check {
    pub fn new(ok: bool, what: String) -> Self {
        Self { ok, what }
    }
}

/// The three accounts for one VIP.
#[derive(Clone, Debug)]
pub struct VipOutcome {
    pub vip: IpAddr,
    pub role: Role,
    pub client: Totals,
    pub client_per_second: Vec<Totals>,
    /// Start of the first and last attempt that lost a packet.
    pub loss_span: Option<(Duration, Duration)>,
    pub kernel: u64,
    pub lbtrace: u64,
    pub lbtrace_by_reason: BTreeMap<String, u64>,
    /// Records of the VIP that are normal discards ([`Class::Noise`]), not in `lbtrace`.
    pub lbtrace_noise: u64,
    /// Records of the VIP that are neither its loss nor noise ([`Class::Other`]), by reason.
    pub lbtrace_other: BTreeMap<String, u64>,
    /// Of those, the ones lbtrace classes as loss (the rest it calls local noise).
    pub lbtrace_other_loss: u64,
    pub lbtrace_per_second: Vec<u64>,
}

pub fn vip_outcome(
    vip: IpAddr,
    role: Role,
    report: &Report,
    kernel: u64,
    events: &[Value],
) -> VipOutcome {
    let seconds = report.duration.as_secs().max(1) as usize;
    let mut by_reason = BTreeMap::new();
    let mut per_second = vec![0; seconds];
    let (mut noise, mut other, mut other_loss) = (0, BTreeMap::new(), 0);
    let vip_s = vip.to_string();
    for e in events.iter().filter(|e| {
        (e["kind"] == "drop" || e["kind"] == "conntrack") && e["vip"].as_str() == Some(&vip_s)
    }) {
        match classify(e) {
            Class::Loss => {}
            Class::Noise => {
                noise += 1;
                continue;
            }
            Class::Other => {
                let what = format!(
                    "{} {}",
                    e["reason"].as_str().unwrap_or("?"),
                    e["proto"].as_str().unwrap_or("?")
                );
                *other.entry(what).or_insert(0) += 1;
                other_loss += u64::from(e["class"] == "loss");
                continue;
            }
        }
        let reason = match e["kind"].as_str() {
            Some("conntrack") => format!("conntrack {}", e["event"].as_str().unwrap_or("?")),
            _ => e["reason"].as_str().unwrap_or("?").to_owned(),
        };
        *by_reason.entry(reason).or_insert(0) += 1;
        if let Some(t) = e["time"].as_str().and_then(parse_rfc3339) {
            let s = t
                .duration_since(report.started)
                .unwrap_or_default()
                .as_secs() as usize;
            per_second[s.min(seconds - 1)] += 1;
        }
    }
    VipOutcome {
        vip,
        role,
        client: report.totals(vip),
        client_per_second: report.per_second(vip),
        loss_span: report.loss_span(vip),
        kernel,
        lbtrace: by_reason.values().sum(),
        lbtrace_by_reason: by_reason,
        lbtrace_noise: noise,
        lbtrace_other: other,
        lbtrace_other_loss: other_loss,
        lbtrace_per_second: per_second,
    }
}

/// `lbtrace_lost`: the summary's `events_lost`; `None` (missing) fails like a loss.
pub fn accounting_checks(vips: &[VipOutcome], lbtrace_lost: Option<u64>) -> Vec<Check> {
    let mut checks = vec![Check::new(
        lbtrace_lost == Some(0),
        format!("lbtrace lost {lbtrace_lost:?} events (ring buffer; None: not in its summary)"),
    )];
    for v in vips {
        let (vip, lost, k, l) = (v.vip, v.client.lost(), v.kernel, v.lbtrace);
        if v.role == Role::Control {
            let other: u64 = v.lbtrace_other.values().sum();
            checks.push(Check::new(
                other == 0,
                format!(
                    "{vip} ({}): no drop record of any other kind either ({:?})",
                    v.role.name(),
                    v.lbtrace_other
                ),
            ));
        }
        match v.role {
            Role::Control => checks.push(Check::new(
                lost == 0 && k == 0 && l == 0,
                format!("{vip} (control): client lost {lost}, kernel {k}, lbtrace {l}: all 0"),
            )),
            Role::Hidden => checks.push(Check::new(
                lost == 0 && l == 0 && k > 0,
                format!("{vip} (hidden): client lost {lost} and lbtrace {l} are 0, yet {k} packets took the stale path"),
            )),
            Role::Unseen => {
                checks.push(Check::new(
                    lost > 0 && k == lost && l == 0,
                    format!("{vip} (unseen): client lost {lost} > 0, kernel {k} = client, lbtrace {l} = 0 (lost on a host gone from the LAN)"),
                ));
            }
            Role::Moved => checks.push(Check::new(
                lost == k && l == k,
                format!("{vip} (moved): client lost {lost} = kernel {k} = lbtrace {l}"),
            )),
            Role::Affected => {
                checks.push(Check::new(
                    lost > 0,
                    format!("{vip}: the client lost {lost} packets ({} failed attempts + {} retransmissions)", v.client.failed, v.client.retrans),
                ));
                checks.push(Check::new(
                    k == lost,
                    format!("{vip}: kernel {k} = client {lost}"),
                ));
                checks.push(Check::new(
                    l == k,
                    format!("{vip}: lbtrace {l} = kernel {k}"),
                ));
            }
        }
    }
    checks
}

/// The diagnosis of `lbtrace diagnose --json`, one object per VIP (`by_vip`), against the
/// scenario: the injected cause first for the affected VIPs, no finding at all for the control
/// and hidden ones (a VIP missing from the output fails: it was not diagnosed at all); for stale
/// ARP, the measured window within one bucket (1 s) of the client's failure window.
pub fn finding_checks(
    expected: Option<&str>,
    vips: &[VipOutcome],
    by_vip: &BTreeMap<String, Value>,
) -> Vec<Check> {
    let mut checks = Vec::new();
    for v in vips {
        let Some(findings) = by_vip
            .get(&v.vip.to_string())
            .and_then(|d| d["findings"].as_array())
        else {
            checks.push(Check::new(
                false,
                format!("{}: not in the diagnosis", v.vip),
            ));
            continue;
        };
        let causes: Vec<&str> = findings
            .iter()
            .filter_map(|f| f["cause"].as_str())
            .collect();
        match (v.role, expected) {
            (Role::Affected | Role::Unseen | Role::Moved, Some(cause)) => {
                checks.push(Check::new(
                    causes.first() == Some(&cause),
                    format!("{}: diagnosis names {cause} first ({causes:?})", v.vip),
                ));
                if cause == "stale-arp" {
                    let window = findings[0]["evidence"]["window_s"].as_f64().unwrap_or(-1.0);
                    let client = v.loss_span.map_or(0.0, |(a, b)| (b - a).as_secs_f64());
                    checks.push(Check::new(
                        (window - client).abs() <= 1.0,
                        format!("{}: stale-ARP window {window:.1} s vs the client's {client:.1} s (within 1 s)", v.vip),
                    ));
                }
            }
            (role, _) => checks.push(Check::new(
                causes.is_empty(),
                format!(
                    "{} ({}): no finding for a VIP that loses nothing ({causes:?})",
                    v.vip,
                    role.name()
                ),
            )),
        }
    }
    checks
}

/// The watch summary's per-VIP loss (`drops_by_vip`, loss only) against lbtrace's records the
/// lab does not count as noise: equal for every VIP, so 0 for control and hidden ones.
pub fn summary_checks(vips: &[VipOutcome], summary: &Value) -> Vec<Check> {
    vips.iter()
        .map(|v| {
            let by = &summary["drops_by_vip"][v.vip.to_string()];
            let total: u64 = by
                .as_object()
                .map_or(0, |m| m.values().filter_map(Value::as_u64).sum());
            // The summary's loss: the lab's loss, and other records lbtrace classes as loss.
            let records = v.lbtrace + v.lbtrace_other_loss;
            Check::new(
                total == records,
                format!(
                    "{} ({}): the watch summary's loss {total} = lbtrace's loss records {records}",
                    v.vip,
                    v.role.name(),
                ),
            )
        })
        .collect()
}

/// lbtrace's `class` of every drop record agrees with the lab's: the lab's noise is benign
/// or local noise, a TCP/UDP drop the lab counts as loss is loss.
pub fn class_checks(events: &[Value]) -> Vec<Check> {
    let mut wrong = BTreeMap::new();
    let mut n = 0;
    for e in events
        .iter()
        .filter(|e| e["kind"] == "drop" || e["kind"] == "conntrack")
    {
        let ours = classify(e);
        let theirs = e["class"].as_str().unwrap_or("missing");
        let agree = match ours {
            Class::Noise => theirs == "benign" || theirs == "local-noise",
            Class::Loss => theirs == "loss",
            Class::Other => true,
        };
        n += 1;
        if !agree {
            let what = format!(
                "{} at {}: {theirs}",
                e["reason"].as_str().unwrap_or("?"),
                e["location"].as_str().unwrap_or("?")
            );
            *wrong.entry(what).or_insert(0u64) += 1;
        }
    }
    vec![Check::new(
        wrong.is_empty(),
        format!(
            "lbtrace's class of {n} drop records agrees with the lab's (disagreeing: {wrong:?})"
        ),
    )]
}

/// A stale-ARP finding started mid-incident names the old owner's MAC and, per affected VIP,
/// the client with a window within 1 s of its measured loss window.
pub fn client_window_checks(
    vips: &[VipOutcome],
    by_vip: &BTreeMap<String, Value>,
    old_mac: &str,
) -> Vec<Check> {
    let mut checks = Vec::new();
    for v in vips.iter().filter(|v| v.role == Role::Affected) {
        let e = by_vip
            .get(&v.vip.to_string())
            .map_or(&Value::Null, |d| &d["findings"][0]["evidence"]);
        checks.push(Check::new(
            e["old_mac"] == old_mac,
            format!("{}: old owner {} (n0 is {old_mac})", v.vip, e["old_mac"]),
        ));
        let client = if v.vip.is_ipv4() {
            "10.200.0.1"
        } else {
            "fd00:200::1"
        };
        let measured = v.loss_span.map_or(0.0, |(a, b)| (b - a).as_secs_f64());
        let window = e["clients"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["client"] == client))
            .and_then(|c| c["window_s"].as_f64());
        checks.push(Check::new(
            window.is_some_and(|w| (w - measured).abs() <= 1.0),
            format!("{}: client {client}'s window {window:?} s vs its measured {measured:.1} s (within 1 s)", v.vip),
        ));
    }
    checks
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction]Z` (lbtrace's `time`).
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let (date, time) = s.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.splitn(3, '-').map(str::parse::<i64>);
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.splitn(3, ':').map(str::parse::<i64>);
    let (h, mi, sec) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    // Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let secs = u64::try_from(days * 86_400 + h * 3600 + mi * 60 + sec).ok()?;
    let nanos = format!("{frac:0<9}").get(..9)?.parse().ok()?;
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn outcome(vip: &str, role: Role, events: &[Value]) -> VipOutcome {
        let report = Report {
            started: UNIX_EPOCH,
            duration: Duration::from_secs(1),
            attempts: Vec::new(),
        };
        vip_outcome(vip.parse().unwrap(), role, &report, 0, events)
    }

    fn drop(vip: &str, reason: &str, proto: &str, location: &str) -> Value {
        json!({"kind": "drop", "vip": vip, "reason": reason, "proto": proto, "location": location})
    }

    fn failed(checks: &[Check]) -> Vec<&str> {
        checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.what.as_str())
            .collect()
    }

    #[test]
    fn parses_lbtrace_time() {
        let t = parse_rfc3339("2026-11-26T03:16:08.123456789Z").unwrap();
        let d = t.duration_since(UNIX_EPOCH).unwrap();
        assert_eq!(d.as_secs(), 1_795_662_968);
        assert_eq!(d.subsec_nanos(), 123_456_789);
        let t = parse_rfc3339("1970-01-01T00:00:00Z").unwrap();
        assert_eq!(t, UNIX_EPOCH);
    }

    #[test]
    fn a_missing_loss_count_fails() {
        assert_eq!(failed(&accounting_checks(&[], Some(0))).len(), 0);
        assert_eq!(failed(&accounting_checks(&[], None)).len(), 1);
        assert_eq!(failed(&accounting_checks(&[], Some(3))).len(), 1);
    }

    #[test]
    fn other_records_of_a_control_vip_fail() {
        let ctl = "10.200.0.101";
        let noise = drop(ctl, "NOT_SPECIFIED", "tcp", "tcp_rcv_state_process+0x1");
        let icmp = drop(ctl, "IP_INADDRERRORS", "icmp", "ip_error+0x2");
        let clean = outcome(ctl, Role::Control, std::slice::from_ref(&noise));
        assert_eq!((clean.lbtrace, clean.lbtrace_noise), (0, 1));
        assert!(failed(&accounting_checks(&[clean], Some(0))).is_empty());
        {
            let dirty = outcome(ctl, Role::Control, &[noise.clone(), icmp.clone()]);
            assert_eq!(dirty.lbtrace_other.values().sum::<u64>(), 1);
            let f = accounting_checks(&[dirty], Some(0));
            assert!(
                failed(&f)
                    .iter()
                    .any(|w| w.contains("no drop record of any other kind")),
                "{f:?}"
            );
        }
    }

    #[test]
    fn a_finding_on_a_hidden_or_control_vip_fails() {
        let b = "10.200.0.102";
        let none = BTreeMap::from([(b.to_owned(), json!({"vip": b, "findings": []}))]);
        let some = BTreeMap::from([(
            b.to_owned(),
            json!({"vip": b, "findings": [{"cause": "stale-arp"}]}),
        )]);
        for role in [Role::Hidden, Role::Control] {
            let v = [outcome(b, role, &[])];
            assert!(failed(&finding_checks(Some("stale-arp"), &v, &none)).is_empty());
            assert_eq!(
                failed(&finding_checks(Some("stale-arp"), &v, &some)).len(),
                1
            );
            assert_eq!(failed(&finding_checks(None, &v, &BTreeMap::new())).len(), 1);
        }
    }
}
