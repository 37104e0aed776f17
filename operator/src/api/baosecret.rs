//! `BaoSecret`: OpenBao secrets (one KV secret, or several named sources: KV secrets, engine
//! calls that issue leased credentials, PKI certificates) kept as one Kubernetes Secret,
//! copied key by key or rendered from templates.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::Condition;
use super::checks::{
    INTERVAL_PATTERN, KUBE_NAME_PATTERN, MAX_DURATION_TEXT, MAX_KUBE_NAME, MAX_SOURCE_NAME,
    NAMESPACE_PATTERN, SECRET_KEY_PATTERN, SECRET_TYPE_PATTERN, SOURCE_NAME_PATTERN,
};
use crate::openbao_path::{MAX_NAME, MAX_PATH, NAME_PATTERN, PATH_PATTERN, SECRET_PATH_PATTERN};

/// Copies OpenBao KV secrets into a Kubernetes Secret in the same namespace and keeps it fresh.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kubebao.io",
    version = "v1alpha1",
    kind = "BaoSecret",
    doc = "A Kubernetes Secret kept in sync with OpenBao (one KV secretPath, or several named sources: KV secrets, leased engine credentials, PKI certificates), copied or rendered from templates, read as a ServiceAccount of the same namespace.",
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
// Exactly one of secretPath and sources: a structural rule, not CEL. A spec-level CEL rule
// cannot evaluate on an object stored with a wrongly typed field (e.g. `secretPath: 42`), and
// then the API server refuses even the status write that reports it (see lenient.rs).
#[schemars(extend("oneOf" = [{"required": ["secretPath"]}, {"required": ["sources"]}]))]
#[x_kube(
    validation = kube::core::Rule::new("!(has(self.keys) && has(self.template))").message("set keys or template, not both: a template names its own values"),
    validation = kube::core::Rule::new("!(has(self.kvVersion) && has(self.sources))").message("kvVersion belongs to secretPath; with sources, set kvVersion in each source")
)]
#[serde(rename_all = "camelCase")]
pub struct BaoSecretSpec {
    /// OpenBao API path of the KV secret: `<mount>/data/<path>` for KV v2 (e.g.
    /// `secret/data/myapp`), `<mount>/<path>` for KV v1. Letters, digits and `_ . + @ = -`
    /// between single slashes; no `.` or `..` segment. Set exactly one of `secretPath` and
    /// `sources`. (Empty in the Rust type means not set.)
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(regex(pattern = SECRET_PATH_PATTERN), length(max = MAX_PATH))]
    pub secret_path: String,
    /// KV engine version of `secretPath` (1 or 2). Default: 2 when the path has a `/data/`
    /// segment, else 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 2))]
    pub kv_version: Option<u8>,
    /// Several OpenBao secrets for one Kubernetes Secret, each under a name. Without a
    /// template their keys are merged (a key in two sources is refused: rename it with `keys`
    /// or use a template); a template reads each as `{{ <name>.<key> }}`. Set exactly one of
    /// `secretPath` and `sources`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(validation = kube::core::Rule::new("self.all(s, self.exists_one(t, t.name == s.name))").message("two sources have the same name"))]
    pub sources: Option<Vec<SecretSource>>,
    /// OpenBao namespace (its full path, e.g. `team-a` or `org/team-a`) for the login and
    /// the reads of this BaoSecret. Default: the operator's `--openbao-namespace` (none: the
    /// root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = PATH_PATTERN), length(max = MAX_PATH))]
    pub openbao_namespace: Option<String>,
    /// The Kubernetes Secret to write, always in the BaoSecret's own namespace.
    pub target: SecretTarget,
    /// Which KV keys to copy and under which Secret keys. Default: every key, same name.
    /// Not with `template`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(validation = kube::core::Rule::new("self.all(k, self.exists_one(j, (has(j.to) ? j.to : j.from) == (has(k.to) ? k.to : k.from)))").message("two keys map to the same Secret key"))]
    pub keys: Option<Vec<KeyMapping>>,
    /// Builds the Secret's data from templates instead of copying keys. Not with `keys`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<SecretTemplate>,
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
    /// When issued credentials (`engine` leases, `certificate`s) are replaced, and how long
    /// replaced leases stay valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<Rotation>,
}

/// When issued credentials are replaced and how long replaced leases live on.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Rotation {
    /// Grace period: a replaced lease is revoked this long after the new credentials were
    /// written and the `rolloutRestartTargets` restarted (Go duration, `1s` to `24h`).
    /// Default `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = INTERVAL_PATTERN), length(max = MAX_DURATION_TEXT))]
    pub revoke_after: Option<String>,
    /// Leased credentials are replaced this long before their lease ends for good (its max
    /// TTL, or the end of the token that created it), as soon as that end is known (Go
    /// duration, `1s` to `8760h`). Default: a third of the lease duration, at least
    /// `revokeAfter` + 30s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = INTERVAL_PATTERN), length(max = MAX_DURATION_TEXT))]
    pub replace_before: Option<String>,
    /// A certificate is replaced once this share of its lifetime (notBefore to notAfter) has
    /// passed, in percent (10 to 95). Default 67.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 95))]
    pub renew_at_percent: Option<u8>,
}

