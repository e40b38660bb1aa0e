//! Ring-buffer records: arbitrary bytes, and valid records whose every value must survive.

use super::*;

#[test]
fn fuzz_decode_arbitrary_bytes() {
    fuzz(
        regressions!("decode_arbitrary_bytes"),
        5000,
        prop::collection::vec(any::<u8>(), 0..400),
        |bytes| {
            match decode(&bytes) {
                Ok(_) => through_the_pipeline(&bytes),
                Err(DecodeError::Truncated { len, need, .. }) => {
                    prop_assert!(len < need && len == bytes.len())
                }
                Err(DecodeError::UnknownKind(k)) => prop_assert!(!(1..=4).contains(&k)),
            }
            Ok(())
        },
    );
}

/// A record of `kind` with every other byte random, possibly followed by extra bytes.
fn record(kind: u16) -> impl Strategy<Value = Vec<u8>> {
    let size = match RecordKind::try_from(kind) {
        Ok(RecordKind::Drop) => size_of::<DropRecord>(),
        Ok(RecordKind::Arp) => size_of::<ArpRecord>(),
        Ok(RecordKind::Neigh) => size_of::<NeighRecord>(),
        Ok(RecordKind::Proc) => size_of::<ProcRecord>(),
        Err(_) => 16,
    };
    (
        prop::collection::vec(any::<u8>(), size..size + 32),
        // Families and protocols the decoder branches on, more often than chance would.
        prop::sample::select(vec![0u8, FAMILY_IPV4, FAMILY_IPV6, 5, 255]),
        prop::sample::select(vec![0u8, 1, 6, 17, 58, 132, 253]),
    )
        .prop_map(move |(mut b, family, proto)| {
            b[8..10].copy_from_slice(&kind.to_ne_bytes());
            match RecordKind::try_from(kind) {
                Ok(RecordKind::Drop) => {
                    let mut r: DropRecord = from_bytes(&b);
                    r.pkt.family = family;
                    r.pkt.l4_proto = proto;
                    b[..size_of::<DropRecord>()].copy_from_slice(&as_bytes(&r));
                }
                Ok(RecordKind::Arp) => {
                    let mut r: ArpRecord = from_bytes(&b);
                    r.family = family;
                    b[..size_of::<ArpRecord>()].copy_from_slice(&as_bytes(&r));
                }
                _ => {}
            }
            b
        })
}

#[test]
fn fuzz_decode_valid_records_keep_every_value() {
    let kinds = prop_oneof![Just(1u16), Just(2u16), Just(3u16), Just(4u16), any::<u16>()];
    fuzz(
        regressions!("decode_valid_records"),
        5000,
        kinds.prop_flat_map(record),
        |bytes| {
            let kind = u16::from_ne_bytes([bytes[8], bytes[9]]);
            let event = match decode(&bytes) {
                Err(DecodeError::UnknownKind(k)) => {
                    prop_assert_eq!(k, kind);
                    prop_assert!(RecordKind::try_from(kind).is_err());
                    return Ok(());
                }
                other => other.expect("a whole record of a known kind decodes"),
            };
            let ifname_ok = |name: &Option<IfName>, raw: &[u8; 16]| match name.map(|n| n.to_text())
            {
                Some(n) => !n.is_empty() && !n.contains('\0') && raw[0] != 0,
                None => raw[0] == 0,
            };
            match &event {
                Event::Drop(d) => {
                    let r: DropRecord = from_bytes(&bytes);
                    prop_assert_eq!(d.ts_ns, r.header.ts_ns);
                    prop_assert_eq!(d.probe, ProbeId::try_from(r.header.probe));
                    prop_assert_eq!(
                        (d.reason, d.location, d.ifindex, d.netns),
                        (r.reason, r.location, r.ifindex, r.netns)
                    );
                    prop_assert!(ifname_ok(&d.ifname, &r.ifname));
                    let ct: Option<Result<CtEvent, u8>> =
                        (r.ct_event != 0).then(|| CtEvent::try_from(r.ct_event));
                    prop_assert_eq!(d.ct.event, ct);
                    let ip = matches!(r.pkt.family, FAMILY_IPV4 | FAMILY_IPV6);
                    prop_assert_eq!(d.packet.src.is_some(), ip);
                    if ip && r.pkt.l4_proto != 0 {
                        prop_assert_eq!(d.packet.proto.map(L4Proto::number), Some(r.pkt.l4_proto));
                    } else {
                        prop_assert_eq!(d.packet.proto, None);
                    }
                    prop_assert_eq!(d.packet.len, r.pkt.len);
                }
                Event::Arp(a) => {
                    let r: ArpRecord = from_bytes(&bytes);
                    prop_assert_eq!((a.netns, a.ifindex), (r.netns, r.ifindex));
                    prop_assert!(ifname_ok(&a.ifname, &r.ifname));
                    let known = matches!(
                        (r.family, r.op),
                        (FAMILY_IPV4, 1 | 2) | (FAMILY_IPV6, 135 | 136)
                    );
                    prop_assert_eq!(known, !matches!(a.op, ArpOp::Other(_)));
                    if let ArpOp::Other(op) = a.op {
                        prop_assert_eq!(op, r.op);
                    }
                }
                Event::Neigh(n) => {
                    let r: NeighRecord = from_bytes(&bytes);
                    prop_assert_eq!(n.netns, (r.netns != 0).then_some(r.netns));
                    prop_assert_eq!((n.old_state, n.new_state), (r.old_state, r.new_state));
                    prop_assert!(ifname_ok(&n.ifname, &r.ifname));
                }
                Event::Proc(p) => {
                    let r: ProcRecord = from_bytes(&bytes);
                    prop_assert_eq!((p.pid, p.netns, p.signal), (r.pid, r.netns, r.signal));
                    prop_assert!(ifname_ok(&p.comm, &r.comm));
                    prop_assert_eq!(p.oom.total_vm_kb, r.total_vm_kb);
                }
            }
            // One byte short of its kind's record: an error, never a guess.
            let need = match &event {
                Event::Drop(_) => size_of::<DropRecord>(),
                Event::Arp(_) => size_of::<ArpRecord>(),
                Event::Neigh(_) => size_of::<NeighRecord>(),
                Event::Proc(_) => size_of::<ProcRecord>(),
            };
            let short = decode(&bytes[..need - 1]);
            prop_assert!(
                matches!(short, Err(DecodeError::Truncated { .. })),
                "{short:?}"
            );
            through_the_pipeline(&bytes);
            Ok(())
        },
    );
}
