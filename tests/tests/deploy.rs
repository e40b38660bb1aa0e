//! The deployment files, checked offline: kubectl parses and type-checks the manifest without a
//! cluster, the DaemonSet has the least-privilege shape the README documents, systemd accepts
//! the unit and grants it the same capabilities, and the image build context holds what the
//! Containerfile copies.

use std::{collections::BTreeSet, fs, path::Path, process::Command};

use lbtest::{
    deploy::{self, added_capabilities, container, kubectl, manifest, object},
    prometheus::{self, PROMTOOL},
};
use serde_json::Value;

/// The capabilities the README's "Privileges" table justifies, one by one.
const CAPABILITIES: &[&str] = &["BPF", "PERFMON", "SYSLOG", "SYS_ADMIN"];

fn read(name: &str) -> String {
    let path = deploy::dir().join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Fails at the first field of `parsed` (as written) that the typed object lacks: kubectl's typed
/// decoding drops fields the Kubernetes API does not know, such as a misspelt `readonly`. Zero
/// values (`hostPID: false`) are legitimately omitted from the typed encoding.
fn assert_known_fields(parsed: &Value, typed: &Value, path: &str) {
    match (parsed, typed) {
        (Value::Object(p), _) => {
            for (k, v) in p {
                let here = format!("{path}.{k}");
                match typed.get(k) {
                    Some(t) => assert_known_fields(v, t, &here),
                    None => assert!(
                        matches!(v, Value::Null | Value::Bool(false))
                            || v == &Value::from(0)
                            || v == &Value::from(""),
                        "{here}: not a field of the Kubernetes type (typed decoding dropped it)"
                    ),
                }
            }
        }
        (Value::Array(p), Value::Array(t)) => {
            assert_eq!(p.len(), t.len(), "{path}: length changed in typed decoding");
            for (i, (p, t)) in p.iter().zip(t).enumerate() {
                assert_known_fields(p, t, &format!("{path}[{i}]"));
            }
        }
        _ => assert_eq!(parsed, typed, "{path}: value changed in typed decoding"),
    }
}

#[test]
fn manifest_parses_and_type_checks_offline() {
    let objects = manifest().unwrap();
    let kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        ["Namespace", "ServiceAccount", "ConfigMap", "DaemonSet"]
    );
    for o in &objects[1..] {
        assert_eq!(o["metadata"]["namespace"], "lbtrace", "{}", o["kind"]);
    }
    // `set serviceaccount` to the name it already has changes nothing, but decodes the object
    // into the typed apps/v1 DaemonSet: wrong types fail, unknown fields disappear.
    let ds = object(&objects, "DaemonSet").unwrap();
    let typed = kubectl(
        &[
            "set",
            "serviceaccount",
            "--local",
            "-o",
            "json",
            "-f",
            "-",
            "lbtrace",
        ],
        Some(ds.to_string().as_bytes()),
    )
    .unwrap();
    assert_eq!(typed.len(), 1);
    assert_known_fields(ds, &typed[0], "DaemonSet");
}

