//! The agent's configuration file (TOML). Every key is also a flag and an `LBTRACE_*`
//! environment variable; flags and variables win over the file.

use std::{net::SocketAddr, path::Path};

use ipnet::IpNet;
use serde::Deserialize;

use crate::pipeline::attribution::parse_vip;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Invalid { path: String, message: String },
}

/// The file as written: unknown keys are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub vips: Option<Vec<String>>,
    pub metrics_addr: Option<String>,
    pub node_name: Option<String>,
    pub netns: Option<u32>,
    /// The node's namespaces: inodes, paths or `ip netns` names.
    pub node_netns: Option<Vec<String>>,
    pub log_format: Option<String>,
    pub events_file: Option<String>,
    pub events_max_bytes: Option<u64>,
    pub probe_mode: Option<String>,
    pub ring_size: Option<u32>,
    pub no_arp: Option<bool>,
    pub arp_rx: Option<bool>,
    pub discover_vips: Option<bool>,
    pub sample_limit: Option<u32>,
    pub max_vips: Option<u32>,
    pub nat_entries: Option<u32>,
    /// Seconds between reads of kube-proxy's rules (0: not read).
    pub kube_proxy_interval: Option<f64>,
    /// Process names that announce VIPs (`--speaker-comm`).
    pub speaker_comms: Option<Vec<String>>,
    /// The speakers' memberlist port (0: off).
    pub memberlist_port: Option<u16>,
}

/// A process name as the kernel keeps it (`comm`): not empty, no NUL, cut to 15 bytes at a
/// character boundary.
pub fn speaker_comm(s: &str) -> Result<String, String> {
    if s.is_empty() || s.contains('\0') {
        return Err(format!("`{}` is not a process name", s.escape_default()));
    }
    let mut end = s.len().min(15);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Ok(s[..end].to_owned())
}

/// A validated file.
#[derive(Debug, Default)]
pub struct Config {
    pub vips: Vec<IpNet>,
    pub metrics_addr: Option<SocketAddr>,
    pub file: FileConfig,
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Invalid {
            path: path.display().to_string(),
            message,
        })
    }

    /// Parses and validates; the error is one line naming the key (a value's control
    /// characters, such as a newline in a TOML string, are escaped).
    pub fn parse(text: &str) -> Result<Self, String> {
        Self::parse_raw(text).map_err(|e| {
            e.chars()
                .map(|c| {
                    if c.is_control() {
                        c.escape_default().to_string()
                    } else {
                        c.to_string()
                    }
                })
                .collect()
        })
    }

    fn parse_raw(text: &str) -> Result<Self, String> {
        let mut file: FileConfig = toml::from_str(text).map_err(|e| {
            let msg = e.message().lines().next().unwrap_or_default().to_owned();
            match e.span() {
                Some(span) => {
                    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                    format!("line {line}: {msg}")
                }
                None => msg,
            }
        })?;
        let mut vips = Vec::new();
        for (i, v) in file.vips.iter().flatten().enumerate() {
            vips.push(parse_vip(v).map_err(|e| format!("vips[{i}]: {e}"))?);
        }
        let metrics_addr = match &file.metrics_addr {
            Some(a) => Some(
                a.parse::<SocketAddr>()
                    .map_err(|_| format!("metrics_addr: `{a}` is not an address:port"))?,
            ),
            None => None,
        };
        if let Some(f) = &file.log_format {
            if f != "text" && f != "json" {
                return Err(format!("log_format: `{f}` is not text or json"));
            }
        }
        if let Some(m) = &file.probe_mode {
            if !matches!(m.as_str(), "auto" | "btf" | "tracepoint") {
                return Err(format!("probe_mode: `{m}` is not auto, btf or tracepoint"));
            }
        }
        if let Some(r) = file.ring_size {
            if r < 4096 || !r.is_power_of_two() {
                return Err(format!(
                    "ring_size: {r} is not a power of two of at least 4096"
                ));
            }
        }
        if let Some(i) = file.kube_proxy_interval {
            crate::kernel::kubeproxy::interval(i)
                .map_err(|e| format!("kube_proxy_interval: {e}"))?;
        }
        if let Some(comms) = file.speaker_comms.as_mut() {
            for (i, c) in comms.iter_mut().enumerate() {
                *c = speaker_comm(c).map_err(|e| format!("speaker_comms[{i}]: {e}"))?;
            }
        }
        Ok(Self {
            vips,
            metrics_addr,
            file,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_file() {
        let c = Config::parse(
            "vips = [\"10.200.0.100\", \"10.200.1.0/28\"]\nmetrics_addr = \"127.0.0.1:9999\"\nnode_name = \"n1\"\n",
        )
        .unwrap();
        assert_eq!(c.vips.len(), 2);
        assert_eq!(c.metrics_addr.unwrap().port(), 9999);
        assert_eq!(c.file.node_name.as_deref(), Some("n1"));
    }

    #[test]
    fn speaker_keys() {
        let c = Config::parse(
            "speaker_comms = [\"speaker\", \"a-very-long-process-name\"]\nmemberlist_port = 0\n",
        )
        .unwrap();
        let comms = c.file.speaker_comms.unwrap();
        assert_eq!(comms, ["speaker", "a-very-long-pro"]);
        assert_eq!(c.file.memberlist_port, Some(0));
        let e = Config::parse("speaker_comms = [\"\"]").unwrap_err();
        assert!(e.contains("speaker_comms[0]"), "{e}");
    }

    #[test]
    fn one_clear_line_per_bad_key() {
        let e = Config::parse("vips = []\nbogus = 1\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("bogus"), "{e}");
        let e = Config::parse("vips = [\"10.0.0.1\", \"10.0.0.300/24\"]").unwrap_err();
        assert_eq!(e, "vips[1]: `10.0.0.300/24` is not an IP address or CIDR");
        let e = Config::parse("metrics_addr = \"localhost\"").unwrap_err();
        assert!(e.starts_with("metrics_addr:"), "{e}");
        assert!(Config::parse("ring_size = 1000")
            .unwrap_err()
            .starts_with("ring_size"));
        assert!(Config::parse("vips = 3").is_err());
        assert!(Config::parse("kube_proxy_interval = -1")
            .unwrap_err()
            .starts_with("kube_proxy_interval"));
        assert!(Config::parse("kube_proxy_interval = 0.5").is_ok());
        assert!(!Config::parse("vips = [").unwrap_err().contains('\n'));
    }
}
