//! The `KubeBaoInstallation` custom resource: one object that installs KubeBao in a cluster.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The image every KubeBao binary ships in (see the Dockerfile).
pub const DEFAULT_IMAGE: &str = concat!("ghcr.io/kubebao/kubebao:", env!("CARGO_PKG_VERSION"));
/// Annotation that requests a Transit key rotation; any new value triggers one rotation.
pub const ROTATE_ANNOTATION: &str = "kubebao.io/rotate";
/// Finalizer that removes what the installation installed (never the Transit key).
pub const FINALIZER: &str = "kubebao.io/installation";

/// KubeBao installed in this cluster: the OpenBao connection, the KMS v2 plugin on every
/// control-plane node (static pod, written by a node-installer DaemonSet) and the Secrets Store
/// CSI provider on every node. Cluster-scoped; only one per cluster takes effect.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "kubebao.io",
    version = "v1alpha1",
    kind = "KubeBaoInstallation",
    shortname = "kbi",
    status = "KubeBaoInstallationStatus",
    doc = "KubeBao installed in this cluster: OpenBao preparation, the KMS v2 plugin on control-plane nodes and the CSI provider on every node.",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Key Version","type":"integer","jsonPath":".status.keyVersion"}"#,
    printcolumn = r#"{"name":"KMS Nodes","type":"string","jsonPath":".status.kms.summary"}"#,
    printcolumn = r#"{"name":"CSI Nodes","type":"string","jsonPath":".status.csi.summary"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct KubeBaoInstallationSpec {
    /// Namespace for the objects the operator creates (node installer, CSI provider, AppRole
    /// credentials). It must exist. Default `kube-system`, where control-plane add-ons live.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// How to reach OpenBao and how the operator logs in to it.
    pub openbao: OpenBaoSpec,
    /// Encryption at rest: the KMS v2 plugin, its Transit key and its rollout.
    #[serde(default)]
    pub kms: KmsSpec,
    /// The Secrets Store CSI provider DaemonSet.
    #[serde(default)]
    pub csi: CsiSpec,
}

/// The OpenBao server.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct OpenBaoSpec {
    /// OpenBao address as the agents and the operator reach it, e.g. `https://openbao.example.com:8200`.
    pub address: String,
    /// PEM CA bundle that signs OpenBao's certificate; when set, only it is trusted (not the
    /// system roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<String>,
    /// A Secret holding the PEM CA bundle instead of `caBundle`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
    /// OpenBao namespace (enterprise-style namespaces), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Allow a plain `http://` address, only to an OpenBao on a loopback address (tests, a local
    /// dev server); never for a remote address. Passed to the KMS plugin and the CSI provider
    /// as `--openbao-allow-plain-http`.
    #[serde(
        default,
        rename = "allowPlainHTTP",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub allow_plain_http: bool,
    /// How the operator logs in to OpenBao to prepare it; unset: the operator's own identity
    /// (its `--operator-role`, `--openbao-token-file` or `--openbao-token-secret`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<OperatorAuth>,
}

/// A key in a Secret.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Secret name.
    pub name: String,
    /// Secret namespace: only the operator's own namespace is allowed, and is the default
    /// (a reference to another namespace is refused with `Stalled/CrossNamespaceSecret`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Key in the Secret's data.
    pub key: String,
}

/// How the operator proves who it is to OpenBao for this installation.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OperatorAuth {
    /// Kubernetes auth with the operator's own ServiceAccount token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesAuth>,
    /// A token in a Secret (bootstrap or tests). Used when set, instead of `kubernetes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_ref: Option<SecretKeyRef>,
}

impl Default for OperatorAuth {
    fn default() -> Self {
        Self {
            kubernetes: Some(KubernetesAuth::default()),
            token_secret_ref: None,
        }
    }
}

/// OpenBao Kubernetes auth for the operator.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KubernetesAuth {
    /// Mount path of the Kubernetes auth method.
    #[serde(default = "default_kubernetes_mount")]
    pub mount: String,
    /// OpenBao role of the operator.
    #[serde(default = "default_operator_role")]
    pub role: String,
    /// File holding the operator's projected ServiceAccount token for OpenBao. Its only
    /// audience must be the operator's `--operator-jwt-audience`, else it is not sent.
    #[serde(default = "default_token_path")]
    pub token_path: String,
}

