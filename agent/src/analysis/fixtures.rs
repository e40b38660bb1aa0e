//! Records for the analysis tests, built in one place.

use crate::event::{
    record::{DropRec, VipOwnerRec},
    values::{Mac, Time},
    Record,
};

/// `s` seconds into a fixed day.
pub fn at(s: u64) -> Option<Time> {
    Some(Time::from_secs_f64(1_800_000_000.0 + s as f64))
}

/// A drop at `s` of `reason` at `location`, to `dst` from a client, attributed to `vip`.
pub fn drop_at(s: u64, vip: &str, netns: u32, reason: &str, dst: &str, location: &str) -> Record {
    Record::Drop(DropRec {
        time: at(s),
        reason: reason.into(),
        location: location.into(),
        netns,
        dst: dst.parse().ok(),
        src: "10.200.0.2".parse().ok(),
        vip: vip.parse().ok(),
        ..DropRec::default()
    })
}

/// `vip` moving at `s` from `old` to `new`, each a (last MAC byte, netns).
pub fn owner(s: u64, vip: &str, old: Option<(u8, u32)>, new: (u8, u32)) -> Record {
    Record::VipOwner(Box::new(VipOwnerRec {
        node: None,
        time: at(s),
        vip: vip.parse().unwrap(),
        old_mac: old.map(|(m, _)| Mac([0xaa, 0, 0, 0, 0, m])),
        old_netns: old.map(|(_, n)| n),
        new_mac: Mac([0xaa, 0, 0, 0, 0, new.0]),
        new_netns: Some(new.1),
        ifname: None,
        source: None,
        service: None,
    }))
}
