//! What the running kernel's BTF says: struct member offsets for the programs and the names of
//! the drop reasons. Nothing here is a table fixed at build time.

use std::{collections::BTreeMap, path::Path};

use btf_rs::{Btf, BtfType, Type};

/// Where the kernel publishes its BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read kernel BTF at {path}: {source}")]
    Read { path: String, source: btf_rs::Error },
    #[error("kernel BTF has no {kind} named `{name}`")]
    MissingType { kind: &'static str, name: String },
    #[error("kernel BTF: struct {strukt} has no member `{member}`")]
    MissingMember { strukt: String, member: String },
    #[error("kernel BTF: {0}")]
    Other(#[from] btf_rs::Error),
}

pub struct KernelBtf {
    btf: Btf,
}

impl KernelBtf {
    pub fn load(path: &Path) -> Result<Self, BtfError> {
        let btf = Btf::from_file(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self { btf })
    }

    fn named_struct(&self, name: &str) -> Result<btf_rs::Struct, BtfError> {
        let types = self.btf.resolve_types_by_name(name).unwrap_or_default();
        types
            .into_iter()
            .find_map(|t| match t {
                Type::Struct(s) if !s.members.is_empty() => Some(s),
                _ => None,
            })
            .ok_or_else(|| BtfError::MissingType {
                kind: "struct",
                name: name.to_owned(),
            })
    }

    /// `sizeof(struct name)`.
    pub fn struct_size(&self, name: &str) -> Result<u32, BtfError> {
        let s = self.named_struct(name)?;
        u32::try_from(s.size()).map_err(|_| BtfError::MissingType {
            kind: "sized struct",
            name: name.to_owned(),
        })
    }

    /// Byte offset of `path` (dot-separated, e.g. `__sk_common.skc_net`) inside `struct strukt`,
    /// looking through anonymous unions and structs on the way.
    pub fn member_offset(&self, strukt: &str, path: &str) -> Result<u32, BtfError> {
        let mut current = self.named_struct(strukt)?;
        let mut total_bits = 0u32;
        let parts: Vec<&str> = path.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            let (bits, member_type) =
                self.find_member(&current, part)?
                    .ok_or_else(|| BtfError::MissingMember {
                        strukt: strukt.to_owned(),
                        member: path.to_owned(),
                    })?;
            total_bits += bits;
            if i + 1 < parts.len() {
                current = self
                    .as_struct(member_type)?
                    .ok_or_else(|| BtfError::MissingMember {
                        strukt: strukt.to_owned(),
                        member: path.to_owned(),
                    })?;
            }
        }
        Ok(total_bits / 8)
    }

    /// Finds `name` among the members of `s`, descending into anonymous members. Returns the bit
    /// offset from the start of `s` and the member's type id.
    fn find_member(&self, s: &btf_rs::Struct, name: &str) -> Result<Option<(u32, u32)>, BtfError> {
        for m in &s.members {
            let member_name = self.btf.resolve_name(m).unwrap_or_default();
            let Some(type_id) = m.get_type_id() else {
                continue;
            };
            if member_name == name {
                return Ok(Some((m.bit_offset(), type_id)));
            }
            if member_name.is_empty() {
                if let Some(inner) = self.as_struct(type_id)? {
                    if let Some((bits, t)) = self.find_member(&inner, name)? {
                        return Ok(Some((m.bit_offset() + bits, t)));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Resolves typedefs and qualifiers down to a struct or union, if that is what `id` is.
    fn as_struct(&self, id: u32) -> Result<Option<btf_rs::Struct>, BtfError> {
        let mut t = self.btf.resolve_type_by_id(id)?;
        for _ in 0..16 {
            match t {
                Type::Struct(s) | Type::Union(s) => return Ok(Some(s)),
                Type::Typedef(_) | Type::Const(_) | Type::Volatile(_) | Type::TypeTag(_) => {
                    let inner = t.as_btf_type().and_then(|b| b.get_type_id());
                    match inner {
                        Some(next) => t = self.btf.resolve_type_by_id(next)?,
                        None => return Ok(None),
                    }
                }
                _ => return Ok(None),
            }
        }
        Ok(None)
    }

    /// `(value, name)` pairs of `enum name`.
    pub fn enum_values(&self, name: &str) -> Result<Vec<(u64, String)>, BtfError> {
        for t in self.btf.resolve_types_by_name(name).unwrap_or_default() {
            match t {
                Type::Enum(e) => {
                    return Ok(e
                        .members
                        .iter()
                        .map(|m| {
                            (
                                u64::from(m.val()),
                                self.btf.resolve_name(m).unwrap_or_default(),
                            )
                        })
                        .collect())
                }
                Type::Enum64(e) => {
                    return Ok(e
                        .members
                        .iter()
                        .map(|m| (m.val(), self.btf.resolve_name(m).unwrap_or_default()))
                        .collect())
                }
                _ => {}
            }
        }
        Err(BtfError::MissingType {
            kind: "enum",
            name: name.to_owned(),
        })
    }
}

/// Bits above this shift select the subsystem of a drop reason (`SKB_DROP_REASON_SUBSYS_SHIFT`).
pub const SUBSYS_SHIFT: u32 = 16;

/// Drop-reason names of the running kernel.
#[derive(Clone, Debug, Default)]
pub struct DropReasons {
    core: BTreeMap<u32, String>,
    subsystems: BTreeMap<u32, String>,
}

impl DropReasons {
    /// Reads `enum skb_drop_reason` (names without the `SKB_DROP_REASON_` prefix) and
    /// `enum skb_drop_reason_subsys`.
    pub fn from_btf(btf: &KernelBtf) -> Result<Self, BtfError> {
        let mut core = BTreeMap::new();
        for (value, name) in btf.enum_values("skb_drop_reason")? {
            let short = name
                .strip_prefix("SKB_DROP_REASON_")
                .or_else(|| name.strip_prefix("SKB_"))
                .unwrap_or(&name);
            // The kernel's own markers, not reasons a packet is dropped for.
            if matches!(short, "MAX" | "SUBSYS_MASK") {
                continue;
            }
            if let Ok(v) = u32::try_from(value) {
                core.entry(v).or_insert_with(|| short.to_owned());
            }
        }
        let mut subsystems = BTreeMap::new();
        if let Ok(values) = btf.enum_values("skb_drop_reason_subsys") {
            for (value, name) in values {
                let short = name
                    .strip_prefix("SKB_DROP_REASON_SUBSYS_")
                    .unwrap_or(&name);
                if short != "NUM" && value != 0 {
                    if let Ok(v) = u32::try_from(value) {
                        subsystems.insert(v, short.to_owned());
                    }
                }
            }
        }
        Ok(Self { core, subsystems })
    }

    /// The kernel's name for `code`; unknown codes keep their number.
    pub fn name(&self, code: u32) -> String {
        let subsys = code >> SUBSYS_SHIFT;
        if subsys == 0 {
            if let Some(n) = self.core.get(&code) {
                return n.clone();
            }
            return format!("UNKNOWN_{code}");
        }
        let sub = self
            .subsystems
            .get(&subsys)
            .cloned()
            .unwrap_or_else(|| format!("SUBSYS_{subsys}"));
        format!("{sub}:{}", code & ((1 << SUBSYS_SHIFT) - 1))
    }

    /// Code of a reason named `name` (case-insensitive, with or without the kernel prefix).
    pub fn code(&self, name: &str) -> Option<u32> {
        let wanted = name.trim();
        let wanted = wanted
            .strip_prefix("SKB_DROP_REASON_")
            .unwrap_or(wanted)
            .to_ascii_uppercase();
        self.core
            .iter()
            .find(|(_, n)| **n == wanted)
            .map(|(c, _)| *c)
    }

    /// Reasons a packet can be dropped for (not `NOT_DROPPED_YET` or `CONSUMED`).
    pub fn iter(&self) -> impl Iterator<Item = (u32, &str)> {
        self.core
            .iter()
            .filter(|(c, _)| **c >= 2)
            .map(|(c, n)| (*c, n.as_str()))
    }

    pub fn subsystems(&self) -> impl Iterator<Item = (u32, &str)> {
        self.subsystems.iter().map(|(c, n)| (*c, n.as_str()))
    }
}
