//! kube-proxy's iptables mode: `iptables-restore` input as `pkg/proxy/iptables/proxier.go`
//! writes it (`KUBE-SERVICES`, `KUBE-EXT-`, `KUBE-SVC-`, `KUBE-SEP-`, `KUBE-EXTERNAL-SERVICES`).

use super::*;

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
