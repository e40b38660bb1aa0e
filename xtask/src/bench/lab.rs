//! The bench's lab: a client namespace and a node namespace (the VIP) joined by a veth, the
//! generator, and the node's kernel counters.

use std::{
    collections::BTreeMap,
    net::{SocketAddrV4, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use lbtest::{
    blast::{Blaster, Plan, Sent},
    lab::topology::snmp,
    netns::{veth, Netns},
};
use serde_json::Value;

use super::{tracer::Scope, CLIENT, CLOSED_PORT, FILTERED_PORT, MARKER_PORT, VIP};

/// The two namespaces, the generator's sockets and what it sends.
pub struct Lab {
    pub client: Netns,
    pub node: Netns,
    pub blaster: Blaster,
    pub targets: Vec<SocketAddrV4>,
}

/// Kernel counters of the node namespace: an account of the drops independent of any tracer.
#[derive(Clone, Copy, Debug, Default)]
pub struct Oracle {
    pub udp_no_ports: u64,
    pub nft_dropped: u64,
}

pub(super) fn mac(ns: &Netns, ifname: &str) -> Result<String> {
    let out = ns.ip(&["-j", "link", "show", "dev", ifname])?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    v[0]["address"]
        .as_str()
        .map(str::to_owned)
        .context("no MAC address")
}

impl Lab {
    pub fn new() -> Result<Self> {
        let client = Netns::new("bcl")?;
        let node = Netns::new("bnd")?;
        // No IPv6: no MLD or router solicitations to add drops of their own.
        for ns in [&client, &node] {
            ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
            ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        }
        let (cif, nif) = (lbtest::unique("lbc"), lbtest::unique("lbn"));
        veth(
            &client,
            &cif,
            &[&format!("{CLIENT}/24")],
            &node,
            &nif,
            &[&format!("{VIP}/24")],
        )?;
        // Permanent neighbours: no ARP, so no packet waits (or is dropped) in an unresolved queue.
        for (ns, dev, peer_ip, peer_ns, peer_dev) in [
            (&client, &cif, VIP, &node, &nif),
            (&node, &nif, CLIENT, &client, &cif),
        ] {
            let lladdr = mac(peer_ns, peer_dev)?;
            ns.ip(&[
                "neigh",
                "replace",
                &peer_ip.to_string(),
                "lladdr",
                &lladdr,
                "dev",
                dev,
                "nud",
                "permanent",
            ])?;
        }
        node.nft(&format!(
            "table ip lbbench {{\n counter dropped {{ }}\n chain input {{ type filter hook input priority 0; udp dport {FILTERED_PORT} counter name dropped drop; }}\n}}"
        ))?;
        let threads = std::thread::available_parallelism()
            .map_or(2, usize::from)
            .max(2);
        let blaster = Blaster::new(&client, threads)?;
        let closed = SocketAddrV4::new(VIP, CLOSED_PORT);
        let filtered = SocketAddrV4::new(VIP, FILTERED_PORT);
        Ok(Self {
            client,
            node,
            blaster,
            targets: vec![closed, closed, closed, filtered],
        })
    }

    /// What the tracers watch: the VIP in the node namespace.
    pub fn scope(&self) -> Scope {
        Scope {
            vip: VIP,
            netns: self.node.inode,
        }
    }

    pub fn plan(&self, rate: Option<u64>, duration: Duration) -> Plan {
        Plan {
            targets: self.targets.clone(),
            rate,
            duration,
            payload: 16,
        }
    }

    pub fn oracle(&self) -> Result<Oracle> {
        Ok(Oracle {
            udp_no_ports: snmp(&self.node, "Udp", "NoPorts").context("the node's Udp NoPorts")?,
            nft_dropped: self.node.nft_counter("ip", "lbbench", "dropped")?,
        })
    }

    /// The exact drops per reason that `sent` and `markers` make.
    pub fn expected(&self, sent: &Sent, plan: &Plan, markers: u64) -> BTreeMap<String, u64> {
        let closed = sent.to(plan, SocketAddrV4::new(VIP, CLOSED_PORT)) + markers;
        let filtered = sent.to(plan, SocketAddrV4::new(VIP, FILTERED_PORT));
        BTreeMap::from([
            ("NETFILTER_DROP".to_owned(), filtered),
            ("NO_SOCKET".to_owned(), closed),
        ])
    }

    /// Sends one marker drop at a time, 20–60 ms apart, until `until`, each from its own socket
    /// (kept open so every source port is distinct). Returns `(source port, sent at)`.
    pub fn send_markers(&self, until: Instant) -> Result<Vec<(u16, Instant)>> {
        self.client.run(|| -> Result<Vec<(u16, Instant)>> {
            let dst = SocketAddrV4::new(VIP, MARKER_PORT);
            let mut socks = Vec::new();
            let mut sent = Vec::new();
            // Pseudo-random gaps: markers must not lock onto the reader's 50 ms drain tick.
            let mut x: u64 = 0x2545_f491_4f6c_dd1d;
            while Instant::now() < until {
                let s = UdpSocket::bind("0.0.0.0:0")?;
                let sport = s.local_addr()?.port();
                let at = Instant::now();
                s.send_to(&[0u8; 8], dst)?;
                sent.push((sport, at));
                socks.push(s);
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                std::thread::sleep(Duration::from_millis(20 + x % 41));
            }
            Ok(sent)
        })?
    }
}
