//! The `because` rule on synthetic records.

use super::*;
use crate::{
    analysis::{diagnosis::Evidence, Analyzer, Cause},
    event::{
        record::{SpeakerEvent, SpeakerLinkRec, SpeakerRec, VipOwnerRec},
        Record,
    },
};

const T0: f64 = 1_800_000_000.0;
const VIP: &str = "10.200.0.100";
const N0: u32 = 11;
const N1: u32 = 12;

fn mac(n: u8) -> Mac {
    Mac([2, 0, 0, 0, 0, n])
}

fn change(t: f64) -> OwnerChange {
    OwnerChange {
        t: T0 + t,
        old_mac: Some(mac(0)),
        old_netns: Some(N0),
        new_mac: mac(1),
        new_netns: Some(N1),
        garps: 3,
    }
}

fn life(t: f64, netns: u32, pid: u32, event: LifeEvent) -> Lifecycle {
    Lifecycle {
        t: T0 + t,
        node: None,
        netns,
        pid,
        comm: "speaker".into(),
        event,
        vips: vec![VIP.parse().unwrap()],
    }
}

fn explain_with(lifecycle: &[Lifecycle], links: &[LinkDrop], signs: &LinkSigns) -> Because {
    let ctx = Context {
        lifecycle,
        links,
        nodes: None,
        lifecycle_seen: true,
    };
    explain(VIP.parse().unwrap(), &change(10.0), signs, &ctx)
}

#[test]
fn an_oom_kill_of_the_old_announcer_explains_the_move() {
    let oom = OomFigures {
        anon_rss_kb: 60_000,
        ..OomFigures::default()
    };
    let l = [
        life(0.0, N1, 200, LifeEvent::Start),
        life(9.3, N0, 100, LifeEvent::OomKill(Some(oom))),
        life(
            9.3,
            N0,
            100,
            LifeEvent::Signal {
                signal: 9,
                sender_pid: 100,
                sender_comm: "speaker".into(),
            },
        ),
        life(
            9.31,
            N0,
            100,
            LifeEvent::Exit {
                code: None,
                signal: Some(9),
            },
        ),
    ];
    let b = explain_with(&l, &[], &LinkSigns::default());
    assert_eq!(b.reason, Reason::AnnouncerOomKilled);
    assert_eq!(b.before_move_s, Some(0.7));
    let p = b.process.unwrap();
    assert_eq!(
        (p.pid, p.signal, p.oom.map(|m| m.anon_rss_kb)),
        (100, Some(9), Some(60_000))
    );
    assert!(b.says.contains("OOM-killed"), "{}", b.says);
}

#[test]
fn a_sigterm_is_said_with_its_sender_and_the_restart() {
    let l = [
        life(
            9.0,
            N0,
            100,
            LifeEvent::Signal {
                signal: 15,
                sender_pid: 7,
                sender_comm: "kubelet".into(),
            },
        ),
        life(
            9.05,
            N0,
            100,
            LifeEvent::Exit {
                code: Some(0),
                signal: None,
            },
        ),
        life(14.0, N0, 101, LifeEvent::Start),
    ];
    let b = explain_with(&l, &[], &LinkSigns::default());
    assert_eq!(b.reason, Reason::AnnouncerSignalled);
    assert_eq!(b.before_move_s, Some(1.0));
    let p = b.process.unwrap();
    assert_eq!(p.sender.as_deref(), Some("7 kubelet"));
    assert_eq!((p.exit_code, p.restarted_after_s), (Some(0), Some(4.95)));
}

#[test]
fn a_plain_exit_and_other_nodes_processes() {
    let exit = LifeEvent::Exit {
        code: Some(2),
        signal: None,
    };
    // An exit on a third node, or long before, explains nothing.
    let l = [
        life(-40.0, N0, 99, exit.clone()),
        life(9.0, 13, 300, exit.clone()),
    ];
    let b = explain_with(&l, &[], &LinkSigns::default());
    assert_eq!(b.reason, Reason::AnnouncerChanged);
    let l = [life(8.0, N0, 100, exit)];
    let b = explain_with(&l, &[], &LinkSigns::default());
    assert_eq!(b.reason, Reason::AnnouncerExited);
    assert!(b.says.contains("exited with code 2"), "{}", b.says);
}