impl Default for KubernetesAuth {
    fn default() -> Self {
        Self {
            mount: default_kubernetes_mount(),
            role: default_operator_role(),
            token_path: default_token_path(),
        }
    }
}

/// The KMS v2 plugin.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KmsSpec {
    /// Install the KMS plugin and its Transit key.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Mount path of the Transit secrets engine (enabled if missing).
    #[serde(default = "default_transit_mount")]
    pub transit_mount: String,
    /// Transit key name (created if missing: not exportable, deletion not allowed).
    #[serde(default = "default_key_name")]
    pub key_name: String,
    /// Transit key type; must support encryption (`aes256-gcm96`, `chacha20-poly1305`, `aes128-gcm96`).
    #[serde(default = "default_key_type")]
    pub key_type: String,
    /// Automatic rotation period of the Transit key as an OpenBao duration (`720h`); `0` turns
    /// scheduled rotation off. OpenBao refuses periods under one hour.
    #[serde(default = "default_rotation_period")]
    pub rotation_period: String,
    /// The plugin's unix socket on the control-plane host; the EncryptionConfiguration endpoint.
    #[serde(default = "default_socket_path")]
    pub socket_path: String,
    /// Image holding `kubebao-kms` and `kubebao-installer`.
    #[serde(default = "default_image")]
    pub image: String,
    /// Image pull policy.
    #[serde(default = "default_pull_policy")]
    pub image_pull_policy: String,
    /// Resources of the KMS plugin container.
    #[serde(default = "default_kms_resources")]
    pub resources: ResourceRequirements,
    /// Nodes that run the plugin (control-plane nodes; kubeadm labels them like this).
    #[serde(default = "default_control_plane_selector")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the node installer (kubeadm taints control-plane nodes).
    #[serde(default = "default_control_plane_tolerations")]
    pub tolerations: Vec<Toleration>,
    /// Host directory the kubelet reads static-pod manifests from.
    #[serde(default = "default_manifest_dir")]
    pub manifest_dir: String,
    /// Host directory for the plugin's config, credentials and the EncryptionConfiguration.
    /// Point kube-apiserver's `--encryption-provider-config` at `<configDir>/encryption-config.yaml`.
    #[serde(default = "default_config_dir")]
    pub config_dir: String,
    /// Local port of the plugin's `/healthz`, `/readyz` and `/metrics` (host network, 127.0.0.1).
    #[serde(default = "default_kms_health_port")]
    pub health_port: u16,
    /// AppRole auth mount for the plugin's credentials (enabled if missing).
    #[serde(default = "default_approle_mount")]
    pub approle_mount: String,
    /// Lifetime of the plugin's AppRole secret_id, in seconds; the operator issues a new one
    /// when a third of it is left.
    #[serde(default = "default_secret_id_ttl")]
    pub secret_id_ttl_seconds: u64,
    /// After a key rotation, once the plugin reports the new key_id, rewrite every Secret so it
    /// is stored under the new key.
    #[serde(default)]
    pub rewrite_after_rotation: bool,
    /// Secrets rewritten per second during a rewrite.
    #[serde(default = "default_rewrite_rate")]
    pub rewrite_per_second: u32,
    /// After the Transit key rotates, how long to wait before rewriting Secrets, in seconds:
    /// the plugin sees a new key version within its probe interval (10 s) and kube-apiserver
    /// polls the plugin's Status every 60 s, so Secrets rewritten earlier could still be
    /// stored under the old key.
    #[serde(default = "default_rewrite_delay")]
    pub rewrite_delay_seconds: u64,
    /// How long deletion waits for the node installers to remove their files before the
    /// objects are deleted anyway, in seconds.
    #[serde(default = "default_uninstall_grace")]
    pub uninstall_grace_seconds: u64,
    /// Move every Secret off KMS encryption, the safe way to remove the plugin: the nodes get an
    /// EncryptionConfiguration with `identity` first (kube-apiserver writes plaintext and still
    /// reads KMS data), every Secret is rewritten, then the nodes get an `identity`-only one.
    /// `KMSMigratedOff=True` says it is done; only then does deletion or `enabled: false` remove
    /// the plugin. Setting it back to false encrypts again (new writes; rotate to rewrite all).
    #[serde(default)]
    pub migrate_off: bool,
    /// How long kube-apiserver takes to use a changed EncryptionConfiguration once every
    /// control-plane node has it, in seconds. With `--encryption-provider-config-automatic-reload=true`
    /// it re-reads the file every 60 s; without it, restart every API server within this time.
    /// A migration off KMS waits this long before rewriting Secrets and before it reports done.
    #[serde(default = "default_api_server_reload")]
    pub api_server_reload_seconds: u64,
}

