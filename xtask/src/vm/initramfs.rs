//! The guest's initramfs: busybox, lbtrace, the suite's test binaries, the host tools they run
//! (with the shared libraries `ldd` names) and the kernel modules the suite needs.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use super::kernels::Kernel;
use crate::util::{output, run};

/// Tools the tests run, from the host (Debian's builds, so their libraries come along).
const TOOLS: &[&str] = &[
    "/usr/sbin/ip",
    "/usr/sbin/nft",
    "/usr/bin/arping",
    "/usr/sbin/conntrack",
];

/// Modules loaded at boot; the rest of netfilter's load on demand through /sbin/modprobe.
pub const BOOT_MODULES: &[&str] = &[
    "veth",
    "bridge",
    "nf_tables",
    "nf_conntrack",
    "nf_nat",
    "nft_ct",
    "nft_nat",
    "nft_chain_nat",
    "nft_masq",
    "nft_reject_inet",
];

/// Directories whose modules all go in (nft loads expression modules by name at run time).
const MODULE_DIRS: &[&str] = &[
    "kernel/net/netfilter",
    "kernel/net/ipv4/netfilter",
    "kernel/net/ipv6/netfilter",
    "kernel/net/bridge",
    "kernel/drivers/net/veth.ko",
    // libcrc32c (nf_conntrack, nf_nat) needs the crc32c algorithm: a module on the rt kernels
    "kernel/crypto/crc32c_generic.ko",
];

/// What goes into every guest.
pub struct Payload {
    pub lbtrace: PathBuf,
    /// Test binary name (drops, conntrack, …) → its path.
    pub tests: BTreeMap<String, PathBuf>,
    /// Extra host binaries (the fault-injection tool).
    pub extra: Vec<PathBuf>,
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// Copies `bin` to `root/dest` and every shared library it needs to the same path in `root`.
fn copy_with_libs(root: &Path, bin: &Path, dest: &str) -> Result<()> {
    copy(bin, &root.join(dest.trim_start_matches('/')))?;
    let out = output(Command::new("ldd").arg(bin))?;
    for lib in String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let to = root.join(lib.trim_start_matches('/'));
        if !to.exists() {
            // Copy the file a symlink points to, under the name the binary asks for.
            let real = std::fs::canonicalize(lib)?;
            copy(&real, &to)?;
        }
    }
    Ok(())
}

/// `modules.dep` as (module path → dependencies), paths relative to lib/modules/<release>.
fn module_deps(modules: &Path) -> Result<BTreeMap<String, Vec<String>>> {
    let text = std::fs::read_to_string(modules.join("modules.dep"))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(m, deps)| {
            (
                m.to_owned(),
                deps.split_whitespace().map(str::to_owned).collect(),
            )
        })
        .collect())
}

/// The modules under MODULE_DIRS and everything they depend on.
fn module_closure(deps: &BTreeMap<String, Vec<String>>) -> BTreeSet<String> {
    let mut todo: Vec<String> = deps
        .keys()
        .filter(|m| MODULE_DIRS.iter().any(|d| m.starts_with(d)))
        .cloned()
        .collect();
    let mut all = BTreeSet::new();
    while let Some(m) = todo.pop() {
        if all.insert(m.clone()) {
            todo.extend(deps.get(&m).into_iter().flatten().cloned());
        }
    }
    all
}

/// Copies the modules (decompressed: busybox modprobe reads plain .ko) and writes their
/// modules.dep with the names changed to match.
fn install_modules(root: &Path, kernel: &Kernel) -> Result<()> {
    let deps = module_deps(&kernel.modules)?;
    let wanted = module_closure(&deps);
    let dest = root.join("lib/modules").join(&kernel.release);
    let plain = |m: &str| {
        m.trim_end_matches(".xz")
            .trim_end_matches(".zst")
            .to_owned()
    };
    for m in &wanted {
        let from = kernel.modules.join(m);
        let to = dest.join(plain(m));
        std::fs::create_dir_all(to.parent().context("module path")?)?;
        if m.ends_with(".xz") {
            let out = output(Command::new("xz").arg("-dc").arg(&from))?;
            std::fs::write(&to, out.stdout)?;
        } else if m.ends_with(".zst") {
            let out = output(Command::new("zstd").arg("-dc").arg(&from))?;
            std::fs::write(&to, out.stdout)?;
        } else {
            copy(&from, &to)?;
        }
    }
    let mut dep = String::new();
    for m in &wanted {
        let ds: Vec<String> = deps[m].iter().map(|d| plain(d)).collect();
        dep.push_str(&format!("{}: {}\n", plain(m), ds.join(" ")));
    }
    std::fs::write(dest.join("modules.dep"), dep)?;
    for f in [
        "modules.builtin",
        "modules.order",
        "modules.alias",
        "modules.softdep",
    ] {
        if kernel.modules.join(f).is_file() {
            copy(&kernel.modules.join(f), &dest.join(f))?;
        }
    }
    Ok(())
}

/// Builds `dir/initramfs.cpio` with `init` as /init; returns its path.
pub fn build(dir: &Path, kernel: &Kernel, payload: &Payload, init: &str) -> Result<PathBuf> {
    let root = dir.join("root");
    let _ = std::fs::remove_dir_all(&root);
    for d in [
        "bin", "sbin", "proc", "sys", "dev", "run", "tmp", "etc", "t", "root",
    ] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::create_dir_all(root.join("var"))?;
    symlink("../run", root.join("var/run"))?;
    copy(Path::new("/usr/bin/busybox"), &root.join("bin/busybox"))?;
    for applet in ["sh", "modprobe"] {
        symlink("busybox", root.join("bin").join(applet))?;
    }
    symlink("../bin/busybox", root.join("sbin/modprobe"))?;
    for tool in TOOLS {
        copy_with_libs(&root, Path::new(tool), tool)?;
    }
    copy_with_libs(&root, &payload.lbtrace, "/bin/lbtrace")?;
    for (name, path) in &payload.tests {
        copy_with_libs(&root, path, &format!("/t/{name}"))?;
    }
    for path in &payload.extra {
        let name = path.file_name().context("extra binary name")?;
        copy_with_libs(&root, path, &format!("/bin/{}", name.to_string_lossy()))?;
    }
    install_modules(&root, kernel)?;
    std::fs::write(root.join("init"), init)?;
    run(Command::new("chmod").arg("755").arg(root.join("init")))?;
    let cpio = dir.join("initramfs.cpio");
    run(Command::new("sh")
        .arg("-c")
        .arg("find . | LC_ALL=C sort | cpio -o -H newc --quiet > \"$0\"")
        .arg(&cpio)
        .current_dir(&root))?;
    Ok(cpio)
}
