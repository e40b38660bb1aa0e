//! The scale phase's lab (see `scale.rs`): client → node → pod namespaces, the node's DNAT of
//! 1,000 VIPs, the generator of new connections and the kernel's counters.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use lbtest::{
    blast::{Headers, Pacer},
    lab::topology::snmp,
    netns::{veth, Netns},
};

use super::lab::mac;

/// The pool the agent is given: 1,022 usable addresses, of which the first [`VIPS`] get traffic
/// and the rest must show nothing.
pub const POOL: &str = "10.200.64.0/22";
const POOL_BASE: Ipv4Addr = Ipv4Addr::new(10, 200, 64, 0);
const POOL_HOSTS: u32 = 1022;
pub const VIPS: usize = 1000;
const _: () = assert!(VIPS as u32 <= POOL_HOSTS);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 200, 68, 1);
const NODE_OUT: Ipv4Addr = Ipv4Addr::new(10, 200, 68, 2);
const NODE_IN: Ipv4Addr = Ipv4Addr::new(10, 200, 72, 1);
const POD: Ipv4Addr = Ipv4Addr::new(10, 200, 72, 2);
const VIP_PORT: u16 = 80;
/// VIP `i` is translated to the pod's port `POD_PORT0 + i`, where nothing listens.
const POD_PORT0: u16 = 10_000;
pub const RATE: u64 = 50_000;
/// Seconds an unreplied UDP entry lives in the node's conntrack table (its namespace only):
/// the table never fills, whatever the run's length.
const CT_UDP_TIMEOUT: &str = "2";
/// The agent's NAT map size, given explicitly: evictions are at least the new connections
/// beyond it.
pub const NAT_ENTRIES: u64 = 131_072;

pub fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(POOL_BASE) + 1 + i as u32)
}

/// The three namespaces (deleted when dropped, also on failure) and the client's sockets.
pub struct ScaleLab {
    /// Held so the namespace lives as long as the lab.
    _client: Netns,
    node: Netns,
    pub pod: Netns,
    pub socks: Vec<UdpSocket>,
}

/// Kernel counters: the pod's Udp NoPorts, the node's DNAT rule counter, the node's conntrack
/// insert failures, drops and early drops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Oracle {
    pub no_ports: u64,
    pub new_conns: u64,
    pub ct_insert_failed: u64,
    pub ct_drop: u64,
    pub ct_early_drop: u64,
}

impl Oracle {
    pub fn minus(self, o: Self) -> Self {
        Self {
            no_ports: self.no_ports - o.no_ports,
            new_conns: self.new_conns - o.new_conns,
            ct_insert_failed: self.ct_insert_failed.wrapping_sub(o.ct_insert_failed),
            ct_drop: self.ct_drop.wrapping_sub(o.ct_drop),
            ct_early_drop: self.ct_early_drop.wrapping_sub(o.ct_early_drop),
        }
    }
}

fn permanent_neigh(
    ns: &Netns,
    dev: &str,
    ip: Ipv4Addr,
    peer: &Netns,
    peer_dev: &str,
) -> Result<()> {
    let lladdr = mac(peer, peer_dev)?;
    let ip = ip.to_string();
    ns.ip(&[
        "neigh",
        "replace",
        &ip,
        "lladdr",
        &lladdr,
        "dev",
        dev,
        "nud",
        "permanent",
    ])?;
    Ok(())
}

fn dnat_ruleset() -> String {
    let elements: Vec<String> = (0..VIPS)
        .map(|i| format!("{} : {}", vip(i), POD_PORT0 as usize + i))
        .collect();
    format!(
        "table ip lbscale {{\n counter new {{ }}\n map ports {{ type ipv4_addr : inet_service; elements = {{ {} }} }}\n chain pre {{ type nat hook prerouting priority dstnat; ip daddr {POOL} udp dport {VIP_PORT} counter name new dnat ip to {POD} : ip daddr map @ports; }}\n}}",
        elements.join(", ")
    )
}