impl Default for KmsSpec {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("every KMS field has a default")
    }
}

/// The Secrets Store CSI provider.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CsiSpec {
    /// Run the CSI provider DaemonSet.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Image holding `kubebao-csi`.
    #[serde(default = "default_image")]
    pub image: String,
    /// Image pull policy.
    #[serde(default = "default_pull_policy")]
    pub image_pull_policy: String,
    /// Host directory the Secrets Store CSI driver looks for provider sockets in.
    #[serde(default = "default_provider_dir")]
    pub provider_dir: String,
    /// Resources of the provider container.
    #[serde(default = "default_csi_resources")]
    pub resources: ResourceRequirements,
    /// Nodes that run the provider (default: every Linux node).
    #[serde(default = "default_linux_selector")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations (default: tolerate everything, so every node that runs pods gets it).
    #[serde(default = "default_tolerate_all")]
    pub tolerations: Vec<Toleration>,
    /// ServiceAccount token audience for OpenBao Kubernetes auth when a SecretProviderClass
    /// sets none.
    #[serde(default = "default_audience")]
    pub audience: String,
    /// Kubernetes auth mount when a SecretProviderClass sets none.
    #[serde(default = "default_kubernetes_mount")]
    pub auth_mount: String,
    /// Port of the provider's `/healthz` and `/metrics`.
    #[serde(default = "default_csi_health_port")]
    pub health_port: u16,
}

impl Default for CsiSpec {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("every CSI field has a default")
    }
}

/// What the operator observed and did.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct KubeBaoInstallationStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// OpenBaoReady, KMSReady, CSIReady, KMSMigratedOff (while `kms.migrateOff`), Ready,
    /// Reconciling, Stalled.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Latest version of the Transit key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_version: Option<u64>,
    /// The key_id the KMS plugin reports for that version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// When the key was last rotated (RFC 3339, as OpenBao reports the version's creation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotation: Option<String>,
    /// The last `kubebao.io/rotate` annotation value acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotate_request: Option<String>,
    /// The last rotation request attempted, written before the Transit rotate call: an operator
    /// that restarts (or a new leader) after the call but before the result was recorded sees
    /// the key past `fromVersion` and does not rotate a second time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotate_attempt: Option<RotateAttempt>,
    /// When the operator first saw the current key_id (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id_since: Option<String>,
    /// When deletion (or disabling the plugin) started asking the node installers to remove
    /// their files (RFC 3339).
    #[serde(default)]
    pub uninstall_started: Option<String>,
    /// True once a node installer confirmed installing an EncryptionConfiguration that reads
    /// Secrets through the plugin. From then on the plugin is removed only after a migration
    /// off KMS (`kms.migrateOff`): kube-apiserver may need it to read every Secret.
    #[serde(default)]
    pub kms_config_installed: bool,
    /// Progress of the migration off KMS (`kms.migrateOff`).
    #[serde(default)]
    pub migration: Option<MigrationStatus>,
    /// When the plugin's current AppRole secret_id expires (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_id_expires: Option<String>,
    /// The KMS node installer rollout (null once the plugin is removed).
    #[serde(default)]
    pub kms: Option<RolloutStatus>,
    /// The CSI provider rollout (null once the provider is removed).
    #[serde(default)]
    pub csi: Option<RolloutStatus>,
    /// Progress of rewriting Secrets under the new key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<RewriteStatus>,
}

/// A rotation request, recorded before the Transit key is rotated for it.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RotateAttempt {
    /// The `kubebao.io/rotate` annotation value.
    pub request: String,
    /// The key's latest version before the rotate call.
    pub from_version: u64,
}

