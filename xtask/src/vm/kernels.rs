//! The kernels of the matrix: Debian's packages, fetched with apt and unpacked under
//! target/vm/kernels/, reused on the next run.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::util::{output, run};

/// One kernel of the matrix, by the name users give it.
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    /// `--kernel` value: 6.1, 6.12, 6.1-rt, 6.12-rt.
    pub label: &'static str,
    /// Regex for `apt-cache search --names-only`; the newest match wins.
    pattern: &'static str,
}

pub const MATRIX: &[Spec] = &[
    Spec {
        label: "6.1",
        pattern: r"^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$",
    },
    Spec {
        label: "6.12",
        pattern: r"^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64-unsigned$",
    },
    Spec {
        label: "6.1-rt",
        pattern: r"^linux-image-6\.1\.0-[0-9]+-rt-amd64-unsigned$",
    },
    Spec {
        label: "6.12-rt",
        pattern: r"^linux-image-6\.12\.[0-9]+\+deb12-rt-amd64-unsigned$",
    },
];

/// `--kernel` → the specs it names.
pub fn select(which: &str) -> Result<Vec<Spec>> {
    if which == "all" {
        return Ok(MATRIX.to_vec());
    }
    let mut out = Vec::new();
    for w in which.split(',') {
        match MATRIX.iter().find(|s| s.label == w) {
            Some(s) => out.push(*s),
            None => bail!(
                "unknown kernel {w}: one of {} or all",
                MATRIX
                    .iter()
                    .map(|s| s.label)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
    Ok(out)
}

/// A kernel unpacked on disk.
pub struct Kernel {
    pub label: &'static str,
    pub package: String,
    /// `uname -r` of the guest.
    pub release: String,
    pub vmlinuz: PathBuf,
    /// lib/modules/<release> of the package.
    pub modules: PathBuf,
}

/// Sort key of a package name: its numbers in order (6.1.0-57 < 6.1.0-100).
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// The newest package matching `spec`, from apt's lists (refreshed once when they know none).
fn resolve(spec: &Spec) -> Result<String> {
    let search = || -> Result<Option<String>> {
        let out = output(Command::new("apt-cache").args(["search", "--names-only", spec.pattern]))?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .max_by_key(|n| version_key(n))
            .map(str::to_owned))
    };
    if let Some(p) = search()? {
        return Ok(p);
    }
    run(Command::new("apt-get").args(["update", "-q"]))?;
    search()?.with_context(|| format!("no Debian package matches {}", spec.pattern))
}

/// Downloads and unpacks the kernel of `spec` under `cache`, unless done before.
pub fn prepare(spec: &Spec, cache: &Path) -> Result<Kernel> {
    let package = match resolve(spec) {
        Ok(p) => p,
        // Offline: the package a previous run unpacked still serves.
        Err(e) => std::fs::read_to_string(cache.join(format!("{}.package", spec.label)))
            .map(|s| s.trim().to_owned())
            .map_err(|_| e)?,
    };
    let dir = cache.join(&package);
    if !dir.join(".unpacked").is_file() {
        let debs = cache.join("debs");
        std::fs::create_dir_all(&debs)?;
        eprintln!("    apt-get download {package}");
        run(Command::new("apt-get")
            .args(["download", "-q", "-o", "APT::Sandbox::User=root", &package])
            .current_dir(&debs))?;
        let deb = std::fs::read_dir(&debs)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{package}_")))
            })
            .with_context(|| format!("apt-get download left no {package}_*.deb"))?;
        let _ = std::fs::remove_dir_all(&dir);
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir))?;
        std::fs::remove_file(&deb)?;
        std::fs::write(dir.join(".unpacked"), "")?;
    }
    std::fs::write(cache.join(format!("{}.package", spec.label)), &package)?;
    let vmlinuz = std::fs::read_dir(dir.join("boot"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .with_context(|| format!("{package} has no boot/vmlinuz-*"))?;
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or_default()
        .to_owned();
    let modules = dir.join("lib/modules").join(&release);
    if !modules.join("modules.dep").is_file() {
        // The package leaves modules.dep to depmod at install time.
        run(Command::new("depmod").arg("-b").arg(&dir).arg(&release))?;
    }
    anyhow::ensure!(
        modules.join("modules.dep").is_file(),
        "{} has no modules.dep",
        modules.display()
    );
    Ok(Kernel {
        label: spec.label,
        package,
        release,
        vmlinuz,
        modules,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_package_sorts_numerically() {
        let a = "linux-image-6.1.0-9-cloud-amd64-unsigned";
        let b = "linux-image-6.1.0-57-cloud-amd64-unsigned";
        assert!(version_key(b) > version_key(a));
        assert!(select("6.12-rt").is_ok());
        assert!(select("5.10").is_err());
        assert_eq!(select("all").unwrap().len(), 4);
    }
}
