//! Booting a guest under qemu (TCG: nested KVM does not run here) and reading what its serial
//! console printed, each line with the time it arrived.

use std::{
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

/// A console line and the seconds since boot started when it arrived.
pub struct Line {
    pub at: f64,
    pub text: String,
}

pub struct Boot {
    pub lines: Vec<Line>,
    pub seconds: f64,
    /// The guest did not power off in time and was killed.
    pub timed_out: bool,
}

/// Boots `vmlinuz` with `initrd`, 2 vCPUs, no network card, pointers printed unhashed; the guest's console goes to `log`
/// (and lines starting with VMTEST to stderr, as progress). Kills it after `timeout`.
pub fn boot(vmlinuz: &Path, initrd: &Path, log: &Path, timeout: Duration) -> Result<Boot> {
    // thread=single: under multi-threaded TCG a vCPU can run a stale int3 after the other one
    // has finished patching a static key (every probe attach does), and the guest oopses
    // ("Oops: int3" in ttwu_do_activate on 6.12-rt, intermittently).
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg,thread=single",
            "-smp",
            "2",
            "-m",
            "2048",
            "-no-reboot",
        ])
        .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
        .args(["-nic", "none"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        // no_hash_pointers: 6.1 prints kfree_skb's location with %p, which the tracefs oracle
        // resolves through /proc/kallsyms only when it is the real address.
        .args(["-append", "console=ttyS0 panic=-1 quiet no_hash_pointers"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting qemu-system-x86_64 (run `cargo xtask setup`)")?;
    let start = Instant::now();
    let stdout = child.stdout.take().context("qemu stdout")?;
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            let text = String::from_utf8_lossy(&line).trim_end().to_owned();
            if tx.send(text).is_err() {
                break;
            }
        }
    });
    let mut file = std::fs::File::create(log)?;
    let mut lines = Vec::new();
    let mut timed_out = false;
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        match rx.recv_timeout(left.max(Duration::from_millis(1))) {
            Ok(text) => {
                let at = start.elapsed().as_secs_f64();
                writeln!(file, "[{at:8.2}] {text}")?;
                if text.starts_with("VMTEST") {
                    eprintln!("    [{at:6.1}s] {text}");
                }
                lines.push(Line { at, text });
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                let _ = child.kill();
                break;
            }
        }
    }
    let _ = child.wait();
    let _ = reader.join();
    Ok(Boot {
        lines,
        seconds: start.elapsed().as_secs_f64(),
        timed_out,
    })
}
