//! lbtrace: traces why packets to LoadBalancer IPs are dropped.
//!
//! A record flows through the modules in this order: [`kernel`] (BTF, symbols, tracefs,
//! namespaces) configures [`probes`], which load and attach the programs with fallbacks; the
//! ring's bytes become typed events and then [`event::Record`]s in [`event`]; the [`pipeline`]
//! attributes them to VIPs and tracks ownership, then hands them to sinks: the [`analysis`]
//! (timelines, diagnosis) and the [`output`]s (terminal, NDJSON, summary, metrics, HTML).
pub mod analysis;
pub mod config;
pub mod event;
pub mod kernel;
pub mod output;
pub mod pipeline;
pub mod probes;
