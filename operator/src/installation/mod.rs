//! `KubeBaoInstallation`: one object that prepares OpenBao and installs the KMS plugin (static
//! pod on every control-plane node, via the node installer) and the CSI provider (DaemonSet).

pub mod controller;
pub mod prepare;
pub mod render;
pub mod types;

pub use types::KubeBaoInstallation;
