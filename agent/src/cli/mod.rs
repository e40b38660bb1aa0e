//! The `lbtrace` command line: flags, one file per subcommand, and the errors users can fix.

mod agent;
mod common;
mod diagnose;
mod doctor;
mod prometheus;
mod record;
mod report;
mod timeline;
mod top;
mod watch;

use std::{net::IpAddr, time::Duration};

use agent_common::CtEvent;
use clap::{Args, Parser, Subcommand};
use lbtrace::{event::values::L4Proto, pipeline::attribution::parse_vip, probes::ProbeMode};

pub use common::UsageError;

/// `watch`'s default sample limit: below 1,000 drops per second per key and CPU (most
/// incidents, every test) every drop is shown; a flood costs at most that many records per
/// key and CPU each second (a few thousand lines a second: more than anyone reads, and a
/// few percent of a core to print), while the kernel counts the rest exactly.
pub const DEFAULT_WATCH_SAMPLE_LIMIT: u32 = 1000;

#[derive(Parser)]
#[command(
    name = "lbtrace",
    version,
    about = "Trace why packets to Kubernetes LoadBalancer IPs are dropped, with eBPF",
    long_about = "lbtrace hooks the kernel's drop points (kfree_skb drop reasons) with eBPF and \
                  explains, per LoadBalancer IP, what dropped, where and why."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
    /// Name the likely cause per VIP: live (--duration) or from recordings.
    Diagnose {
        /// Recordings (from `record` or the agent's --events-file), one per node: merged into
        /// one timeline. Live when absent.
        files: Vec<std::path::PathBuf>,
        #[command(flatten)]
        prom: prometheus::PromArgs,
        #[command(flatten)]
        watch: WatchArgs,
    },
    /// Print a VIP's timeline from recordings (several nodes' are merged).
    Timeline {
        #[arg(required_unless_present = "prometheus")]
        files: Vec<std::path::PathBuf>,
        /// The VIP.
        #[arg(long, value_name = "IP")]
        vip: IpAddr,
        #[command(flatten)]
        prom: prometheus::PromArgs,
    },
    /// Write a self-contained HTML report from recordings (several nodes' are merged).
    Report {
        #[arg(required_unless_present = "prometheus")]
        files: Vec<std::path::PathBuf>,
        #[command(flatten)]
        prom: prometheus::PromArgs,
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
    pub(crate) json: bool,
    /// Keep only drops with this reason (repeatable), e.g. NO_SOCKET; see `lbtrace reasons`.
    #[arg(long = "reason", value_name = "NAME")]
    pub(crate) reasons: Vec<String>,
    /// Keep only packets from or to this address (repeatable).
    #[arg(long = "host", value_name = "IP")]
    pub(crate) hosts: Vec<IpAddr>,
    /// Keep only packets from or to this port.
    #[arg(long, value_name = "N")]
    pub(crate) port: Option<u16>,
    /// Keep only this transport protocol: tcp, udp, icmp, icmpv6, sctp or a number.
    #[arg(long, value_name = "P", value_parser = parse_proto)]
    pub(crate) proto: Option<L4Proto>,
    /// Keep only events in these network namespaces (repeatable, or comma-separated): inodes
    /// (`stat -L -c %i /proc/PID/ns/net`), paths, or `ip netns` names. A node's set is its own
    /// namespace and its pods'.
    #[arg(long = "netns", visible_alias = "node-netns", value_name = "NS", value_delimiter = ',', value_parser = parse_netns)]
    pub(crate) netns: Vec<u32>,
    /// Label every event with this node name (`record` defaults to $NODE_NAME, else the
    /// hostname): merged recordings say where each event was seen.
    #[arg(long, value_name = "NAME")]
    pub(crate) node: Option<String>,
    /// Keep only drops caused by this conntrack event (repeatable): insert_failed, table_full,
    /// early_drop.
    #[arg(long = "event", value_name = "EVENT", value_parser = parse_ct_event)]
    pub(crate) events: Vec<CtEvent>,
    /// A LoadBalancer IP to watch (repeatable): keeps drops from or to it, also behind DNAT,
    /// and tags them.
    #[arg(long = "vip", value_name = "IP")]
    pub(crate) vips: Vec<IpAddr>,
    /// A LoadBalancer IP to attribute events to without selecting them (repeatable).
    #[arg(long = "tag-vip", value_name = "IP")]
    pub(crate) tag_vips: Vec<IpAddr>,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub(crate) duration: Option<Duration>,
    /// Stop after printing this many events.
    #[arg(long, value_name = "N")]
    pub(crate) count: Option<u64>,
    /// Drop records shown per (VIP, reason, drop site), CPU and second (about); the kernel
    /// still counts every drop, and a TOTALS line (a `totals` record with --json) gives the
    /// exact counts whenever some were not shown. 0 sends every drop through the ring buffer.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_WATCH_SAMPLE_LIMIT)]
    pub(crate) sample_limit: u32,
    /// Do not record ARP, IPv6 neighbour discovery or neighbour-cache updates.
    #[arg(long)]
    pub(crate) no_arp: bool,
    /// Learn VIPs from announcements (gratuitous ARP/NA, ARP replies), from the addresses
    /// configured in the namespaces lbtrace can enter and from the LoadBalancer IPs in
    /// kube-proxy's rules.
    #[arg(long)]
    pub(crate) discover_vips: bool,
    /// Also show drops that are not loss: packets the kernel freed after they did their job,
    /// socket teardown, the host's own noise (each record's `class` says which).
    #[arg(long)]
    pub(crate) all_drops: bool,
    /// How often kube-proxy's rules are read again for Service names and endpoint changes
    /// (0: not at all).
    #[arg(long, value_name = "SECS", default_value = "1", value_parser = parse_interval)]
    pub(crate) kube_proxy_interval: Duration,
    /// A process name (`comm`) that announces VIPs, followed from the start (repeatable);
    /// others are learnt from their own announcements.
    #[arg(long = "speaker-comm", value_name = "NAME", value_parser = parse_comm)]
    pub(crate) speaker_comms: Vec<String>,
    /// The speakers' memberlist (leader election) port, UDP and TCP: its drops are
    /// speaker_link records (0: off).
    #[arg(long, value_name = "N", default_value_t = lbtrace::probes::MEMBERLIST_PORT)]
    pub(crate) memberlist_port: u16,
    /// Which hooks to use: tp_btf first (auto), or only one kind (btf, tracepoint).
    #[arg(long, default_value_t = ProbeMode::Auto, value_parser = probe_modes())]
    pub(crate) probe_mode: ProbeMode,
    /// Ring buffer size in bytes (a power of two, at least 4096).
    #[arg(long, value_name = "BYTES", default_value_t = 4 << 20, value_parser = parse_ring_size)]
    pub(crate) ring_size: u32,
    /// Colour the output: auto (only on a terminal), always or never.
    #[arg(long, value_enum, default_value_t = ColorMode::Auto)]
    pub(crate) color: ColorMode,
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
    /// TOML config file (keys: vips, metrics_addr, node_name, netns, node_netns, log_format,
    /// events_file, events_max_bytes, probe_mode, ring_size, no_arp, arp_rx, discover_vips,
    /// sample_limit, max_vips, nat_entries, kube_proxy_interval, speaker_comms,
    /// memberlist_port).
    #[arg(long, env = "LBTRACE_CONFIG", value_name = "FILE")]
    pub(crate) config: Option<std::path::PathBuf>,
    /// Where to serve /metrics, /healthz and /readyz [default: 127.0.0.1:9464].
    #[arg(long, env = "LBTRACE_METRICS_ADDR", value_name = "ADDR:PORT")]
    pub(crate) metrics_addr: Option<std::net::SocketAddr>,
    /// Node name on every record and metric [default: $NODE_NAME, else the hostname].
    #[arg(
        long = "node-name",
        visible_alias = "node",
        env = "LBTRACE_NODE_NAME",
        value_name = "NAME"
    )]
    pub(crate) node_name: Option<String>,
    /// LoadBalancer IPs or pools (CIDR) to attribute to (repeatable, or comma-separated).
    #[arg(long = "vip", env = "LBTRACE_VIP", value_name = "IP|CIDR", value_delimiter = ',', value_parser = parse_vip_arg)]
    pub(crate) vips: Vec<ipnet::IpNet>,
    /// Only these network namespaces (repeatable, or comma-separated): inodes, paths or
    /// `ip netns` names; the node's own namespace and its pods'.
    #[arg(long = "netns", visible_alias = "node-netns", env = "LBTRACE_NETNS", value_name = "NS", value_delimiter = ',', value_parser = parse_netns)]
    pub(crate) netns: Vec<u32>,
    /// Log format.
    #[arg(long, env = "LBTRACE_LOG_FORMAT", value_enum)]
    pub(crate) log_format: Option<LogFormat>,
    /// Also write every event as NDJSON to this file (for `diagnose` and `report`).
    #[arg(long, env = "LBTRACE_EVENTS_FILE", value_name = "PATH")]
    pub(crate) events_file: Option<std::path::PathBuf>,
    /// Rotate the event file to PATH.1 past this size [default: 64 MiB].
    #[arg(long, env = "LBTRACE_EVENTS_MAX_BYTES", value_name = "BYTES")]
    pub(crate) events_max_bytes: Option<u64>,
    /// Which hooks to use: auto, btf or tracepoint.
    #[arg(long, env = "LBTRACE_PROBE_MODE", value_parser = probe_modes())]
    pub(crate) probe_mode: Option<ProbeMode>,
    /// Ring buffer size in bytes (a power of two, at least 4096) [default: 4 MiB].
    #[arg(long, env = "LBTRACE_RING_SIZE", value_name = "BYTES", value_parser = parse_ring_size)]
    pub(crate) ring_size: Option<u32>,
    /// Do not record ARP, neighbour discovery or neighbour updates.
    #[arg(long, env = "LBTRACE_NO_ARP")]
    pub(crate) no_arp: bool,
    /// Learn VIPs from gratuitous announcements and kube-proxy's rules.
    #[arg(long, env = "LBTRACE_DISCOVER_VIPS")]
    pub(crate) discover_vips: bool,
    /// Also see ARP/NDP on receive: hooks every received packet (about 45 ns each here).
    /// Ownership needs only what each node transmits, so the agent leaves it off.
    #[arg(long, env = "LBTRACE_ARP_RX")]
    pub(crate) arp_rx: bool,
    /// Drop records sent to userspace per (VIP, reason, location, conntrack event), CPU and
    /// second; every drop is still counted exactly in the kernel. 0 sends every drop
    /// [default: 100].
    #[arg(long, env = "LBTRACE_SAMPLE_LIMIT", value_name = "N")]
    pub(crate) sample_limit: Option<u32>,
    /// VIPs (and pools) the kernel attributes to, and VIPs with their own metric label
    /// [default: 1024].
    #[arg(long, env = "LBTRACE_MAX_VIPS", value_name = "N", value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub(crate) max_vips: Option<u32>,
    /// DNAT translations remembered to attribute drops behind kube-proxy: new connections per
    /// second times how long a flow must stay attributable [default: 131072, about 2.6 s
    /// at 50k new connections/s]. Evictions are counted.
    #[arg(long, env = "LBTRACE_NAT_ENTRIES", value_name = "N", value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    pub(crate) nat_entries: Option<u32>,
    /// How often kube-proxy's rules are read again, in seconds (0: not at all) [default: 1].
    #[arg(long, env = "LBTRACE_KUBE_PROXY_INTERVAL", value_name = "SECS", value_parser = parse_interval)]
    pub(crate) kube_proxy_interval: Option<Duration>,
    /// A process name that announces VIPs, followed from the start (repeatable, or
    /// comma-separated); others are learnt from their own announcements.
    #[arg(long = "speaker-comm", env = "LBTRACE_SPEAKER_COMM", value_name = "NAME", value_delimiter = ',', value_parser = parse_comm)]
    pub(crate) speaker_comms: Vec<String>,
    /// The speakers' memberlist port, UDP and TCP (0: off) [default: 7946].
    #[arg(long, env = "LBTRACE_MEMBERLIST_PORT", value_name = "N")]
    pub(crate) memberlist_port: Option<u16>,
}

