//! Kernel text addresses → `function+0xoff`, through /proc/kallsyms.

use std::{fs, io};

pub const KALLSYMS: &str = "/proc/kallsyms";

#[derive(Debug, Default)]
pub struct Kallsyms {
    /// Sorted by address; only text symbols.
    syms: Vec<(u64, String)>,
}

impl Kallsyms {
    /// Reads /proc/kallsyms. Addresses read as zero when the caller may not see them
    /// (kptr_restrict); then the table is empty and locations print as raw addresses.
    pub fn load() -> io::Result<Self> {
        Ok(Self::parse(&fs::read_to_string(KALLSYMS)?))
    }

    pub fn parse(text: &str) -> Self {
        let mut syms: Vec<(u64, String)> = text
            .lines()
            .filter_map(|line| {
                let mut it = line.split_ascii_whitespace();
                let addr = u64::from_str_radix(it.next()?, 16).ok()?;
                let kind = it.next()?;
                let name = it.next()?;
                (addr != 0 && matches!(kind, "t" | "T" | "w" | "W"))
                    .then(|| (addr, name.to_owned()))
            })
            .collect();
        syms.sort_unstable_by_key(|(a, _)| *a);
        Self { syms }
    }

    pub fn is_empty(&self) -> bool {
        self.syms.is_empty()
    }

    pub fn symbolize(&self, addr: u64) -> String {
        let idx = self.syms.partition_point(|(a, _)| *a <= addr);
        match idx.checked_sub(1).map(|i| &self.syms[i]) {
            Some((start, name)) if addr != 0 => format!("{name}+{:#x}", addr - start),
            _ => format!("{addr:#x}"),
        }
    }

    /// Just the function part of [`Self::symbolize`].
    pub fn function(&self, addr: u64) -> Option<&str> {
        let idx = self.syms.partition_point(|(a, _)| *a <= addr);
        idx.checked_sub(1).map(|i| self.syms[i].1.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbolizes_inside_and_outside() {
        let k = Kallsyms::parse(
            "ffffffff81000000 T _stext\nffffffff81000100 t tcp_v4_rcv\n0000000000000000 D x\n",
        );
        assert_eq!(k.symbolize(0xffffffff81000123), "tcp_v4_rcv+0x23");
        assert_eq!(k.symbolize(0x10), "0x10");
        assert_eq!(k.function(0xffffffff81000100), Some("tcp_v4_rcv"));
    }
}
