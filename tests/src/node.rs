//! A real node on this machine: containerd, the kubelet and kube-scheduler against a test
//! bed's API server, and on request the real Secrets Store CSI driver registered with the
//! kubelet. Started by the tests that need one; stopping it (or dropping it) puts the host
//! back as it was (see `host.rs`).
//!
//! ```no_run
//! # async fn demo() {
//! let bed = kubebao_testbed::Testbed::shared().await;
//! let node = kubebao_testbed::Node::start(bed).await; // Ready
//! // pods with `image: node.pause_image()` and `imagePullPolicy: Never` run on it
//! # }
//! ```
//!
//! One node per machine at a time: the kubelet's host changes (sysctls, `/kubepods`) are
//! machine-wide, so `start` waits for a lock that any other node holds. Needs root.
//! All traffic stays on loopback: the node is named `localhost`, the kubelet serves on
//! 127.0.0.1 and the API server reaches it by its Hostname address.

mod config;
mod csi;
mod host;
mod services;

pub use csi::{CsiDriver, CsiDriverOptions, install_secrets_store_crds};
use services::Forwarder;
pub use services::SERVICE_IP;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node as NodeObject;
use kube::api::{Api, DeleteParams};

pub use host::HostState;

use crate::paths::{installed, setting};
use crate::{Component, Testbed, free_port, wait_for};

/// The node's name; it resolves to 127.0.0.1, so the API server reaches the kubelet on loopback.
pub const NODE_NAME: &str = "localhost";
/// The Secrets Store CSI driver's name, as its CSIDriver object and the kubelet know it.
pub const CSI_DRIVER_NAME: &str = "secrets-store.csi.k8s.io";
/// What the host looked like before the running node started; a node that was killed before
/// it could restore the host leaves it, and the next node restores from it first.
const STATE_FILE: &str = "/run/kubebao-node.json";
/// Locked (flock) by the running node: a directory every Linux host has, so the lock leaves
/// no file behind.
const LOCK_PATH: &str = "/run";

/// What to start besides containerd, the kubelet and kube-scheduler.
#[derive(Clone, Debug, Default)]
pub struct NodeOptions {
    /// Run the Secrets Store CSI driver as a host process, registered with the kubelet.
    pub csi_driver: bool,
    /// Where the driver looks for providers' sockets (such as KubeBao's `kubebao.sock`);
    /// default: `providers/` in the node's directory.
    pub csi_provider_dir: Option<PathBuf>,
}

/// A running node. Dropping it stops everything and restores the host.
pub struct Node {
    saved: host::Saved,
    /// Started in order, stopped in reverse.
    components: Vec<Component>,
    /// The components' logs: in the test bed's directory, so they outlive the node (and
    /// `KUBEBAO_KEEP_TESTBED=1` keeps them).
    logs: PathBuf,
    root_dir: PathBuf,
    static_pod_dir: PathBuf,
    provider_dir: Option<PathBuf>,
    /// The CSI driver when `NodeOptions::csi_driver` asked for it; stopped first.
    csi_driver: Option<CsiDriver>,
    /// Host services pods reach on [`SERVICE_IP`] (the API server first).
    forwarders: Vec<Forwarder>,
    pause_image: String,
    /// `flock` holding [`LOCK_PATH`] until its stdin closes.
    lock: Option<std::process::Child>,
}

impl Node {
    /// Starts containerd, kube-scheduler and the kubelet and waits until the node is Ready.
    pub async fn start(bed: &Testbed) -> Node {
        Self::start_with(bed, NodeOptions::default()).await
    }

