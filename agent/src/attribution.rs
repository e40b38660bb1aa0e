//! Which LoadBalancer IP (VIP) an event belongs to.

use std::net::IpAddr;

use crate::decode::{Event, Packet};

/// The VIPs being watched.
#[derive(Clone, Debug, Default)]
pub struct VipSet {
    vips: Vec<IpAddr>,
}

impl VipSet {
    pub fn new(mut vips: Vec<IpAddr>) -> Self {
        vips.sort_unstable();
        vips.dedup();
        Self { vips }
    }

    pub fn is_empty(&self) -> bool {
        self.vips.is_empty()
    }

    pub fn addrs(&self) -> &[IpAddr] {
        &self.vips
    }

    fn find(&self, addr: Option<IpAddr>) -> Option<IpAddr> {
        self.of_addr(addr?)
    }

    /// `addr` itself when it is a VIP.
    pub fn of_addr(&self, addr: IpAddr) -> Option<IpAddr> {
        self.vips.binary_search(&addr).ok().map(|i| self.vips[i])
    }

    /// The VIP a packet is addressed to or comes from.
    pub fn of_packet(&self, p: &Packet) -> Option<IpAddr> {
        self.find(p.dst).or_else(|| self.find(p.src))
    }

    /// The VIP of an event: its own addresses first, then, behind DNAT, the flow's original
    /// destination (or source, for replies) from conntrack or the NAT map.
    pub fn of_event(&self, e: &Event) -> Option<IpAddr> {
        match e {
            Event::Drop(d) => self.of_packet(&d.packet).or_else(|| {
                let orig = d.ct.orig.as_ref()?;
                self.find(Some(orig.dst))
                    .or_else(|| self.find(Some(orig.src)))
            }),
            Event::Arp(a) => self.find(a.sender_ip).or_else(|| self.find(a.target_ip)),
            Event::Neigh(n) => self.find(n.ip),
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
