//! ARP, gratuitous ARP, IPv6 neighbour discovery and neighbour updates: who owns each VIP.
//!
//! Two "node" namespaces and a client on a bridge (in a namespace of its own). Ground truth is
//! what the test sent (arping, the speaker's raw-socket announcements, the client's datagrams)
//! and the client's neighbour table as `ip neigh` shows it.

use std::{net::SocketAddr, process::Command, time::Duration};

use lbtest::{
    lab::speaker,
    lbtrace::{Finished, Watch},
    netns::{veth, Netns},
    require_root, sh, unique,
};
use serde_json::Value;

const VIP: &str = "10.200.40.100";
const VIP6: &str = "fd00:200::40:100";

struct L2 {
    _bridge: Netns,
    a: Netns,
    b: Netns,
    client: Netns,
    a_if: String,
    b_if: String,
    a_mac: String,
    b_mac: String,
}

fn mac_of(ns: &Netns, ifname: &str) -> String {
    let out = ns.ip(&["-j", "link", "show", ifname]).unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0]["address"].as_str().unwrap().to_owned()
}

fn l2() -> L2 {
    require_root();
    let bridge = Netns::new("br").unwrap();
    bridge
        .ip(&[
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])
        .unwrap();
    bridge.ip(&["link", "set", "br0", "up"]).unwrap();
    let attach = |ns: &Netns, addrs: &[&str]| -> String {
        let (inner, port) = (unique("lh"), unique("lp"));
        veth(ns, &inner, addrs, &bridge, &port, &[]).unwrap();
        bridge.ip(&["link", "set", &port, "master", "br0"]).unwrap();
        inner
    };
    let a = Netns::new("na").unwrap();
    let b = Netns::new("nb").unwrap();
    let client = Netns::new("cl").unwrap();
    let a_if = attach(&a, &["10.200.40.11/24", "fd00:200::40:11/64"]);
    let b_if = attach(&b, &["10.200.40.12/24", "fd00:200::40:12/64"]);
    attach(&client, &["10.200.40.2/24", "fd00:200::40:2/64"]);
    L2 {
        a_mac: mac_of(&a, &a_if),
        b_mac: mac_of(&b, &b_if),
        _bridge: bridge,
        a,
        b,
        client,
        a_if,
        b_if,
    }
}

/// The client sends `n` datagrams to `vip:9` (resolving the VIP's MAC first if needed).
fn client_sends(l: &L2, vip: &str, n: u32) {
    let dst: SocketAddr = if vip.contains(':') {
        format!("[{vip}]:9")
    } else {
        format!("{vip}:9")
    }
    .parse()
    .unwrap();
    l.client
        .run(|| lbtest::traffic::udp_send(dst, n, 8).unwrap())
        .unwrap();
}

/// The client's neighbour entry for `ip`: (MAC, state).
fn client_neigh(l: &L2, ip: &str) -> Option<(String, String)> {
    let out = l.client.ip(&["-j", "neigh", "show", ip]).unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let e = v.as_array()?.first()?;
    Some((
        e["lladdr"].as_str().unwrap_or("").to_owned(),
        e["state"][0].as_str().unwrap_or("").to_owned(),
    ))
}

fn arping(ns: &Netns, ifname: &str, ip: &str, count: u32) {
    sh(Command::new("ip").args([
        "netns",
        "exec",
        &ns.name,
        "arping",
        "-q",
        "-U",
        "-c",
        &count.to_string(),
        "-I",
        ifname,
        ip,
    ]))
    .unwrap();
}

fn move_vip(from: (&Netns, &str), to: (&Netns, &str), vip: &str) {
    let plen = if vip.contains(':') { "128" } else { "32" };
    from.0
        .ip(&["addr", "del", &format!("{vip}/{plen}"), "dev", from.1])
        .unwrap();
    let mut args = vec!["addr", "add"];
    let cidr = format!("{vip}/{plen}");
    args.extend([cidr.as_str(), "dev", to.1]);
    if vip.contains(':') {
        args.push("nodad");
    }
    to.0.ip(&args).unwrap();
}

