//! What a guest's console says: each check's outcome and time, what `doctor` found; and the
//! "Kernels" table made from it (target/vm/kernels.md and the README's marked section).

use std::path::Path;

use anyhow::{Context, Result};

use super::{qemu::Boot, suite::Check};

pub struct Outcome {
    pub item: &'static str,
    pub test: &'static str,
    /// None: the guest never reported an end for it.
    pub passed: Option<bool>,
    pub seconds: f64,
}

pub struct KernelResult {
    pub label: String,
    pub release: String,
    pub outcomes: Vec<Outcome>,
    /// `lbtrace doctor`'s probe and feature lines.
    pub doctor: Vec<String>,
    pub seconds: f64,
    pub timed_out: bool,
    pub finished: bool,
    /// The guest kernel's first Oops, BUG or panic line: the checks after it never ran.
    pub crash: Option<String>,
}

impl KernelResult {
    pub fn parse(label: &str, checks: &[&Check], boot: &Boot) -> Self {
        let text = |p: &str| {
            boot.lines
                .iter()
                .find_map(|l| l.text.strip_prefix(p).map(|s| (l.at, s.trim().to_owned())))
        };
        let outcomes = checks
            .iter()
            .map(|c| {
                let begin = text(&format!("VMTEST-BEGIN {}", c.test));
                let end = text(&format!("VMTEST-END {} ", c.test));
                Outcome {
                    item: c.item,
                    test: c.test,
                    passed: end.as_ref().map(|(_, rc)| rc == "0"),
                    seconds: match (begin, end) {
                        (Some((b, _)), Some((e, _))) => e - b,
                        _ => 0.0,
                    },
                }
            })
            .collect();
        let mut doctor = Vec::new();
        let mut inside = false;
        for l in &boot.lines {
            match l.text.as_str() {
                "VMTEST-DOCTOR-BEGIN" => inside = true,
                "VMTEST-DOCTOR-END" => inside = false,
                t if inside => doctor.push(t.to_owned()),
                _ => {}
            }
        }
        Self {
            label: label.to_owned(),
            release: text("VMTEST-KERNEL").map(|(_, r)| r).unwrap_or_default(),
            outcomes,
            doctor,
            seconds: boot.seconds,
            timed_out: boot.timed_out,
            finished: text("VMTEST-DONE").is_some(),
            crash: boot.lines.iter().find_map(|l| crash_line(&l.text)),
        }
    }

