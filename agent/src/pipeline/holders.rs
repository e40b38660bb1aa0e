//! Who holds each VIP when lbtrace starts, from what the host already knows: the addresses
//! configured in every namespace lbtrace can enter, and their neighbour tables. Without this a
//! run started mid-incident has no owner to compare the drops with until someone announces.

use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;

use super::{
    attribution::VipSet,
    ownership::{Owner, Ownership},
};
use crate::{
    event::{
        record::{FindingKind, FindingRec, OwnerSource},
        values::{Mac, Time},
        Record,
    },
    kernel::{netns, rtnl},
};

/// What one namespace knows.
#[derive(Clone, Debug, Default)]
pub struct NsView {
    pub netns: u32,
    pub addrs: Vec<rtnl::Addr>,
    pub neighbours: Vec<rtnl::Neighbour>,
}

/// Reads every namespace lbtrace can enter (only those of `only`, when any: `--netns`); those it
/// cannot are skipped (logged).
pub fn scan(only: &[u32]) -> Vec<NsView> {
    let mut out = Vec::new();
    for (ino, path) in netns::namespaces() {
        if !only.is_empty() && !only.contains(&ino) {
            continue;
        }
        match netns::in_netns(&path, || {
            Ok::<_, std::io::Error>((rtnl::addresses()?, rtnl::neighbours()?))
        }) {
            Ok(Ok((addrs, neighbours))) => out.push(NsView {
                netns: ino,
                addrs,
                neighbours,
            }),
            Ok(Err(e)) | Err(e) => tracing::debug!("netns {ino} ({}): {e}", path.display()),
        }
    }
    out
}

/// A VIP held the MetalLB-L2 way: a host address (/32, /128) on an interface that also has an
/// address whose subnet contains it (the speaker adds the VIP next to the node's own address).
/// Pods' and gateways' /32s and kube-proxy's dummy interface have no such neighbour address.
fn l2_vip(a: &rtnl::Addr, all: &[rtnl::Addr]) -> bool {
    let host = if a.ip.is_ipv4() { 32 } else { 128 };
    a.prefix == host
        && a.mac.is_some()
        && !a.ip.is_loopback()
        && all.iter().any(|o| {
            o.ifindex == a.ifindex
                && o.prefix < host
                && IpNet::new(o.ip, o.prefix).is_ok_and(|n| n.contains(&a.ip))
        })
}

/// Holders found configured, per VIP (one per namespace and MAC).
fn configured(views: &[NsView], vips: &VipSet, discover: bool) -> BTreeMap<IpAddr, Vec<Owner>> {
    let mut out: BTreeMap<IpAddr, Vec<Owner>> = BTreeMap::new();
    for v in views {
        for a in &v.addrs {
            let watched = vips.of_addr(a.ip) == Some(a.ip);
            if !(watched || discover) || !l2_vip(a, &v.addrs) {
                continue;
            }
            let Some(mac) = a.mac else { continue };
            let holders = out.entry(a.ip).or_default();
            if !holders.iter().any(|h| h.mac == mac && h.netns == v.netns) {
                holders.push(Owner {
                    mac,
                    netns: v.netns,
                    ifname: Some(a.ifname.as_str().into()),
                });
            }
        }
    }
    out
}

/// The MAC neighbour tables give a watched VIP, when they agree (the holder may be a host
/// lbtrace cannot enter).
fn from_neighbours(views: &[NsView], vip: IpAddr) -> Option<Mac> {
    let mut macs = views
        .iter()
        .flat_map(|v| &v.neighbours)
        .filter(|n| n.ip == vip)
        .map(|n| n.mac);
    let first = macs.next()?;
    macs.all(|m| m == first).then_some(first)
}

/// Split brains said so far: per VIP, the MACs it was configured on. One entry per watched
/// VIP at most, removed when the VIP is held once again (a recurrence is said again).
#[derive(Debug, Default)]
pub struct SplitBrains(BTreeMap<IpAddr, Vec<Mac>>);

