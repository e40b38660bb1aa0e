//! Running the real `lbtrace` binary and collecting what it printed.

use std::{
    io::{BufRead, BufReader, Read},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// The binary under test: `LBTRACE_BIN` (set by `cargo xtask test`) or target/release/lbtrace.
pub fn bin() -> PathBuf {
    std::env::var_os("LBTRACE_BIN").map_or_else(
        || {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/release/lbtrace"
            ))
        },
        PathBuf::from,
    )
}

/// A command running the binary under test; fails when it was not built.
pub fn binary() -> Result<Command> {
    let b = bin();
    if !b.is_file() {
        bail!("{} missing: run `cargo xtask build`", b.display());
    }
    Ok(Command::new(b))
}

/// Runs `lbtrace ARGS` to completion.
pub fn run(args: &[&str]) -> Result<std::process::Output> {
    binary()?
        .args(args)
        .output()
        .with_context(|| format!("running {}", bin().display()))
}

/// A running `lbtrace watch`.
pub struct Watch {
    child: Child,
    stdout: JoinHandle<String>,
    stderr: JoinHandle<String>,
}

/// What a finished `lbtrace watch --json` printed.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// Every non-summary object.
    pub events: Vec<Value>,
    pub summary: Value,
}

impl Watch {
    /// Starts `lbtrace watch ARGS` and waits until its probes are attached.
    pub fn start(args: &[&str]) -> Result<Self> {
        Self::spawn(binary()?, "watch", args, false)
    }

    /// Like [`Watch::start`], but what lbtrace prints goes straight to our stdout (for demos).
    pub fn start_live(args: &[&str]) -> Result<Self> {
        Self::spawn(binary()?, "watch", args, true)
    }

    /// Like [`Watch::start`], through `lbtrace`: a command that runs the binary (under
    /// `setpriv`, `nsenter`, ...), to which `watch ARGS` are appended.
    pub fn start_via(lbtrace: Command, args: &[&str]) -> Result<Self> {
        Self::spawn(lbtrace, "watch", args, false)
    }

    /// Starts another streaming subcommand (`record`, `diagnose`) the same way.
    pub fn start_command(command: &str, args: &[&str]) -> Result<Self> {
        Self::spawn(binary()?, command, args, false)
    }

    fn spawn(mut lbtrace: Command, command: &str, args: &[&str], live: bool) -> Result<Self> {
        let mut child = lbtrace
            .arg(command)
            .args(args)
            .stdout(if live {
                Stdio::inherit()
            } else {
                Stdio::piped()
            })
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {lbtrace:?}"))?;
        let out = child.stdout.take();
        let err = child.stderr.take().context("stderr")?;
        let stdout = std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut out) = out {
                let _ = out.read_to_string(&mut s);
            }
            s
        });
        let (ready_tx, ready_rx) = mpsc::channel();
        let stderr = std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if line.starts_with("lbtrace: tracing") {
                    let _ = ready_tx.send(());
                }
                if live {
                    eprintln!("{line}");
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        let mut w = Self {
            child,
            stdout,
            stderr,
        };
        if ready_rx.recv_timeout(Duration::from_secs(30)).is_err() {
            let _ = w.child.kill();
            let _ = w.child.wait();
            let err = std::mem::replace(&mut w.stderr, std::thread::spawn(String::new))
                .join()
                .unwrap_or_default();
            bail!("lbtrace watch did not become ready: {err}");
        }
        Ok(w)
    }

    fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// The lbtrace process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the process (SIGSTOP): its ring buffer fills while the kernel goes on.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// Sends SIGINT and collects the output.
    pub fn stop(self) -> Result<Finished> {
        self.signal(libc::SIGINT);
        self.wait()
    }

    /// [`Watch::stop`], then fails unless lbtrace exited 0 and printed its summary: a crash
    /// must never pass for "nothing matched".
    #[track_caller]
    pub fn stop_ok(self) -> Finished {
        let f = self.stop().expect("lbtrace stops");
        f.assert_ok();
        f
    }

    /// Waits for the process and returns its raw output (for non-JSON commands).
    pub fn wait_raw(mut self) -> Result<(ExitStatus, String, String)> {
        let status = self.child.wait()?;
        let stdout = std::mem::replace(&mut self.stdout, std::thread::spawn(String::new))
            .join()
            .unwrap_or_default();
        let stderr = std::mem::replace(&mut self.stderr, std::thread::spawn(String::new))
            .join()
            .unwrap_or_default();
        Ok((status, stdout, stderr))
    }

    /// Waits for a watch that ends by itself (--duration, --count).
    pub fn wait(self) -> Result<Finished> {
        let (status, stdout, stderr) = self.wait_raw()?;
        let mut events = Vec::new();
        let mut summary = Value::Null;
        for line in stdout.lines() {
            let v: Value = serde_json::from_str(line)
                .with_context(|| format!("lbtrace printed a line that is not JSON: {line}"))?;
            if v["kind"] == "summary" {
                summary = v;
            } else {
                events.push(v);
            }
        }
        Ok(Finished {
            status,
            stdout,
            stderr,
            events,
            summary,
        })
    }
}

impl Drop for Watch {
    /// A test that fails mid-way must not leave lbtrace running (and its programs attached).
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Finished {
    /// Panics unless lbtrace exited with status 0 and its last line was its summary.
    #[track_caller]
    pub fn assert_ok(&self) {
        assert!(
            self.status.success(),
            "lbtrace exited with {}: {}",
            self.status,
            self.stderr
        );
        let last = self.stdout.lines().rev().find(|l| !l.trim().is_empty());
        assert!(
            self.summary["kind"] == "summary"
                && last.is_some_and(|l| l.contains("\"kind\":\"summary\"")),
            "lbtrace printed no summary last: {}",
            self.stdout
        );
    }

    /// Events of `kind` with `reason`.
    pub fn drops<'a>(&'a self, reason: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.events
            .iter()
            .filter(move |e| e["kind"] == "drop" && e["reason"] == reason)
    }

    /// The summary's exact kernel count for `reason`.
    pub fn counted(&self, reason: &str) -> u64 {
        self.summary["drops_by_reason"][reason]
            .as_u64()
            .unwrap_or(0)
    }
}
