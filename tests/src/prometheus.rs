//! Debian's real Prometheus scraping agents on loopback, with deploy/'s rules loaded, and the
//! expressions of deploy/'s rules and dashboard.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::{deploy, http, unique};

pub const PROMETHEUS: &str = "/usr/bin/prometheus";
pub const PROMTOOL: &str = "/usr/bin/promtool";

/// A Prometheus with its own data directory; killed and removed when dropped.
pub struct Prometheus {
    child: Child,
    pub addr: SocketAddr,
    dir: PathBuf,
}

impl Prometheus {
    /// Scrapes `targets` every second (job `lbtrace`) and evaluates `rule_files` every second.
    pub fn start(targets: &[SocketAddr], rule_files: &[PathBuf]) -> Result<Self> {
        ensure!(
            Path::new(PROMETHEUS).exists(),
            "Debian's prometheus is missing: run `cargo xtask setup`"
        );
        let dir = std::env::temp_dir().join(unique("lbtprom"));
        std::fs::create_dir_all(dir.join("data"))?;
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let rules: Vec<String> = rule_files
            .iter()
            .map(|r| format!("'{}'", r.display()))
            .collect();
        std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [{}]\nscrape_configs:\n  - job_name: lbtrace\n    static_configs:\n      - targets: [{}]\n",
                rules.join(", "),
                targets.join(", ")
            ),
        )?;
        let addr: SocketAddr = format!("127.0.0.1:{}", http::free_port()?).parse()?;
        let child = Command::new(PROMETHEUS)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting prometheus")?;
        let p = Self { child, addr, dir };
        let start = Instant::now();
        while http::get(p.addr, "/-/ready").map(|r| r.0).ok() != Some(200) {
            ensure!(
                start.elapsed() < Duration::from_secs(60),
                "prometheus never became ready"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(p)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `GET /api/v1/PATH?query`: the JSON answer, whatever its status.
    pub fn api(&self, path_and_query: &str) -> Result<Value> {
        let (_, body) = http::get(self.addr, &format!("/api/v1/{path_and_query}"))?;
        serde_json::from_str(&body).with_context(|| format!("prometheus answered {body}"))
    }

    /// An instant query; an error when Prometheus says the expression is wrong.
    pub fn eval(&self, promql: &str) -> Result<Vec<Value>> {
        let v = self.api(&format!("query?query={}", http::encode(promql)))?;
        if v["status"] != "success" {
            bail!("{}: {}", v["errorType"], v["error"]);
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// An instant query: `{label value → number}` for the label `by`.
    pub fn query(&self, promql: &str, by: &str) -> Result<BTreeMap<String, u64>> {
        Ok(self
            .eval(promql)?
            .iter()
            .map(|r| {
                let v = r["value"][1].as_str().unwrap_or("NaN");
                (
                    r["metric"][by].as_str().unwrap_or("").to_owned(),
                    v.parse::<f64>().unwrap_or(f64::NAN) as u64,
                )
            })
            .collect())
    }

    /// Every rule loaded, as `(name, health, last error)`.
    pub fn rules(&self) -> Result<Vec<(String, String, String)>> {
        let v = self.api("rules")?;
        let mut out = Vec::new();
        for g in v["data"]["groups"].as_array().context("no rule groups")? {
            for r in g["rules"].as_array().context("no rules")? {
                out.push((
                    r["name"].as_str().unwrap_or("").to_owned(),
                    r["health"].as_str().unwrap_or("").to_owned(),
                    r["lastError"].as_str().unwrap_or("").to_owned(),
                ));
            }
        }
        Ok(out)
    }

    /// Waits until `promql`, by `by`, gives what `ok` accepts; returns the last answer.
    pub fn wait_for(
        &self,
        promql: &str,
        by: &str,
        timeout: Duration,
        ok: impl Fn(&BTreeMap<String, u64>) -> bool,
    ) -> Result<BTreeMap<String, u64>> {
        let start = Instant::now();
        loop {
            let got = self.query(promql, by)?;
            if ok(&got) {
                return Ok(got);
            }
            ensure!(
                start.elapsed() < timeout,
                "Prometheus has {got:?} for {promql}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// deploy/prometheus/lbtrace-rules.yaml.
pub fn rules_file() -> PathBuf {
    deploy::dir().join("prometheus/lbtrace-rules.yaml")
}

/// deploy/grafana/lbtrace.json.
pub fn dashboard_file() -> PathBuf {
    deploy::dir().join("grafana/lbtrace.json")
}

/// The rules file's `expr:` blocks (block scalars or one-liners), with their alert names.
pub fn rule_exprs(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut name = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        if let Some(n) = t
            .strip_prefix("- alert:")
            .or_else(|| t.strip_prefix("- record:"))
        {
            name = n.trim().to_owned();
        } else if let Some(e) = t.strip_prefix("expr:") {
            let e = e.trim();
            if e != "|" && e != ">" {
                out.push((name.clone(), e.to_owned()));
                continue;
            }
            let indent = line.len() - t.len();
            let mut body = String::new();
            while let Some(next) = lines.peek() {
                let ni = next.len() - next.trim_start().len();
                if !next.trim().is_empty() && ni <= indent {
                    break;
                }
                body.push_str(next.trim());
                body.push('\n');
                lines.next();
            }
            out.push((name.clone(), body));
        }
    }
    out
}

/// Every PromQL expression of the dashboard (panel targets), with its panel title, and the
/// metrics its template variables read (`label_values(metric, label)`).
pub fn dashboard_exprs(dashboard: &Value) -> (Vec<(String, String)>, Vec<String>) {
    let mut exprs = Vec::new();
    for p in dashboard["panels"].as_array().into_iter().flatten() {
        let title = p["title"].as_str().unwrap_or("").to_owned();
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                exprs.push((title.clone(), e.to_owned()));
            }
        }
    }
    let mut var_metrics = Vec::new();
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let q = v["query"]["query"].as_str().or(v["query"].as_str());
        if let Some(inner) = q.and_then(|q| q.strip_prefix("label_values(")) {
            var_metrics.push(
                inner
                    .split([',', ')', '{'])
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_owned(),
            );
        }
    }
    (exprs, var_metrics)
}

/// Grafana's variables replaced by what they stand for on a dashboard showing everything.
pub fn grafana_to_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "1h")
        .replace("$vip", ".*")
        .replace("$node", ".*")
}

/// The `lbtrace_*` metric names an expression reads.
pub fn metric_names(promql: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = promql.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let mut i = 0;
    while i < b.len() {
        if ident(b[i]) && (i == 0 || !ident(b[i - 1])) {
            let start = i;
            while i < b.len() && ident(b[i]) {
                i += 1;
            }
            let word = &promql[start..i];
            // A label value inside quotes is not a name.
            let quoted = promql[..start].matches('"').count() % 2 == 1;
            if word.starts_with("lbtrace_") && !quoted {
                out.insert(word.to_owned());
            }
        } else {
            i += 1;
        }
    }
    out
}

/// The metric families a Prometheus text exposition declares (`# TYPE` lines).
pub fn families(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_exprs_are_found() {
        let n = metric_names(
            "sum by (vip) (rate(lbtrace_vip_drops_total{reason!~\"lbtrace_x\"}[1m])) / on (node) lbtrace_conntrack_entries_max > up",
        );
        assert_eq!(
            n.into_iter().collect::<Vec<_>>(),
            ["lbtrace_conntrack_entries_max", "lbtrace_vip_drops_total"]
        );
        let r = rule_exprs(
            "      - alert: A\n        expr: |\n          sum(x)\n          > 1\n        for: 1m\n      - alert: B\n        expr: up == 0\n",
        );
        assert_eq!(
            r,
            [
                ("A".to_owned(), "sum(x)\n> 1\n".to_owned()),
                ("B".to_owned(), "up == 0".to_owned())
            ]
        );
    }
}
