//! `garp-child NETNS IFNAME IP COUNT DELAY_MS ACTION`: a stand-in for a speaker. Sends COUNT
//! gratuitous ARPs for IP out of IFNAME in the namespace NETNS from an AF_PACKET socket (as
//! MetalLB does), waits DELAY_MS, then does ACTION:
//!
//! - `exit:N`: exits with code N;
//! - `wait`: sleeps until a signal ends it (SIGKILL, SIGTERM);
//! - `alloc`: allocates and touches memory until the OOM killer ends it (run it in a memory
//!   cgroup with a limit).
//!
//! Its process name (`garp-child`) is what the speaker tests look for.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{bail, Context, Result};
use lbtest::{lab::speaker::send_garp, netns::Netns};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [ns, ifname, ip, count, delay, action] = &args[..] else {
        bail!("usage: garp-child NETNS IFNAME IP COUNT DELAY_MS exit:N|wait|alloc");
    };
    let ip: Ipv4Addr = ip.parse().context("IP")?;
    let count: u32 = count.parse().context("COUNT")?;
    let delay = Duration::from_millis(delay.parse().context("DELAY_MS")?);
    // A handle on the test's namespace: kept, never deleted from here.
    let ns = Netns::open(ns)?;
    let sent = send_garp(&ns, ifname, ip, count);
    ns.keep();
    sent?;
    std::thread::sleep(delay);
    match action.as_str() {
        "wait" => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
        "alloc" => {
            let mut held: Vec<Vec<u8>> = Vec::new();
            loop {
                // Touched pages count as anonymous RSS.
                held.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&held);
            }
        }
        other => match other.strip_prefix("exit:").map(str::parse::<i32>) {
            Some(Ok(code)) => std::process::exit(code),
            _ => bail!("unknown action {other}"),
        },
    }
}
