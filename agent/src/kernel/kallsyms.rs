//! Kernel text addresses → `function+0xoff`, through /proc/kallsyms.
//!
//! The table is read line by line and kept compact (one string holding every name, and an
//! address and name offset per symbol): the file is megabytes, and the daemon keeps the table
//! for its whole life.

use std::{
    fs,
    io::{self, BufRead, BufReader},
};

pub const KALLSYMS: &str = "/proc/kallsyms";

#[derive(Debug, Default)]
pub struct Kallsyms {
    /// Sorted by address; only text symbols. `(address, start and length of the name in
    /// `names`)`: 16 bytes a symbol.
    syms: Vec<(u64, u32, u32)>,
    /// Every name, one after the other.
    names: String,
}

impl Kallsyms {
    /// Reads /proc/kallsyms. Addresses read as zero when the caller may not see them
    /// (kptr_restrict); then the table is empty and locations print as raw addresses.
    pub fn load() -> io::Result<Self> {
        let mut k = Self::default();
        let mut lines = BufReader::new(fs::File::open(KALLSYMS)?);
        let mut line = String::new();
        while lines.read_line(&mut line)? > 0 {
            k.add_line(&line);
            line.clear();
        }
        k.finish();
        Ok(k)
    }

    pub fn parse(text: &str) -> Self {
        let mut k = Self::default();
        for line in text.lines() {
            k.add_line(line);
        }
        k.finish();
        k
    }

    fn add_line(&mut self, line: &str) {
        let mut it = line.split_ascii_whitespace();
        let (Some(addr), Some(kind), Some(name)) = (it.next(), it.next(), it.next()) else {
            return;
        };
        let Ok(addr) = u64::from_str_radix(addr, 16) else {
            return;
        };
        if addr == 0 || !matches!(kind, "t" | "T" | "w" | "W") {
            return;
        }
        let (Ok(at), Ok(len)) = (u32::try_from(self.names.len()), u32::try_from(name.len())) else {
            return;
        };
        self.names.push_str(name);
        self.syms.push((addr, at, len));
    }

    fn finish(&mut self) {
        self.syms.sort_unstable_by_key(|(a, _, _)| *a);
        self.syms.shrink_to_fit();
        self.names.shrink_to_fit();
    }

    pub fn is_empty(&self) -> bool {
        self.syms.is_empty()
    }

    fn lookup(&self, addr: u64) -> Option<(u64, &str)> {
        let idx = self.syms.partition_point(|(a, _, _)| *a <= addr);
        let (start, at, len) = *self.syms.get(idx.checked_sub(1)?)?;
        let name = self.names.get(at as usize..(at + len) as usize)?;
        Some((start, name))
    }

    pub fn symbolize(&self, addr: u64) -> String {
        match self.lookup(addr) {
            Some((start, name)) if addr != 0 => format!("{name}+{:#x}", addr - start),
            _ => format!("{addr:#x}"),
        }
    }

    /// Just the function part of [`Self::symbolize`].
    pub fn function(&self, addr: u64) -> Option<&str> {
        self.lookup(addr).map(|(_, name)| name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbolizes_inside_and_outside() {
        let k = Kallsyms::parse(
            "ffffffff81000100 t tcp_v4_rcv\nffffffff81000000 T _stext\n0000000000000000 D x\n",
        );
        assert_eq!(k.symbolize(0xffffffff81000123), "tcp_v4_rcv+0x23");
        assert_eq!(k.symbolize(0xffffffff81000010), "_stext+0x10");
        assert_eq!(k.symbolize(0x10), "0x10");
        assert_eq!(k.function(0xffffffff81000100), Some("tcp_v4_rcv"));
    }
}
