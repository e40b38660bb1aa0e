//! kube-proxy's iptables mode, from `iptables-save` / `ip6tables-save`:
//! - nat `KUBE-SERVICES`: `-d IP -p proto --dport N` with `"ns/svc:port cluster IP"`,
//!   `"… loadbalancer IP"` or `"… external IP"`, jumping to `KUBE-SVC-`/`KUBE-EXT-`/`KUBE-FW-`;
//! - `KUBE-SVC-`/`KUBE-SVL-` rules `"ns/svc:port -> IP:port"` jumping to `KUBE-SEP-` chains,
//!   which `DNAT --to-destination IP:port` (comments are left out in large clusters: the
//!   Service is then followed through the jumps);
//! - filter `KUBE-EXTERNAL-SERVICES` / `KUBE-SERVICES`: `"ns/svc:port has no local endpoints"`
//!   (DROP) and `"ns/svc:port has no endpoints"` (REJECT).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use super::{
    parse_service_name, proto_number, Endpoint, Frontend, FrontendKind, Mode, NoEndpoints,
    NodeRules,
};
use crate::event::values::Name;

const SERVICES: &str = "KUBE-SERVICES";
const EXTERNAL_SERVICES: &str = "KUBE-EXTERNAL-SERVICES";
/// Chains whose rules belong to one Service port.
const SERVICE_CHAINS: [&str; 5] = [
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-EXT-",
    "KUBE-FW-",
    "KUBE-SEP-",
];
/// kube-proxy's own rules in KUBE-SERVICES that name no Service.
const NODEPORTS_COMMENT: &str = "kubernetes service nodeports";

/// One `-A` line, the options this reader uses.
#[derive(Debug, Default)]
struct Line {
    chain: String,
    dst: Option<IpAddr>,
    proto: Option<u8>,
    dport: Option<u16>,
    jump: Option<String>,
    comment: Option<String>,
    to: Option<SocketAddr>,
}

/// Splits an iptables-save line into words: `"…"` quoted, `\` escaping inside quotes.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let (mut quoted, mut any) = (false, false);
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            '\\' if quoted => cur.extend(chars.next()),
            c if c.is_whitespace() && !quoted => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                any = false;
            }
            c => cur.push(c),
        }
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn host(s: &str) -> Option<IpAddr> {
    let (ip, len) = s.split_once('/').unwrap_or((s, ""));
    let ip: IpAddr = ip.parse().ok()?;
    let full = if ip.is_ipv4() { "32" } else { "128" };
    (len.is_empty() || len == full).then_some(ip)
}

fn socket(s: &str) -> Option<SocketAddr> {
    s.parse().ok().or_else(|| {
        let (ip, port) = s.rsplit_once(':')?;
        Some(SocketAddr::new(ip.parse().ok()?, port.parse().ok()?))
    })
}

