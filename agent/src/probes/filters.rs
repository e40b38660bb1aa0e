//! Kernel-side filters and the maps filled before anything attaches.

use std::net::IpAddr;

use agent_common::{
    CtEvent, CtStatKey, CtStatValue, HostKey, ProbeConfig, FAMILY_IPV4, FAMILY_IPV6,
    FILTER_CT_EVENT, FILTER_HOST, FILTER_NETNS, FILTER_PORT, FILTER_PROTO, FILTER_REASON,
    FILTER_VIP, MAP_CT_LAST,
};
use aya::{
    maps::{HashMap, MapData},
    Ebpf,
};

use super::{map_err, ProbeError};
use crate::{event::values::L4Proto, kernel::conntrack::conntrack_stats, kernel::netns};

/// Kernel-side filters: applied before a record is reserved.
#[derive(Clone, Debug, Default)]
pub struct KernelFilter {
    pub reasons: Vec<u32>,
    /// Addresses matched against the packet and, behind NAT, the flow's original addresses.
    pub hosts: Vec<IpAddr>,
    /// `hosts` are exactly the VIPs the kernel attributes to, for the whole run: aggregating,
    /// the filter is then "attributed to a VIP", which costs no lookup of its own.
    pub hosts_are_vips: bool,
    pub port: Option<u16>,
    pub proto: Option<L4Proto>,
    /// Namespaces (inodes) to keep; all when empty.
    pub netns: Vec<u32>,
    pub ct_events: Vec<CtEvent>,
}

impl KernelFilter {
    /// The filter bits and values the programs read from their configuration. The VIP filter
    /// needs `aggregating`: only then does the kernel attribute.
    pub fn configure(&self, cfg: &mut ProbeConfig, aggregating: bool) {
        if !self.reasons.is_empty() {
            cfg.filter_flags |= FILTER_REASON;
        }
        if self.hosts_are_vips && aggregating {
            cfg.filter_flags |= FILTER_VIP;
        } else if !self.hosts.is_empty() {
            cfg.filter_flags |= FILTER_HOST;
        }
        if let Some(p) = self.port {
            cfg.filter_flags |= FILTER_PORT;
            cfg.filter_port = p;
        }
        if let Some(p) = self.proto {
            cfg.filter_flags |= FILTER_PROTO;
            cfg.filter_proto = p.number();
        }
        if !self.netns.is_empty() {
            cfg.filter_flags |= FILTER_NETNS;
        }
        if let [one] = self.netns[..] {
            cfg.filter_netns_one = one;
        }
        if !self.ct_events.is_empty() {
            cfg.filter_flags |= FILTER_CT_EVENT;
            for e in &self.ct_events {
                cfg.filter_ct_events |= 1 << (*e as u32);
            }
        }
    }
}

pub(super) fn host_key(addr: IpAddr) -> HostKey {
    let mut key = HostKey::default();
    match addr {
        IpAddr::V4(a) => {
            key.addr[..4].copy_from_slice(&a.octets());
            key.family = FAMILY_IPV4;
        }
        IpAddr::V6(a) => {
            key.addr = a.octets();
            key.family = FAMILY_IPV6;
        }
    }
    key
}

/// Puts `keys` into the hash map `name`, used as a set.
pub(super) fn fill_set<K: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    keys: impl Iterator<Item = K>,
) -> Result<(), ProbeError> {
    let map = ebpf.map_mut(name).ok_or(ProbeError::MissingMap(name))?;
    let mut set: HashMap<&mut MapData, K, u8> = HashMap::try_from(map).map_err(map_err(name))?;
    for k in keys {
        set.insert(k, 1, 0).map_err(map_err(name))?;
    }
    Ok(())
}

/// Seeds `CT_LAST` with every namespace's current per-CPU conntrack statistics, so that history
/// from before lbtrace started is not mistaken for a conntrack drop. Namespaces created later
/// start from zero, which is what the programs assume for an unknown one.
pub(super) fn seed_ct_baselines(ebpf: &mut Ebpf) -> Result<(), ProbeError> {
    let map = ebpf
        .map_mut(MAP_CT_LAST)
        .ok_or(ProbeError::MissingMap(MAP_CT_LAST))?;
    let mut last: HashMap<&mut MapData, CtStatKey, CtStatValue> =
        HashMap::try_from(map).map_err(map_err(MAP_CT_LAST))?;
    let mut denied = 0;
    for (inode, path) in netns::namespaces() {
        let table = match conntrack_stats(&path) {
            Ok(Some(t)) => t,
            Ok(None) => continue,
            Err(e) => {
                if e.kind() == std::io::ErrorKind::PermissionDenied {
                    denied += 1;
                }
                continue;
            }
        };
        for (cpu, row) in table.per_cpu.iter().enumerate() {
            let key = CtStatKey {
                netns: inode,
                cpu: u32::try_from(cpu).unwrap_or(u32::MAX),
            };
            let value = CtStatValue {
                insert_failed: row.insert_failed,
                drop: row.drop,
                early_drop: row.early_drop,
                _pad0: 0,
            };
            // A full LRU only means a namespace is classified from zero: not fatal.
            if let Err(e) = last.insert(key, value, 0) {
                tracing::debug!("seeding conntrack baseline for netns {inode}: {e}");
            }
        }
    }
    if denied > 0 {
        tracing::warn!(
            "cannot enter {denied} network namespaces (setns needs CAP_SYS_ADMIN): their conntrack history is unknown, so their first NETFILTER_DROP per CPU may be mislabelled as a conntrack event"
        );
    }
    Ok(())
}