fn watch_vip(vip: &str) -> Watch {
    Watch::start(&["--json", "--vip", vip]).unwrap()
}

fn kind<'a>(f: &'a Finished, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    f.events.iter().filter(move |e| e["kind"] == kind)
}

/// GARPs a host sent (not the bridge's forwarded copies, not receptions).
fn garps_sent<'a>(f: &'a Finished, vip: &'a str) -> Vec<&'a Value> {
    kind(f, "arp")
        .filter(|e| e["gratuitous"] == true && e["direction"] == "tx" && e["bridged"] == false)
        .filter(|e| e["sender_ip"] == vip || e["target_ip"] == vip)
        .collect()
}

#[test]
fn garp_move_is_seen_with_both_macs_and_the_client_update() {
    let l = l2();
    l.a.ip(&["addr", "add", &format!("{VIP}/32"), "dev", &l.a_if])
        .unwrap();
    let w = watch_vip(VIP);
    // The client resolves the VIP: A answers, so A is the owner.
    client_sends(&l, VIP, 1);
    assert_eq!(client_neigh(&l, VIP).unwrap().0, l.a_mac);
    move_vip((&l.a, &l.a_if), (&l.b, &l.b_if), VIP);
    arping(&l.b, &l.b_if, VIP, 3);
    std::thread::sleep(Duration::from_millis(300));
    let f = w.stop_ok();
    assert_eq!(
        client_neigh(&l, VIP).unwrap().0,
        l.b_mac,
        "the client followed the GARP"
    );

    let garps = garps_sent(&f, VIP);
    assert_eq!(
        garps.len(),
        3,
        "exactly the 3 GARPs arping sent: {}",
        f.stdout
    );
    for g in &garps {
        assert_eq!(g["sender_mac"], l.b_mac.as_str());
        assert_eq!(g["sender_ip"], VIP);
        assert_eq!(g["netns"], l.b.inode);
        assert_eq!(g["vip"], VIP);
    }
    // Received at the client too (each GARP once).
    let at_client = kind(&f, "arp")
        .filter(|e| {
            e["direction"] == "rx" && e["netns"] == l.client.inode && e["gratuitous"] == true
        })
        .count();
    assert_eq!(at_client, 3);

    let owner = &f.summary["vip_owners"][VIP];
    assert_eq!(owner["mac"], l.b_mac.as_str(), "{}", f.summary);
    let changes = owner["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{}", f.summary);
    assert_eq!(changes[0]["from"], l.a_mac.as_str());
    assert_eq!(changes[0]["to"], l.b_mac.as_str());
    assert_eq!(changes[0]["garps"], 3);
    let moves: Vec<_> = kind(&f, "vip_owner")
        .filter(|e| !e["old_mac"].is_null())
        .collect();
    assert_eq!(moves.len(), 1);
    assert_eq!(moves[0]["old_mac"], l.a_mac.as_str());
    assert_eq!(moves[0]["new_mac"], l.b_mac.as_str());

    // The client's neighbour entry switched to B's MAC.
    let switched: Vec<_> = kind(&f, "neigh")
        .filter(|e| {
            e["netns"] == l.client.inode && e["ip"] == VIP && e["new_mac"] == l.b_mac.as_str()
        })
        .collect();
    assert!(
        !switched.is_empty(),
        "no neighbour update to B's MAC: {}",
        f.stdout
    );
    assert_eq!(switched[0]["old_mac"], l.a_mac.as_str());
    assert_eq!(switched[0]["vip"], VIP);
    assert!(f.summary["findings"].as_array().unwrap().is_empty());
}

