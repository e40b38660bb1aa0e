//! Network namespaces that are deleted when dropped, and veth links between them.

use std::{
    fs::File,
    io::Write,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    process::{Command, Output, Stdio},
};

use anyhow::{bail, Context, Result};

use crate::{sh, unique};

pub struct Netns {
    pub name: String,
    pub inode: u32,
}

impl Netns {
    /// Creates `lbt<prefix>…` with loopback up.
    pub fn new(prefix: &str) -> Result<Self> {
        Self::create(&unique(&format!("lbt{prefix}")))
    }

    /// Creates the namespace `name` with loopback up.
    pub fn create(name: &str) -> Result<Self> {
        sh(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Self::open(name)?;
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A handle on an existing namespace; like any handle, it deletes the namespace when
    /// dropped unless [`Netns::keep`] is called.
    pub fn open(name: &str) -> Result<Self> {
        let path = format!("/run/netns/{name}");
        let inode = std::fs::metadata(&path)
            .with_context(|| path.clone())?
            .ino();
        Ok(Self {
            name: name.to_owned(),
            inode: u32::try_from(inode).context("netns inode above 32 bits")?,
        })
    }

    /// Leaves the namespace in place (a lab that outlives this process).
    pub fn keep(self) {
        std::mem::forget(self);
    }

    /// `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        sh(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command to run inside the namespace.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output> {
        sh(self.cmd(program).args(args))
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")])?;
        Ok(())
    }

    /// Loads an nftables ruleset (`nft -f -`).
    pub fn nft(&self, ruleset: &str) -> Result<()> {
        let mut child = self
            .cmd("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting nft")?;
        child
            .stdin
            .take()
            .context("nft stdin")?
            .write_all(ruleset.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "nft -f failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Packets counted by the named nftables counter: an oracle independent of lbtrace.
    pub fn nft_counter(&self, family: &str, table: &str, counter: &str) -> Result<u64> {
        let out = self.exec("nft", &["-j", "list", "counter", family, table, counter])?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        v["nftables"]
            .as_array()
            .and_then(|items| {
                items
                    .iter()
                    .find_map(|i| i.get("counter").and_then(|c| c["packets"].as_u64()))
            })
            .context("no counter in nft output")
    }

    /// Runs `f` on a thread that has entered this namespace: sockets it opens live here, and so
    /// do those of threads it starts.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let file = self.file()?;
        std::thread::scope(|s| {
            s.spawn(|| {
                enter(&file)?;
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
        })
    }

    /// Like [`Netns::run`], on a thread that outlives the call.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<std::thread::JoinHandle<Result<T>>> {
        let file = self.file()?;
        Ok(std::thread::spawn(move || {
            enter(&file)?;
            f()
        }))
    }

    fn file(&self) -> Result<File> {
        let path = format!("/run/netns/{}", self.name);
        File::open(&path).with_context(|| path)
    }
}

/// Moves the calling thread into the namespace `file` refers to.
fn enter(file: &File) -> Result<()> {
    // SAFETY: setns on this thread only, with an fd to a netns file we hold open.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A veth pair with one end in each namespace, both up, with the given addresses (CIDR).
pub fn veth(
    a: &Netns,
    a_if: &str,
    a_addrs: &[&str],
    b: &Netns,
    b_if: &str,
    b_addrs: &[&str],
) -> Result<()> {
    sh(Command::new("ip").args([
        "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns",
        &b.name,
    ]))?;
    for (ns, ifname, addrs) in [(a, a_if, a_addrs), (b, b_if, b_addrs)] {
        for addr in addrs {
            let nodad = if addr.contains(':') {
                vec!["nodad"]
            } else {
                vec![]
            };
            let mut args = vec!["addr", "add", *addr, "dev", ifname];
            args.extend(nodad);
            ns.ip(&args)?;
        }
        ns.ip(&["link", "set", ifname, "up"])?;
    }
    Ok(())
}

impl Netns {
    /// Sum over CPUs of a column of this namespace's `/proc/net/stat/nf_conntrack` (the
    /// kernel's own counters: an oracle lbtrace does not produce).
    pub fn conntrack_stat(&self, column: &str) -> Result<u64> {
        let out = self.exec("cat", &["/proc/net/stat/nf_conntrack"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines();
        let header: Vec<&str> = lines
            .next()
            .context("empty stat file")?
            .split_whitespace()
            .collect();
        let idx = header
            .iter()
            .position(|h| *h == column)
            .with_context(|| format!("no column {column}"))?;
        let mut sum = 0;
        for line in lines {
            let v = line.split_whitespace().nth(idx).context("short row")?;
            sum += u64::from_str_radix(v, 16)?;
        }
        Ok(sum)
    }
}

/// Sets a sysctl of the initial namespace and restores the old value when dropped, even when a
/// test fails.
pub struct SysctlGuard {
    path: String,
    old: String,
}

impl SysctlGuard {
    pub fn set(path: &str, value: &str) -> Result<Self> {
        let old = std::fs::read_to_string(path).with_context(|| path.to_owned())?;
        std::fs::write(path, value).with_context(|| format!("writing {path}"))?;
        Ok(Self {
            path: path.to_owned(),
            old: old.trim().to_owned(),
        })
    }
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.path, &self.old);
    }
}
