//! `BaoSecret`: one OpenBao KV secret kept as one Kubernetes Secret.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::Condition;
use super::checks::{
    INTERVAL_PATTERN, KUBE_NAME_PATTERN, MAX_DURATION_TEXT, MAX_KUBE_NAME, NAMESPACE_PATTERN,
    SECRET_KEY_PATTERN, SECRET_TYPE_PATTERN,
};
use crate::openbao_path::{MAX_NAME, MAX_PATH, NAME_PATTERN, PATH_PATTERN, SECRET_PATH_PATTERN};

/// Copies one OpenBao KV secret into a Kubernetes Secret in the same namespace and keeps it fresh.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kubebao.io",
    version = "v1alpha1",
    kind = "BaoSecret",
    doc = "A Kubernetes Secret kept in sync with one OpenBao KV secret, read as a ServiceAccount of the same namespace.",
    namespaced,
    status = "BaoSecretStatus",
    shortname = "bs",
    category = "kubebao",
    printcolumn = r#"{"name":"Path","type":"string","jsonPath":".spec.secretPath"}"#,
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.target.name"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Version","type":"integer","jsonPath":".status.kvVersion"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BaoSecretSpec {
    /// OpenBao API path of the KV secret: `<mount>/data/<path>` for KV v2 (e.g.
    /// `secret/data/myapp`), `<mount>/<path>` for KV v1. Letters, digits and `_ . + @ = -`
    /// between single slashes; no `.` or `..` segment.
    #[schemars(regex(pattern = SECRET_PATH_PATTERN), length(max = MAX_PATH))]
    pub secret_path: String,
    /// KV engine version (1 or 2). Default: 2 when the path has a `/data/` segment, else 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 2))]
    pub kv_version: Option<u8>,
    /// The Kubernetes Secret to write, always in the BaoSecret's own namespace.
    pub target: SecretTarget,
    /// Which KV keys to copy and under which Secret keys. Default: every key, same name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(validation = kube::core::Rule::new("self.all(k, self.exists_one(j, (has(j.to) ? j.to : j.from) == (has(k.to) ? k.to : k.from)))").message("two keys map to the same Secret key"))]
    pub keys: Option<Vec<KeyMapping>>,
    /// How often to check OpenBao for a new version (Go duration such as `30s`, `5m`, `1h`).
    /// Default `1h`; at least `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = INTERVAL_PATTERN), length(max = MAX_DURATION_TEXT))]
    pub refresh_interval: Option<String>,
    /// OpenBao Kubernetes-auth role to log in as. Default: the BaoSecret's namespace name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = NAME_PATTERN), length(max = MAX_NAME))]
    pub role: Option<String>,
    /// ServiceAccount in the BaoSecret's namespace whose token is used for the login.
    /// Default `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = KUBE_NAME_PATTERN), length(max = MAX_KUBE_NAME))]
    pub service_account_name: Option<String>,
    /// Mount of OpenBao's Kubernetes auth method. Default: the operator's `--auth-mount`
    /// (`kubernetes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = PATH_PATTERN), length(max = MAX_NAME))]
    pub auth_mount: Option<String>,
    /// Audience of the ServiceAccount token requested for the login. Default: the operator's
    /// `--token-audience` (`openbao`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub audience: Option<String>,
    /// Workloads in the same namespace restarted (pod template annotation) when the data changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub rollout_restart_targets: Option<Vec<RolloutTarget>>,
}

/// The Kubernetes Secret a BaoSecret writes.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretTarget {
    /// Name of the Secret.
    #[schemars(regex(pattern = KUBE_NAME_PATTERN), length(max = MAX_KUBE_NAME))]
    pub name: String,
    /// Namespace of the Secret. Optional; when set it must be the BaoSecret's own namespace
    /// (anything else is refused: the object goes Stalled with reason CrossNamespaceTarget and
    /// nothing is written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = NAMESPACE_PATTERN), length(max = 63))]
    pub namespace: Option<String>,
    /// Secret type (e.g. `Opaque`, `kubernetes.io/tls`). Default `Opaque`. Types Kubernetes
    /// itself acts on (`kubernetes.io/service-account-token`, `bootstrap.kubernetes.io/token`)
    /// are refused: a BaoSecret may not make Kubernetes mint credentials.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = SECRET_TYPE_PATTERN), length(max = MAX_KUBE_NAME))]
    #[x_kube(validation = kube::core::Rule::new("!(self in ['kubernetes.io/service-account-token', 'bootstrap.kubernetes.io/token'])").message("target.type may not be a type Kubernetes acts on (service-account-token, bootstrap token): a BaoSecret may not make Kubernetes mint credentials"))]
    pub type_: Option<String>,
    /// Labels to put on the Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 64))]
    pub labels: Option<BTreeMap<String, String>>,
    /// Annotations to put on the Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 64))]
    pub annotations: Option<BTreeMap<String, String>>,
    /// Who owns the Secret: `Owner` (created and owned; deleted with the BaoSecret), `Merge`
    /// (an existing Secret that opts in with the annotation `kubebao.io/allow-merge-from:
    /// <this BaoSecret's name>`; only the managed keys are written), `Orphan` (created, kept when
    /// the BaoSecret is deleted). Default `Owner`.
    #[serde(default)]
    pub creation_policy: CreationPolicy,
}

/// Who owns the target Secret.
#[derive(
    schemars::JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum CreationPolicy {
    /// The BaoSecret owns the Secret; Kubernetes deletes it with the BaoSecret.
    #[default]
    Owner,
    /// The Secret exists already and allows it (annotation `kubebao.io/allow-merge-from`); the
    /// managed keys are merged into it.
    Merge,
    /// The Secret is created but not owned; it stays when the BaoSecret is deleted.
    Orphan,
}

/// One KV key copied into the Secret, optionally under another name.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KeyMapping {
    /// Key in the OpenBao secret.
    #[schemars(length(min = 1, max = 253))]
    pub from: String,
    /// Key in the Kubernetes Secret. Default: the same as `from`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = SECRET_KEY_PATTERN), length(max = MAX_KUBE_NAME))]
    pub to: Option<String>,
}

/// A workload restarted when the Secret's data changes.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutTarget {
    /// Workload kind.
    pub kind: WorkloadKind,
    /// Workload name, in the BaoSecret's namespace.
    #[schemars(regex(pattern = KUBE_NAME_PATTERN), length(max = MAX_KUBE_NAME))]
    pub name: String,
}

/// Kinds of workload that can be restarted.
#[derive(schemars::JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkloadKind {
    /// apps/v1 Deployment.
    Deployment,
    /// apps/v1 StatefulSet.
    StatefulSet,
    /// apps/v1 DaemonSet.
    DaemonSet,
}

/// What the operator last did with a BaoSecret.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BaoSecretStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Reconciling` and `Stalled` (kstatus conventions).
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// KV v2 version last written into the Secret (absent for KV v1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_version: Option<u64>,
    /// When the Secret's data was last written (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<String>,
    /// HMAC-SHA256 (keyed with the operator's hash key) of the managed keys and values: shows
    /// when the data changed without revealing it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_hash: Option<String>,
}
