//! The `lbtrace` command line: the binary edge, where errors become one line and an exit code.

mod cmd;
mod daemon;
mod inspect;
mod top;

use std::{net::IpAddr, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use lbtrace::probes::ProbeMode;

#[derive(Parser)]
#[command(
    name = "lbtrace",
    version,
    about = "Trace why packets to Kubernetes LoadBalancer IPs are dropped, with eBPF",
    long_about = "lbtrace hooks the kernel's drop points (kfree_skb drop reasons) with eBPF and \
                  explains, per LoadBalancer IP, what dropped, where and why."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Stream dropped packets live, one line (or JSON object) per drop, then a summary.
    Watch(WatchArgs),
    /// Full-screen live view of the VIPs (takes the same flags as watch).
    Top(WatchArgs),
    /// Save the event stream to a file (NDJSON with a header) for diagnose, timeline, report.
    Record {
        /// Where to write the recording.
        #[arg(short = 'o', long, value_name = "FILE")]
        output: std::path::PathBuf,
        #[command(flatten)]
        watch: WatchArgs,
    },
    /// Name the likely cause per VIP: live (--duration) or from a recording.
    Diagnose {
        /// A recording (from `record` or the agent's --events-file); live when absent.
        file: Option<std::path::PathBuf>,
        #[command(flatten)]
        watch: WatchArgs,
    },
    /// Print a VIP's timeline from a recording.
    Timeline {
        file: std::path::PathBuf,
        /// The VIP.
        #[arg(long, value_name = "IP")]
        vip: IpAddr,
    },
    /// Write a self-contained HTML report from a recording.
    Report {
        file: std::path::PathBuf,
        /// Where to write the HTML page.
        #[arg(short = 'o', long, value_name = "FILE")]
        output: std::path::PathBuf,
        /// Only these VIPs (repeatable).
        #[arg(long = "vip", value_name = "IP")]
        vips: Vec<IpAddr>,
    },
    /// List this kernel's drop reasons with their codes (from BTF).
    Reasons {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run as the node daemon: Prometheus metrics, health, optional event file.
    Agent(AgentArgs),
    /// Check the kernel, BTF, tracefs, capabilities, and which probes attach.
    Doctor {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct WatchArgs {
    /// Print NDJSON: one object per event, then one summary object.
    #[arg(long)]
    json: bool,
    /// Keep only drops with this reason (repeatable), e.g. NO_SOCKET; see `lbtrace reasons`.
    #[arg(long = "reason", value_name = "NAME")]
    reasons: Vec<String>,
    /// Keep only packets from or to this address (repeatable).
    #[arg(long = "host", value_name = "IP")]
    hosts: Vec<IpAddr>,
    /// Keep only packets from or to this port.
    #[arg(long, value_name = "N")]
    port: Option<u16>,
    /// Keep only this transport protocol: tcp, udp, icmp, icmpv6, sctp or a number.
    #[arg(long, value_name = "P", value_parser = parse_proto)]
    proto: Option<lbtrace::decode::L4Proto>,
    /// Keep only drops in the network namespace with this inode (see `ls -l /proc/PID/ns/net`).
    #[arg(long, value_name = "INODE")]
    netns: Option<u32>,
    /// Keep only drops caused by this conntrack event (repeatable): insert_failed, table_full,
    /// early_drop.
    #[arg(long = "event", value_name = "EVENT", value_parser = parse_ct_event)]
    events: Vec<agent_common::CtEvent>,
    /// A LoadBalancer IP to watch (repeatable): keeps drops from or to it, also behind DNAT,
    /// and tags them.
    #[arg(long = "vip", value_name = "IP")]
    vips: Vec<IpAddr>,
    /// A LoadBalancer IP to attribute events to without selecting them (repeatable).
    #[arg(long = "tag-vip", value_name = "IP")]
    tag_vips: Vec<IpAddr>,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    duration: Option<Duration>,
    /// Stop after printing this many events.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Do not record ARP, IPv6 neighbour discovery or neighbour-cache updates.
    #[arg(long)]
    no_arp: bool,
    /// Learn VIPs from the gratuitous announcements seen (as a MetalLB speaker makes them).
    #[arg(long)]
    discover_vips: bool,
    /// Which hooks to use: tp_btf first (auto), or only one kind.
    #[arg(long, value_enum, default_value_t = ProbeMode::Auto)]
    probe_mode: ProbeMode,
    /// Ring buffer size in bytes (a power of two, at least 4096).
    #[arg(long, value_name = "BYTES", default_value_t = 4 << 20, value_parser = parse_ring_size)]
    ring_size: u32,
    /// Colour the output: auto (only on a terminal), always or never.
    #[arg(long, value_enum, default_value_t = ColorMode::Auto)]
    color: ColorMode,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Every flag is also an `LBTRACE_*` environment variable and a key of the config file
/// (flags and variables win over the file).
#[derive(Args, Debug)]
pub struct AgentArgs {
    /// TOML config file (keys: vips, metrics_addr, node_name, netns, log_format, events_file,
    /// events_max_bytes, probe_mode, ring_size, no_arp, discover_vips).
    #[arg(long, env = "LBTRACE_CONFIG", value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    /// Where to serve /metrics, /healthz and /readyz [default: 127.0.0.1:9464].
    #[arg(long, env = "LBTRACE_METRICS_ADDR", value_name = "ADDR:PORT")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Node name on every record and metric [default: $NODE_NAME, else the hostname].
    #[arg(long, env = "LBTRACE_NODE_NAME", value_name = "NAME")]
    node_name: Option<String>,
    /// LoadBalancer IPs or pools (CIDR) to attribute to (repeatable, or comma-separated).
    #[arg(long = "vip", env = "LBTRACE_VIP", value_name = "IP|CIDR", value_delimiter = ',', value_parser = parse_vip_arg)]
    vips: Vec<ipnet::IpNet>,
    /// Only this network namespace (inode).
    #[arg(long, env = "LBTRACE_NETNS", value_name = "INODE")]
    netns: Option<u32>,
    /// Log format.
    #[arg(long, env = "LBTRACE_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// Also write every event as NDJSON to this file (for `diagnose` and `report`).
    #[arg(long, env = "LBTRACE_EVENTS_FILE", value_name = "PATH")]
    events_file: Option<std::path::PathBuf>,
    /// Rotate the event file to PATH.1 past this size [default: 64 MiB].
    #[arg(long, env = "LBTRACE_EVENTS_MAX_BYTES", value_name = "BYTES")]
    events_max_bytes: Option<u64>,
    /// Which hooks to use.
    #[arg(long, env = "LBTRACE_PROBE_MODE", value_enum)]
    probe_mode: Option<ProbeMode>,
    /// Ring buffer size in bytes (a power of two, at least 4096) [default: 4 MiB].
    #[arg(long, env = "LBTRACE_RING_SIZE", value_name = "BYTES", value_parser = parse_ring_size)]
    ring_size: Option<u32>,
    /// Do not record ARP, neighbour discovery or neighbour updates.
    #[arg(long, env = "LBTRACE_NO_ARP")]
    no_arp: bool,
    /// Learn VIPs from gratuitous announcements.
    #[arg(long, env = "LBTRACE_DISCOVER_VIPS")]
    discover_vips: bool,
}

fn parse_vip_arg(s: &str) -> Result<ipnet::IpNet, String> {
    lbtrace::attribution::parse_vip(s)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorMode {
    Auto,
    Always,
    Never,
}

fn parse_proto(s: &str) -> Result<lbtrace::decode::L4Proto, String> {
    lbtrace::decode::L4Proto::parse(s)
        .ok_or_else(|| format!("`{s}` is not tcp, udp, icmp, icmpv6, sctp or a protocol number"))
}

fn parse_ct_event(s: &str) -> Result<agent_common::CtEvent, String> {
    use agent_common::CtEvent;
    [
        CtEvent::InsertFailed,
        CtEvent::TableFull,
        CtEvent::EarlyDrop,
    ]
    .into_iter()
    .find(|e| lbtrace::probes::ct_event_name(*e) == s)
    .ok_or_else(|| format!("`{s}` is not insert_failed, table_full or early_drop"))
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if !(secs.is_finite() && secs > 0.0 && secs < 1e9) {
        return Err(format!("`{s}` must be a positive number of seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_ring_size(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a size in bytes"))?;
    if n < 4096 || !n.is_power_of_two() {
        return Err(format!("{n} is not a power of two of at least 4096"));
    }
    Ok(n)
}

/// Exit code for errors the user can fix: bad input or missing privileges (as clap's usage errors).
pub const EXIT_USAGE: u8 = 2;

/// Logs to stderr through tracing; `LBTRACE_LOG` sets the filter (default: warn, info for the
/// agent).
pub fn init_logging(json: bool, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LBTRACE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Agent(_)) {
        init_logging(false, "warn");
    }
    let result = match cli.command {
        Command::Agent(args) => daemon::agent(args),
        Command::Watch(args) => cmd::watch(args),
        Command::Top(args) => top::top(args),
        Command::Record { output, watch } => inspect::record(&output, watch),
        Command::Diagnose { file, watch } => {
            let json = watch.json;
            inspect::diagnose(file, json, watch)
        }
        Command::Timeline { file, vip } => inspect::timeline(&file, &vip.to_string()),
        Command::Report { file, output, vips } => {
            let vips: Vec<String> = vips.iter().map(ToString::to_string).collect();
            inspect::report(&file, &output, &vips)
        }
        Command::Reasons { json } => cmd::reasons(json),
        Command::Doctor { json } => cmd::doctor(json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            let code = match e.downcast_ref::<cmd::UsageError>() {
                Some(_) => EXIT_USAGE,
                None => 1,
            };
            eprintln!("lbtrace: error: {}", one_line(&e));
            ExitCode::from(code)
        }
    }
}

/// `lbtrace ... | head` closing early is not an error.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn one_line(e: &anyhow::Error) -> String {
    let mut s = String::new();
    for (i, cause) in e.chain().enumerate() {
        let text = cause.to_string();
        if i > 0 && s.contains(&text) {
            continue;
        }
        if i > 0 {
            s.push_str(": ");
        }
        s.push_str(text.lines().next().unwrap_or_default());
    }
    s
}