/// How often the configured addresses are read again for split brains after the start.
pub const RESCAN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Records what `views` say about the VIPs: discoveries, first owners, and a split brain for a
/// VIP configured on two hosts at once (as a speaker that died leaves it behind).
pub fn learn(
    views: &[NsView],
    own: &mut Ownership,
    vips: &mut VipSet,
    seen: &mut SplitBrains,
    now: Time,
) -> Vec<Record> {
    let mut out = Vec::new();
    let held = configured(views, vips, own.discovers_vips());
    for (vip, holders) in &held {
        out.extend(own.discover_configured(*vip, &holders[0], vips));
        out.extend(own.claim(
            *vip,
            holders[0].clone(),
            false,
            now,
            OwnerSource::Configured,
        ));
    }
    out.extend(split_brains(&held, own, seen, now));
    for vip in vips.addrs().to_vec() {
        if held.contains_key(&vip) || vip_is_range(vips, vip) {
            continue;
        }
        if let Some(mac) = from_neighbours(views, vip) {
            let owner = Owner {
                mac,
                netns: 0,
                ifname: None,
            };
            out.extend(own.claim(vip, owner, false, now, OwnerSource::Neighbour));
        }
    }
    out
}

/// A periodic re-read: only split brains that are new since the last time they were said.
/// Owners are not claimed again (announcements and drops tell moves better than a poll does).
pub fn rescan(
    views: &[NsView],
    own: &mut Ownership,
    vips: &VipSet,
    seen: &mut SplitBrains,
    now: Time,
) -> Vec<Record> {
    split_brains(&configured(views, vips, false), own, seen, now)
}

/// A finding per VIP configured on two or more MACs, unless the same set was said already.
fn split_brains(
    held: &BTreeMap<IpAddr, Vec<Owner>>,
    own: &mut Ownership,
    seen: &mut SplitBrains,
    now: Time,
) -> Vec<Record> {
    seen.0
        .retain(|vip, _| held.get(vip).is_some_and(|h| h.len() > 1));
    let mut out = Vec::new();
    for (vip, holders) in held {
        let mut macs: Vec<Mac> = holders.iter().map(|h| h.mac).collect();
        macs.sort();
        macs.dedup();
        if macs.len() < 2 || seen.0.get(vip) == Some(&macs) {
            continue;
        }
        seen.0.insert(*vip, macs.clone());
        let at: Vec<String> = holders
            .iter()
            .map(|h| format!("{} (netns {})", h.mac, h.netns))
            .collect();
        out.push(own.found(FindingRec {
            node: None,
            time: Some(now),
            finding: FindingKind::SplitBrain,
            vip: *vip,
            changes: 0,
            detail: format!(
                "{vip} is configured on {} hosts at once: {}",
                macs.len(),
                at.join(", ")
            ),
            macs,
        }));
    }
    out
}

