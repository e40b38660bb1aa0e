use super::*;

#[test]
fn vip_labels_are_bounded() {
    let mut m = Metrics::new("n".into(), Vec::new(), 0);
    for i in 0..(MAX_VIP_LABELS + 5) {
        let ip: IpAddr = format!("10.200.{}.{}", i / 200, i % 200 + 1)
            .parse()
            .unwrap();
        m.vip_label(Some(ip));
    }
    assert_eq!(m.vip_labels.len(), MAX_VIP_LABELS);
    assert_eq!(m.overflow, 5);
    assert_eq!(m.vip_label(None).to_string(), "none");
    let text = m.render();
    assert!(text.contains("lbtrace_label_overflow_total{node=\"n\"} 5"));
    assert!(text.contains("# TYPE lbtrace_drops_total counter"));
}

#[test]
fn drops_carry_the_vips_service() {
    use crate::{
        event::{record::DropRec, values::Time},
        kernel::kubeproxy::{Frontend, FrontendKind, Mode, NodeRules, Snapshot},
    };
    let vip: IpAddr = "10.200.0.100".parse().unwrap();
    let mut rules = NodeRules::default();
    rules.modes.insert(Mode::Nftables);
    rules.skipped = 2;
    let f = Frontend {
        ip: vip,
        proto: 6,
        port: 80,
    };
    rules
        .frontends
        .insert(f, ("lab/a:http".into(), FrontendKind::External));
    let mut c = Catalog::default();
    c.update(Snapshot {
        at: Time::now(),
        nodes: [(1, rules)].into(),
    });
    let mut m = Metrics::new("n".into(), Vec::new(), 0);
    m.record(&Record::Drop(DropRec {
        vip: Some(vip),
        reason: "NO_SOCKET".into(),
        ..Default::default()
    }));
    m.kube_proxy(&c);
    let text = m.render();
    assert!(
        text.contains(r#"lbtrace_drops_total{vip="10.200.0.100",reason="NO_SOCKET",service="lab/a",node="n"} 1"#),
        "{text}"
    );
    assert!(text.contains(r#"lbtrace_kube_proxy_rules_skipped{node="n"} 2"#));
}

#[test]
fn label_values_are_escaped() {
    assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
}
