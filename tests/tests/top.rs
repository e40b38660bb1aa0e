//! `lbtrace top` driven in tmux: it shows the VIPs with their drops, answers keys, and leaves
//! the terminal as it found it.

use std::{
    net::UdpSocket,
    process::Command,
    time::{Duration, Instant},
};

use lbtest::{lbtrace::bin, netns::Netns, require_root, sh, traffic, unique};

struct Tmux(String);

impl Tmux {
    fn start(cmd: &str) -> Self {
        let name = unique("lbttop");
        sh(Command::new("tmux").args([
            "new-session",
            "-d",
            "-s",
            &name,
            "-x",
            "160",
            "-y",
            "40",
            cmd,
        ]))
        .unwrap();
        Self(name)
    }

    fn screen(&self) -> String {
        let out =
            sh(Command::new("tmux").args(["capture-pane", "-p", "-S", "-100", "-t", &self.0]))
                .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &str) {
        sh(Command::new("tmux").args(["send-keys", "-t", &self.0, keys])).unwrap();
    }

    fn display(&self, format: &str) -> String {
        let out = sh(Command::new("tmux").args(["display-message", "-p", "-t", &self.0, format]))
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn wait_for(&self, what: impl Fn(&str) -> bool, why: &str) -> String {
        let start = Instant::now();
        loop {
            let s = self.screen();
            if what(&s) {
                return s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{why}; screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .status();
    }
}

/// The "drops" column of a VIP's row: the first number after the address (the sparkline
/// between them is block characters).
/// The row's "drops" column: the second number after the VIP, since the sparkline's cell ends
/// with this second's rate (0 once the drops fall in an earlier second).
fn drops_column(row: &str, vip: &str) -> Option<u64> {
    let (_, rest) = row.split_once(vip)?;
    rest.split(|c: char| c.is_whitespace() || c == '│')
        .filter(|t| !t.is_empty() && t.chars().all(|c| c.is_ascii_digit()))
        .nth(1)?
        .parse()
        .ok()
}

#[test]
fn top_shows_vips_answers_keys_and_restores_the_terminal() {
    require_root();
    let ns = Netns::new("top").unwrap();
    let (vip, control) = ("10.200.52.100", "10.200.52.101");
    for a in [vip, control] {
        ns.ip(&["addr", "add", &format!("{a}/32"), "dev", "lo"])
            .unwrap();
    }
    // The control VIP has a listener: its traffic is delivered, and must not count as drops.
    let sink = ns
        .run(|| UdpSocket::bind(format!("{control}:9")))
        .unwrap()
        .unwrap();
    sink.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    // The shell stays a moment after lbtrace exits, to look at what it left behind.
    let t = Tmux::start(&format!(
        "sh -c '{} top --vip {vip} --vip {control}; echo exit=$?; sleep 30'",
        bin().display()
    ));
    t.wait_for(
        |s| s.contains("tracing with") && s.contains(control),
        "top did not start",
    );
    assert_eq!(
        t.display("#{alternate_on}"),
        "1",
        "full screen on the alternate screen"
    );
    // The control's traffic first: by the time the VIP's drops show, it has been processed.
    let ctl_sent = ns
        .run(|| traffic::udp_send(format!("{control}:9").parse().unwrap(), 40, 8).unwrap())
        .unwrap();
    let mut buf = [0u8; 64];
    for i in 0..ctl_sent {
        sink.recv(&mut buf)
            .unwrap_or_else(|e| panic!("control datagram {i} of {ctl_sent} not delivered: {e}"));
    }
    let sent = ns
        .run(|| traffic::udp_send(format!("{vip}:9").parse().unwrap(), 25, 8).unwrap())
        .unwrap();
    let screen = t.wait_for(
        |s| s.contains(&format!("{sent}       NO_SOCKET ({sent})")),
        "the VIP's drops never showed",
    );
    let vip_row = screen.lines().find(|l| l.contains(vip)).unwrap();
    assert!(vip_row.contains('█'), "a sparkline: {vip_row}");
    assert_eq!(
        drops_column(vip_row, vip),
        Some(u64::from(sent)),
        "{vip_row}"
    );
    let control_row = screen.lines().find(|l| l.contains(control)).unwrap();
    assert_eq!(
        drops_column(control_row, control),
        Some(0),
        "the control VIP got {ctl_sent} delivered datagrams and must show no drops: {control_row}"
    );
    assert!(screen.contains("recent events: 10.200.52.100") && screen.contains("NO_SOCKET udp"));

    t.keys("p");
    t.wait_for(
        |s| s.lines().next().unwrap_or("").contains("[paused]"),
        "p did not pause",
    );
    t.keys("p");
    t.wait_for(
        |s| !s.lines().next().unwrap_or("").contains("[paused]"),
        "p did not resume",
    );
    t.keys("j");
    t.wait_for(
        |s| s.contains(&format!("recent events: {control}")),
        "j did not select the next VIP",
    );
    t.keys("/");
    t.keys("101");
    t.keys("Enter");
    t.wait_for(
        |s| s.contains("filter: 101") && !s.lines().any(|l| l.contains(vip)),
        "the filter did not apply",
    );

    t.keys("q");
    let after = t.wait_for(|s| s.contains("exit="), "lbtrace top did not exit after q");
    assert!(after.contains("exit=0"), "{after}");
    assert!(after.contains("--- lbtrace summary"), "{after}");
    assert_eq!(
        t.display("#{alternate_on}"),
        "0",
        "left the alternate screen"
    );
    assert_eq!(
        t.display("#{cursor_flag}"),
        "1",
        "the cursor is visible again"
    );
    assert!(
        !after.contains("lbtrace top —") && !after.contains("┌ VIPs"),
        "no trace of the full-screen view:\n{after}"
    );
    assert!(
        after.contains(&format!("vip {vip}: {sent} drops")),
        "{after}"
    );
}