    pub fn passed(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|o| o.passed == Some(true))
            .count()
    }

    pub fn ok(&self) -> bool {
        self.finished && !self.timed_out && self.passed() == self.outcomes.len()
    }

    /// The doctor lines about `what` ("probe", "feature"), without the status column.
    fn doctor_lines(&self, what: &str) -> Vec<(bool, String)> {
        self.doctor
            .iter()
            .filter_map(|l| {
                let (mark, rest) = l.split_at(l.len().min(5));
                let rest = rest.trim_start().strip_prefix(what)?;
                Some((mark.trim() == "ok", rest.trim().to_owned()))
            })
            .collect()
    }

    /// Markdown row: kernel, drop probe in use, features, suite result, time.
    fn row(&self) -> String {
        let probes = self.doctor_lines("probe");
        let drop_probe = probes
            .iter()
            .find(|(ok, p)| *ok && p.contains("(drops)"))
            .map(|(_, p)| p.split_whitespace().next().unwrap_or_default().to_owned())
            .unwrap_or_else(|| "none attaches".to_owned());
        let others = probes
            .iter()
            .filter(|(ok, p)| *ok && !p.contains("(drops)") && p.starts_with("tp_btf"))
            .count();
        let mut features: Vec<String> = self
            .doctor_lines("feature")
            .into_iter()
            .map(|(ok, f)| {
                if ok {
                    format!("{f}: on")
                } else {
                    format!("{f}: **off**")
                }
            })
            .collect();
        if features.is_empty() {
            features.push("none (no drop probe)".to_owned());
        }
        // What doctor says the drop hook's arguments allow (6.1: no rx_sk).
        if let Some((_, args)) = self.doctor_lines("args").into_iter().next() {
            features.insert(0, args);
        }
        // How conntrack drops are classified: its hooks, or its statistics.
        if let Some((_, p)) = probes
            .iter()
            .find(|(ok, p)| *ok && p.contains("(conntrack)"))
        {
            let path = p.split_whitespace().next().unwrap_or_default();
            features.push(format!("conntrack events from `{path}`"));
        }
        let failed: Vec<&str> = self
            .outcomes
            .iter()
            .filter(|o| o.passed != Some(true))
            .map(|o| o.item)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let result = if self.ok() {
            format!("pass ({}/{})", self.passed(), self.outcomes.len())
        } else {
            format!(
                "**FAIL** ({}/{}; {}){}",
                self.passed(),
                self.outcomes.len(),
                failed.join(", "),
                if self.timed_out { ", timed out" } else { "" }
            ) + &self
                .crash
                .as_ref()
                .map(|c| format!(", guest kernel crashed: `{c}`"))
                .unwrap_or_default()
        };
        format!(
            "| {} (`{}`) | {drop_probe} (+{others} tp_btf helpers) | {} | {result} | {:.0} s |",
            self.label,
            self.release,
            features.join("; "),
            self.seconds
        )
    }

    /// Detail per check, for the log and the report.
    pub fn detail(&self) -> String {
        let mut s = String::new();
        for o in &self.outcomes {
            let status = match o.passed {
                Some(true) => "pass",
                Some(false) => "FAIL",
                None => "NOT RUN",
            };
            s.push_str(&format!(
                "    {status:<7} {:>6.1}s  {:<24} {}\n",
                o.seconds, o.item, o.test
            ));
        }
        if let Some(c) = &self.crash {
            s.push_str(&format!("    guest kernel crashed: {c}\n"));
        }
        s
    }
}

/// `[   77.42] Oops: int3: 0000 [#1] …` → `Oops: int3: 0000 [#1] …`, for the kernel's crash markers.
fn crash_line(text: &str) -> Option<String> {
    ["Oops:", "BUG:", "Kernel panic"]
        .iter()
        .find_map(|m| text.find(m).map(|at| text[at..].trim().to_owned()))
}

pub const BEGIN: &str = "<!-- kernels:begin (generated by `cargo xtask vm-test`; do not edit) -->";
pub const END: &str = "<!-- kernels:end -->";

/// The table for the README and target/vm/kernels.md.
pub fn table(results: &[KernelResult], self_test: Option<&str>) -> String {
    let mut s = String::from(
        "| kernel | drop probe | features | suite | time (TCG) |\n|---|---|---|---|---|\n",
    );
    for r in results {
        s.push_str(&r.row());
        s.push('\n');
    }
    if let Some(t) = self_test {
        s.push_str(&format!("\nSelf-test of the suite: {t}\n"));
    }
    s
}

/// Replaces the marked section of `readme` with `table`.
pub fn update_readme(readme: &Path, table: &str) -> Result<()> {
    let text = std::fs::read_to_string(readme)?;
    let (head, rest) = text
        .split_once(BEGIN)
        .with_context(|| format!("{} has no `{BEGIN}` marker", readme.display()))?;
    let (_, tail) = rest
        .split_once(END)
        .with_context(|| format!("{} has no `{END}` marker", readme.display()))?;
    std::fs::write(readme, format!("{head}{BEGIN}\n{table}{END}{tail}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::crash_line;

    #[test]
    fn a_guest_oops_is_found_inside_a_test_line() {
        let line = "test nftables_drop_rule_btf ... [   77.423575] Oops: int3: 0000 [#1] PREEMPT_RT SMP NOPTI";
        assert_eq!(
            crash_line(line).as_deref(),
            Some("Oops: int3: 0000 [#1] PREEMPT_RT SMP NOPTI")
        );
        assert_eq!(crash_line("test result: ok. 1 passed"), None);
    }
}