#[test]
fn the_new_owners_speaker_starting_takes_the_vip_back() {
    let l = [life(9.4, N1, 201, LifeEvent::Start)];
    let b = explain_with(&l, &[], &LinkSigns::default());
    assert_eq!(b.reason, Reason::AnnouncerRestarted);
    assert_eq!(b.process.unwrap().pid, 201);
}

#[test]
fn dropped_memberlist_packets_between_the_owners() {
    let drop = |t: f64| LinkDrop {
        t: T0 + t,
        src: "10.200.0.11".parse().ok(),
        dst: "10.200.0.12".parse().ok(),
        src_node: None,
        dst_node: None,
        reason: "NETFILTER_DROP".into(),
    };
    let links: Vec<LinkDrop> = [-5.0, 8.0, 8.5, 9.0, 12.0].map(drop).into();
    let b = explain_with(&[], &links, &LinkSigns::default());
    assert_eq!(b.reason, Reason::MemberlistDropped);
    assert_eq!(b.before_move_s, Some(2.0));
    let m = b.memberlist.unwrap();
    assert_eq!((m.drops, m.reasons["NETFILTER_DROP"]), (3, 3));
    assert_eq!(m.between, ["10.200.0.11", "10.200.0.12"]);
}

#[test]
fn the_old_owner_left_the_lan() {
    let mut signs = LinkSigns::default();
    signs.flooded(T0 + 9.1, mac(0));
    signs.flooded(T0 + 9.2, mac(0));
    signs.flooded(T0 + 9.2, mac(7));
    signs.failed(T0 + 10.5, mac(0));
    let b = explain_with(&[], &[], &signs);
    assert_eq!(b.reason, Reason::NodeLinkLost);
    let l = b.link.unwrap();
    assert_eq!((l.flooded, l.neigh_failed), (2, 1));
    assert_eq!(b.before_move_s, Some(0.9));
    // Failed entries alone: the old owner stopped answering for the VIP, nothing more.
    let mut signs = LinkSigns::default();
    signs.failed(T0 + 9.5, mac(0));
    let b = explain_with(&[], &[], &signs);
    assert_eq!(b.reason, Reason::AnnouncerChanged);
}

#[test]
fn nothing_seen_is_a_planned_change_or_unknown_when_blind() {
    let b = explain_with(&[], &[], &LinkSigns::default());
    assert_eq!(b.reason, Reason::AnnouncerChanged);
    let ctx = Context::default();
    let b = explain(
        VIP.parse().unwrap(),
        &change(1.0),
        &LinkSigns::default(),
        &ctx,
    );
    assert_eq!(b.reason, Reason::Unknown);
}

fn speaker(t: f64, netns: u32, pid: u32, event: SpeakerEvent) -> Record {
    Record::Speaker(SpeakerRec {
        node: Some("n1".into()),
        time: Some(Time::from_secs_f64(T0 + t)),
        pid,
        comm: "speaker".into(),
        netns,
        event,
        signal: (event == SpeakerEvent::Exit).then_some(9),
        vips: vec![VIP.parse().unwrap()],
        ..SpeakerRec::default()
    })
}

fn owner(t: f64, old: Option<(u8, u32)>, new: (u8, u32)) -> Record {
    Record::VipOwner(Box::new(VipOwnerRec {
        node: None,
        time: Some(Time::from_secs_f64(T0 + t)),
        vip: VIP.parse().unwrap(),
        old_mac: old.map(|(m, _)| mac(m)),
        old_netns: old.map(|(_, n)| n),
        new_mac: mac(new.0),
        new_netns: Some(new.1),
        ifname: None,
        source: None,
        service: None,
    }))
}

