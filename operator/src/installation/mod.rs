//! `KubeBaoInstallation`: one object that prepares OpenBao and installs the KMS plugin (static
//! pod on every control-plane node, via the node installer) and the CSI provider (DaemonSet).

pub mod controller;
pub mod migration;
pub mod notices;
pub mod openbao;
pub mod prepare;
pub mod render;
pub mod rewrite;
pub mod rollout;
pub mod rotation;
pub mod types;
pub mod uninstall;
pub mod verdict;

pub use types::KubeBaoInstallation;

/// Seconds since the epoch of an RFC 3339 timestamp, as the status holds them.
fn unix(ts: &str) -> Option<i64> {
    ts.parse::<k8s_openapi::jiff::Timestamp>()
        .ok()
        .map(|t| t.as_second())
}
