//! The KMS plugin's static-pod manifest (`<manifestDir>/kubebao-kms.yaml`): the kubelet on each
//! control-plane node runs it next to kube-apiserver, without the API server's help.

use k8s_openapi::api::core::v1::Pod;
use serde_json::json;

use crate::installation::render::{
    CONFIG_HASH_ANNOTATION, Context, hash_of, join, kms_config, labels, to_yaml,
};
use crate::installation::types::KubeBaoInstallationSpec;

/// File name of the manifest in the manifest dir.
pub const FILE_NAME: &str = "kubebao-kms.yaml";
/// Name of the static pod (the kubelet appends the node name).
pub const POD_NAME: &str = "kubebao-kms";

/// The command line the plugin runs with (also used by tests to start it locally).
pub fn command(spec: &KubeBaoInstallationSpec) -> Vec<String> {
    let mut cmd = vec![
        "/usr/local/bin/kubebao-kms".into(),
        format!("--config={}", kms_config::config_path(spec)),
    ];
    if spec.openbao.allow_plain_http {
        cmd.push("--openbao-allow-plain-http".into());
    }
    cmd
}

/// The directory holding the socket.
pub fn socket_dir(spec: &KubeBaoInstallationSpec) -> String {
    let socket = &spec.kms.socket_path;
    match socket.rfind('/') {
        Some(0) | None => "/".into(),
        Some(i) => socket[..i].to_string(),
    }
}

/// Renders the static pod. `config_hash` covers the plugin config and CA, so the kubelet
/// restarts the plugin when they change (credentials are re-read by the plugin at login).
pub fn pod(spec: &KubeBaoInstallationSpec, ctx: &Context, config_hash: &str) -> Pod {
    let kms = &spec.kms;
    let port = kms.health_port;
    let probe = |path: &str, period: u32, failures: u32| {
        json!({
            "httpGet": {"host": "127.0.0.1", "path": path, "port": port, "scheme": "HTTP"},
            "initialDelaySeconds": 5, "periodSeconds": period, "timeoutSeconds": 3,
            "failureThreshold": failures
        })
    };
    let mut labels = labels(&ctx.instance, "kms");
    labels.insert("tier".into(), "control-plane".into());
    let cmd = command(spec);
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": POD_NAME,
            "namespace": spec.namespace,
            "labels": labels,
            "annotations": {CONFIG_HASH_ANNOTATION: config_hash},
        },
        "spec": {
            "hostNetwork": true,
            "priorityClassName": "system-node-critical",
            "dnsPolicy": "ClusterFirstWithHostNet",
            "automountServiceAccountToken": false,
            "enableServiceLinks": false,
            "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "kms",
                "image": kms.image,
                "imagePullPolicy": kms.image_pull_policy,
                "command": [cmd[0]],
                "args": cmd[1..],
                "resources": kms.resources,
                "livenessProbe": probe("/healthz", 10, 6),
                "readinessProbe": probe("/readyz", 5, 3),
                "startupProbe": probe("/healthz", 2, 30),
                // Root (the files are root-owned 0600 and the API server connects as root), but
                // with no capabilities, no escalation and a read-only root file system.
                "securityContext": {
                    "runAsUser": 0,
                    "runAsGroup": 0,
                    "runAsNonRoot": false,
                    "allowPrivilegeEscalation": false,
                    "privileged": false,
                    "readOnlyRootFilesystem": true,
                    "capabilities": {"drop": ["ALL"]},
                },
                "volumeMounts": [
                    {"name": "socket", "mountPath": socket_dir(spec)},
                    {"name": "config", "mountPath": kms.config_dir, "readOnly": true},
                ],
            }],
            "volumes": [
                {"name": "socket", "hostPath": {"path": socket_dir(spec), "type": "DirectoryOrCreate"}},
                {"name": "config", "hostPath": {"path": kms.config_dir, "type": "Directory"}},
            ],
        }
    }))
    .expect("the static pod is a valid Pod")
}

/// Renders the manifest file.
pub fn render(spec: &KubeBaoInstallationSpec, ctx: &Context, config_hash: &str) -> String {
    format!(
        "# Rendered by kubebao-operator from KubeBaoInstallation {}; written by kubebao-installer.\n{}",
        ctx.instance,
        to_yaml(&pod(spec, ctx, config_hash))
    )
}

/// The hash the static pod carries: the plugin config and the CA bundle.
pub fn config_hash(spec: &KubeBaoInstallationSpec, ctx: &Context) -> String {
    let mut parts = std::collections::BTreeMap::new();
    parts.insert("kms.yaml".to_string(), kms_config::render(spec, ctx));
    parts.insert("ca".to_string(), ctx.ca_pem.clone().unwrap_or_default());
    parts.insert(
        "config-path".to_string(),
        join(&spec.kms.config_dir, kms_config::FILE_NAME),
    );
    hash_of(&parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::installation::render::snapshot::{assert_snapshot, example};

    #[test]
    fn static_pod_matches_the_snapshot() {
        let (spec, ctx) = example();
        let hash = config_hash(&spec, &ctx);
        assert_snapshot("kubebao-kms.yaml", &render(&spec, &ctx, &hash));
    }

    #[test]
    fn plain_http_reaches_the_plugin_only_when_the_installation_allows_it() {
        let (mut spec, ctx) = example();
        let args = |spec: &KubeBaoInstallationSpec| {
            pod(spec, &ctx, "h").spec.unwrap().containers[0]
                .args
                .clone()
                .unwrap()
        };
        assert!(!args(&spec).contains(&"--openbao-allow-plain-http".to_string()));
        spec.openbao.allow_plain_http = true;
        assert_eq!(
            args(&spec),
            [
                "--config=/etc/kubebao/kms.yaml",
                "--openbao-allow-plain-http"
            ]
        );
    }

    #[test]
    fn static_pod_is_critical_on_the_host_network_with_local_probes() {
        let (spec, ctx) = example();
        let pod = pod(&spec, &ctx, "h");
        let ps = pod.spec.unwrap();
        assert_eq!(
            ps.priority_class_name.as_deref(),
            Some("system-node-critical")
        );
        assert_eq!(ps.host_network, Some(true));
        let c = &ps.containers[0];
        let probe = c
            .liveness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(probe.host.as_deref(), Some("127.0.0.1"));
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_ref().unwrap(),
            &["ALL"]
        );
        assert_eq!(
            c.args.as_ref().unwrap(),
            &["--config=/etc/kubebao/kms.yaml"]
        );
    }

    #[test]
    fn the_socket_directory_is_mounted_from_the_host() {
        let (mut spec, ctx) = example();
        spec.kms.socket_path = "/run/kb/plugin.sock".into();
        let pod = pod(&spec, &ctx, "h");
        let vols = pod.spec.unwrap().volumes.unwrap();
        assert_eq!(vols[0].host_path.as_ref().unwrap().path, "/run/kb");
    }

    #[test]
    fn a_config_change_changes_the_hash() {
        let (mut spec, ctx) = example();
        let before = config_hash(&spec, &ctx);
        spec.kms.key_name = "other".into();
        assert_ne!(before, config_hash(&spec, &ctx));
    }
}
