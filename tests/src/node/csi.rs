//! The real Secrets Store CSI driver as a host process: its CRDs and CSIDriver object, the
//! driver with its socket in the kubelet's plugin directory, and the registrar that announces it
//! to the kubelet.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::storage::v1::CSINode;
use kube::api::Api;

use super::{CSI_DRIVER_NAME, NODE_NAME, Node};
use crate::paths::installed;
use crate::{Component, Testbed, free_port, wait_for};

/// Installs the Secrets Store CSI driver's CRDs (SecretProviderClass and its pod statuses) from
/// the driver's own `deploy/` folder and waits until they are served.
pub fn install_secrets_store_crds(bed: &Testbed) {
    let deploy = installed("KUBEBAO_CSI_DRIVER_DEPLOY", "the CSI driver's manifests");
    for file in [
        "secrets-store.csi.x-k8s.io_secretproviderclasses.yaml",
        "secrets-store.csi.x-k8s.io_secretproviderclasspodstatuses.yaml",
    ] {
        let path = deploy.join(file);
        bed.kubectl(&["apply", "--server-side", "-f", &path.display().to_string()]);
    }
    // The driver's controller watches SecretProviderClassPodStatuses from its start.
    bed.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/secretproviderclasses.secrets-store.csi.x-k8s.io",
        "crd/secretproviderclasspodstatuses.secrets-store.csi.x-k8s.io",
    ]);
}

/// How a test's own Secrets Store CSI driver runs.
#[derive(Clone, Debug)]
pub struct CsiDriverOptions {
    /// Where the driver looks for providers' sockets (such as KubeBao's `kubebao.sock`).
    pub provider_dir: PathBuf,
    /// `--enable-secret-rotation --rotation-poll-interval=<this>`; None: no rotation.
    pub rotation_poll_interval: Option<Duration>,
    /// The CSIDriver object (YAML) to apply; None: the driver's own `deploy/csidriver.yaml`.
    pub csi_driver_object: Option<String>,
}

/// The Secrets Store CSI driver and its registrar as host processes, started by a test on a
/// node started without one (`NodeOptions::csi_driver: false`), for the driver options
/// [`NodeOptions`](crate::NodeOptions) has no field for (secret rotation). Stopped on drop.
pub struct CsiDriver {
    components: Vec<Component>,
}

impl CsiDriver {
    /// Installs the driver's CRDs and the CSIDriver object, starts the driver and its
    /// registrar, and returns once the kubelet lists the driver in the node's CSINode.
    pub async fn start(bed: &Testbed, node: &Node, options: CsiDriverOptions) -> CsiDriver {
        let started = Instant::now();
        install_secrets_store_crds(bed);
        let object = options.csi_driver_object.unwrap_or_else(|| {
            let deploy = installed("KUBEBAO_CSI_DRIVER_DEPLOY", "the CSI driver's manifests");
            std::fs::read_to_string(deploy.join("csidriver.yaml")).expect("read csidriver.yaml")
        });
        bed.apply(&object);
        std::fs::create_dir_all(&options.provider_dir).expect("create the CSI provider dir");
        let plugin_dir = node.root_dir().join("plugins/csi-secrets-store");
        let registry = node.root_dir().join("plugins_registry");
        std::fs::create_dir_all(&plugin_dir).expect("create the CSI plugin dir");
        std::fs::create_dir_all(&registry).expect("create the plugin registry dir");
        let socket = plugin_dir.join("csi.sock");
        let providers = options.provider_dir.display().to_string();
        let mut args = vec![
            format!("--endpoint=unix://{}", socket.display()),
            format!("--nodeid={NODE_NAME}"),
            format!("--provider-volume={providers}"),
            format!("--additional-provider-volume-paths={providers}"),
            format!("--metrics-addr=127.0.0.1:{}", free_port()),
            "--v=2".into(),
        ];
        if let Some(interval) = options.rotation_poll_interval {
            args.push("--enable-secret-rotation".into());
            args.push(format!(
                "--rotation-poll-interval={}ms",
                interval.as_millis()
            ));
        }
        let kubeconfig = bed.kubeconfig().display().to_string();
        let driver = Component::start_with_env(
            "secrets-store-csi-driver",
            node.log_dir(),
            &installed("KUBEBAO_CSI_DRIVER", "the Secrets Store CSI driver"),
            &args,
            &[("KUBECONFIG", &kubeconfig)],
        );
        let registrar = Component::start(
            "csi-registrar",
            node.log_dir(),
            &installed("KUBEBAO_CSI_REGISTRAR", "the CSI driver's registrar"),
            &[
                format!("--driver-name={CSI_DRIVER_NAME}"),
                format!("--csi-address={}", socket.display()),
                format!("--plugin-registration-dir={}", registry.display()),
            ],
        );
        let mut this = CsiDriver {
            components: vec![driver, registrar],
        };
        this.wait_registered(bed).await;
        eprintln!(
            "node: CSI driver (rotation every {:?}) registered with the kubelet in {:.1?}",
            options.rotation_poll_interval,
            started.elapsed()
        );
        this
    }

    async fn wait_registered(&mut self, bed: &Testbed) {
        let csinodes: Api<CSINode> = Api::all(bed.client().await);
        wait_for(
            "the kubelet to register the CSI driver (CSINode)",
            Duration::from_secs(60),
            || {
                self.assert_running();
                let csinodes = csinodes.clone();
                async move {
                    let csinode = csinodes.get(NODE_NAME).await.map_err(|e| e.to_string())?;
                    let drivers: Vec<String> =
                        csinode.spec.drivers.into_iter().map(|d| d.name).collect();
                    if drivers.iter().any(|d| d == CSI_DRIVER_NAME) {
                        Ok(())
                    } else {
                        Err(format!("CSINode lists {drivers:?}"))
                    }
                }
            },
        )
        .await;
    }

    /// Panics with the logs' tails if the driver or its registrar has exited.
    pub fn assert_running(&mut self) {
        for c in &mut self.components {
            c.assert_running();
        }
    }

    /// The driver's log file.
    pub fn log_path(&self) -> &Path {
        self.components[0].log_path()
    }
}

impl Drop for CsiDriver {
    fn drop(&mut self) {
        while let Some(mut c) = self.components.pop() {
            c.stop();
        }
    }
}
