//! `BaoPolicy`: one OpenBao ACL policy and the Kubernetes-auth roles that receive it.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::Condition;
use super::checks::{MAX_DURATION_TEXT, MAX_KUBE_NAME, TTL_PATTERN};
use crate::openbao_path::{GLOB_PATTERN, MAX_NAME, MAX_PATH, NAME_PATTERN, PATH_PATTERN};

/// An OpenBao ACL policy (`sys/policies/acl/<name>`), written from structured rules or raw HCL,
/// plus optional Kubernetes-auth roles that get it.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kubebao.io",
    version = "v1alpha1",
    kind = "BaoPolicy",
    doc = "An OpenBao ACL policy and the Kubernetes-auth roles that receive it, managed from Kubernetes.",
    status = "BaoPolicyStatus",
    shortname = "bp",
    category = "kubebao",
    printcolumn = r#"{"name":"Policy","type":"string","jsonPath":".status.policyName"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = kube::core::Rule::new("has(self.rules) != has(self.hcl)").message("set exactly one of rules or hcl"))]
#[serde(rename_all = "camelCase")]
pub struct BaoPolicySpec {
    /// Policy name in OpenBao. Default: the BaoPolicy's `metadata.name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$"),
        length(max = 128)
    )]
    pub name: Option<String>,
    /// Structured rules, rendered to HCL deterministically. Exactly one of `rules` and `hcl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub rules: Option<Vec<PolicyRule>>,
    /// Raw policy HCL, written as given (after a `# managed-by` header). Exactly one of `rules`
    /// and `hcl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 65536))]
    pub hcl: Option<String>,
    /// Take over a policy of the same name that KubeBao did not create. Default false: such a
    /// policy is left alone and the BaoPolicy reports Stalled with reason NotOwned. (Roles have
    /// their own `adopt`.)
    #[serde(default)]
    pub adopt: bool,
    /// What deleting the BaoPolicy does in OpenBao: `Delete` (remove the policy and roles) or
    /// `Retain`. Default `Delete`.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// Kubernetes-auth roles that get this policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub roles: Option<Vec<KubernetesAuthRole>>,
}

/// One `path "…" { … }` block.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRule {
    /// API path, optionally ending in `*` (prefix) and with `+` segments (one segment wildcard).
    /// Letters, digits and `_ . + @ = -` between single slashes, no `.` or `..` segment: quotes,
    /// braces, spaces and newlines are refused so a path can never change the policy's
    /// structure.
    #[schemars(regex(pattern = GLOB_PATTERN), length(min = 1, max = MAX_PATH))]
    pub path: String,
    /// Capabilities granted on the path.
    #[schemars(length(min = 1, max = 16))]
    pub capabilities: Vec<Capability>,
    /// Parameters the caller may send, with allowed values (`[]` = any value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 64))]
    pub allowed_parameters: Option<BTreeMap<String, Vec<String>>>,
    /// Parameters (and values) the caller may not send.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 64))]
    pub denied_parameters: Option<BTreeMap<String, Vec<String>>>,
    /// Parameters the caller must send.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 253)))]
    pub required_parameters: Option<Vec<String>>,
}

/// An OpenBao ACL capability.
#[derive(
    schemars::JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord,
)]
#[serde(rename_all = "lowercase")]
pub enum Capability {
    /// Create data at a path that has none.
    Create,
    /// Read data.
    Read,
    /// Change existing data.
    Update,
    /// Partially change existing data.
    Patch,
    /// Delete data.
    Delete,
    /// List keys.
    List,
    /// Root-protected paths.
    Sudo,
    /// Deny everything (overrides the rest).
    Deny,
    /// Subscribe to events.
    Subscribe,
}

impl Capability {
    /// The name OpenBao uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Create => "create",
            Capability::Read => "read",
            Capability::Update => "update",
            Capability::Patch => "patch",
            Capability::Delete => "delete",
            Capability::List => "list",
            Capability::Sudo => "sudo",
            Capability::Deny => "deny",
            Capability::Subscribe => "subscribe",
        }
    }
}

/// What happens in OpenBao when the BaoPolicy is deleted.
#[derive(
    schemars::JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum DeletionPolicy {
    /// Remove the policy and the roles.
    #[default]
    Delete,
    /// Leave them in OpenBao.
    Retain,
}

/// A Kubernetes-auth role (`auth/<mount>/role/<name>`) that receives the policy.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KubernetesAuthRole {
    /// Role name (one path segment, not `.` or `..`).
    #[schemars(regex(pattern = NAME_PATTERN), length(min = 1, max = MAX_NAME))]
    pub name: String,
    /// Kubernetes auth mount. Default `kubernetes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = PATH_PATTERN), length(max = MAX_NAME))]
    pub mount: Option<String>,
    /// ServiceAccount names allowed to log in (`*` for any).
    #[schemars(
        length(min = 1, max = 256),
        inner(regex(pattern = BOUND_PATTERN), length(min = 1, max = MAX_KUBE_NAME))
    )]
    pub bound_service_account_names: Vec<String>,
    /// Namespaces allowed to log in (`*` for any).
    #[schemars(
        length(min = 1, max = 256),
        inner(regex(pattern = BOUND_PATTERN), length(min = 1, max = MAX_KUBE_NAME))
    )]
    pub bound_service_account_namespaces: Vec<String>,
    /// Token TTL (e.g. `1h`). Default: the mount's.
    #[serde(default, rename = "tokenTTL", skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = TTL_PATTERN), length(max = MAX_DURATION_TEXT))]
    pub token_ttl: Option<String>,
    /// Token maximum TTL (e.g. `24h`). Default: the mount's.
    #[serde(
        default,
        rename = "tokenMaxTTL",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(regex(pattern = TTL_PATTERN), length(max = MAX_DURATION_TEXT))]
    pub token_max_ttl: Option<String>,
    /// Audience the ServiceAccount token must carry. Default: none checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub audience: Option<String>,
    /// Take over a role of this name that KubeBao did not create. Default false: such a role is
    /// left alone and the BaoPolicy reports Stalled with reason NotOwned.
    #[serde(default)]
    pub adopt: bool,
}

/// A bound ServiceAccount name or namespace: a Kubernetes name, optionally with `*` globs.
const BOUND_PATTERN: &str = r"^[-a-z0-9.*]+$";

/// What the operator last did with a BaoPolicy.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BaoPolicyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Reconciling` and `Stalled` (kstatus conventions).
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The policy name in OpenBao this object manages (set once KubeBao owns it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_name: Option<String>,
    /// Roles this BaoPolicy owns in OpenBao, as `<mount>/<name>`, so removed ones can be deleted
    /// (also recorded in the policy's marker line).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    /// SHA-256 of the rendered HCL last written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_hash: Option<String>,
}
