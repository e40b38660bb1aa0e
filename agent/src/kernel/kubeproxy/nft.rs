//! kube-proxy's nftables mode, from `nft -j list ruleset`: the `service-ips` map
//! (`IP . proto . port : goto <chain>`), the endpoint chains (`endpoint-HASH-ns/svc/proto/port__IP/port`)
//! with their `dnat to`, and the `no-endpoint-services` map whose elements carry the Service's
//! name as comment (verdict `drop`: no local endpoints; `goto reject-chain`: no endpoints).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr, SocketAddr},
};

use serde::Deserialize;

use super::{
    parse_service_name, proto_number, service_name, Endpoint, Frontend, FrontendKind, Mode,
    NoEndpoints, NodeRules,
};
use crate::event::values::Name;

/// kube-proxy's table name, in families `ip` and `ip6`.
pub const TABLE: &str = "kube-proxy";
const SERVICE_IPS: &str = "service-ips";
const NO_ENDPOINT_SERVICES: &str = "no-endpoint-services";
const REJECT_CHAIN: &str = "reject-chain";
/// Maps and sets kube-proxy keeps that say nothing this reader needs.
const OTHER_MAPS: [&str; 6] = [
    "service-nodeports",
    "no-endpoint-nodeports",
    "firewall-ips",
    "nodeport-ips",
    "cluster-ips",
    "affinity",
];

