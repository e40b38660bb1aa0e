//! The deployment files in deploy/, read offline, and lbtrace run the way they run it.

use std::{
    ffi::OsString,
    io::{ErrorKind, Write},
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

/// deploy/ in the workspace.
pub fn dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy"))
}

/// Runs `kubectl ARGS`, with `stdin` on its standard input, and returns the JSON objects it
/// printed. Only `--local` commands work: the kubeconfig names no cluster, so none is contacted.
pub fn kubectl(args: &[&str], stdin: Option<&[u8]>) -> Result<Vec<Value>> {
    let mut child = Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", "/dev/null")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            ErrorKind::NotFound => anyhow!(
                "kubectl not found: run `cargo xtask setup` (it installs Debian's kubernetes-client)"
            ),
            _ => anyhow!("starting kubectl: {e}"),
        })?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .context("kubectl stdin")?
            .write_all(input)?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::Deserializer::from_slice(&out.stdout)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .context("kubectl printed something other than JSON")
}

/// Every object of deploy/daemonset.yaml as kubectl parses it. `label --local` needs no cluster;
/// `apply --dry-run=client` and `create --dry-run=client` still ask the API server for its
/// resource types, and fail offline.
pub fn manifest() -> Result<Vec<Value>> {
    let path = dir().join("daemonset.yaml");
    let path = path.to_str().context("deploy path is not UTF-8")?;
    kubectl(
        &[
            "label",
            "--local",
            "-o",
            "json",
            "-f",
            path,
            "lbtrace.test/parsed=true",
        ],
        None,
    )
}

/// The one object of `kind` in `objects`.
pub fn object<'a>(objects: &'a [Value], kind: &str) -> Result<&'a Value> {
    let mut found = objects.iter().filter(|o| o["kind"] == kind);
    match (found.next(), found.next()) {
        (Some(o), None) => Ok(o),
        _ => bail!("expected exactly one {kind} in the manifest"),
    }
}

/// The `lbtrace` container of the DaemonSet.
pub fn container(daemonset: &Value) -> Result<&Value> {
    daemonset["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == "lbtrace"))
        .context("no lbtrace container in the DaemonSet")
}

/// The capabilities the container adds, spelled as Kubernetes spells them (`SYS_ADMIN`).
pub fn added_capabilities(container: &Value) -> Vec<String> {
    container["securityContext"]["capabilities"]["add"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The command line (`setpriv ... lbtrace`) that runs the binary under test as the container
/// runtime runs the DaemonSet's container: uid 0 holding exactly `caps` (Kubernetes spelling),
/// with no_new_privs. Prefix it (`nsenter`, `timeout`) or use [`lbtrace_with`].
pub fn argv_with<S: AsRef<str>>(caps: &[S]) -> Result<Vec<OsString>> {
    let bin = crate::lbtrace::bin();
    if !bin.is_file() {
        bail!("{} missing: run `cargo xtask build`", bin.display());
    }
    let set: Vec<String> = std::iter::once("-all".to_owned())
        .chain(
            caps.iter()
                .map(|c| format!("+{}", c.as_ref().to_ascii_lowercase())),
        )
        .collect();
    Ok([
        "setpriv".to_owned(),
        "--no-new-privs".to_owned(),
        "--inh-caps=-all".to_owned(),
        format!("--bounding-set={}", set.join(",")),
    ]
    .into_iter()
    .map(OsString::from)
    .chain([bin.into_os_string()])
    .collect())
}

/// A command running the binary under test with exactly `caps`, as [`argv_with`] describes.
pub fn lbtrace_with<S: AsRef<str>>(caps: &[S]) -> Result<Command> {
    let argv = argv_with(caps)?;
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    Ok(cmd)
}