    /// Like `start`, with the CSI driver if `options` ask for it.
    pub async fn start_with(bed: &Testbed, options: NodeOptions) -> Node {
        assert_root();
        let bins = NodeBinaries::locate();
        let lock = tokio::task::spawn_blocking(take_lock)
            .await
            .expect("node lock");
        let started = Instant::now();
        restore_after_crash();
        let dir = tempfile::Builder::new()
            .prefix("kubebao-node-")
            .tempdir()
            .expect("node dir")
            .keep();
        let saved = host::Saved {
            before: HostState::capture(),
            dir: dir.clone(),
        };
        std::fs::write(
            STATE_FILE,
            serde_json::to_vec(&saved).expect("serialize host state"),
        )
        .expect("write the node's host state file");
        let mut node = Node {
            saved,
            components: Vec::new(),
            logs: bed.dir().join(dir.file_name().expect("node dir name")),
            root_dir: dir.join("kubelet"),
            static_pod_dir: dir.join("manifests"),
            provider_dir: None,
            csi_driver: None,
            forwarders: Vec::new(),
            pause_image: bins.pause_image_ref.clone(),
            lock: Some(lock),
        };
        node.start_node(bed, &bins).await;
        services::add_service_ip();
        let apiserver: SocketAddr = bed
            .apiserver_url()
            .trim_start_matches("https://")
            .parse()
            .expect("the API server's address");
        node.expose_to_pods(443, apiserver);
        eprintln!("node: Ready in {:.1?}", started.elapsed());
        if options.csi_driver {
            let provider_dir = options
                .csi_provider_dir
                .unwrap_or_else(|| dir.join("providers"));
            let driver = CsiDriver::start(
                bed,
                &node,
                CsiDriverOptions {
                    provider_dir: provider_dir.clone(),
                    rotation_poll_interval: None,
                    csi_driver_object: None,
                },
            )
            .await;
            node.csi_driver = Some(driver);
            node.provider_dir = Some(provider_dir);
        }
        node
    }

    /// The node's name (as in `spec.nodeName`).
    pub fn name(&self) -> &str {
        NODE_NAME
    }

    /// The image every pod sandbox runs; pods may run it too (`imagePullPolicy: Never`).
    pub fn pause_image(&self) -> &str {
        &self.pause_image
    }

    /// The kubelet's static pod directory: manifests put here run as static pods.
    pub fn static_pod_dir(&self) -> &Path {
        &self.static_pod_dir
    }

    /// The kubelet's root directory (`--root-dir`).
    pub fn root_dir(&self) -> &Path {
        &self.root_dir
    }

    /// The subnet pods without `hostNetwork` get their IP from; the host reaches it directly.
    pub fn pod_subnet(&self) -> &str {
        config::POD_SUBNET
    }

    /// Where the CSI driver looks for providers' sockets (None without the driver).
    pub fn csi_provider_dir(&self) -> Option<&Path> {
        self.provider_dir.as_deref()
    }

    /// The node's private directory (containerd, the kubelet's root, pod logs).
    pub fn dir(&self) -> &Path {
        &self.saved.dir
    }

    /// The components' logs (`kubelet.log`, `containerd.log`, …), in the test bed's directory.
    pub fn log_dir(&self) -> &Path {
        &self.logs
    }

    async fn start_node(&mut self, bed: &Testbed, bins: &NodeBinaries) {
        let dir = self.saved.dir.clone();
        let socket = dir.join("containerd/containerd.sock");
        for d in [
            &self.static_pod_dir,
            &self.root_dir,
            &dir.join("containerd"),
            &dir.join("cni/net.d"),
            &dir.join("pod-logs"),
            &self.logs,
        ] {
            std::fs::create_dir_all(d).expect("create node dir");
        }
        self.create_bridge();
        self.start_containerd(bins, &socket).await;
        delete_stale_node_object(bed).await;
        let scheduler = Component::start(
            "kube-scheduler",
            &self.logs,
            &bins.kube_scheduler,
            &[
                format!("--kubeconfig={}", bed.kubeconfig().display()),
                "--leader-elect=false".into(),
                "--secure-port=0".into(),
                "--v=1".into(),
            ],
        );
        self.components.push(scheduler);
        self.start_kubelet(bed, bins, &socket);
        self.wait_ready(bed).await;
    }

    /// The pod network's bridge, with the host's address on it: pods and host talk directly,
    /// nothing is routed, so the bridge plugin needs no `isGateway` (which turns forwarding on).
    fn create_bridge(&self) {
        let b = config::BRIDGE;
        for args in [
            &["link", "add", b, "type", "bridge"][..],
            &["addr", "add", config::BRIDGE_ADDRESS, "dev", b],
            &["link", "set", b, "up"],
        ] {
            assert!(
                host::run("ip", args),
                "could not set up the pod network bridge {b} (ip {args:?})"
            );
        }
    }

