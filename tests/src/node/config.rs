//! The node's configuration files: containerd's, the kubelet's and the CNI network's.

use std::path::Path;

/// The pod network: a bridge the harness creates with the host's address on it, so the host
/// reaches pods directly and nothing is routed (IP forwarding stays off).
pub(crate) const BRIDGE: &str = "kubebao0";
/// The bridge's (host's) address and the pods' subnet.
pub(crate) const BRIDGE_ADDRESS: &str = "10.244.0.1/24";
/// Pod IPs come from here.
pub(crate) const POD_SUBNET: &str = "10.244.0.0/24";

/// containerd with everything private: root, state, socket, runc root, `opt`, netns mounts.
/// `restrict_oom_score_adj`: the machine may drop CAP_SYS_RESOURCE, and runc then fails every
/// sandbox ("failed to update /proc/self/oom_score_adj: Permission denied").
pub(crate) fn containerd(dir: &Path, socket: &Path, cni_conf: &Path, pause_ref: &str) -> String {
    let d = dir.display();
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{socket}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause_ref}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{d}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
    max_conf_num = 1
"#,
        socket = socket.display(),
        cni = cni_conf.display(),
    )
}

/// The pod network: Debian's `bridge` + `host-local` plugins on [`BRIDGE`], with no gateway
/// (`isGateway` would turn IP forwarding on) and no masquerading (no iptables rules). One route:
/// the service address via the host's bridge address, which the host delivers to itself
/// (node/services.rs).
pub(crate) fn cni_conflist(ipam_dir: &Path) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "kubebao-testbed",
        "plugins": [{
            "type": "bridge",
            "bridge": BRIDGE,
            "isGateway": false,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "dataDir": ipam_dir,
                "ranges": [[{"subnet": POD_SUBNET, "rangeStart": "10.244.0.10"}]],
                "routes": [{
                    "dst": format!("{}/32", super::services::SERVICE_IP),
                    "gw": BRIDGE_ADDRESS.split('/').next(),
                }],
            },
        }],
    })
    .to_string()
}

/// Where the kubelet listens and what it talks to.
pub(crate) struct KubeletSpec<'a> {
    pub containerd_socket: &'a Path,
    pub static_pod_dir: &'a Path,
    pub pod_logs_dir: &'a Path,
    pub client_ca: &'a Path,
    pub port: u16,
    pub healthz_port: u16,
}

/// The kubelet: cgroup v1 allowed (`failCgroupV1: false`), cgroupfs (no systemd), no swap
/// check, serving on loopback only, static pods re-read every second, and eviction and image
/// GC thresholds low enough that a busy disk never evicts the test's pods or images.
pub(crate) fn kubelet(spec: &KubeletSpec) -> String {
    serde_json::json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": "127.0.0.1",
        "port": spec.port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": spec.healthz_port,
        "containerRuntimeEndpoint": format!("unix://{}", spec.containerd_socket.display()),
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": false,
        "failSwapOn": false,
        "staticPodPath": spec.static_pod_dir,
        "fileCheckFrequency": "1s",
        "podLogsDir": spec.pod_logs_dir,
        "authentication": {
            "anonymous": {"enabled": false},
            "webhook": {"enabled": true},
            "x509": {"clientCAFile": spec.client_ca},
        },
        "authorization": {"mode": "Webhook"},
        "evictionHard": {
            "memory.available": "1Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "rotateCertificates": false,
        "serverTLSBootstrap": false,
    })
    .to_string()
}
