//! A figure with its spread over rounds, and targets judged beyond that spread: a target is
//! met only when the whole measured range holds it, missed only when none of it does, and
//! otherwise "within noise".

use serde_json::{json, Value};

/// Min, median and max of a set of rounds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
    pub n: usize,
}

impl Spread {
    pub fn of(values: &[f64]) -> Option<Self> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Self {
            min: v[0],
            median,
            max: v[n - 1],
            n,
        })
    }

    /// `self − other`, as a range: the median difference, and the extremes either way.
    pub fn minus(self, other: Self) -> Self {
        Self {
            min: self.min - other.max,
            median: self.median - other.median,
            max: self.max - other.min,
            n: self.n.min(other.n),
        }
    }

    /// `self / other` as a range; `None` unless `other` is positive over its whole range.
    pub fn ratio(self, other: Self) -> Option<Self> {
        (other.min > 0.0).then(|| Self {
            min: self.min / other.max,
            median: self.median / other.median,
            max: self.max / other.min,
            n: self.n.min(other.n),
        })
    }

    /// (a − base) / (b − base) over the rounds all three have, each `(round, value)`. A round
    /// runs them back to back, so a drift of the machine between rounds cancels, where the
    /// ratio of two ranges ([`Self::ratio`]) would compound it. `None` unless `b` is above
    /// `base` in every such round.
    pub fn paired_ratio(
        base: &[(usize, f64)],
        a: &[(usize, f64)],
        b: &[(usize, f64)],
    ) -> Option<Self> {
        let at = |v: &[(usize, f64)], round: usize| v.iter().find(|x| x.0 == round).map(|x| x.1);
        let ratios: Option<Vec<f64>> = base
            .iter()
            .filter_map(|&(round, n)| {
                let (x, y) = (at(a, round)?, at(b, round)?);
                Some((y > n).then(|| (x - n) / (y - n)))
            })
            .collect();
        Self::of(&ratios?)
    }

    pub fn from_json(s: &Value) -> Option<Self> {
        Some(Self {
            min: s["min"].as_f64()?,
            median: s["median"].as_f64()?,
            max: s["max"].as_f64()?,
            n: usize::try_from(s["rounds"].as_u64()?).ok()?,
        })
    }

    pub fn to_json(self) -> Value {
        json!({"min": self.min, "median": self.median, "max": self.max, "rounds": self.n})
    }

    /// `median (min–max)`.
    pub fn show(self, decimals: usize) -> String {
        format!(
            "{:.d$} ({:.d$}–{:.d$}, {} rounds)",
            self.median,
            self.min,
            self.max,
            self.n,
            d = decimals
        )
    }
}

/// The outcome of a target.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Held over the whole measured range.
    Met,
    /// Failed over the whole measured range.
    Missed,
    /// The limit lies inside the measured range: not resolved on this run.
    WithinNoise,
    /// No figure, and why.
    NotMeasured(String),
}

impl Verdict {
    /// `figure ≤ limit`, judged over the figure's range.
    pub fn at_most(figure: Option<Spread>, limit: f64) -> Self {
        match figure {
            None => Self::NotMeasured("no figure".into()),
            Some(s) if s.max <= limit => Self::Met,
            Some(s) if s.min > limit => Self::Missed,
            Some(_) => Self::WithinNoise,
        }
    }

    /// `true` met, `false` missed, `null` otherwise.
    pub fn met(&self) -> Value {
        match self {
            Self::Met => json!(true),
            Self::Missed => json!(false),
            _ => Value::Null,
        }
    }

    pub fn name(&self) -> String {
        match self {
            Self::Met => "met".into(),
            Self::Missed => "missed".into(),
            Self::WithinNoise => "within noise (not resolved)".into(),
            Self::NotMeasured(why) => format!("not measured: {why}"),
        }
    }
}

/// A target over a figure with its spread: `{target, limit, measured, spread, met, verdict}`.
pub fn target(name: &str, figure: Option<Spread>, limit: f64, unit: &str, note: &str) -> Value {
    let v = Verdict::at_most(figure, limit);
    target_with(name, figure, &format!("≤ {limit}{unit}"), &v, note)
}

pub fn target_with(
    name: &str,
    figure: Option<Spread>,
    limit: &str,
    v: &Verdict,
    note: &str,
) -> Value {
    json!({
        "target": name,
        "limit": limit,
        "measured": figure.map(|f| f.median),
        "spread": figure.map(Spread::to_json),
        "shown": figure.map(|f| if f.n > 1 { f.show(2) } else { format!("{:.2}", f.median) }),
        "met": v.met(),
        "verdict": v.name(),
        "note": note,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn met_only_beyond_the_spread() {
        let s = |v: &[f64]| Spread::of(v);
        assert_eq!(s(&[3.0, 1.0, 2.0]).unwrap().median, 2.0);
        assert_eq!(Verdict::at_most(s(&[0.5, 0.9]), 1.0), Verdict::Met);
        assert_eq!(Verdict::at_most(s(&[0.5, 1.2]), 1.0), Verdict::WithinNoise);
        assert_eq!(Verdict::at_most(s(&[1.1, 1.2]), 1.0), Verdict::Missed);
        assert!(matches!(
            Verdict::at_most(None, 1.0),
            Verdict::NotMeasured(_)
        ));
        // lbtrace's overhead near zero on noise against bpftrace's: no ratio is resolved.
        let none = s(&[100.0, 120.0]).unwrap();
        let lb = s(&[95.0, 125.0]).unwrap().minus(none);
        let bp = s(&[110.0, 150.0]).unwrap().minus(none);
        assert!(lb.min < 0.0 && bp.min < 0.0);
        assert_eq!(lb.ratio(bp), None);
        // A clear case either way.
        let bp = s(&[400.0, 420.0]).unwrap().minus(none);
        assert_eq!(Verdict::at_most(lb.ratio(bp), 1.0), Verdict::Met);
        let lb = s(&[900.0, 950.0]).unwrap().minus(none);
        assert_eq!(Verdict::at_most(lb.ratio(bp), 1.0), Verdict::Missed);
    }

    #[test]
    fn paired_ratios_cancel_a_drift_between_rounds() {
        // The machine slows by 100 ns a drop each round; lbtrace always adds 50, bpftrace 100.
        let none = [(0, 1000.0), (1, 1100.0), (2, 1200.0)];
        let lb = [(0, 1050.0), (1, 1150.0), (2, 1250.0)];
        let bp = [(0, 1100.0), (1, 1200.0), (2, 1300.0)];
        let p = Spread::paired_ratio(&none, &lb, &bp).unwrap();
        assert_eq!((p.min, p.median, p.max, p.n), (0.5, 0.5, 0.5, 3));
        // The ranges' ratio spans the drift.
        let r =
            |v: &[(usize, f64)]| Spread::of(&v.iter().map(|x| x.1).collect::<Vec<_>>()).unwrap();
        let wide = r(&lb).minus(r(&none)).ratio(r(&bp).minus(r(&none)));
        assert_eq!(wide, None, "bpftrace's range reaches below zero");
        // Only rounds all three have count; bpftrace at or below the base resolves nothing.
        let p = Spread::paired_ratio(&none, &lb[..2], &bp).unwrap();
        assert_eq!(p.n, 2);
        assert_eq!(Spread::paired_ratio(&none, &lb, &none), None);
    }
}
