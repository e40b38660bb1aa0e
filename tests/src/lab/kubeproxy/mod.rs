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

mod iptables;
pub use iptables::iptables_restore;

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
