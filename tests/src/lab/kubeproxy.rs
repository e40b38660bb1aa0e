//! kube-proxy's rules on a lab node, in its own dialect: nftables mode (tables `ip kube-proxy`
//! and `ip6 kube-proxy` with the `service-ips` and `no-endpoint-services` maps, chains named
//! `service-HASH-ns/svc/proto/port`, `endpoint-HASH-…__IP/port`, as
//! `pkg/proxy/nftables/proxier.go` writes them) or iptables mode (`KUBE-SERVICES`,
//! `KUBE-EXT-`, `KUBE-SVC-`, `KUBE-SEP-`, `KUBE-EXTERNAL-SERVICES`, through Debian's
//! `iptables-restore` with its nft backend, as `pkg/proxy/iptables/proxier.go` writes them).
//! A sync rewrites the whole of it, as kube-proxy's does.

use std::{fmt::Write as _, io::Write as _, net::IpAddr, process::Stdio};

use anyhow::{ensure, Context, Result};
use sha2::{Digest, Sha256};

use super::{
    topology::{Lab, Policy, Service},
    POD_TCP_PORT, POD_UDP_PORT, TCP_PORT, UDP_PORT,
};
use crate::netns::Netns;

/// The Kubernetes namespace of the lab's Services.
pub const NAMESPACE: &str = "lab";
/// kube-proxy's masquerade mark (bit 14).
const MASQ_MARK: &str = "0x4000";

/// Which of kube-proxy's modes the lab's nodes run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProxyMode {
    #[default]
    Nftables,
    Iptables,
}

impl ProxyMode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Nftables => "nftables",
            Self::Iptables => "iptables",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "nftables" => Ok(Self::Nftables),
            "iptables" => Ok(Self::Iptables),
            _ => anyhow::bail!("kube-proxy mode {s:?}: nftables or iptables"),
        }
    }
}

/// One port of a lab Service.
#[derive(Clone, Copy, Debug)]
pub struct Port {
    pub name: &'static str,
    pub proto: &'static str,
    pub port: u16,
    pub target: u16,
}

pub const PORTS: [Port; 2] = [
    Port {
        name: "http",
        proto: "tcp",
        port: TCP_PORT,
        target: POD_TCP_PORT,
    },
    Port {
        name: "dns",
        proto: "udp",
        port: UDP_PORT,
        target: POD_UDP_PORT,
    },
];

/// `lab/NAME:PORT`, as kube-proxy names a Service port.
pub fn service_port_name(svc: &str, port: &Port) -> String {
    format!("{NAMESPACE}/{svc}:{}", port.name)
}

/// The Service port a record for `vip` and `port` must carry (`None`: not a lab Service).
pub fn expected_service(lab: &Lab, vip: IpAddr, port: Option<u16>) -> Option<String> {
    let svc = lab.service_of(vip).ok()?;
    match PORTS.iter().find(|p| Some(p.port) == port) {
        Some(p) => Some(service_port_name(svc.name, p)),
        None => Some(format!("{NAMESPACE}/{}", svc.name)),
    }
}

/// The ClusterIP of the lab's `i`-th Service (never sent traffic: it is only in the rules).
pub fn cluster_ip(i: usize, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(std::net::Ipv6Addr::new(
            0xfd00,
            0x200,
            0,
            0,
            0,
            0,
            0xfa,
            i as u16 + 1,
        ))
    } else {
        IpAddr::V4(std::net::Ipv4Addr::new(10, 200, 250, 10 + i as u8))
    }
}