/// A process name as `--speaker-comm` takes it: what the kernel keeps of it (15 bytes).
fn parse_comm(s: &str) -> Result<String, String> {
    lbtrace::config::speaker_comm(s)
}

/// Seconds, fractions allowed; 0 is allowed (off).
fn parse_interval(s: &str) -> Result<Duration, String> {
    let secs = s
        .parse::<f64>()
        .map_err(|_| format!("`{s}` is not a number of seconds from 0 to 3600"))?;
    lbtrace::kernel::kubeproxy::interval(secs)
}

fn parse_netns(s: &str) -> Result<u32, String> {
    lbtrace::kernel::netns::inode_of(s)
}

fn parse_vip_arg(s: &str) -> Result<ipnet::IpNet, String> {
    parse_vip(s)
}

/// `auto`, `btf` or `tracepoint`, with clap's list of possible values on a mistake.
fn probe_modes() -> impl clap::builder::TypedValueParser<Value = ProbeMode> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(ProbeMode::NAMES)
        // Only the names above get here, and each parses.
        .map(|s| s.parse::<ProbeMode>().unwrap_or_default())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorMode {
    Auto,
    Always,
    Never,
}

fn parse_proto(s: &str) -> Result<L4Proto, String> {
    L4Proto::parse(s)
        .ok_or_else(|| format!("`{s}` is not tcp, udp, icmp, icmpv6, sctp or a protocol number"))
}

fn parse_ct_event(s: &str) -> Result<CtEvent, String> {
    CtEvent::from_name(s)
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

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent(args) => agent::agent(args),
        Command::Watch(args) => watch::watch(args),
        Command::Top(args) => top::top(args),
        Command::Record { output, watch } => record::record(&output, watch),
        Command::Diagnose { files, prom, watch } => diagnose::diagnose(files, &prom, watch),
        Command::Timeline { files, vip, prom } => {
            timeline::timeline(&files, &prom, &vip.to_string())
        }
        Command::Report {
            files,
            prom,
            output,
            vips,
        } => {
            let vips: Vec<String> = vips.iter().map(ToString::to_string).collect();
            report::report(&files, &prom, &output, &vips)
        }
        Command::Reasons { json } => doctor::reasons(json),
        Command::Doctor { json } => doctor::doctor(json),
    }
}