impl ScaleLab {
    pub fn new(sockets: usize) -> Result<Self> {
        let client = Netns::new("scl")?;
        let node = Netns::new("snd")?;
        let pod = Netns::new("spd")?;
        for ns in [&client, &node, &pod] {
            ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
            ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        }
        let (c, n1) = (lbtest::unique("lsc"), lbtest::unique("lsn"));
        let (n2, p) = (lbtest::unique("lsm"), lbtest::unique("lsp"));
        veth(
            &client,
            &c,
            &[&format!("{CLIENT}/24")],
            &node,
            &n1,
            &[&format!("{NODE_OUT}/24")],
        )?;
        veth(
            &node,
            &n2,
            &[&format!("{NODE_IN}/24")],
            &pod,
            &p,
            &[&format!("{POD}/24")],
        )?;
        permanent_neigh(&client, &c, NODE_OUT, &node, &n1)?;
        permanent_neigh(&node, &n1, CLIENT, &client, &c)?;
        permanent_neigh(&node, &n2, POD, &pod, &p)?;
        permanent_neigh(&pod, &p, NODE_IN, &node, &n2)?;
        client.ip(&["route", "add", POOL, "via", &NODE_OUT.to_string()])?;
        pod.ip(&["route", "add", "default", "via", &NODE_IN.to_string()])?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        node.nft(&dnat_ruleset())?;
        // Per namespace (the nft rule above loaded conntrack into the node's).
        node.sysctl("net.netfilter.nf_conntrack_udp_timeout", CT_UDP_TIMEOUT)?;
        let socks = client.run(|| {
            (0..sockets)
                .map(|_| UdpSocket::bind("0.0.0.0:0"))
                .collect::<std::io::Result<Vec<_>>>()
        })??;
        Ok(Self {
            _client: client,
            node,
            pod,
            socks,
        })
    }

    pub fn oracle(&self) -> Result<Oracle> {
        Ok(Oracle {
            no_ports: snmp(&self.pod, "Udp", "NoPorts").context("the pod's Udp NoPorts")?,
            new_conns: self.node.nft_counter("ip", "lbscale", "new")?,
            ct_insert_failed: self.node.conntrack_stat("insert_failed")?,
            ct_drop: self.node.conntrack_stat("drop")?,
            ct_early_drop: self.node.conntrack_stat("early_drop")?,
        })
    }
}

/// One thread's share: each socket sends to every VIP once, in order, at `rate` (paced as in
/// `lbtest::blast`), until `duration`. Returns datagrams per VIP, exact (`sendmmsg`'s return
/// values).
fn send_loop(socks: &[UdpSocket], rate: f64, duration: Duration, t0: Instant) -> Result<Vec<u64>> {
    let mut headers = Headers::new((0..VIPS).map(|i| SocketAddrV4::new(vip(i), VIP_PORT)), 16);
    let pacer = Pacer::new(rate);
    let mut per_vip = vec![0u64; VIPS];
    let mut sent = 0u64;
    for sock in socks {
        let mut next = 0;
        while next < VIPS {
            let elapsed = t0.elapsed();
            if elapsed >= duration {
                return Ok(per_vip);
            }
            let want = match pacer.owed(elapsed, sent) {
                Ok(n) => n,
                Err(wait) => {
                    std::thread::sleep(wait);
                    continue;
                }
            };
            let n = headers.send(sock, next, want)?;
            for c in &mut per_vip[next..next + n] {
                *c += 1;
            }
            next += n;
            sent += n as u64;
        }
    }
    Ok(per_vip)
}

/// Sends on two threads (the sockets split between them) for `duration` at [`RATE`].
pub fn send(socks: &[UdpSocket], duration: Duration) -> Result<(Vec<u64>, Duration)> {
    let threads = super::ncpus().clamp(1, 2);
    let per_thread = RATE as f64 / threads as f64;
    let t0 = Instant::now();
    let parts: Vec<Result<Vec<u64>>> = std::thread::scope(|s| {
        socks
            .chunks(socks.len().div_ceil(threads))
            .map(|chunk| s.spawn(move || send_loop(chunk, per_thread, duration, t0)))
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("sender panicked")))
            })
            .collect()
    });
    let elapsed = t0.elapsed();
    let mut per_vip = vec![0u64; VIPS];
    for p in parts {
        for (t, n) in per_vip.iter_mut().zip(p?) {
            *t += n;
        }
    }
    Ok((per_vip, elapsed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_and_its_translations() {
        assert_eq!(vip(0), Ipv4Addr::new(10, 200, 64, 1));
        assert_eq!(vip(VIPS - 1), Ipv4Addr::new(10, 200, 67, 232));
        assert!(dnat_ruleset().contains("10.200.67.232 : 10999"));
    }
}
