//! KubeBao's Secrets Store CSI provider: mounts OpenBao secrets into pods, logged in as the
//! pod's own ServiceAccount. See docs/csi.md.

pub mod bounded;
pub mod error;
pub mod identity;
pub mod leases;
pub mod metrics;
pub mod params;
pub mod provider;
pub mod render;
pub mod server;
#[cfg(test)]
mod testing;