#[test]
fn daemonset_is_least_privilege() {
    let objects = manifest().unwrap();
    let ds = object(&objects, "DaemonSet").unwrap();
    let pod = &ds["spec"]["template"];
    let spec = &pod["spec"];
    let c = container(ds).unwrap();
    let sc = &c["securityContext"];

    assert_eq!(spec["hostNetwork"], true);
    for host in ["hostPID", "hostIPC"] {
        assert_ne!(spec[host], true, "{host}");
    }
    assert_ne!(sc["privileged"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(added_capabilities(c), CAPABILITIES);
    assert_eq!(spec["automountServiceAccountToken"], false);
    assert_eq!(
        object(&objects, "ServiceAccount").unwrap()["automountServiceAccountToken"],
        false
    );

    // Every mount read-only; the host paths exactly those the README lists.
    let mounts = c["volumeMounts"].as_array().unwrap();
    for m in mounts {
        assert_eq!(m["readOnly"], true, "{}", m["name"]);
    }
    let host_paths: BTreeSet<&str> = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| {
            let path = v["hostPath"]["path"].as_str()?;
            let mounted = mounts.iter().find(|m| m["name"] == v["name"]);
            assert_eq!(
                mounted.map(|m| &m["mountPath"]),
                Some(&v["hostPath"]["path"]),
                "{path} is mounted where the host has it"
            );
            Some(path)
        })
        .collect();
    assert_eq!(
        host_paths,
        BTreeSet::from(["/run/netns", "/sys/kernel/btf", "/sys/kernel/tracing"])
    );
    let netns = mounts.iter().find(|m| m["mountPath"] == "/run/netns");
    assert_eq!(
        netns.unwrap()["mountPropagation"],
        "HostToContainer",
        "pods started later must appear"
    );

    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "9464");
    let port = &c["ports"][0];
    assert_eq!(
        (&port["name"], &port["containerPort"]),
        (&"metrics".into(), &9464.into())
    );
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(c[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], "metrics", "{probe}");
    }
    let node_name = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "NODE_NAME")
        .expect("NODE_NAME in the environment");
    assert_eq!(
        node_name["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    let res = &c["resources"];
    assert_eq!(res["requests"]["cpu"], "10m");
    assert_eq!(res["limits"]["cpu"], "200m");
    assert!(res["limits"]["memory"].is_string());
}

#[test]
fn config_is_the_example_and_metrics_listen_widely_only_in_the_manifest() {
    let objects = manifest().unwrap();
    let example = read("config.example.toml");
    assert_eq!(
        object(&objects, "ConfigMap").unwrap()["data"]["config.toml"],
        example.as_str(),
        "the ConfigMap is a copy of deploy/config.example.toml"
    );
    let c = container(object(&objects, "DaemonSet").unwrap()).unwrap();
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        args,
        [
            "agent",
            "--config",
            "/etc/lbtrace/config.toml",
            "--metrics-addr",
            "0.0.0.0:9464"
        ]
    );
    for other in ["config.example.toml", "lbtrace.service", "Containerfile"] {
        let text = read(other);
        let setting = text
            .lines()
            .find(|l| !l.trim_start().starts_with('#') && l.contains("0.0.0.0:"));
        assert_eq!(setting, None, "{other} listens on every address");
    }
}

/// `Key=` values of a unit file (the last assignment wins, as in systemd).
fn unit_value<'a>(unit: &'a str, key: &str) -> Option<&'a str> {
    unit.lines()
        .rev()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

#[test]
fn systemd_unit_verifies_with_the_same_capabilities() {
    let unit = read("lbtrace.service");
    let expected: Vec<String> = CAPABILITIES.iter().map(|c| format!("CAP_{c}")).collect();
    for key in ["CapabilityBoundingSet", "AmbientCapabilities"] {
        let caps: Vec<String> = unit_value(&unit, key)
            .unwrap_or_else(|| panic!("no {key}="))
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        assert_eq!(caps, expected, "{key}");
    }
    for (key, value) in [
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("ProtectHome", "yes"),
    ] {
        assert_eq!(unit_value(&unit, key), Some(value), "{key}");
    }
    // systemd-analyze checks ExecStart's binary exists: point it at the one under test.
    let bin = lbtest::lbtrace::bin();
    let dir = std::env::temp_dir().join(lbtest::unique("lbtunit"));
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lbtrace.service");
    fs::write(
        &path,
        unit.replace("/usr/local/bin/lbtrace", bin.to_str().unwrap()),
    )
    .unwrap();
    let run = |args: &[&str]| {
        Command::new("systemd-analyze")
            .args(args)
            .arg(&path)
            .output()
            .unwrap_or_else(|e| {
                panic!("systemd-analyze: {e}: run `cargo xtask setup` (Debian's systemd)")
            })
    };
    let verify = run(&["verify", "--man=no"]);
    let security = run(&["security", "--offline=true", "--no-pager"]);
    let _ = fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&verify.stderr);
    // Unknown keys are only warnings: any output is a finding.
    assert!(
        verify.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
    let text = String::from_utf8_lossy(&security.stdout);
    let exposure: f64 = text
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for lbtrace.service: "))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {text}"));
    // 2.9 on systemd 252 (Debian 12); CAP_SYS_ADMIN and uid 0 keep it from lower.
    assert!(exposure <= 3.0, "exposure {exposure} rose: {text}");
}