    /// containerd with a private config, root, state and socket; the pause image imported.
    async fn start_containerd(&mut self, bins: &NodeBinaries, socket: &Path) {
        let dir = self.saved.dir.join("containerd");
        let cni_conf = self.saved.dir.join("cni/net.d");
        let containerd_config = dir.join("config.toml");
        let toml = config::containerd(&dir, socket, &cni_conf, &bins.pause_image_ref);
        std::fs::write(&containerd_config, toml).expect("write containerd config");
        let conflist = config::cni_conflist(&self.saved.dir.join("cni/ipam"));
        std::fs::write(cni_conf.join("10-kubebao.conflist"), conflist).expect("write CNI config");
        let containerd = Component::start(
            "containerd",
            &self.logs,
            &on_path("containerd"),
            &[format!("--config={}", containerd_config.display())],
        );
        self.components.push(containerd);
        self.wait_for_containerd(socket, &bins.pause_image).await;
    }

    async fn wait_for_containerd(&mut self, socket: &Path, pause_tar: &Path) {
        let ctr = |args: &[&str]| {
            Command::new(on_path("ctr"))
                .arg(format!("--address={}", socket.display()))
                .args(["--namespace=k8s.io"])
                .args(args)
                .output()
        };
        let containerd = self.components.last_mut().expect("containerd");
        wait_for("containerd to serve", Duration::from_secs(30), || {
            containerd.assert_running();
            let out = ctr(&["version"]);
            async move {
                match out {
                    Ok(o) if o.status.success() => Ok(()),
                    Ok(o) => Err(String::from_utf8_lossy(&o.stderr).into_owned()),
                    Err(e) => Err(e.to_string()),
                }
            }
        })
        .await;
        let out = ctr(&["images", "import", &pause_tar.display().to_string()])
            .expect("run ctr images import");
        assert!(
            out.status.success(),
            "ctr images import {} failed: {}",
            pause_tar.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start_kubelet(&mut self, bed: &Testbed, bins: &NodeBinaries, socket: &Path) {
        let dir = &self.saved.dir;
        let kubelet_config = dir.join("kubelet.json");
        let spec = config::KubeletSpec {
            containerd_socket: socket,
            static_pod_dir: &self.static_pod_dir,
            pod_logs_dir: &dir.join("pod-logs"),
            client_ca: &bed.pki().ca_cert,
            port: free_port(),
            healthz_port: free_port(),
        };
        std::fs::write(&kubelet_config, config::kubelet(&spec)).expect("write kubelet config");
        let kubelet = Component::start(
            "kubelet",
            &self.logs,
            &bins.kubelet,
            &[
                format!("--config={}", kubelet_config.display()),
                format!("--kubeconfig={}", bed.kubeconfig().display()),
                format!("--root-dir={}", self.root_dir.display()),
                // Its default is /var/lib/kubelet/pki whatever the root directory is.
                format!("--cert-dir={}", self.root_dir.join("pki").display()),
                format!("--hostname-override={NODE_NAME}"),
                "--v=2".into(),
            ],
        );
        self.components.push(kubelet);
    }

    async fn wait_ready(&mut self, bed: &Testbed) {
        let nodes: Api<NodeObject> = Api::all(bed.client().await);
        let kubelet = self.components.last_mut().expect("kubelet");
        wait_for("the node to be Ready", Duration::from_secs(180), || {
            kubelet.assert_running();
            let nodes = nodes.clone();
            async move {
                let node = nodes.get(NODE_NAME).await.map_err(|e| e.to_string())?;
                let conditions = node.status.and_then(|s| s.conditions).unwrap_or_default();
                match conditions.iter().find(|c| c.type_ == "Ready") {
                    Some(c) if c.status == "True" => Ok(()),
                    Some(c) => Err(format!(
                        "Ready={}: {}",
                        c.status,
                        c.message.clone().unwrap_or_default()
                    )),
                    None => Err("no Ready condition yet".into()),
                }
            }
        })
        .await;
    }

    /// Lets pods reach `target` (on the host's loopback) at `SERVICE_IP:port`, as long as the
    /// node runs; returns that address. The API server is on port 443 from the start, where
    /// pods' in-cluster configuration (`KUBERNETES_SERVICE_HOST`) looks for it.
    pub fn expose_to_pods(&mut self, port: u16, target: SocketAddr) -> SocketAddr {
        let forwarder = Forwarder::start(port, target);
        let address = forwarder.address();
        self.forwarders.push(forwarder);
        address
    }

    /// The host as it was before this node started (captured under the node lock).
    pub fn host_before(&self) -> &HostState {
        &self.saved.before
    }

    /// Stops everything, restores the host and returns its state afterwards (captured before
    /// the next node may start): compare it with [`Node::host_before`].
    pub fn stop(mut self) -> HostState {
        self.stop_and_restore().unwrap_or_else(HostState::capture)
    }

    /// None when already stopped.
    fn stop_and_restore(&mut self) -> Option<HostState> {
        let mut lock = self.lock.take()?;
        let started = Instant::now();
        drop(self.csi_driver.take());
        self.forwarders.clear();
        while let Some(mut component) = self.components.pop() {
            component.stop();
        }
        let after = host::restore(&self.saved);
        let differences = after.differences(&self.saved.before);
        if differences.is_empty() {
            let _ = std::fs::remove_file(STATE_FILE);
        } else {
            eprintln!(
                "node: the host is still changed after restoring (kept {STATE_FILE}):\n{}",
                differences.join("\n")
            );
        }
        eprintln!(
            "node: stopped and host restored in {:.1?}",
            started.elapsed()
        );
        drop(lock.stdin.take());
        let _ = lock.wait();
        Some(after)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop_and_restore();
    }
}

/// The node's binaries and images, from `make testbed`.
struct NodeBinaries {
    kubelet: PathBuf,
    kube_scheduler: PathBuf,
    pause_image: PathBuf,
    pause_image_ref: String,
}

impl NodeBinaries {
    fn locate() -> Self {
        Self {
            kubelet: installed("KUBEBAO_KUBELET", "the kubelet"),
            kube_scheduler: installed("KUBEBAO_KUBE_SCHEDULER", "kube-scheduler"),
            pause_image: installed("KUBEBAO_PAUSE_IMAGE", "the pause image"),
            pause_image_ref: setting("KUBEBAO_PAUSE_IMAGE_REF")
                .expect("KUBEBAO_PAUSE_IMAGE_REF is not set: run `make testbed`"),
        }
    }
}

/// The Secrets Store CSI driver, its registrar and its manifests (CRDs, CSIDriver).
fn assert_root() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next().map(str::to_string));
    assert_eq!(
        uid.as_deref(),
        Some("0"),
        "a node (kubelet, containerd) needs root: run the node tests as root"
    );
}

