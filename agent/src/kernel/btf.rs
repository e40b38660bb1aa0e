//! What the running kernel's BTF says: struct member offsets for the programs and the names of
//! the drop reasons. Nothing here is a table fixed at build time.
//!
//! The reader keeps the raw file and an index of where each type starts, and looks types up
//! when asked: lbtrace needs a few dozen of the kernel's ~100,000 types, and parsing them all
//! would set the daemon's memory peak (tens of MB).

use std::{collections::BTreeMap, path::Path};

/// Where the kernel publishes its BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read kernel BTF at {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("kernel BTF has no {kind} named `{name}`")]
    MissingType { kind: &'static str, name: String },
    #[error("kernel BTF: struct {strukt} has no member `{member}`")]
    MissingMember { strukt: String, member: String },
    #[error("kernel BTF is malformed: {0}")]
    Malformed(&'static str),
    #[error("struct {strukt} member `{member}` lies past the {limit} bytes the programs read")]
    BeyondRead {
        strukt: &'static str,
        member: &'static str,
        limit: u32,
    },
}

const MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;
/// `struct btf_type`: name_off, info, size_or_type.
const TYPE_LEN: usize = 12;

/// BTF kinds (`BTF_KIND_*`, a stable UAPI).
const KIND_PTR: u32 = 2;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// Bytes that follow a type's common part, by kind and member count.
fn extra_len(kind: u32, vlen: usize) -> Option<usize> {
    Some(match kind {
        1 | 14 | 17 => 4,             // int, var, decl_tag
        3 => 12,                      // array
        4 | 5 | 15 | 19 => 12 * vlen, // struct, union, datasec, enum64
        6 | 13 => 8 * vlen,           // enum, func_proto
        2 | 7..=12 | 16 | 18 => 0,    // ptr, fwd, typedef, qualifiers, func, float, tag
        _ => return None,
    })
}

/// One type as the file holds it.
#[derive(Clone, Copy, Debug)]
struct Ty {
    name_off: u32,
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    /// Size (structs, enums) or the referenced type (typedefs, qualifiers).
    size_or_type: u32,
    /// Where the members start.
    body: usize,
}

pub struct KernelBtf {
    data: Vec<u8>,
    strings: std::ops::Range<usize>,
    /// Byte offset of type `id` at index `id - 1`.
    index: Vec<u32>,
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    let b = data.get(at..at + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

impl KernelBtf {
    pub fn load(path: &Path) -> Result<Self, BtfError> {
        let read_error = |source| BtfError::Read {
            path: path.display().to_string(),
            source,
        };
        let data = std::fs::read(path).map_err(read_error)?;
        Self::parse(data).map_err(|e| match e {
            BtfError::Malformed(what) => {
                read_error(std::io::Error::new(std::io::ErrorKind::InvalidData, what))
            }
            other => other,
        })
    }

    /// Checks the header and indexes where each type starts (little-endian BTF, as on every
    /// architecture lbtrace runs on).
    pub fn parse(data: Vec<u8>) -> Result<Self, BtfError> {
        let bad = BtfError::Malformed;
        let magic = data.get(0..2).ok_or(bad("shorter than its header"))?;
        if u16::from_le_bytes([magic[0], magic[1]]) != MAGIC {
            return Err(bad("wrong magic (not little-endian BTF)"));
        }
        let field = |i: usize| u32_at(&data, 4 + 4 * i).map(|v| v as usize);
        let (Some(hdr), Some(type_off), Some(type_len), Some(str_off), Some(str_len)) =
            (field(0), field(1), field(2), field(3), field(4))
        else {
            return Err(bad("shorter than its header"));
        };
        let types = hdr.max(HEADER_LEN) + type_off..hdr.max(HEADER_LEN) + type_off + type_len;
        let strings = hdr.max(HEADER_LEN) + str_off..hdr.max(HEADER_LEN) + str_off + str_len;
        if types.end > data.len() || strings.end > data.len() {
            return Err(bad("sections past the end of the file"));
        }
        let mut index = Vec::new();
        let mut at = types.start;
        while at < types.end {
            let info = u32_at(&data, at + 4).ok_or(bad("truncated type"))?;
            let extra = extra_len((info >> 24) & 0x1f, (info & 0xffff) as usize)
                .ok_or(bad("unknown type kind"))?;
            index.push(u32::try_from(at).map_err(|_| bad("too large"))?);
            at += TYPE_LEN + extra;
        }
        if at != types.end {
            return Err(bad("types overrun their section"));
        }
        Ok(Self {
            data,
            strings,
            index,
        })
    }

    fn ty(&self, id: u32) -> Option<Ty> {
        let at = *self.index.get(usize::try_from(id).ok()?.checked_sub(1)?)? as usize;
        let info = u32_at(&self.data, at + 4)?;
        Some(Ty {
            name_off: u32_at(&self.data, at)?,
            kind: (info >> 24) & 0x1f,
            vlen: (info & 0xffff) as usize,
            kind_flag: info >> 31 == 1,
            size_or_type: u32_at(&self.data, at + 8)?,
            body: at + TYPE_LEN,
        })
    }

    fn name(&self, off: u32) -> &str {
        let start = self.strings.start + off as usize;
        let bytes = self.data.get(start..self.strings.end).unwrap_or_default();
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        std::str::from_utf8(&bytes[..end]).unwrap_or_default()
    }

    /// Types named `name`, in id order.
    fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = Ty> + 'a {
        (1..=self.index.len() as u32)
            .filter_map(|id| self.ty(id))
            .filter(move |t| self.name(t.name_off) == name)
    }

    fn named_struct(&self, name: &str) -> Result<Ty, BtfError> {
        self.named(name)
            .find(|t| t.kind == KIND_STRUCT && t.vlen > 0)
            .ok_or_else(|| BtfError::MissingType {
                kind: "struct",
                name: name.to_owned(),
            })
    }

    /// `sizeof(struct name)`.
    pub fn struct_size(&self, name: &str) -> Result<u32, BtfError> {
        Ok(self.named_struct(name)?.size_or_type)
    }

    /// `(name, type id, bit offset)` of member `i` of a struct or union.
    fn member(&self, s: &Ty, i: usize) -> Option<(&str, u32, u32)> {
        let at = s.body + 12 * i;
        let offset = u32_at(&self.data, at + 8)?;
        // With kind_flag the high 8 bits hold a bitfield's size.
        let bits = if s.kind_flag {
            offset & 0x00ff_ffff
        } else {
            offset
        };
        Some((
            self.name(u32_at(&self.data, at)?),
            u32_at(&self.data, at + 4)?,
            bits,
        ))
    }

    /// Byte offset of `path` (dot-separated, e.g. `__sk_common.skc_net`) inside `struct strukt`,
    /// looking through anonymous unions and structs on the way.
    pub fn member_offset(&self, strukt: &str, path: &str) -> Result<u32, BtfError> {
        let missing = || BtfError::MissingMember {
            strukt: strukt.to_owned(),
            member: path.to_owned(),
        };
        let mut current = self.named_struct(strukt)?;
        let mut total_bits = 0u32;
        let parts: Vec<&str> = path.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            let (bits, member_type) = self.find_member(&current, part, 0).ok_or_else(missing)?;
            total_bits += bits;
            if i + 1 < parts.len() {
                current = self.as_struct(member_type).ok_or_else(missing)?;
            }
        }
        Ok(total_bits / 8)
    }

    /// Finds `name` among the members of `s`, descending into anonymous members. Returns the bit
    /// offset from the start of `s` and the member's type id.
    fn find_member(&self, s: &Ty, name: &str, depth: u32) -> Option<(u32, u32)> {
        if depth > 8 {
            return None;
        }
        for i in 0..s.vlen {
            let (member_name, type_id, bits) = self.member(s, i)?;
            if member_name == name {
                return Some((bits, type_id));
            }
            if member_name.is_empty() {
                if let Some(inner) = self.as_struct(type_id) {
                    if let Some((b, t)) = self.find_member(&inner, name, depth + 1) {
                        return Some((bits + b, t));
                    }
                }
            }
        }
        None
    }

    /// Resolves typedefs and qualifiers down to a struct or union, if that is what `id` is.
    fn as_struct(&self, mut id: u32) -> Option<Ty> {
        for _ in 0..16 {
            let t = self.ty(id)?;
            match t.kind {
                KIND_STRUCT | KIND_UNION => return Some(t),
                KIND_TYPEDEF | KIND_CONST | KIND_VOLATILE | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type;
                }
                _ => return None,
            }
        }
        None
    }

    /// How many arguments a raw tracepoint passes: the parameters of the function behind
    /// `typedef ... (*btf_trace_<name>)(void *, ...)`, without its leading context pointer.
    pub fn tracepoint_args(&self, name: &str) -> Result<usize, BtfError> {
        let missing = || BtfError::MissingType {
            kind: "tracepoint typedef",
            name: format!("btf_trace_{name}"),
        };
        let typedef = self
            .named(&format!("btf_trace_{name}"))
            .find(|t| t.kind == KIND_TYPEDEF)
            .ok_or_else(missing)?;
        let ptr = self.ty(typedef.size_or_type).ok_or_else(missing)?;
        let proto = self.ty(ptr.size_or_type).ok_or_else(missing)?;
        if ptr.kind != KIND_PTR || proto.kind != KIND_FUNC_PROTO || proto.vlen == 0 {
            return Err(missing());
        }
        Ok(proto.vlen - 1)
    }

    /// `(value, name)` pairs of `enum name`.
    pub fn enum_values(&self, name: &str) -> Result<Vec<(u64, String)>, BtfError> {
        let e = self
            .named(name)
            .find(|t| matches!(t.kind, KIND_ENUM | KIND_ENUM64))
            .ok_or_else(|| BtfError::MissingType {
                kind: "enum",
                name: name.to_owned(),
            })?;
        let wide = e.kind == KIND_ENUM64;
        let step = if wide { 12 } else { 8 };
        let mut out = Vec::with_capacity(e.vlen);
        for i in 0..e.vlen {
            let at = e.body + step * i;
            let (Some(name_off), Some(lo)) = (u32_at(&self.data, at), u32_at(&self.data, at + 4))
            else {
                return Err(BtfError::Malformed("truncated enum"));
            };
            let hi = if wide {
                u32_at(&self.data, at + 8).ok_or(BtfError::Malformed("truncated enum"))?
            } else {
                0
            };
            out.push((
                (u64::from(hi) << 32) | u64::from(lo),
                self.name(name_off).to_owned(),
            ));
        }
        Ok(out)
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

    /// Reasons a packet can be dropped for (not `NOT_DROPPED_YET` or `CONSUMED`). By name: 6.1
    /// has no `CONSUMED`, so its `NOT_SPECIFIED` is 1, not 2.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &str)> {
        self.core
            .iter()
            .filter(|(_, n)| !matches!(n.as_str(), "NOT_DROPPED_YET" | "CONSUMED"))
            .map(|(c, n)| (*c, n.as_str()))
    }

    pub fn subsystems(&self) -> impl Iterator<Item = (u32, &str)> {
        self.subsystems.iter().map(|(c, n)| (*c, n.as_str()))
    }
}