/// A DaemonSet rollout.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// Hash of the rendered configuration (the pods' `kubebao.io/config-hash`).
    pub config_hash: String,
    /// Nodes that should run it.
    pub desired: i32,
    /// Nodes running the current configuration and ready (installed).
    pub ready: i32,
    /// `ready/desired`, for `kubectl get`.
    pub summary: String,
}

/// Rewriting every Secret (after a rotation, or off KMS), in Secret key order.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RewriteStatus {
    /// The key_id Secrets are being rewritten to (`identity` when migrating off KMS).
    pub key_id: String,
    /// Secrets in the cluster when the rewrite started.
    pub total: u64,
    /// Secrets rewritten (or found deleted) so far.
    pub done: u64,
    /// Secrets whose rewrite failed and is retried (deleted meanwhile are not failures).
    pub failed: u64,
    /// True once every Secret that existed at the start was rewritten or deleted.
    pub complete: bool,
    /// The last Secret done (`namespace/name`); the rewrite goes on with the Secrets after it
    /// in key order, so Secrets created or deleted meanwhile never make it skip one.
    #[serde(default)]
    pub after: Option<String>,
    /// Secrets (`namespace/name`) to retry, at most 100; more failures mean another pass.
    #[serde(default)]
    pub retry: Vec<String>,
    /// The Secret list's resourceVersion when the rewrite started: a Secret written since then
    /// (a newer resourceVersion) was written with the current configuration and is skipped.
    #[serde(default)]
    pub start_resource_version: Option<String>,
}

/// Migrating every Secret off KMS encryption (`kms.migrateOff`).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStatus {
    /// The EncryptionConfiguration the nodes get: `IdentityFirst` (plaintext writes, KMS still
    /// read) while Secrets are rewritten, then `IdentityOnly`.
    pub stage: MigrationStage,
    /// The installer bundle hash the nodes must confirm for this stage.
    pub config_hash: String,
    /// When every control-plane node confirmed that bundle (RFC 3339); kube-apiserver uses it
    /// `kms.apiServerReloadSeconds` later.
    #[serde(default)]
    pub confirmed_at: Option<String>,
    /// Rewriting every Secret as plaintext (stage `IdentityFirst`).
    #[serde(default)]
    pub rewrite: Option<RewriteStatus>,
    /// True once no Secret is stored KMS-encrypted and kube-apiserver no longer uses the plugin.
    pub complete: bool,
}

/// Which EncryptionConfiguration a migration off KMS has reached.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Default)]
pub enum MigrationStage {
    /// `identity` first, the KMS plugin second: plaintext writes, KMS data still readable.
    #[default]
    IdentityFirst,
    /// `identity` only: nothing reads through the plugin any more.
    IdentityOnly,
}

/// Compute resources of a container (the Kubernetes `resources` shape, quantities as strings).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ResourceRequirements {
    /// Minimum resources, e.g. `cpu: 20m`, `memory: 32Mi`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, String>,
    /// Maximum resources, e.g. `memory: 128Mi`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, String>,
}

/// A toleration (the Kubernetes pod `tolerations` shape).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Toleration {
    /// Taint key to tolerate; empty with operator `Exists` tolerates every taint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// `Exists` or `Equal` (default `Equal`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    /// Taint value for operator `Equal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`; empty matches every effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<String>,
    /// For `NoExecute`: how long the pod stays bound after the taint appears.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub toleration_seconds: Option<i64>,
}

pub use crate::api::Condition;