#[test]
fn flapping_names_the_repeated_oom_kill_and_json_carries_each_because() {
    let mut a = Analyzer::new([VIP.to_owned(), "10.200.0.101".to_owned()]);
    a.add(&owner(0.0, None, (1, N1)));
    for (i, t) in [10.0, 70.0, 130.0].into_iter().enumerate() {
        let pid = 100 + i as u32;
        a.add(&speaker(t + 19.0, N1, pid, SpeakerEvent::OomKill));
        a.add(&speaker(t + 19.0, N1, pid, SpeakerEvent::Exit));
        a.add(&owner(t + 20.0, Some((1, N1)), (0, N0)));
        a.add(&speaker(t + 20.5, N1, pid + 10, SpeakerEvent::Start));
        a.add(&owner(t + 21.0, Some((0, N0)), (1, N1)));
    }
    a.add(&Record::SpeakerLink(SpeakerLinkRec::default()));
    let d = a.diagnose();
    let f = &d[0].findings[0];
    assert_eq!(f.cause, Cause::SpeakerFailover);
    let Evidence::Failover(e) = &f.evidence else {
        panic!("{f:?}")
    };
    let reasons: Vec<Reason> = e
        .changes
        .iter()
        .map(|c| c.because.as_ref().unwrap().reason)
        .collect();
    assert_eq!(reasons[0], Reason::AnnouncerOomKilled);
    assert_eq!(reasons[1], Reason::AnnouncerRestarted);
    assert_eq!(
        f.statements[0],
        "speaker on n1 was OOM-killed 3 times in 2 minutes"
    );
    assert!(f.hint.contains("memory limit"), "{}", f.hint);
    let json = serde_json::to_string(&d[0]).unwrap();
    assert!(
        json.contains(r#""reason":"announcer-oom-killed""#),
        "{json}"
    );
    assert!(d[1].findings.is_empty(), "the other VIP shows nothing");
}

#[test]
fn blind_only_when_the_status_lists_no_process_collector() {
    use crate::event::record::{ProbeState, ProbeStatus, Status};
    let status = |collector: &str, state: ProbeState| {
        Record::Status(Status {
            probe: "tp_btf".into(),
            probes: vec![ProbeStatus {
                collector: collector.into(),
                probe: "sched_process_exit".into(),
                state,
            }],
        })
    };
    let reason = |status: Option<Record>| {
        let mut a = Analyzer::new([VIP.to_owned()]);
        if let Some(s) = status {
            a.add(&s);
        }
        a.add(&owner(0.0, None, (0, N0)));
        a.add(&owner(5.0, Some((0, N0)), (1, N1)));
        a.moves(VIP)[0].3.reason
    };
    assert_eq!(reason(None), Reason::AnnouncerChanged);
    let attached = status("exit", ProbeState::Attached);
    assert_eq!(reason(Some(attached)), Reason::AnnouncerChanged);
    let off = status("exit", ProbeState::Disabled("forced off".into()));
    assert_eq!(reason(Some(off)), Reason::Unknown);
}

#[test]
fn flapping_behind_dropped_memberlist_packets_names_the_pair_and_the_count() {
    let mut a = Analyzer::new([VIP.to_owned()]);
    a.add(&owner(0.0, None, (0, N0)));
    for i in 0..60 {
        let (src, dst) = if i % 2 == 0 { (11, 12) } else { (12, 11) };
        a.add(&Record::SpeakerLink(SpeakerLinkRec {
            time: Some(Time::from_secs_f64(T0 + 3.0 + f64::from(i) * 0.1)),
            src: format!("10.200.0.{src}").parse().unwrap(),
            dst: format!("10.200.0.{dst}").parse().unwrap(),
            reason: "NETFILTER_DROP".into(),
            ..SpeakerLinkRec::default()
        }));
    }
    for (i, t) in [3.5, 4.2, 5.2, 6.3].into_iter().enumerate() {
        let (old, new) = if i % 2 == 0 {
            ((0, N0), (1, N1))
        } else {
            ((1, N1), (0, N0))
        };
        a.add(&owner(t, Some(old), new));
    }
    let d = a.diagnose();
    let f = &d[0].findings[0];
    assert_eq!(
        f.statements[0],
        "memberlist packets between 10.200.0.11 and 10.200.0.12 dropped (44, NETFILTER_DROP 44), behind 4 move(s)"
    );
    assert!(f.hint.contains("memberlist port"), "{}", f.hint);
    let moves = a.moves(VIP);
    assert!(moves
        .iter()
        .all(|m| m.3.reason == Reason::MemberlistDropped));
    assert_eq!(moves[0].3.memberlist.as_ref().unwrap().drops, 16);
}
