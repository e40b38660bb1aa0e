//! `--prometheus URL` for `diagnose`, `timeline` and `report`: the agents' series through
//! Prometheus' HTTP API (range queries), turned into the records they count.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use clap::Args;
use lbtrace::{
    analysis::from_metrics::{
        self, MetricsInput, Series, CONNTRACK, DROPS, OWNER_GARPS, OWNER_SINCE,
    },
    event::Record,
};
use serde::Deserialize;

use super::common::UsageError;

/// Range queries are capped at this many points per series (Prometheus allows 11,000).
const MAX_POINTS: f64 = 1000.0;

#[derive(Args, Debug, Clone, Default)]
pub struct PromArgs {
    /// Read the agents' series from this Prometheus (http://HOST:9090, plain HTTP: use a
    /// port-forward) instead of recordings.
    #[arg(long, value_name = "URL")]
    pub(crate) prometheus: Option<String>,
    /// With --prometheus: this far back from now [default: 30m].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, conflicts_with_all = ["from", "to"])]
    pub(crate) since: Option<Duration>,
    /// With --prometheus: from this time (RFC 3339, or Unix seconds).
    #[arg(long, value_name = "TIME", value_parser = parse_time, requires = "to")]
    pub(crate) from: Option<f64>,
    /// With --prometheus: to this time (RFC 3339, or Unix seconds).
    #[arg(long, value_name = "TIME", value_parser = parse_time, requires = "from")]
    pub(crate) to: Option<f64>,
    /// With --prometheus: bucket width in seconds [default: the range / 1000, at least 1].
    #[arg(long, value_name = "SECS", value_parser = parse_step)]
    pub(crate) step: Option<f64>,
}

fn parse_time(s: &str) -> Result<f64, String> {
    if let Ok(secs) = s.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Ok(secs);
        }
    }
    let t = humantime::parse_rfc3339_weak(s)
        .map_err(|_| format!("`{s}` is not an RFC 3339 time or Unix seconds"))?;
    Ok(t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64()))
}

fn parse_step(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 1.0 => Ok(v),
        _ => Err(format!("`{s}` is not a number of seconds of at least 1")),
    }
}

impl PromArgs {
    /// `(start, end, step)` in Unix seconds.
    fn range(&self) -> Result<(f64, f64, f64), UsageError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let (start, end) = match (self.from, self.to) {
            (Some(f), Some(t)) => (f, t),
            _ => {
                let since = self.since.unwrap_or(Duration::from_secs(30 * 60));
                (now - since.as_secs_f64(), now)
            }
        };
        if end <= start {
            return Err(UsageError("--from must be before --to".into()));
        }
        let step = self
            .step
            .unwrap_or_else(|| ((end - start) / MAX_POINTS).ceil().max(1.0));
        if (end - start) / step > 10_000.0 {
            return Err(UsageError(format!(
                "{step} s buckets over {} s are too many points: raise --step",
                end - start
            )));
        }
        Ok((start, end, step))
    }
}

/// Prometheus' answer to a range query.
#[derive(Deserialize)]
struct Answer {
    status: String,
    #[serde(default)]
    data: Option<Matrix>,
    #[serde(default, rename = "errorType")]
    error_type: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct Matrix {
    #[serde(rename = "resultType")]
    result_type: String,
    result: Vec<MatrixSeries>,
}

#[derive(Deserialize)]
struct MatrixSeries {
    metric: BTreeMap<String, String>,
    /// `[unix seconds, "value"]`.
    values: Vec<(f64, String)>,
}

/// A typed client for the range query API.
struct Client {
    base: String,
    http: ureq::Agent,
}

impl Client {
    fn new(url: &str) -> Self {
        let http = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(30)))
            // Prometheus explains a bad query in a 4xx body.
            .http_status_as_error(false)
            .build()
            .into();
        Self {
            base: url.trim_end_matches('/').to_owned(),
            http,
        }
    }

    fn range(
        &self,
        query: &str,
        (start, end, step): (f64, f64, f64),
    ) -> anyhow::Result<Vec<Series>> {
        let url = format!("{}/api/v1/query_range", self.base);
        let mut resp = self
            .http
            .get(&url)
            .query("query", query)
            .query("start", format!("{start:.3}"))
            .query("end", format!("{end:.3}"))
            .query("step", format!("{step}"))
            .call()
            .map_err(|e| UsageError(format!("cannot query Prometheus at {}: {e}", self.base)))?;
        let status = resp.status();
        let body = resp.body_mut().read_to_string().map_err(|e| {
            UsageError(format!(
                "reading Prometheus' answer from {}: {e}",
                self.base
            ))
        })?;
        let answer: Answer = serde_json::from_str(&body).map_err(|_| {
            UsageError(format!(
                "{url} answered {status} with something that is not Prometheus' API: {}",
                body.chars().take(120).collect::<String>()
            ))
        })?;
        if answer.status != "success" {
            return Err(UsageError(format!(
                "Prometheus refused `{query}`: {} {}",
                answer.error_type.unwrap_or_default(),
                answer.error.unwrap_or_default()
            ))
            .into());
        }
        let data = answer
            .data
            .filter(|d| d.result_type == "matrix")
            .ok_or_else(|| UsageError(format!("Prometheus gave no matrix for `{query}`")))?;
        Ok(data
            .result
            .into_iter()
            .map(|s| Series {
                labels: s.metric,
                points: s
                    .values
                    .into_iter()
                    .filter_map(|(t, v)| Some((t, v.parse::<f64>().ok()?)))
                    .collect(),
            })
            .collect())
    }
}

/// The records the agents' series count over the range, and the bucket width.
pub(crate) fn records(args: &PromArgs, vips: &[String]) -> anyhow::Result<(Vec<Record>, f64)> {
    let Some(url) = &args.prometheus else {
        return Err(UsageError("--prometheus URL is missing".into()).into());
    };
    let range = args.range()?;
    let c = Client::new(url);
    let input = MetricsInput {
        start: range.0,
        end: range.1,
        step: range.2,
        drops: c.range(DROPS, range)?,
        conntrack: c.range(&format!("{CONNTRACK}{{vip!~\"none|other\"}}"), range)?,
        owner_since: c.range(OWNER_SINCE, range)?,
        owner_garps: c.range(OWNER_GARPS, range)?,
    };
    if input.drops.is_empty() && input.owner_since.is_empty() {
        return Err(UsageError(format!(
            "Prometheus at {url} has no {DROPS} or {OWNER_SINCE} series in that range: are lbtrace agents (0.1 or later) scraped?"
        ))
        .into());
    }
    Ok((from_metrics::records(&input, vips), range.2))
}
