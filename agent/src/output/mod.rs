//! Where records end up: terminal lines, NDJSON, the summary, metrics and their HTTP endpoint,
//! text timelines and the HTML report.

pub mod evidence;
pub mod html;
pub mod http;
pub mod metrics;
pub mod metrics_cluster;
pub mod metrics_speakers;
pub mod ndjson;
pub mod summary;
pub mod text;
pub mod timeline;