fn parse_line(w: &[String]) -> Option<Line> {
    let mut l = Line {
        chain: w.get(1)?.clone(),
        ..Line::default()
    };
    let mut i = 2;
    while i < w.len() {
        let v = w.get(i + 1).map(String::as_str);
        match w[i].as_str() {
            "-d" => l.dst = host(v?),
            "-p" => l.proto = proto_number(v?),
            "--dport" => l.dport = v?.parse().ok(),
            "-j" => l.jump = v.map(str::to_owned),
            "--comment" => l.comment = v.map(str::to_owned),
            "--to-destination" => l.to = socket(v?),
            "!" => {
                // A negated option says nothing about the rule's own address: skip it whole.
                i += 3;
                continue;
            }
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    Some(l)
}

/// The rules of one family, by table.
#[derive(Default)]
struct Tables {
    nat: Vec<Line>,
    filter: Vec<Line>,
    unknown: u64,
}

fn split(text: &str) -> Tables {
    let mut t = Tables::default();
    let mut table = "";
    for raw in text.lines() {
        let line = raw.trim();
        if let Some(name) = line.strip_prefix('*') {
            table = if name == "nat" || name == "filter" {
                name
            } else {
                ""
            };
            continue;
        }
        if line.is_empty() || line.starts_with('#') || line.starts_with(':') || line == "COMMIT" {
            continue;
        }
        let w = words(line);
        let ours = w.get(1).is_some_and(|c| c.starts_with("KUBE-"));
        if w.first().map(String::as_str) != Some("-A") || !ours {
            continue;
        }
        match (table, parse_line(&w)) {
            ("nat", Some(l)) => t.nat.push(l),
            ("filter", Some(l)) => t.filter.push(l),
            (_, None) => t.unknown += 1,
            _ => {}
        }
    }
    t
}

/// Parses one `iptables-save` (or `ip6tables-save`) output into `out`.
pub fn parse(text: &str, out: &mut NodeRules) {
    let t = split(text);
    out.skipped += t.unknown;
    if t.nat.iter().chain(&t.filter).any(|l| l.chain == SERVICES) {
        out.modes.insert(Mode::Iptables);
    }
    let owner = chain_owners(&t.nat, out);
    endpoints(&t.nat, &owner, out);
    for l in &t.filter {
        if l.chain == EXTERNAL_SERVICES || l.chain == SERVICES {
            no_endpoints(l, out);
        }
    }
}

/// `ns/svc:port cluster IP` → (name, kind).
fn frontend_comment(c: &str) -> Option<(Name, FrontendKind)> {
    for (suffix, kind) in [
        (" cluster IP", FrontendKind::ClusterIp),
        (" loadbalancer IP", FrontendKind::LoadBalancer),
        (" external IP", FrontendKind::ExternalIp),
    ] {
        if let Some(name) = c.strip_suffix(suffix) {
            return Some((parse_service_name(name)?, kind));
        }
    }
    None
}

fn is_service_chain(c: &str) -> bool {
    SERVICE_CHAINS.iter().any(|p| c.starts_with(p))
}

/// Which Service port each of its chains belongs to: from KUBE-SERVICES' comments, then along
/// the jumps (EXT → SVC/SVL → SEP), and from the chains' own comments where they have them.
fn chain_owners(nat: &[Line], out: &mut NodeRules) -> BTreeMap<String, Name> {
    let mut owner: BTreeMap<String, Name> = BTreeMap::new();
    for l in nat.iter().filter(|l| l.chain == SERVICES) {
        let c = l.comment.as_deref().unwrap_or("");
        if c.starts_with(NODEPORTS_COMMENT) {
            continue;
        }
        let Some((name, kind)) = frontend_comment(c) else {
            out.skipped += 1;
            continue;
        };
        if let (Some(ip), Some(proto), Some(port)) = (l.dst, l.proto, l.dport) {
            out.add_frontend(Frontend { ip, proto, port }, name.clone(), kind);
        }
        match &l.jump {
            Some(j) if is_service_chain(j) => {
                owner.insert(j.clone(), name);
            }
            _ => {}
        }
    }
    for l in nat.iter().filter(|l| is_service_chain(&l.chain)) {
        let named = l
            .comment
            .as_deref()
            .map(|c| c.split_once(" -> ").map_or(c, |(n, _)| n))
            .and_then(parse_service_name);
        if let Some(n) = named {
            owner.entry(l.chain.clone()).or_insert(n);
        }
    }
    // Jumps are at most EXT → FW → SVL/SVC → SEP deep.
    for _ in 0..4 {
        for l in nat.iter().filter(|l| is_service_chain(&l.chain)) {
            let (Some(from), Some(to)) = (owner.get(&l.chain), l.jump.as_ref()) else {
                continue;
            };
            if is_service_chain(to) && !owner.contains_key(to) {
                owner.insert(to.clone(), from.clone());
            }
        }
    }
    owner
}

/// The endpoints of each Service port: the SEP chains its SVC/SVL chains jump to (stale SEP
/// chains linger in large clusters, unreferenced), each with its DNAT.
fn endpoints(nat: &[Line], owner: &BTreeMap<String, Name>, out: &mut NodeRules) {
    let mut dnat: BTreeMap<&str, (SocketAddr, Option<u8>)> = BTreeMap::new();
    for l in nat.iter().filter(|l| l.chain.starts_with("KUBE-SEP-")) {
        match (l.jump.as_deref(), l.to) {
            (Some("DNAT"), Some(to)) => {
                dnat.insert(&l.chain, (to, l.proto));
            }
            (Some("DNAT"), None) => out.skipped += 1,
            _ => {}
        }
    }
    let mut used = BTreeSet::new();
    for l in nat
        .iter()
        .filter(|l| l.chain.starts_with("KUBE-SVC-") || l.chain.starts_with("KUBE-SVL-"))
    {
        let Some(sep) = l.jump.as_deref().filter(|j| j.starts_with("KUBE-SEP-")) else {
            continue;
        };
        if !used.insert(sep) {
            continue;
        }
        match (owner.get(sep), dnat.get(sep)) {
            (Some(service), Some(&(addr, Some(proto)))) => {
                out.add_endpoint(service.clone(), Endpoint { addr, proto });
            }
            _ => out.skipped += 1,
        }
    }
}

fn no_endpoints(l: &Line, out: &mut NodeRules) {
    let c = l.comment.as_deref().unwrap_or("");
    let (name, state) = if let Some(n) = c.strip_suffix(" has no local endpoints") {
        (n, NoEndpoints::NoLocalEndpoints)
    } else if let Some(n) = c.strip_suffix(" has no endpoints") {
        (n, NoEndpoints::NoEndpoints)
    } else {
        // Other filter rules (firewall, health check node ports) name no endpoint state.
        return;
    };
    let Some(name) = parse_service_name(name) else {
        out.skipped += 1;
        return;
    };
    if let (Some(ip), Some(proto), Some(port)) = (l.dst, l.proto, l.dport) {
        let kind = if l.chain == EXTERNAL_SERVICES {
            FrontendKind::External
        } else {
            FrontendKind::ClusterIp
        };
        out.add_frontend(Frontend { ip, proto, port }, name.clone(), kind);
    }
    let e = out.no_endpoints.entry(name).or_insert(state);
    *e = (*e).min(state);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// iptables-save of kube-proxy's iptables mode (the formats of its proxier.go), with a
    /// hand-made rule in KUBE-SERVICES and a large-cluster Service without comments.
    const SAVE: &str = include_str!("testdata/iptables-save.txt");

    #[test]
    fn words_keep_quoted_comments_whole() {
        assert_eq!(
            words(r#"-A X -m comment --comment "a/b:c -> 1.2.3.4:80" -j Y"#),
            [
                "-A",
                "X",
                "-m",
                "comment",
                "--comment",
                "a/b:c -> 1.2.3.4:80",
                "-j",
                "Y"
            ]
        );
        assert_eq!(
            words(r#"--comment "x \"y\"" """#),
            ["--comment", "x \"y\"", ""]
        );
    }

    #[test]
    fn services_endpoints_and_no_endpoint_states() {
        let mut r = NodeRules::default();
        parse(SAVE, &mut r);
        assert!(r.modes.contains(&Mode::Iptables));
        let f = |ip: &str, proto, port| Frontend {
            ip: ip.parse().unwrap(),
            proto,
            port,
        };
        let a: Name = "lab/a:http".into();
        assert_eq!(
            r.frontends[&f("10.200.0.100", 6, 80)],
            (a.clone(), FrontendKind::LoadBalancer)
        );
        assert_eq!(
            r.frontends[&f("10.96.0.10", 6, 80)],
            (a.clone(), FrontendKind::ClusterIp)
        );
        let eps = |s: &str| -> Vec<String> {
            r.endpoints[&Name::from(s)]
                .iter()
                .map(|e| e.addr.to_string())
                .collect()
        };
        assert_eq!(eps("lab/a:http"), ["10.200.11.2:8080", "10.200.11.3:8080"]);
        // No comments (large cluster mode): followed through the jumps.
        assert_eq!(eps("lab/big:dns"), ["10.200.12.2:5353"]);
        assert_eq!(
            r.no_endpoints[&Name::from("lab/ctl:http")],
            NoEndpoints::NoLocalEndpoints
        );
        assert_eq!(
            r.no_endpoints[&Name::from("lab/gone:http")],
            NoEndpoints::NoEndpoints
        );
        assert_eq!(
            r.frontends[&f("10.200.0.101", 6, 80)].1,
            FrontendKind::External
        );
        // The hand-made rule in KUBE-SERVICES and the stale, unreferenced SEP chain's
        // neighbour: a SVC rule jumping to a SEP chain without DNAT.
        assert_eq!(r.skipped, 2, "{r:?}");
    }
}