/// One OpenBao secret a BaoSecret reads, under a name. A source sets exactly one kind of read:
/// `secretPath` (a KV secret), `engine` (a call to any secrets engine, e.g. database
/// credentials with a lease) or `certificate` (a PKI certificate).
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = kube::core::Rule::new("(has(self.secretPath) ? 1 : 0) + (has(self.engine) ? 1 : 0) + (has(self.certificate) ? 1 : 0) == 1").message("a source needs secretPath (a KV secret), engine (a secrets engine call) or certificate (a PKI certificate): exactly one of them"),
    validation = kube::core::Rule::new("!has(self.kvVersion) || has(self.secretPath)").message("kvVersion belongs to secretPath")
)]
#[serde(rename_all = "camelCase")]
pub struct SecretSource {
    /// Name of the source: a lower-case letter, then lower-case letters, digits and `_`;
    /// unique in `sources`. Templates read its data as `{{ <name>.<key> }}`.
    #[schemars(regex(pattern = SOURCE_NAME_PATTERN), length(max = MAX_SOURCE_NAME))]
    pub name: String,
    /// OpenBao API path of a KV secret, as `spec.secretPath`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = SECRET_PATH_PATTERN), length(max = MAX_PATH))]
    pub secret_path: Option<String>,
    /// KV engine version of `secretPath` (1 or 2). Default: 2 when the path has a `/data/`
    /// segment, else 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 2))]
    pub kv_version: Option<u8>,
    /// A call to a secrets engine (e.g. `database/creds/app`). An answer with a lease is kept:
    /// renewed, replaced before the lease ends, revoked after the grace and when the
    /// BaoSecret is deleted. An answer without a lease is read again at every refresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineSource>,
    /// A PKI certificate issued by OpenBao (`<mount>/issue/<role>`); its data is `tls.crt`
    /// (certificate and intermediates), `tls.key` and `ca.crt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateSource>,
}

/// Most arguments of an engine call.
pub const MAX_ENGINE_ARGS: usize = 32;
/// Longest engine arguments, as JSON text.
pub const MAX_ENGINE_ARGS_TEXT: usize = 8192;
/// A certificate's common name or alternative name: a DNS name (`*.` wildcard allowed) or
/// an e-mail address.
pub const CERTIFICATE_NAME_PATTERN: &str = r"^[A-Za-z0-9*]([-A-Za-z0-9_.*@]*[A-Za-z0-9])?$";
/// Most alternative names of a certificate.
pub const MAX_ALT_NAMES: usize = 100;

/// A call to a secrets engine, as the BaoSecret's own ServiceAccount.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EngineSource {
    /// OpenBao API path, e.g. `database/creds/app` or `aws/creds/deploy`: letters, digits and
    /// `_ . + @ = -` between single slashes; no `.` or `..` segment.
    #[schemars(regex(pattern = SECRET_PATH_PATTERN), length(max = MAX_PATH))]
    pub path: String,
    /// HTTP method: `GET` (default; `args` become query parameters), `PUT` or `POST` (`args`
    /// are the JSON body).
    #[serde(default)]
    pub method: EngineMethod,
    /// Arguments of the call (at most 32; GET takes strings, numbers and booleans only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "engine_args_schema")]
    pub args: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Any JSON object of at most [`MAX_ENGINE_ARGS`] members (each engine has its own fields).
fn engine_args_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "maxProperties": MAX_ENGINE_ARGS,
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// The HTTP method of an engine call.
#[derive(
    schemars::JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum EngineMethod {
    /// GET: a read (database, AWS, Kubernetes credentials).
    #[default]
    Get,
    /// PUT with the arguments as JSON body.
    Put,
    /// POST with the arguments as JSON body.
    Post,
}

/// A PKI certificate issued by OpenBao, with a private key it generates.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CertificateSource {
    /// OpenBao API path of the PKI role's issue endpoint: `<mount>/issue/<role>` (or
    /// `<mount>/issuer/<issuer>/issue/<role>`).
    #[schemars(regex(pattern = SECRET_PATH_PATTERN), length(max = MAX_PATH))]
    pub path: String,
    /// The certificate's common name (the role must allow it).
    #[schemars(regex(pattern = CERTIFICATE_NAME_PATTERN), length(max = MAX_KUBE_NAME))]
    pub common_name: String,
    /// Subject alternative names (DNS names or e-mail addresses), at most 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_ALT_NAMES), inner(regex(pattern = CERTIFICATE_NAME_PATTERN), length(max = MAX_KUBE_NAME)))]
    pub alt_names: Option<Vec<String>>,
    /// Requested lifetime (Go duration, `10s` to `87600h`). Default: the role's TTL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = INTERVAL_PATTERN), length(max = MAX_DURATION_TEXT))]
    pub ttl: Option<String>,
}