#[test]
fn move_without_garp_leaves_the_client_on_the_old_node_where_traffic_drops() {
    let l = l2();
    l.a.ip(&["addr", "add", &format!("{VIP}/32"), "dev", &l.a_if])
        .unwrap();
    client_sends(&l, VIP, 1);
    let w = watch_vip(VIP);
    move_vip((&l.a, &l.a_if), (&l.b, &l.b_if), VIP);
    const N: u32 = 7;
    client_sends(&l, VIP, N);
    std::thread::sleep(Duration::from_millis(300));
    let f = w.stop_ok();
    assert_eq!(
        client_neigh(&l, VIP).unwrap().0,
        l.a_mac,
        "still the old MAC"
    );
    assert!(garps_sent(&f, VIP).is_empty(), "no GARP was sent");
    assert!(kind(&f, "neigh").all(|e| e["new_mac"] != l.b_mac.as_str()));
    // A no longer has the VIP and does not forward: it drops every datagram.
    let at_a: Vec<_> = kind(&f, "drop")
        .filter(|e| e["netns"] == l.a.inode)
        .collect();
    assert_eq!(at_a.len() as u32, N, "{}", f.stdout);
    for d in at_a {
        assert_eq!(d["vip"], VIP);
        assert_eq!(d["dst"], VIP);
        assert_eq!(d["reason"], "IP_INADDRERRORS");
    }
}

