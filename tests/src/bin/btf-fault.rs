//! `btf-fault IN OUT STRUCT MEMBER OTHER`: copies the BTF file IN to OUT with STRUCT's MEMBER
//! placed at OTHER's offset — a wrong offset as a resolver bug would produce. Used by the VM
//! suite's self-test (mounted over /sys/kernel/btf/vmlinux in a throwaway guest): type ids and
//! sizes stay as they were, so programs still attach, and only what lbtrace reads through that
//! member goes wrong.

use anyhow::{bail, Context, Result};

fn u32_at(d: &[u8], at: usize) -> Result<u32> {
    let b = d.get(at..at + 4).context("truncated BTF")?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Bytes after a type's 12-byte header, by kind and vlen (BTF UAPI).
fn extra(kind: u32, vlen: usize) -> Result<usize> {
    Ok(match kind {
        1 | 14 | 17 => 4,
        3 => 12,
        4 | 5 | 15 | 19 => 12 * vlen,
        6 | 13 => 8 * vlen,
        2 | 7..=12 | 16 | 18 => 0,
        k => bail!("unknown BTF kind {k}"),
    })
}

fn name(d: &[u8], strings: usize, off: u32) -> &str {
    let s = &d[strings + off as usize..];
    let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
    std::str::from_utf8(&s[..end]).unwrap_or_default()
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output, strukt, member, other] = args.as_slice() else {
        bail!("usage: btf-fault IN OUT STRUCT MEMBER OTHER");
    };
    let mut d = std::fs::read(input).with_context(|| input.clone())?;
    let hdr = u32_at(&d, 4)? as usize;
    let types = hdr + u32_at(&d, 8)? as usize;
    let types_end = types + u32_at(&d, 12)? as usize;
    let strings = hdr + u32_at(&d, 16)? as usize;
    let mut at = types;
    while at < types_end {
        let info = u32_at(&d, at + 4)?;
        let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
        if kind == 4 && vlen > 0 && name(&d, strings, u32_at(&d, at)?) == strukt {
            let offset_of = |d: &[u8], want: &str| -> Result<Option<usize>> {
                for i in 0..vlen {
                    let m = at + 12 + 12 * i;
                    if name(d, strings, u32_at(d, m)?) == want {
                        return Ok(Some(m + 8));
                    }
                }
                Ok(None)
            };
            let (Some(target), Some(source)) = (offset_of(&d, member)?, offset_of(&d, other)?)
            else {
                bail!("struct {strukt} has no member {member} or {other}");
            };
            let value = u32_at(&d, source)?.to_le_bytes();
            d[target..target + 4].copy_from_slice(&value);
            std::fs::write(output, &d).with_context(|| output.clone())?;
            println!("btf-fault: {strukt}.{member} now at {strukt}.{other}'s offset");
            return Ok(());
        }
        at += 12 + extra(kind, vlen)?;
    }
    bail!("no struct {strukt} in {input}")
}