/// Only single addresses are looked up in neighbour tables, not whole pools.
fn vip_is_range(vips: &VipSet, vip: IpAddr) -> bool {
    vips.of_addr(vip) != Some(vip)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::ownership::OwnershipConfig;

    fn addr(ip: &str, prefix: u8, ifindex: u32, mac: u8) -> rtnl::Addr {
        rtnl::Addr {
            ip: ip.parse().unwrap(),
            prefix,
            ifindex,
            ifname: "eth0".into(),
            mac: Some(Mac([2, 0, 0, 0, 0, mac])),
        }
    }

    fn node(netns: u32, mac: u8, extra: &[&str]) -> NsView {
        let mut addrs = vec![
            addr("10.200.0.11", 24, 2, mac),
            addr("10.200.10.1", 32, 3, 0x77),
        ];
        addrs.extend(extra.iter().map(|ip| addr(ip, 32, 2, mac)));
        NsView {
            netns,
            addrs,
            neighbours: Vec::new(),
        }
    }

    fn kinds(recs: &[Record]) -> Vec<String> {
        recs.iter()
            .map(|r| match r {
                Record::VipOwner(o) => format!("owner {} {}", o.vip, o.new_mac),
                Record::VipDiscovered(d) => format!("discovered {}", d.vip),
                Record::Finding(f) => format!("{} {}", f.finding.as_str(), f.vip),
                _ => "other".into(),
            })
            .collect()
    }

    #[test]
    fn a_configured_vip_has_its_owner_and_two_hosts_are_split_brain() {
        let vip = "10.200.0.100";
        let mut vips = VipSet::new(vec![vip.parse().unwrap()]);
        let mut own = Ownership::new(OwnershipConfig::default(), false);
        let views = [node(1, 0xa, &[vip]), node(2, 0xb, &[])];
        let recs = learn(
            &views,
            &mut own,
            &mut vips,
            &mut SplitBrains::default(),
            Time::from_secs_f64(1.0),
        );
        assert_eq!(kinds(&recs), [format!("owner {vip} 02:00:00:00:00:0a")]);

        let mut own = Ownership::new(OwnershipConfig::default(), false);
        let views = [node(1, 0xa, &[vip]), node(2, 0xb, &[vip])];
        let recs = learn(
            &views,
            &mut own,
            &mut vips,
            &mut SplitBrains::default(),
            Time::from_secs_f64(1.0),
        );
        assert_eq!(
            kinds(&recs),
            [
                format!("owner {vip} 02:00:00:00:00:0a"),
                format!("split-brain {vip}")
            ]
        );
    }

    #[test]
    fn a_rescan_says_a_new_split_brain_once_and_a_recurrence_again() {
        let vip = "10.200.0.100";
        let vips = VipSet::new(vec![vip.parse().unwrap()]);
        let mut own = Ownership::new(OwnershipConfig::default(), false);
        let mut seen = SplitBrains::default();
        let t = Time::from_secs_f64(1.0);
        let once = [node(1, 0xa, &[vip]), node(2, 0xb, &[])];
        let twice = [node(1, 0xa, &[vip]), node(2, 0xb, &[vip])];
        assert!(rescan(&once, &mut own, &vips, &mut seen, t).is_empty());
        let split = [format!("split-brain {vip}")];
        assert_eq!(kinds(&rescan(&twice, &mut own, &vips, &mut seen, t)), split);
        assert!(rescan(&twice, &mut own, &vips, &mut seen, t).is_empty());
        assert!(rescan(&once, &mut own, &vips, &mut seen, t).is_empty());
        assert_eq!(kinds(&rescan(&twice, &mut own, &vips, &mut seen, t)), split);
    }

    #[test]
    fn discovery_takes_l2_vips_not_pod_or_gateway_addresses() {
        let mut vips = VipSet::default();
        let mut own = Ownership::new(OwnershipConfig::default(), true);
        let views = [node(1, 0xa, &["10.200.0.100"])];
        let recs = learn(
            &views,
            &mut own,
            &mut vips,
            &mut SplitBrains::default(),
            Time::from_secs_f64(1.0),
        );
        assert_eq!(
            kinds(&recs),
            [
                "discovered 10.200.0.100",
                "owner 10.200.0.100 02:00:00:00:00:0a"
            ]
        );
    }

    #[test]
    fn a_neighbour_table_names_a_holder_lbtrace_cannot_enter() {
        let vip: IpAddr = "10.200.0.100".parse().unwrap();
        let mut vips = VipSet::new(vec![vip]);
        let mut own = Ownership::new(OwnershipConfig::default(), false);
        let mut client = node(5, 0x1, &[]);
        client.neighbours.push(rtnl::Neighbour {
            ip: vip,
            mac: Mac([2, 0, 0, 0, 0, 0xc]),
            state: 2,
            ifindex: 2,
        });
        let recs = learn(
            &[client],
            &mut own,
            &mut vips,
            &mut SplitBrains::default(),
            Time::from_secs_f64(1.0),
        );
        let Record::VipOwner(o) = &recs[0] else {
            panic!("{recs:?}")
        };
        assert_eq!(
            (o.new_netns, o.source),
            (None, Some(OwnerSource::Neighbour))
        );
    }
}