fn sha256(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// RFC 4648 base32 (Go's `base32.StdEncoding`), enough characters for kube-proxy's hashes.
fn base32(bytes: &[u8], chars: usize) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in bytes {
        if out.len() == chars {
            return out;
        }
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 && out.len() < chars {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
        acc &= (1 << bits) - 1;
    }
    if bits > 0 && out.len() < chars {
        out.push(ALPHABET[((acc << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// nftables mode: `HASH-ns/svc/proto/port` (`hashAndTruncate`).
fn nft_base(name: &str) -> String {
    format!("{}-{name}", base32(&sha256(name), 8))
}

/// iptables mode: `KUBE-SVC-` and friends (`portProtoHash`), and `KUBE-SEP-`.
fn ipt_chain(prefix: &str, what: &str) -> String {
    format!("{prefix}{}", base32(&sha256(what), 16))
}

/// nft's family and address type.
fn family(v6: bool) -> (&'static str, &'static str) {
    if v6 {
        ("ip6", "ipv6_addr")
    } else {
        ("ip", "ipv4_addr")
    }
}

fn host_port(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// What a Service port looks like on node `n` for one family.
struct View<'a> {
    svc: &'a Service,
    port: Port,
    lb: Vec<IpAddr>,
    cluster_ip: IpAddr,
    /// All endpoints of the family (the ClusterIP uses them) and the node's own.
    all: Vec<IpAddr>,
    local: Vec<IpAddr>,
}

fn views(lab: &Lab, n: usize, v6: bool) -> Vec<View<'_>> {
    let mut out = Vec::new();
    for (index, svc) in lab.services.iter().enumerate() {
        let lb: Vec<IpAddr> = svc
            .vips
            .iter()
            .copied()
            .filter(|v| v.is_ipv6() == v6)
            .collect();
        if lb.is_empty() {
            continue;
        }
        let like = lb[0];
        let all: Vec<IpAddr> = svc.endpoints.iter().map(|p| p.ip_like(like)).collect();
        let local: Vec<IpAddr> = svc
            .endpoints
            .iter()
            .filter(|p| p.node == n)
            .map(|p| p.ip_like(like))
            .collect();
        for port in PORTS {
            out.push(View {
                svc,
                port,
                lb: lb.clone(),
                cluster_ip: cluster_ip(index, v6),
                all: all.clone(),
                local: local.clone(),
            });
        }
    }
    out
}

/// kube-proxy's nftables table for one family of node `n`.
pub fn nft_table(lab: &Lab, n: usize, v6: bool) -> String {
    let (fam, addr) = family(v6);
    let mut service_ips = Vec::new();
    let mut no_endpoint = Vec::new();
    let mut chains = String::new();
    for v in views(lab, n, v6) {
        let spn = service_port_name(v.svc.name, &v.port);
        let base = format!(
            "{NAMESPACE}/{}/{}/{}",
            v.svc.name, v.port.proto, v.port.name
        );
        let (cluster, local, external) = (
            format!("service-{}", nft_base(&base)),
            format!("local-{}", nft_base(&base)),
            format!("external-{}", nft_base(&base)),
        );
        let key = |ip: IpAddr| format!("{ip} . {} . {}", v.port.proto, v.port.port);
        if v.all.is_empty() {
            for ip in std::iter::once(v.cluster_ip).chain(v.lb.iter().copied()) {
                no_endpoint.push(format!("{} comment \"{spn}\" : goto reject-chain", key(ip)));
            }
            continue;
        }
        service_ips.push(format!("{} : goto {cluster}", key(v.cluster_ip)));
        for &ip in &v.lb {
            service_ips.push(format!("{} : goto {external}", key(ip)));
        }
        let ep_chain = |ip: IpAddr| {
            let ep = format!("{}/{}", ip.to_string().replace(':', "."), v.port.target);
            format!("endpoint-{}", nft_base(&format!("{base}__{ep}")))
        };
        let pick = |eps: &[IpAddr]| {
            let m: Vec<String> = eps
                .iter()
                .enumerate()
                .map(|(i, ip)| format!("{i} : goto {}", ep_chain(*ip)))
                .collect();
            format!(
                "numgen random mod {} vmap {{ {} }}",
                eps.len(),
                m.join(" , ")
            )
        };
        let _ = writeln!(chains, "  chain {cluster} {{\n    {}\n  }}", pick(&v.all));
        let mut ext = String::new();
        match v.svc.policy {
            Policy::Cluster => {
                let _ = write!(ext, "    jump mark-for-masquerade\n    goto {cluster}\n");
            }
            Policy::Local => {
                let _ = write!(ext, "    fib saddr type local jump mark-for-masquerade comment \"masquerade local traffic\"\n    fib saddr type local goto {cluster} comment \"short-circuit local traffic\"\n");
                if v.local.is_empty() {
                    for &ip in &v.lb {
                        no_endpoint.push(format!("{} comment \"{spn}\" : drop", key(ip)));
                    }
                } else {
                    let _ = writeln!(ext, "    goto {local}");
                    let _ = writeln!(chains, "  chain {local} {{\n    {}\n  }}", pick(&v.local));
                }
            }
        }
        let _ = writeln!(chains, "  chain {external} {{\n{ext}  }}");
        for &ip in &v.all {
            let _ = writeln!(
                chains,
                "  chain {} {{\n    {fam} saddr {ip} jump mark-for-masquerade\n    meta l4proto {} dnat to {}\n  }}",
                ep_chain(ip),
                v.port.proto,
                host_port(ip, v.port.target)
            );
        }
    }
    let elements = |e: &[String]| {
        if e.is_empty() {
            String::new()
        } else {
            format!(" elements = {{ {} }} ;", e.join(" , "))
        }
    };
    let base = |name: &str, kind: &str, hook: &str, prio: &str, body: &str| {
        format!("  chain {name} {{\n    type {kind} hook {hook} priority {prio} ; policy accept ;\n{body}  }}\n")
    };
    let mut t = format!(
        "add table {fam} kube-proxy\ndelete table {fam} kube-proxy\ntable {fam} kube-proxy {{\n  comment \"rules for kube-proxy\"\n"
    );
    let _ = writeln!(t, "  map service-ips {{ type {addr} . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ;{} }}", elements(&service_ips));
    let _ = writeln!(t, "  map no-endpoint-services {{ type {addr} . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ;{} }}", elements(&no_endpoint));
    let check = "    ct state new jump endpoints-check\n";
    t += &base("filter-input", "filter", "input", "-110", check);
    t += &base("filter-forward", "filter", "forward", "-110", check);
    t += &base("filter-output", "filter", "output", "-110", check);
    t += &base(
        "nat-prerouting",
        "nat",
        "prerouting",
        "dstnat",
        "    jump services\n",
    );
    // kube-proxy writes `dstnat` (and `dstnat - 10` for filter chains); nft 1.0.6 takes the
    // name only on prerouting, and lists every other one as the number anyway.
    t += &base("nat-output", "nat", "output", "-100", "    jump services\n");
    t += &base(
        "nat-postrouting",
        "nat",
        "postrouting",
        "srcnat",
        "    jump masquerading\n",
    );
    let _ = write!(
        t,
        "  chain endpoints-check {{\n    {fam} daddr . meta l4proto . th dport vmap @no-endpoint-services\n  }}\n  chain services {{\n    {fam} daddr . meta l4proto . th dport vmap @service-ips\n  }}\n  chain reject-chain {{\n    comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\"\n    reject\n  }}\n  chain mark-for-masquerade {{\n    mark set mark or {MASQ_MARK}\n  }}\n  chain masquerading {{\n    mark and {MASQ_MARK} == 0 return\n    mark set mark xor {MASQ_MARK}\n    masquerade fully-random\n  }}\n"
    );
    t + &chains + "}\n"
}

/// kube-proxy's iptables-restore input for one family of node `n` (filter and nat).
pub fn iptables_restore(lab: &Lab, n: usize, v6: bool) -> String {
    let mut filter_chains: Vec<String> = ["KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES"]
        .map(str::to_owned)
        .to_vec();
    let mut filter = String::new();
    let mut nat_chains: Vec<String> = ["KUBE-SERVICES", "KUBE-MARK-MASQ", "KUBE-POSTROUTING"]
        .map(str::to_owned)
        .to_vec();
    let mut nat = String::new();
    let jump = |table: &mut String, from: &str, comment: &str, to: &str, extra: &str| {
        let _ = writeln!(
            table,
            "-A {from}{extra} -m comment --comment \"{comment}\" -j {to}"
        );
    };
    for c in ["INPUT", "FORWARD"] {
        jump(
            &mut filter,
            c,
            "kubernetes externally-visible service portals",
            "KUBE-EXTERNAL-SERVICES",
            " -m conntrack --ctstate NEW",
        );
    }
    jump(
        &mut filter,
        "FORWARD",
        "kubernetes service portals",
        "KUBE-SERVICES",
        " -m conntrack --ctstate NEW",
    );
    jump(
        &mut filter,
        "OUTPUT",
        "kubernetes service portals",
        "KUBE-SERVICES",
        " -m conntrack --ctstate NEW",
    );
    for c in ["PREROUTING", "OUTPUT"] {
        jump(
            &mut nat,
            c,
            "kubernetes service portals",
            "KUBE-SERVICES",
            "",
        );
    }
    jump(
        &mut nat,
        "POSTROUTING",
        "kubernetes postrouting rules",
        "KUBE-POSTROUTING",
        "",
    );
    let _ = writeln!(nat, "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}");
    let _ = writeln!(
        nat,
        "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"
    );
    let _ = writeln!(nat, "-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}");
    let _ = writeln!(nat, "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully");
    for v in views(lab, n, v6) {
        let spn = service_port_name(v.svc.name, &v.port);
        let hash_of = format!("{spn}{}", v.port.proto);
        let (svc, svl, ext) = (
            ipt_chain("KUBE-SVC-", &hash_of),
            ipt_chain("KUBE-SVL-", &hash_of),
            ipt_chain("KUBE-EXT-", &hash_of),
        );
        let m = format!("-m {p} -p {p}", p = v.port.proto);
        let dport = v.port.port;
        if v.all.is_empty() {
            let _ = writeln!(filter, "-A KUBE-SERVICES -m comment --comment \"{spn} has no endpoints\" {m} -d {} --dport {dport} -j REJECT", v.cluster_ip);
            for ip in &v.lb {
                let _ = writeln!(filter, "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"{spn} has no endpoints\" {m} -d {ip} --dport {dport} -j REJECT");
            }
            continue;
        }
        let _ = writeln!(nat, "-A KUBE-SERVICES -m comment --comment \"{spn} cluster IP\" {m} -d {} --dport {dport} -j {svc}", v.cluster_ip);
        for ip in &v.lb {
            let _ = writeln!(nat, "-A KUBE-SERVICES -m comment --comment \"{spn} loadbalancer IP\" {m} -d {ip} --dport {dport} -j {ext}");
        }
        nat_chains.extend([svc.clone(), ext.clone()]);
        let sep = |ip: IpAddr| {
            ipt_chain(
                "KUBE-SEP-",
                &format!("{hash_of}{}", host_port(ip, v.port.target)),
            )
        };
        let balance = |nat: &mut String, chain: &str, eps: &[IpAddr]| {
            for (i, ip) in eps.iter().enumerate() {
                let left = eps.len() - i;
                let prob = if left > 1 {
                    format!(
                        " -m statistic --mode random --probability {:.10}",
                        1.0 / left as f64
                    )
                } else {
                    String::new()
                };
                let _ = writeln!(
                    nat,
                    "-A {chain} -m comment --comment \"{spn} -> {}\"{prob} -j {}",
                    host_port(*ip, v.port.target),
                    sep(*ip)
                );
            }
        };
        balance(&mut nat, &svc, &v.all);
        match v.svc.policy {
            Policy::Cluster => {
                let _ = writeln!(nat, "-A {ext} -m comment --comment \"masquerade traffic for {spn} external destinations\" -j KUBE-MARK-MASQ");
                let _ = writeln!(nat, "-A {ext} -j {svc}");
            }
            Policy::Local => {
                let _ = writeln!(nat, "-A {ext} -m comment --comment \"masquerade LOCAL traffic for {spn} external destinations\" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ");
                let _ = writeln!(nat, "-A {ext} -m comment --comment \"route LOCAL traffic for {spn} external destinations\" -m addrtype --src-type LOCAL -j {svc}");
                if v.local.is_empty() {
                    for ip in &v.lb {
                        let _ = writeln!(filter, "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"{spn} has no local endpoints\" {m} -d {ip} --dport {dport} -j DROP");
                    }
                } else {
                    let _ = writeln!(nat, "-A {ext} -j {svl}");
                    nat_chains.push(svl.clone());
                    balance(&mut nat, &svl, &v.local);
                }
            }
        }
        for &ip in &v.all {
            let c = sep(ip);
            let plen = if v6 { 128 } else { 32 };
            let _ = writeln!(
                nat,
                "-A {c} -m comment --comment {spn} -s {ip}/{plen} -j KUBE-MARK-MASQ"
            );
            let _ = writeln!(
                nat,
                "-A {c} -m comment --comment {spn} {m} -j DNAT --to-destination {}",
                host_port(ip, v.port.target)
            );
            nat_chains.push(c);
        }
    }
    let _ = writeln!(nat, "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS");
    nat_chains.push("KUBE-NODEPORTS".to_owned());
    filter_chains.sort();
    nat_chains.sort();
    nat_chains.dedup();
    let decl = |cs: &[String]| {
        cs.iter()
            .map(|c| format!(":{c} - [0:0]\n"))
            .collect::<String>()
    };
    format!(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n{}{filter}COMMIT\n*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n{}{nat}COMMIT\n",
        decl(&filter_chains),
        decl(&nat_chains)
    )
}

/// Feeds `input` to `program` in the namespace.
fn pipe(ns: &Netns, program: &str, args: &[&str], input: &str) -> Result<()> {
    let mut child = ns
        .cmd(program)
        .args(args)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {program} (cargo xtask setup installs it)"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "{program}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// One kube-proxy sync on node `n`: rewrites its rules whole, atomically per family (and,
/// in iptables mode, removes what nftables mode left, and the other way round).
pub fn sync(lab: &Lab, n: usize) -> Result<()> {
    let node = &lab.nodes[n];
    match lab.proxy_mode {
        ProxyMode::Nftables => {
            let both = nft_table(lab, n, false) + &nft_table(lab, n, true);
            node.nft(&both)
        }
        ProxyMode::Iptables => {
            node.nft("add table ip kube-proxy\ndelete table ip kube-proxy\nadd table ip6 kube-proxy\ndelete table ip6 kube-proxy\n")?;
            // The lab's nodes have no other iptables rules: each table is replaced whole
            // (kube-proxy's own restore keeps others' chains; the result is the same here).
            pipe(
                node,
                "iptables-restore",
                &[],
                &iptables_restore(lab, n, false),
            )?;
            pipe(
                node,
                "ip6tables-restore",
                &[],
                &iptables_restore(lab, n, true),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base32_as_go_writes_it() {
        // Go: base32.StdEncoding.EncodeToString([]byte("foobar")) == "MZXW6YTBOI======"
        assert_eq!(base32(b"foobar", 10), "MZXW6YTBOI");
        assert_eq!(base32(b"f", 2), "MY");
        // A digest truncated as kube-proxy does: the bytes past the last character are not read.
        assert_eq!(base32(&[0xff; 32], 8), "77777777");
    }
}
