//! Network namespaces on this host, and running code inside one.

use std::{
    collections::BTreeMap,
    fs::{self, File},
    io,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

/// Every network namespace reachable through a process (`/proc/PID/ns/net`) or a bind mount
/// (`/run/netns/NAME`, as `ip netns` makes), by inode. One path per namespace.
pub fn namespaces() -> BTreeMap<u32, PathBuf> {
    let mut out = BTreeMap::new();
    let mut add = |p: PathBuf| {
        if let Ok(m) = fs::metadata(&p) {
            if let Ok(ino) = u32::try_from(m.ino()) {
                out.entry(ino).or_insert(p);
            }
        }
    };
    if let Ok(dir) = fs::read_dir("/run/netns") {
        for e in dir.flatten() {
            add(e.path());
        }
    }
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            if e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
            {
                add(e.path().join("ns/net"));
            }
        }
    }
    out
}

/// Runs `f` on a thread that has entered the namespace at `path`.
pub fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let ns = File::open(path)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this thread only, with an fd we hold open.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| io::Error::other("netns thread panicked"))?
    })
}