fn yes() -> bool {
    true
}
fn default_namespace() -> String {
    "kube-system".into()
}
fn default_kubernetes_mount() -> String {
    "kubernetes".into()
}
fn default_operator_role() -> String {
    "kubebao".into()
}
fn default_token_path() -> String {
    // The chart's projected token for OpenBao's audience, never the API server's token.
    "/var/run/secrets/openbao/token".into()
}
fn default_transit_mount() -> String {
    "transit".into()
}
fn default_key_name() -> String {
    "kubebao-kms".into()
}
fn default_key_type() -> String {
    "aes256-gcm96".into()
}
fn default_rotation_period() -> String {
    "720h".into()
}
fn default_socket_path() -> String {
    "/var/run/kubebao/kms.sock".into()
}
fn default_image() -> String {
    DEFAULT_IMAGE.into()
}
fn default_pull_policy() -> String {
    "IfNotPresent".into()
}
fn resources(cpu: &str, memory: &str, limit: &str) -> ResourceRequirements {
    ResourceRequirements {
        requests: [
            ("cpu".to_string(), cpu.to_string()),
            ("memory".to_string(), memory.to_string()),
        ]
        .into(),
        limits: [("memory".to_string(), limit.to_string())].into(),
    }
}
fn default_kms_resources() -> ResourceRequirements {
    resources("20m", "32Mi", "128Mi")
}
fn default_csi_resources() -> ResourceRequirements {
    resources("20m", "32Mi", "128Mi")
}
fn default_control_plane_selector() -> BTreeMap<String, String> {
    [(
        "node-role.kubernetes.io/control-plane".to_string(),
        String::new(),
    )]
    .into()
}
fn default_linux_selector() -> BTreeMap<String, String> {
    [("kubernetes.io/os".to_string(), "linux".to_string())].into()
}
fn default_control_plane_tolerations() -> Vec<Toleration> {
    [
        "node-role.kubernetes.io/control-plane",
        "node-role.kubernetes.io/master",
    ]
    .into_iter()
    .map(|key| Toleration {
        key: Some(key.into()),
        operator: Some("Exists".into()),
        effect: Some("NoSchedule".into()),
        ..Default::default()
    })
    .collect()
}
fn default_tolerate_all() -> Vec<Toleration> {
    vec![Toleration {
        operator: Some("Exists".into()),
        ..Default::default()
    }]
}
fn default_manifest_dir() -> String {
    "/etc/kubernetes/manifests".into()
}
fn default_config_dir() -> String {
    "/etc/kubebao".into()
}
fn default_kms_health_port() -> u16 {
    8787
}
fn default_csi_health_port() -> u16 {
    8788
}
fn default_approle_mount() -> String {
    "approle".into()
}
fn default_secret_id_ttl() -> u64 {
    30 * 24 * 3600
}
fn default_rewrite_rate() -> u32 {
    20
}
fn default_rewrite_delay() -> u64 {
    120
}
fn default_uninstall_grace() -> u64 {
    300
}
fn default_api_server_reload() -> u64 {
    120
}
fn default_provider_dir() -> String {
    "/var/run/secrets-store-csi-providers".into()
}
fn default_audience() -> String {
    "openbao".into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt as _;

    #[test]
    fn the_readme_example_parses_with_kubeadm_defaults() {
        let spec: KubeBaoInstallationSpec = serde_json::from_value(serde_json::json!({
            "openbao": {"address": "https://openbao.example.com:8200"}
        }))
        .unwrap();
        assert_eq!(spec.namespace, "kube-system");
        assert!(spec.kms.enabled && spec.csi.enabled);
        assert_eq!(spec.kms.manifest_dir, "/etc/kubernetes/manifests");
        assert_eq!(spec.kms.socket_path, "/var/run/kubebao/kms.sock");
        assert_eq!(spec.kms.key_name, "kubebao-kms");
        assert_eq!(
            spec.kms.node_selector["node-role.kubernetes.io/control-plane"],
            ""
        );
        assert!(
            spec.openbao.auth.is_none(),
            "the operator's own identity by default"
        );
    }

    #[test]
    fn the_crd_is_cluster_scoped_and_every_field_has_a_description() {
        let crd = KubeBaoInstallation::crd();
        assert_eq!(crd.spec.scope, "Cluster");
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
        let mut missing = Vec::new();
        fn walk(path: &str, v: &serde_json::Value, missing: &mut Vec<String>) {
            if let Some(props) = v.get("properties").and_then(|p| p.as_object()) {
                for (k, p) in props {
                    let here = format!("{path}.{k}");
                    if p.get("description").is_none() {
                        missing.push(here.clone());
                    }
                    walk(&here, p, missing);
                }
            }
            if let Some(items) = v.get("items") {
                walk(path, items, missing);
            }
        }
        let spec = &schema["openAPIV3Schema"]["properties"]["spec"];
        let status = &schema["openAPIV3Schema"]["properties"]["status"];
        walk("spec", spec, &mut missing);
        walk("status", status, &mut missing);
        assert!(
            missing.is_empty(),
            "fields without a description: {missing:?}"
        );
    }
}