/// Longest template text for one Secret key.
pub const MAX_TEMPLATE_TEXT: usize = 65536;
/// Most Secret keys one template builds.
pub const MAX_TEMPLATE_KEYS: usize = 64;

/// The Secret's data, rendered from templates.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretTemplate {
    /// Secret key → template text (MiniJinja, i.e. Jinja2 syntax). The text reads each
    /// source's data by its name (`{{ db.password }}`), or the data of `secretPath` as
    /// `secret` (`{{ secret.password }}`). An undefined name is an error (the object goes
    /// Stalled, reason TemplateError, naming the key and line); there are no includes or
    /// imports. Each key renders within a fixed work budget, and the whole Secret within
    /// 1 MiB.
    #[schemars(extend("maxProperties" = MAX_TEMPLATE_KEYS, "additionalProperties" = {"type": "string", "maxLength": MAX_TEMPLATE_TEXT}))]
    #[x_kube(validation = kube::core::Rule::new(concat!("self.all(k, k.matches('", r"^\\.?[-_a-zA-Z0-9][-._a-zA-Z0-9]*$", "'))")).message("a template key must be a valid Secret key: letters, digits, - _ and . only, not . or .."))]
    pub data: BTreeMap<String, String>,
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
    /// Name of the source the key is taken from (with `sources`). Default: the one source
    /// that has the key; a key in several sources must name one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = SOURCE_NAME_PATTERN), length(max = MAX_SOURCE_NAME))]
    pub source: Option<String>,
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
    /// KV v2 version last written into the Secret (`secretPath` on KV v2 only; see `sources`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_version: Option<u64>,
    /// What the Secret's data was last built from: each source's name, path and KV v2
    /// version (`secretPath` is reported as the source `secret`). Never a value.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<SourceStatus>,
    /// When OpenBao is checked next (RFC 3339), as of the last check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_refresh_time: Option<String>,
    /// When the Secret's data was last written (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<String>,
    /// HMAC-SHA256 (keyed with the operator's hash key) of the managed keys and values: shows
    /// when the data changed without revealing it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_hash: Option<String>,
    /// The lease each `engine` source holds: renewed, and replaced before it ends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leases: Vec<LeaseStatus>,
    /// The certificate each `certificate` source holds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<CertificateStatus>,
    /// Replaced leases still to be revoked (kept here so a restarted operator revokes them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revocations: Vec<RevocationStatus>,
}

/// A lease held for an `engine` source. Times are RFC 3339. Never a credential.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LeaseStatus {
    /// The source's name.
    pub source: String,
    /// OpenBao lease id (`<path>/<id>`).
    pub lease_id: String,
    /// Whether OpenBao lets the lease be renewed.
    #[serde(default)]
    pub renewable: bool,
    /// The duration the lease was granted at first: what each renewal asks for.
    #[serde(default)]
    pub duration_seconds: u64,
    /// When the credentials were read.
    pub issue_time: String,
    /// When the lease ends unless renewed.
    pub expiry_time: String,
    /// When the lease ends for good, once known: a renewal granted less than asked (its max
    /// TTL), the lease is not renewable, or the token that created it ends then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_expiry_time: Option<String>,
    /// When the token that created the lease expires, as last seen (a lease dies with its
    /// token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_expiry_time: Option<String>,
    /// When the lease is renewed next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_time: Option<String>,
    /// When new credentials replace these (once the end is known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_time: Option<String>,
    /// HMAC of who asked and what (identity, method, path, arguments): a change issues new
    /// credentials.
    pub request_hash: String,
}

/// The certificate held for a `certificate` source. Times are RFC 3339.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CertificateStatus {
    /// The source's name.
    pub source: String,
    /// Serial number, as OpenBao writes it (`xx:xx:…`).
    pub serial_number: String,
    /// Start of validity.
    pub not_before: String,
    /// End of validity.
    pub not_after: String,
    /// When a new certificate replaces it.
    pub renew_time: String,
    /// HMAC of who asked and what (identity, path, names, TTL): a change issues a new
    /// certificate.
    pub request_hash: String,
}

/// A replaced lease still to be revoked.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RevocationStatus {
    /// The source it was read for.
    pub source: String,
    /// OpenBao lease id.
    pub lease_id: String,
    /// When it is revoked (RFC 3339); absent until the new credentials are written and the
    /// workloads restarted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoke_time: Option<String>,
    /// When it ends anyway (it is no longer renewed).
    pub expiry_time: String,
}

/// One source as last read.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SourceStatus {
    /// The source's name (`secret` for `secretPath`).
    pub name: String,
    /// The OpenBao API path read.
    pub path: String,
    /// Its KV v2 version (absent for KV v1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}
