//! The KubeBao test bed: real etcd, kube-apiserver, kube-controller-manager and OpenBao,
//! started as child processes on free loopback ports, for end-to-end tests in every crate.
//!
//! ```no_run
//! # async fn demo() {
//! let bed = kubebao_testbed::Testbed::shared().await;
//! let client = bed.client().await;
//! let ns = bed.namespace("demo").await;
//! # }
//! ```
//!
//! The binaries come from `make testbed` (see `paths.rs`); a missing one fails the test with
//! the command that installs it. Every child dies with the test process (see `process.rs`).
//! Tests that need pods to really run start a [`Node`] (containerd, kubelet, kube-scheduler,
//! optionally the Secrets Store CSI driver) on this machine; it restores the host when it stops.

pub mod conditions;
mod etcd;
pub use etcd::RawEtcd;
mod kube_cluster;
mod node;
pub mod node_image;
mod openbao;
mod openbao_ha;
mod paths;
mod pki;
mod postgres;
mod process;
pub mod rbac;
mod testbed;
mod wait;

pub use node::{
    CSI_DRIVER_NAME, CsiDriver, CsiDriverOptions, HostState, NODE_NAME, Node, NodeOptions,
    SERVICE_IP, install_secrets_store_crds,
};
pub use openbao::{Audit, AuditedRequest, OpenBaoServer};
pub use openbao_ha::OpenBaoCluster;
pub use paths::Binaries;
pub use pki::Pki;
pub use postgres::Postgres;
pub use process::Component;
pub use testbed::{Testbed, TestbedOptions, free_port};
pub use wait::wait_for;
