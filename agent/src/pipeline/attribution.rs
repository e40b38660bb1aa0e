//! Which LoadBalancer IP (VIP) an event belongs to.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::event::Record;

/// Where VIPs past a bound are counted together.
pub const OTHER: &str = "other";

/// The one rule for per-VIP state kept within a bound (the analysis' timelines, the metrics'
/// labels): a VIP keeps its own entry when it has one already or while fewer than `max`
/// exist; later ones share [`OTHER`].
pub fn own_entry(known: bool, entries: usize, max: usize) -> bool {
    known || entries < max
}

/// The VIPs being watched: single addresses, and address pools (CIDRs, as a MetalLB
/// `IPAddressPool` lists them) whose every address is a VIP.
#[derive(Clone, Debug, Default)]
pub struct VipSet {
    vips: Vec<IpAddr>,
    pools: Vec<IpNet>,
}

/// Parses `10.0.0.5`, `fd00::5`, `10.0.0.0/28` or `fd00::/120`.
pub fn parse_vip(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    s.parse::<IpNet>()
        .map_err(|_| format!("`{s}` is not an IP address or CIDR"))
}

impl VipSet {
    pub fn new(vips: Vec<IpAddr>) -> Self {
        Self::from_nets(vips.into_iter().map(IpNet::from).collect())
    }

    /// Host routes (/32, /128) are single VIPs; wider networks are pools.
    pub fn from_nets(nets: Vec<IpNet>) -> Self {
        let mut set = Self::default();
        for n in nets {
            if n.prefix_len() == n.max_prefix_len() {
                set.vips.push(n.addr());
            } else {
                set.pools.push(n.trunc());
            }
        }
        set.vips.sort_unstable();
        set.vips.dedup();
        set.pools.sort_unstable();
        set.pools.dedup();
        set
    }

    pub fn is_empty(&self) -> bool {
        self.vips.is_empty() && self.pools.is_empty()
    }

    /// The single VIPs (pools not expanded).
    pub fn addrs(&self) -> &[IpAddr] {
        &self.vips
    }

    pub fn pools(&self) -> &[IpNet] {
        &self.pools
    }

    fn find(&self, addr: Option<IpAddr>) -> Option<IpAddr> {
        self.of_addr(addr?)
    }

    /// `addr` itself when it is a VIP or lies in a pool.
    pub fn of_addr(&self, addr: IpAddr) -> Option<IpAddr> {
        if self.vips.binary_search(&addr).is_ok() || self.pools.iter().any(|p| p.contains(&addr)) {
            Some(addr)
        } else {
            None
        }
    }

    /// The VIP of a record: its packet's own addresses first (destination, then source),
    /// then, behind DNAT, the flow's original destination or source from conntrack or the NAT
    /// map.
    pub fn of_record(&self, r: &Record) -> Option<IpAddr> {
        match r {
            Record::Drop(d) | Record::Conntrack(d) => {
                self.find(d.dst).or_else(|| self.find(d.src)).or_else(|| {
                    let orig = d.orig.as_ref()?;
                    self.find(Some(orig.dst))
                        .or_else(|| self.find(Some(orig.src)))
                })
            }
            Record::Arp(a) => self.find(a.sender_ip).or_else(|| self.find(a.target_ip)),
            Record::Neigh(n) => self.find(n.ip),
            _ => r.vip().and_then(|v| self.of_addr(v)),
        }
    }

    /// Sets the record's `vip` from this set.
    pub fn attribute(&self, r: &mut Record) {
        let vip = self.of_record(r);
        match r {
            Record::Drop(d) | Record::Conntrack(d) => d.vip = vip,
            Record::Arp(a) => a.vip = vip,
            Record::Neigh(n) => n.vip = vip,
            _ => {}
        }
    }

    /// Adds a VIP (discovery); returns whether it was new.
    pub fn insert(&mut self, vip: IpAddr) -> bool {
        match self.vips.binary_search(&vip) {
            Ok(_) => false,
            Err(i) => {
                self.vips.insert(i, vip);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_and_single_vips() {
        let set = VipSet::from_nets(vec![
            parse_vip("10.200.0.100").unwrap(),
            parse_vip("10.200.1.0/28").unwrap(),
            parse_vip("fd00:200::100/128").unwrap(),
        ]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(set.of_addr(ip("10.200.0.100")), Some(ip("10.200.0.100")));
        assert_eq!(set.of_addr(ip("10.200.1.15")), Some(ip("10.200.1.15")));
        assert_eq!(set.of_addr(ip("10.200.1.16")), None);
        assert_eq!(set.of_addr(ip("fd00:200::100")), Some(ip("fd00:200::100")));
        assert_eq!(set.addrs().len(), 2);
        assert!(parse_vip("10.200.0.300")
            .unwrap_err()
            .contains("not an IP address or CIDR"));
        assert!(parse_vip("10.0.0.0/33").is_err());
    }
}