#[test]
fn five_moves_in_thirty_seconds_are_one_flapping_finding() {
    let l = l2();
    let nodes = [(&l.a, l.a_if.as_str()), (&l.b, l.b_if.as_str())];
    l.a.ip(&["addr", "add", &format!("{VIP}/32"), "dev", &l.a_if])
        .unwrap();
    let w = watch_vip(VIP);
    arping(&l.a, &l.a_if, VIP, 1);
    for i in 0..5 {
        std::thread::sleep(Duration::from_secs(3));
        let (from, to) = (nodes[i % 2], nodes[(i + 1) % 2]);
        move_vip(from, to, VIP);
        arping(to.0, to.1, VIP, 1);
    }
    std::thread::sleep(Duration::from_millis(300));
    let f = w.stop_ok();
    let findings = f.summary["findings"].as_array().unwrap();
    assert_eq!(findings.len(), 1, "{}", f.summary);
    assert_eq!(findings[0]["finding"], "flapping");
    assert_eq!(kind(&f, "finding").count(), 1);
    assert_eq!(
        f.summary["vip_owners"][VIP]["changes"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
}

#[test]
fn two_nodes_announcing_at_once_are_one_split_brain_finding() {
    let l = l2();
    l.a.ip(&["addr", "add", &format!("{VIP}/32"), "dev", &l.a_if])
        .unwrap();
    l.b.ip(&["addr", "add", &format!("{VIP}/32"), "dev", &l.b_if])
        .unwrap();
    let w = watch_vip(VIP);
    std::thread::scope(|s| {
        s.spawn(|| arping(&l.a, &l.a_if, VIP, 3));
        s.spawn(|| arping(&l.b, &l.b_if, VIP, 3));
    });
    std::thread::sleep(Duration::from_millis(300));
    let f = w.stop_ok();
    let findings = f.summary["findings"].as_array().unwrap();
    assert_eq!(findings.len(), 1, "{}", f.summary);
    assert_eq!(findings[0]["finding"], "split-brain");
    let macs = findings[0]["macs"].as_array().unwrap();
    assert!(
        macs.contains(&Value::from(l.a_mac.as_str()))
            && macs.contains(&Value::from(l.b_mac.as_str()))
    );
}

/// A speaker that dies after lbtrace started leaves its address behind too: the periodic
/// re-read of configured addresses (every 10 s) says so once, with nobody announcing.
#[test]
fn a_vip_left_behind_after_the_start_is_split_brain_within_a_rescan() {
    let l = l2();
    l.a.ip(&["addr", "add", &format!("{VIP}/32"), "dev", &l.a_if])
        .unwrap();
    let w = watch_vip(VIP);
    std::thread::sleep(Duration::from_millis(500));
    l.b.ip(&["addr", "add", &format!("{VIP}/32"), "dev", &l.b_if])
        .unwrap();
    std::thread::sleep(Duration::from_secs(11));
    let f = w.stop_ok();
    let findings = f.summary["findings"].as_array().unwrap();
    assert_eq!(findings.len(), 1, "{}", f.summary);
    assert_eq!(findings[0]["finding"], "split-brain");
    let macs = findings[0]["macs"].as_array().unwrap();
    assert!(
        macs.contains(&Value::from(l.a_mac.as_str()))
            && macs.contains(&Value::from(l.b_mac.as_str())),
        "{macs:?}"
    );
}

#[test]
fn ipv6_move_with_unsolicited_advertisement() {
    let l = l2();
    l.a.ip(&[
        "addr",
        "add",
        &format!("{VIP6}/128"),
        "dev",
        &l.a_if,
        "nodad",
    ])
    .unwrap();
    // Let the links finish their own IPv6 chatter (MLD, DAD) first.
    std::thread::sleep(Duration::from_millis(500));
    let w = watch_vip(VIP6);
    client_sends(&l, VIP6, 1);
    assert_eq!(client_neigh(&l, VIP6).unwrap().0, l.a_mac);
    move_vip((&l.a, &l.a_if), (&l.b, &l.b_if), VIP6);
    let sent = speaker::send_unsolicited_na(&l.b, &l.b_if, VIP6.parse().unwrap(), 2).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let f = w.stop_ok();
    assert_eq!(
        client_neigh(&l, VIP6).unwrap().0,
        l.b_mac,
        "the client followed the advertisement"
    );
    let nas = garps_sent(&f, VIP6);
    assert_eq!(nas.len() as u32, sent, "{}", f.stdout);
    for na in &nas {
        assert_eq!(na["family"], "ipv6");
        assert_eq!(na["op"], "neighbor-advertisement");
        assert_eq!(na["ndp_flags"]["override"], true);
        assert_eq!(na["ndp_flags"]["solicited"], false);
        assert_eq!(na["target_ip"], VIP6);
        assert_eq!(na["sender_mac"], l.b_mac.as_str());
    }
    let changes = f.summary["vip_owners"][VIP6]["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{}", f.summary);
    assert_eq!(changes[0]["from"], l.a_mac.as_str());
    assert_eq!(changes[0]["to"], l.b_mac.as_str());
    assert!(kind(&f, "neigh").any(|e| e["ip"] == VIP6
        && e["new_mac"] == l.b_mac.as_str()
        && e["netns"] == l.client.inode));
}

#[test]
fn discover_vips_learns_from_gratuitous_announcements() {
    let l = l2();
    l.b.ip(&["addr", "add", &format!("{VIP}/32"), "dev", &l.b_if])
        .unwrap();
    let w = Watch::start(&[
        "--json",
        "--discover-vips",
        "--netns",
        &l.b.inode.to_string(),
    ])
    .unwrap();
    arping(&l.b, &l.b_if, VIP, 1);
    std::thread::sleep(Duration::from_millis(300));
    let f = w.stop_ok();
    let found: Vec<_> = kind(&f, "vip_discovered").collect();
    assert_eq!(found.len(), 1, "{}", f.stdout);
    assert_eq!(found[0]["vip"], VIP);
    assert_eq!(found[0]["mac"], l.b_mac.as_str());
    assert_eq!(f.summary["discovered_vips"], serde_json::json!([VIP]));
}

/// Causes, in order, of each VIP's findings in `diagnose --json` output.
fn causes(json_lines: &str) -> std::collections::BTreeMap<String, Vec<String>> {
    json_lines
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|d| {
            let causes = d["findings"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f["cause"].as_str().unwrap().to_owned())
                .collect();
            (d["vip"].as_str().unwrap().to_owned(), causes)
        })
        .collect()
}

#[test]
fn stale_arp_is_diagnosed_live_and_from_a_recording_alike() {
    let l = l2();
    const CONTROL: &str = "10.200.40.101";
    for vip in [VIP, CONTROL] {
        l.a.ip(&["addr", "add", &format!("{vip}/32"), "dev", &l.a_if])
            .unwrap();
    }
    // A listener on A answers both VIPs while A owns them.
    let _sink =
        l.a.run(|| std::net::UdpSocket::bind("0.0.0.0:9").unwrap())
            .unwrap();
    let dir = std::env::temp_dir().join(unique("lbtrec"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("stale.ndjson");
    let common = ["--vip", VIP, "--vip", CONTROL, "--duration", "6"];
    let mut rec_args = vec!["-o", file.to_str().unwrap()];
    rec_args.extend(common);
    let recorder = Watch::start_command("record", &rec_args).unwrap();
    let mut live_args = vec!["--json"];
    live_args.extend(common);
    let live = Watch::start_command("diagnose", &live_args).unwrap();
    client_sends(&l, VIP, 3);
    client_sends(&l, CONTROL, 3);
    move_vip((&l.a, &l.a_if), (&l.b, &l.b_if), VIP);
    for _ in 0..4 {
        client_sends(&l, VIP, 2);
        client_sends(&l, CONTROL, 1);
        std::thread::sleep(Duration::from_millis(500));
    }
    let (status, live_out, err) = live.wait_raw().unwrap();
    assert!(status.success(), "{err}");
    let (status, _, err) = recorder.wait_raw().unwrap();
    assert!(status.success(), "{err}");
    let live = causes(&live_out);
    assert_eq!(
        live[VIP].first().map(String::as_str),
        Some("stale-arp"),
        "{live_out}"
    );
    assert!(
        live[CONTROL].is_empty(),
        "the control VIP has no finding: {live_out}"
    );

    let out = Command::new(lbtest::lbtrace::bin())
        .args([
            "diagnose",
            file.to_str().unwrap(),
            "--json",
            "--vip",
            VIP,
            "--vip",
            CONTROL,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let offline_out = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        causes(&offline_out),
        live,
        "recorded and live diagnoses agree"
    );
    let finding: Value = serde_json::from_str(
        offline_out
            .lines()
            .find(|l| l.contains(VIP) && l.contains("stale-arp"))
            .unwrap(),
    )
    .unwrap();
    let stale = &finding["findings"][0];
    assert_eq!(stale["evidence"]["drops_at_old_owner"], 8, "{stale}");
    assert_eq!(stale["evidence"]["garps_sent"], 0);
    assert_eq!(stale["evidence"]["old_mac"], l.a_mac.as_str());

    // The timeline and the report read the same file.
    let tl = Command::new(lbtest::lbtrace::bin())
        .args(["timeline", file.to_str().unwrap(), "--vip", VIP])
        .output()
        .unwrap();
    assert!(
        tl.status.success(),
        "{}",
        String::from_utf8_lossy(&tl.stderr)
    );
    let tl = String::from_utf8_lossy(&tl.stdout);
    assert!(
        tl.contains("IP_INADDRERRORS") && tl.contains("finding: stale-arp"),
        "{tl}"
    );
    let html = dir.join("report.html");
    let rep = Command::new(lbtest::lbtrace::bin())
        .args([
            "report",
            file.to_str().unwrap(),
            "-o",
            html.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(rep.status.success());
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<svg class=\"chart\"") && page.contains("stale-arp"));
    // Opened in a real browser: the charts render, one bar per reason and second.
    let dom = lbtest::browser::dump_dom(&html).unwrap();
    assert_eq!(
        dom.matches("<svg class=\"chart\"").count(),
        2,
        "one chart per VIP"
    );
    assert!(dom.matches("class=\"bar\"").count() >= 2, "{dom}");
    assert!(dom.contains("class=\"finding\"") && dom.contains("No finding"));
    let png = std::env::temp_dir().join("lbtrace-report.png");
    lbtest::browser::screenshot(&html, &png).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
