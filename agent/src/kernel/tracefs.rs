//! Tracefs: where it is mounted, and the record layouts of classic tracepoints.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

/// Tracefs mount points, in the order the kernel documents them.
const TRACEFS: &[&str] = &["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

pub fn tracefs_root() -> Option<PathBuf> {
    TRACEFS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("events").is_dir())
}

/// Why tracefs cannot be used: not mounted, or not readable by this process.
pub fn tracefs_problem() -> String {
    for p in TRACEFS {
        if let Err(e) = fs::read_dir(Path::new(p).join("events")) {
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                return format!("{p}: permission denied (tracefs is readable by root only)");
            }
        }
    }
    "not mounted: mount -t tracefs nodev /sys/kernel/tracing".to_owned()
}

/// Offsets of `fields` in a tracefs `format` file.
pub fn tracepoint_offsets(format: &str, fields: &[&str]) -> Result<BTreeMap<String, u32>, String> {
    let mut found = BTreeMap::new();
    for line in format.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let mut decl = "";
        let mut offset = None;
        for part in rest.split(';') {
            let part = part.trim();
            if let Some(v) = part.strip_prefix("offset:") {
                offset = v.trim().parse::<u32>().ok();
            } else if decl.is_empty() {
                decl = part;
            }
        }
        let name = decl
            .rsplit(|c: char| c.is_whitespace() || c == '*')
            .next()
            .unwrap_or("")
            .split('[')
            .next()
            .unwrap_or("");
        if let (true, Some(off)) = (fields.contains(&name), offset) {
            found.insert(name.to_owned(), off);
        }
    }
    for f in fields {
        if !found.contains_key(*f) {
            return Err(format!("field `{f}` missing from the tracepoint format"));
        }
    }
    Ok(found)
}

/// Offsets of `fields` in the tracefs format of `category/name`.
pub fn tracepoint_fields(
    category: &str,
    name: &str,
    fields: &[&str],
) -> Result<BTreeMap<String, u32>, String> {
    let root = tracefs_root()
        .ok_or("tracefs is not mounted (mount -t tracefs nodev /sys/kernel/tracing)")?;
    let path = root.join("events").join(category).join(name).join("format");
    let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    tracepoint_offsets(&text, fields)
}

/// Reads `path` only if it exists (for `doctor`).
pub fn read_opt(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tracefs_format() {
        let fmt = "name: kfree_skb\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\n\tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;\n\tfield:void * location;\toffset:16;\tsize:8;\tsigned:0;\n\tfield:enum skb_drop_reason reason;\toffset:36;\tsize:4;\tsigned:0;\n\tfield:u8 lladdr[32];\toffset:40;\tsize:32;\tsigned:0;\n";
        let o = tracepoint_offsets(fmt, &["skbaddr", "location", "reason", "lladdr"]).unwrap();
        assert_eq!(o["skbaddr"], 8);
        assert_eq!(o["location"], 16);
        assert_eq!(o["reason"], 36);
        assert_eq!(o["lladdr"], 40);
        assert!(tracepoint_offsets(fmt, &["rx_sk"])
            .unwrap_err()
            .contains("rx_sk"));
    }
}
