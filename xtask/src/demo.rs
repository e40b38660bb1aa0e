//! `cargo xtask demo`: lbtrace streaming live drops while a small namespace lab makes some.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use lbtest::{
    lbtrace::Watch,
    netns::{veth, Netns},
    traffic,
};

use crate::util::{require_root, step};

/// SIGINT reaches lbtrace (which stops and prints its summary) and us: we keep running so the
/// namespaces are removed. A handler, unlike SIG_IGN, is not inherited by lbtrace.
fn survive_ctrl_c() {
    extern "C" fn noop(_: libc::c_int) {}
    // SAFETY: installing an async-signal-safe no-op handler.
    unsafe { libc::signal(libc::SIGINT, noop as *const () as libc::sighandler_t) };
}

pub fn demo(duration: u64) -> Result<()> {
    require_root("the demo loads eBPF programs and creates network namespaces")?;
    crate::setup::setup()?;
    let bin = crate::build()?;
    // SAFETY: single-threaded at this point; the variable is read by lbtest.
    unsafe { std::env::set_var("LBTRACE_BIN", &bin) };
    survive_ctrl_c();

    step("demo: a client and a node namespace, joined by veth (10.200.9.0/24, fd00:200::/64)");
    let client = Netns::new("cli").context("client namespace")?;
    let node = Netns::new("node").context("node namespace")?;
    veth(
        &client,
        &lbtest::unique("lcl"),
        &["10.200.9.1/24", "fd00:200::9:1/64"],
        &node,
        &lbtest::unique("lnd"),
        &["10.200.9.2/24", "fd00:200::9:2/64"],
    )?;
    node.nft(
        "table inet demo {\n chain input { type filter hook input priority 0; tcp dport 8443 drop; }\n}",
    )?;
    let inode = node.inode.to_string();
    let secs = duration.to_string();
    step(&format!(
        "demo: lbtrace watch --netns {inode} --duration {secs} (drops in the node namespace)"
    ));
    let watch = Watch::start_live(&["--netns", &inode, "--duration", &secs, "--color", "always"])?;
    let end = Instant::now() + Duration::from_secs(duration.saturating_sub(1));
    let closed_tcp: SocketAddr = "10.200.9.2:80".parse()?;
    let closed_udp: SocketAddr = "10.200.9.2:53".parse()?;
    let closed_v6: SocketAddr = "[fd00:200::9:2]:80".parse()?;
    let filtered: SocketAddr = "10.200.9.2:8443".parse()?;
    while Instant::now() < end {
        client.run(|| -> Result<()> {
            traffic::tcp_refused(closed_tcp, 2)?;
            traffic::udp_send(closed_udp, 3, 40)?;
            traffic::tcp_refused(closed_v6, 1)?;
            // No answer to a dropped SYN: do not wait the whole connect timeout.
            let _ = std::net::TcpStream::connect_timeout(&filtered, Duration::from_millis(300));
            Ok(())
        })??;
        std::thread::sleep(Duration::from_millis(700));
    }
    let finished = watch.wait()?;
    anyhow::ensure!(
        finished.status.success(),
        "lbtrace failed: {}",
        finished.stderr
    );
    step("demo: done; namespaces removed");
    Ok(())
}