#[test]
fn image_context_holds_what_the_containerfile_copies() {
    let containerfile = read("Containerfile");
    let ignore = read("Containerfile.dockerignore");
    let allowed: Vec<&str> = ignore.lines().filter_map(|l| l.strip_prefix('!')).collect();
    let sources: Vec<&str> = containerfile
        .lines()
        .filter_map(|l| l.strip_prefix("COPY "))
        .filter(|l| !l.starts_with("--from"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(!sources.is_empty());
    for src in sources {
        assert!(allowed.contains(&src), "{src} is excluded from the context");
        let path = deploy::dir().join("..").join(src);
        assert!(
            path.is_file(),
            "{} missing: cargo xtask build",
            path.display()
        );
    }
}

/// promtool's output, failing loudly when Debian's prometheus package is missing.
fn promtool(args: &[&str]) -> String {
    assert!(
        Path::new(PROMTOOL).exists(),
        "{PROMTOOL} is missing: run `cargo xtask setup` (it installs Debian's prometheus)"
    );
    let out = Command::new(PROMTOOL)
        .args(args)
        .current_dir(deploy::dir().join("prometheus"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn alert_rules_check_and_pass_their_unit_tests() {
    let out = promtool(&["check", "rules", "lbtrace-rules.yaml"]);
    assert!(out.contains("SUCCESS: 8 rules found"), "{out}");
    let text = read("prometheus/lbtrace-rules.yaml");
    let alerts: Vec<String> = prometheus::rule_exprs(&text)
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    let mut tests: Vec<String> = fs::read_dir(deploy::dir().join("prometheus/tests"))
        .unwrap()
        .map(|e| format!("tests/{}", e.unwrap().file_name().to_string_lossy()))
        .filter(|f| f.ends_with(".yaml"))
        .collect();
    tests.sort();
    let mut args = vec!["test", "rules"];
    args.extend(tests.iter().map(String::as_str));
    let out = promtool(&args);
    assert!(!out.contains("FAILED"), "{out}");
    // Each alert has a case where it fires and one where it does not.
    let cases: String = tests
        .iter()
        .map(|t| read(&format!("prometheus/{t}")))
        .collect();
    for alert in &alerts {
        let evals: Vec<&str> = cases
            .split("- eval_time:")
            .skip(1)
            .filter(|c| c.contains(&format!("alertname: {alert}\n")))
            .collect();
        assert!(
            evals.iter().any(|c| c.contains("exp_alerts: []")),
            "{alert}: no case where it does not fire"
        );
        assert!(
            evals.iter().any(|c| c.contains("exp_labels:")),
            "{alert}: no case where it fires"
        );
    }
}

/// The PrometheusRule is the rules file under a header; `LBTRACE_BLESS=1` rewrites it.
#[test]
fn prometheus_rule_is_the_rules_file() {
    let rules = read("prometheus/lbtrace-rules.yaml");
    let groups = &rules[rules.find("groups:").expect("groups:")..];
    let mut want = String::from(
        "# Generated from lbtrace-rules.yaml (the same rules, for prometheus-operator): edit that file,\n# then run `LBTRACE_BLESS=1 cargo test -p integration-tests --test deploy prometheus_rule`.\napiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\nmetadata:\n  name: lbtrace\n  namespace: lbtrace\n  labels:\n    app.kubernetes.io/name: lbtrace\nspec:\n",
    );
    for line in groups.lines() {
        if !line.trim().is_empty() {
            want.push_str("  ");
        }
        want.push_str(line);
        want.push('\n');
    }
    let path = deploy::dir().join("prometheus/lbtrace-prometheusrule.yaml");
    if std::env::var_os("LBTRACE_BLESS").is_some() {
        fs::write(&path, &want).unwrap();
    }
    let have = fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "{} differs from lbtrace-rules.yaml: run with LBTRACE_BLESS=1",
        path.display()
    );
}
