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

/// The inode of a network namespace given as an inode, a path (`/proc/PID/ns/net`,
/// `/run/netns/NAME`) or a name `ip netns` knows.
pub fn inode_of(spec: &str) -> Result<u32, String> {
    if let Ok(n) = spec.parse::<u32>() {
        return Ok(n);
    }
    let path = if spec.contains('/') {
        PathBuf::from(spec)
    } else {
        Path::new("/run/netns").join(spec)
    };
    let m = fs::metadata(&path)
        .map_err(|e| format!("network namespace `{spec}`: {}: {e}", path.display()))?;
    u32::try_from(m.ino()).map_err(|_| format!("network namespace `{spec}`: inode out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_by_inode_path_or_name() {
        assert_eq!(inode_of("4026531840"), Ok(4_026_531_840));
        let own = fs::metadata("/proc/self/ns/net").map(|m| m.ino() as u32);
        if let Ok(own) = own {
            assert_eq!(inode_of("/proc/self/ns/net"), Ok(own));
        }
        let e = inode_of("no-such-ns-lbtrace").unwrap_err();
        assert!(
            e.starts_with("network namespace `no-such-ns-lbtrace`: /run/netns/"),
            "{e}"
        );
    }
}