#[derive(Debug, thiserror::Error)]
#[error("nft -j output is not JSON of the expected form: {0}")]
pub struct ParseError(#[from] serde_json::Error);

/// `nft -j list ruleset`: one object per table, chain, set, map or rule; other kinds ignored.
#[derive(Debug, Deserialize)]
struct Ruleset {
    nftables: Vec<Item>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Item {
    table: Option<Table>,
    chain: Option<Chain>,
    map: Option<Map>,
    rule: Option<Rule>,
}

#[derive(Debug, Deserialize)]
struct Table {
    family: String,
    name: String,
}

#[derive(Debug, Deserialize)]
struct Chain {
    family: String,
    table: String,
    name: String,
}

#[derive(Debug, Deserialize)]
struct Map {
    family: String,
    table: String,
    name: String,
    #[serde(default)]
    elem: Vec<(Key, Verdict)>,
}

/// A map key: a bare concatenation, or one wrapped with its comment.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Key {
    Commented { elem: CommentedElem },
    Plain(Concat),
}

#[derive(Debug, Deserialize)]
struct CommentedElem {
    val: Concat,
    #[serde(default)]
    comment: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Concat {
    Concat { concat: Vec<Scalar> },
    Other(serde::de::IgnoredAny),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Scalar {
    Num(u64),
    Text(String),
    Other(serde::de::IgnoredAny),
}

/// A verdict: `{"goto": {"target": …}}`, `{"jump": …}`, `{"drop": null}`, …
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Verdict {
    Goto { goto: Target },
    Jump { jump: Target },
    Other(BTreeMap<String, serde::de::IgnoredAny>),
}

#[derive(Debug, Deserialize)]
struct Target {
    target: String,
}

impl Verdict {
    fn chain(&self) -> Option<&str> {
        match self {
            Self::Goto { goto: t } | Self::Jump { jump: t } => Some(&t.target),
            Self::Other(_) => None,
        }
    }

    fn is_drop(&self) -> bool {
        matches!(self, Self::Other(m) if m.len() == 1 && m.contains_key("drop"))
    }
}

#[derive(Debug, Deserialize)]
struct Rule {
    family: String,
    table: String,
    chain: String,
    #[serde(default)]
    expr: Vec<Expr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Expr {
    dnat: Option<Dnat>,
}

#[derive(Debug, Deserialize)]
struct Dnat {
    addr: Option<Scalar>,
    port: Option<Scalar>,
}

fn ours(family: &str, table: &str) -> bool {
    table == TABLE && (family == "ip" || family == "ip6")
}

/// Parses `nft -j list ruleset` into `out` (both of kube-proxy's tables, when present).
pub fn parse(json: &str, out: &mut NodeRules) -> Result<(), ParseError> {
    let ruleset: Ruleset = serde_json::from_str(json)?;
    let mut dnats: BTreeMap<&str, Vec<&Dnat>> = BTreeMap::new();
    let mut chains = Vec::new();
    for item in &ruleset.nftables {
        if let Some(t) = &item.table {
            if ours(&t.family, &t.name) {
                out.modes.insert(Mode::Nftables);
            }
        }
        if let Some(c) = item.chain.as_ref().filter(|c| ours(&c.family, &c.table)) {
            chains.push(c.name.as_str());
        }
        if let Some(r) = item.rule.as_ref().filter(|r| ours(&r.family, &r.table)) {
            let d = dnats.entry(r.chain.as_str()).or_default();
            d.extend(r.expr.iter().filter_map(|e| e.dnat.as_ref()));
        }
    }
    for item in &ruleset.nftables {
        if let Some(m) = item.map.as_ref().filter(|m| ours(&m.family, &m.table)) {
            map(m, out);
        }
    }
    for c in chains {
        chain(c, dnats.get(c).map_or(&[][..], Vec::as_slice), out);
    }
    Ok(())
}

fn map(m: &Map, out: &mut NodeRules) {
    match m.name.as_str() {
        SERVICE_IPS => {
            for (key, verdict) in &m.elem {
                if service_ip(key, verdict, out).is_none() {
                    out.skipped += 1;
                }
            }
        }
        NO_ENDPOINT_SERVICES => {
            for (key, verdict) in &m.elem {
                if no_endpoint(key, verdict, out).is_none() {
                    out.skipped += 1;
                }
            }
        }
        n if OTHER_MAPS.iter().any(|o| n.starts_with(o)) => {}
        _ => out.skipped += 1,
    }
}

/// `IP . proto . port` of a map key.
fn frontend(c: &Concat) -> Option<Frontend> {
    let Concat::Concat { concat } = c else {
        return None;
    };
    let [Scalar::Text(ip), proto, Scalar::Num(port)] = concat.as_slice() else {
        return None;
    };
    let proto = match proto {
        Scalar::Text(p) => proto_number(p)?,
        Scalar::Num(n) => u8::try_from(*n).ok()?,
        Scalar::Other(_) => return None,
    };
    Some(Frontend {
        ip: ip.parse().ok()?,
        proto,
        port: u16::try_from(*port).ok()?,
    })
}

fn service_ip(key: &Key, verdict: &Verdict, out: &mut NodeRules) -> Option<()> {
    let (c, comment) = match key {
        Key::Plain(c) => (c, None),
        Key::Commented { elem } => (&elem.val, elem.comment.as_deref()),
    };
    let f = frontend(c)?;
    let target = verdict.chain()?;
    let (kind, rest) = if let Some(r) = target.strip_prefix("service-") {
        (FrontendKind::ClusterIp, r)
    } else if let Some(r) = target.strip_prefix("local-") {
        (FrontendKind::ClusterIp, r)
    } else if let Some(r) = target.strip_prefix("external-") {
        (FrontendKind::External, r)
    } else if let Some(r) = target.strip_prefix("firewall-") {
        (FrontendKind::External, r)
    } else {
        return None;
    };
    let name = match comment.and_then(parse_service_name) {
        Some(n) => n,
        None => chain_service(rest)?.0,
    };
    out.add_frontend(f, name, kind);
    Some(())
}

fn no_endpoint(key: &Key, verdict: &Verdict, out: &mut NodeRules) -> Option<()> {
    let Key::Commented { elem } = key else {
        return None;
    };
    let f = frontend(&elem.val)?;
    let name = parse_service_name(elem.comment.as_deref()?)?;
    let state = if verdict.is_drop() {
        NoEndpoints::NoLocalEndpoints
    } else if verdict.chain() == Some(REJECT_CHAIN) {
        NoEndpoints::NoEndpoints
    } else {
        return None;
    };
    let kind = match state {
        NoEndpoints::NoLocalEndpoints => FrontendKind::External,
        NoEndpoints::NoEndpoints => FrontendKind::Unknown,
    };
    out.add_frontend(f, name.clone(), kind);
    // A Service whose ClusterIP has endpoints but whose LB IP has no local ones is "no local
    // endpoints"; "no endpoints" (none anywhere) wins.
    let e = out.no_endpoints.entry(name).or_insert(state);
    *e = (*e).min(state);
    Some(())
}

/// `HASH-ns/svc/proto/port` (a chain name without its prefix) → the Service port's name and
/// protocol.
fn chain_service(rest: &str) -> Option<(Name, u8)> {
    let (hash, path) = rest.split_once('-')?;
    if hash.len() != 8 {
        return None;
    }
    let mut parts = path.splitn(4, '/');
    let (ns, name, proto, port) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    Some((service_name(ns, name, port)?, proto_number(proto)?))
}

/// An endpoint chain's address part, `IP/port` (IPv6 with `.` for `:`).
fn chain_endpoint(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.rsplit_once('/')?;
    let port: u16 = port.parse().ok()?;
    let ip: IpAddr = match ip.parse() {
        Ok(ip) => ip,
        Err(_) => IpAddr::V6(ip.replace('.', ":").parse::<Ipv6Addr>().ok()?),
    };
    Some(SocketAddr::new(ip, port))
}

fn dnat_target(d: &Dnat) -> Option<SocketAddr> {
    let Some(Scalar::Text(ip)) = &d.addr else {
        return None;
    };
    let Some(Scalar::Num(port)) = d.port else {
        return None;
    };
    Some(SocketAddr::new(ip.parse().ok()?, u16::try_from(port).ok()?))
}

/// A chain of kube-proxy's table: endpoint chains give endpoints; the others are known by
/// their names (a chain of another name is someone else's, skipped and counted).
fn chain(name: &str, dnats: &[&Dnat], out: &mut NodeRules) {
    const FIXED: [&str; 17] = [
        "filter-prerouting",
        "filter-input",
        "filter-forward",
        "filter-output",
        "filter-prerouting-pre-dnat",
        "filter-output-pre-dnat",
        "nat-prerouting",
        "nat-output",
        "nat-postrouting",
        "services",
        "endpoints-check",
        "firewall-check",
        "masquerading",
        "mark-for-masquerade",
        "reject-chain",
        "cluster-ips-check",
        "nodeport-endpoints-check",
    ];
    let Some(rest) = name.strip_prefix("endpoint-") else {
        let service_chain = ["service-", "local-", "external-", "firewall-"]
            .iter()
            .any(|p| name.strip_prefix(p).and_then(chain_service).is_some());
        if !service_chain && !FIXED.contains(&name) {
            out.skipped += 1;
        }
        return;
    };
    // Stale endpoint chains are flushed in the sync that drops them: no DNAT, no endpoint.
    if dnats.is_empty() {
        return;
    }
    let Some((svc, ep)) = rest.split_once("__") else {
        out.skipped += 1;
        return;
    };
    let Some((service, proto)) = chain_service(svc) else {
        out.skipped += 1;
        return;
    };
    // The DNAT says where traffic goes; the name only when the DNAT is of another form.
    match dnats
        .iter()
        .find_map(|d| dnat_target(d))
        .or_else(|| chain_endpoint(ep))
    {
        Some(addr) => out.add_endpoint(service, Endpoint { addr, proto }),
        None => out.skipped += 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `nft -j list ruleset` of a table in kube-proxy's nftables shape (nft 1.0.6), with a
    /// hand-made chain, an element of an unknown form and a future map in it.
    const RULESET: &str = include_str!("testdata/nft-kube-proxy.json");

    #[test]
    fn services_endpoints_and_no_endpoint_states() {
        let mut r = NodeRules::default();
        parse(RULESET, &mut r).unwrap();
        assert!(r.modes.contains(&Mode::Nftables));
        let f = |ip: &str, proto, port| Frontend {
            ip: ip.parse().unwrap(),
            proto,
            port,
        };
        let a: Name = "lab/a:http".into();
        assert_eq!(
            r.frontends[&f("10.200.0.100", 6, 80)],
            (a.clone(), FrontendKind::External)
        );
        assert_eq!(
            r.frontends[&f("10.96.0.10", 6, 80)],
            (a.clone(), FrontendKind::ClusterIp)
        );
        assert_eq!(
            r.frontends[&f("10.200.0.101", 6, 80)],
            ("lab/ctl:http".into(), FrontendKind::External)
        );
        let eps: Vec<String> = r.endpoints[&a].iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(eps, ["10.200.11.2:8080", "10.200.11.3:8080"]);
        assert_eq!(
            r.no_endpoints[&Name::from("lab/ctl:http")],
            NoEndpoints::NoLocalEndpoints
        );
        assert_eq!(
            r.no_endpoints[&Name::from("lab/ctl:dns")],
            NoEndpoints::NoEndpoints
        );
        // The hand-made chain, the element keyed by a set, and the unknown map.
        assert_eq!(r.skipped, 3);
    }

    #[test]
    fn ipv6_endpoint_names_and_other_tables() {
        assert_eq!(
            chain_endpoint("fd00.200..11.2/8080"),
            Some("[fd00:200::11:2]:8080".parse().unwrap())
        );
        assert_eq!(
            chain_service("ULMVA6XW-ns1/svc1/tcp/p80"),
            Some(("ns1/svc1:p80".into(), 6))
        );
        assert_eq!(
            chain_service("ULMVA6XW-ns1/svc1/tcp/"),
            Some(("ns1/svc1".into(), 6))
        );
        assert_eq!(chain_service("short-ns1/svc1/tcp/p80"), None);
        let mut r = NodeRules::default();
        parse(
            r#"{"nftables":[{"metainfo":{"version":"1.0.6"}},{"table":{"family":"inet","name":"kube-proxy","handle":1}},{"chain":{"family":"inet","table":"kube-proxy","name":"x","handle":1}}]}"#,
            &mut r,
        )
        .unwrap();
        assert!(r.is_empty() && r.skipped == 0, "{r:?}");
        assert!(parse("{\"nftables\": 3}", &mut r).is_err());
    }
}
