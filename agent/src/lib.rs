//! lbtrace: traces why packets to LoadBalancer IPs are dropped.
//!
//! The flow: [`probes`] load and attach the kernel programs (with fallbacks) → [`decode`] turns
//! ring-buffer records into events → [`attribution`] ties them to VIPs → [`output`] prints them.
pub mod analysis;
pub mod attribution;
pub mod btf;
pub mod config;
pub mod decode;
pub mod kallsyms;
pub mod metrics;
pub mod netns;
pub mod output;
pub mod ownership;
pub mod privileges;
pub mod probes;
pub mod report;