/// A program from PATH (Debian's containerd and ctr), or a panic saying how to install it.
fn on_path(program: &str) -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{program} is not installed: run `make testbed` (it installs Debian's containerd, runc and CNI plugins)")
        })
}

/// Takes the machine-wide node lock: `flock` holds it while its stdin is open, so it is
/// released when the node stops or the test process dies in any way.
fn take_lock() -> std::process::Child {
    use std::io::Read as _;
    let mut child = Command::new("flock")
        .args([LOCK_PATH, "sh", "-c", "echo locked; exec cat >/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run flock (util-linux)");
    let mut line = [0u8; 7];
    child
        .stdout
        .take()
        .expect("flock stdout")
        .read_exact(&mut line)
        .expect("wait for the node lock");
    child
}

/// A node whose test process was killed leaves the host changed and its state file behind.
fn restore_after_crash() {
    let Ok(bytes) = std::fs::read(STATE_FILE) else {
        return;
    };
    let saved: host::Saved = match serde_json::from_slice(&bytes) {
        Ok(saved) => saved,
        Err(e) => panic!("{STATE_FILE} is not a node's saved host state ({e}): remove it"),
    };
    eprintln!(
        "node: the node in {} did not restore the host (its test was killed?): restoring it first",
        saved.dir.display()
    );
    let differences = host::restore(&saved).differences(&saved.before);
    assert!(
        differences.is_empty(),
        "could not restore the host as {STATE_FILE} says it was:\n{}\n\
         Undo these by hand, then remove {STATE_FILE}.",
        differences.join("\n")
    );
    let _ = std::fs::remove_file(STATE_FILE);
}

/// A Node object left by an earlier node of this test bed would look Ready at once.
async fn delete_stale_node_object(bed: &Testbed) {
    let nodes: Api<NodeObject> = Api::all(bed.client().await);
    match nodes.delete(NODE_NAME, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => panic!("delete the stale Node {NODE_NAME}: {e}"),
    }
}
