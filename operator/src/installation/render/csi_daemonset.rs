//! The CSI provider: ServiceAccount, RBAC (TokenRequest for pods, used only when the driver
//! sends no token), a ConfigMap with the OpenBao CA, the Secret with the object-version key,
//! and the DaemonSet on every node.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::ObjectMeta;
use serde_json::json;

use crate::installation::render::{
    CONFIG_HASH_ANNOTATION, Context, hash_of, labels, selector, to_yaml,
};
use crate::installation::types::KubeBaoInstallationSpec;

/// Name of the DaemonSet, ServiceAccount, RBAC objects and CA ConfigMap.
pub const NAME: &str = "kubebao-csi";
/// Name of the Secret holding the object-version HMAC key (generated once, then kept, so
/// versions stay stable across restarts and nodes).
pub const VERSION_KEY_SECRET: &str = "kubebao-csi-object-version-key";
/// Key of the version key in that Secret.
pub const VERSION_KEY: &str = "key";
const CA_DIR: &str = "/etc/kubebao-csi/ca";
const KEY_DIR: &str = "/etc/kubebao-csi/version-key";

fn meta(spec: &KubeBaoInstallationSpec, ctx: &Context, name: &str, namespaced: bool) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: namespaced.then(|| spec.namespace.clone()),
        labels: Some(labels(&ctx.instance, "csi")),
        ..Default::default()
    }
}

/// The provider's ServiceAccount.
pub fn service_account(spec: &KubeBaoInstallationSpec, ctx: &Context) -> ServiceAccount {
    ServiceAccount {
        metadata: meta(spec, ctx, NAME, true),
        ..Default::default()
    }
}

/// What the provider may do: request tokens for pods' ServiceAccounts (TokenRequest).
pub fn cluster_role(spec: &KubeBaoInstallationSpec, ctx: &Context) -> ClusterRole {
    // Only TokenReview: a Mount's own ServiceAccount token (which the CSIDriver's
    // tokenRequests hand over) must prove the pod's identity before a cached OpenBao token
    // serves it. No `serviceaccounts/token`: minting tokens for any ServiceAccount in the
    // cluster is a power the provider does not need when the driver passes the pod's token.
    let mut role: ClusterRole = serde_json::from_value(json!({
        "rules": [{"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}]
    }))
    .expect("valid ClusterRole");
    role.metadata = meta(spec, ctx, NAME, false);
    role
}

/// Binds the ClusterRole to the provider's ServiceAccount.
pub fn cluster_role_binding(spec: &KubeBaoInstallationSpec, ctx: &Context) -> ClusterRoleBinding {
    let mut b: ClusterRoleBinding = serde_json::from_value(json!({
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": NAME},
        "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": spec.namespace}],
    }))
    .expect("valid ClusterRoleBinding");
    b.metadata = meta(spec, ctx, NAME, false);
    b
}

/// The ConfigMap with the OpenBao CA bundle (empty when none is configured).
pub fn config_map(spec: &KubeBaoInstallationSpec, ctx: &Context) -> ConfigMap {
    ConfigMap {
        metadata: meta(spec, ctx, NAME, true),
        data: Some(
            ctx.ca_pem
                .iter()
                .map(|ca| ("ca.crt".to_string(), ca.clone()))
                .collect(),
        ),
        ..Default::default()
    }
}

/// The object-version key Secret, for a key the controller generated.
pub fn version_key_secret(spec: &KubeBaoInstallationSpec, ctx: &Context, key: &[u8]) -> Secret {
    Secret {
        metadata: meta(spec, ctx, VERSION_KEY_SECRET, true),
        type_: Some("Opaque".into()),
        data: Some([(VERSION_KEY.to_string(), ByteString(key.to_vec()))].into()),
        ..Default::default()
    }
}

/// The provider's command-line arguments.
pub fn args(spec: &KubeBaoInstallationSpec, ctx: &Context) -> Vec<String> {
    let csi = &spec.csi;
    let mut args = vec![
        format!("--provider-dir={}", csi.provider_dir),
        format!("--openbao-addr={}", spec.openbao.address),
        format!("--auth-mount={}", csi.auth_mount),
        format!("--audience={}", csi.audience),
        format!("--object-version-key-file={KEY_DIR}/{VERSION_KEY}"),
        format!("--listen=0.0.0.0:{}", csi.health_port),
        "--log-format=json".into(),
    ];
    if ctx.ca_pem.is_some() {
        args.push(format!("--openbao-ca-cert={CA_DIR}/ca.crt"));
    }
    if let Some(ns) = &spec.openbao.namespace {
        args.push(format!("--openbao-namespace={ns}"));
    }
    if spec.openbao.allow_plain_http {
        args.push("--openbao-allow-plain-http".into());
    }
    args
}

/// The DaemonSet without its config hash.
fn daemonset_with(spec: &KubeBaoInstallationSpec, ctx: &Context, hash: &str) -> DaemonSet {
    let csi = &spec.csi;
    let probe = |path: &str| json!({"httpGet": {"path": path, "port": csi.health_port}, "periodSeconds": 10, "failureThreshold": 3});
    let mut ds: DaemonSet = serde_json::from_value(json!({
        "spec": {
            "selector": {"matchLabels": selector(&ctx.instance, "csi")},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {
                    "labels": labels(&ctx.instance, "csi"),
                    "annotations": {CONFIG_HASH_ANNOTATION: hash},
                },
                "spec": {
                    "serviceAccountName": NAME,
                    "priorityClassName": "system-node-critical",
                    "nodeSelector": csi.node_selector,
                    "tolerations": csi.tolerations,
                    "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "provider",
                        "image": csi.image,
                        "imagePullPolicy": csi.image_pull_policy,
                        "command": ["/usr/local/bin/kubebao-csi"],
                        "args": args(spec, ctx),
                        "ports": [{"name": "metrics", "containerPort": csi.health_port}],
                        "livenessProbe": probe("/healthz"),
                        "readinessProbe": probe("/readyz"),
                        "resources": csi.resources,
                        // Root only to create the socket in the driver's root-owned directory.
                        "securityContext": {
                            "runAsUser": 0,
                            "runAsNonRoot": false,
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        "volumeMounts": [
                            {"name": "providers", "mountPath": csi.provider_dir},
                            {"name": "ca", "mountPath": CA_DIR, "readOnly": true},
                            {"name": "version-key", "mountPath": KEY_DIR, "readOnly": true},
                        ],
                    }],
                    "volumes": [
                        {"name": "providers", "hostPath": {"path": csi.provider_dir, "type": "DirectoryOrCreate"}},
                        {"name": "ca", "configMap": {"name": NAME}},
                        {"name": "version-key", "secret": {"secretName": VERSION_KEY_SECRET, "defaultMode": 0o400}},
                    ],
                },
            },
        },
    }))
    .expect("the CSI DaemonSet is valid");
    ds.metadata = meta(spec, ctx, NAME, true);
    ds
}

/// The hash of everything the provider pods depend on (arguments, image, placement, CA).
pub fn config_hash(spec: &KubeBaoInstallationSpec, ctx: &Context) -> String {
    let mut parts = BTreeMap::new();
    parts.insert(
        "daemonset".to_string(),
        to_yaml(&daemonset_with(spec, ctx, "")),
    );
    parts.insert("ca".to_string(), ctx.ca_pem.clone().unwrap_or_default());
    hash_of(&parts)
}

/// The provider DaemonSet, its pod template annotated with [`config_hash`].
pub fn daemonset(spec: &KubeBaoInstallationSpec, ctx: &Context) -> DaemonSet {
    daemonset_with(spec, ctx, &config_hash(spec, ctx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::installation::render::snapshot::{assert_snapshot, example};

    #[test]
    fn plain_http_reaches_the_provider_only_when_the_installation_allows_it() {
        let (mut spec, ctx) = example();
        let flag = "--openbao-allow-plain-http".to_string();
        assert!(!args(&spec, &ctx).contains(&flag));
        spec.openbao.allow_plain_http = true;
        assert!(args(&spec, &ctx).contains(&flag));
        let ds = daemonset_with(&spec, &ctx, "h");
        let container = &ds.spec.unwrap().template.spec.unwrap().containers[0];
        assert!(container.args.as_ref().unwrap().contains(&flag));
    }

    #[test]
    fn csi_objects_match_the_snapshot() {
        let (spec, ctx) = example();
        let all = [
            to_yaml(&service_account(&spec, &ctx)),
            to_yaml(&cluster_role(&spec, &ctx)),
            to_yaml(&cluster_role_binding(&spec, &ctx)),
            to_yaml(&config_map(&spec, &ctx)),
            to_yaml(&daemonset(&spec, &ctx)),
        ]
        .join("---\n");
        assert_snapshot("csi.yaml", &all);
    }

    #[test]
    fn the_provider_may_only_review_tokens_and_mints_none() {
        let (spec, ctx) = example();
        let rules = cluster_role(&spec, &ctx).rules.unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!(
            rules[0].api_groups.as_deref(),
            Some(&["authentication.k8s.io".to_string()][..])
        );
        assert_eq!(rules[0].resources.as_ref().unwrap(), &["tokenreviews"]);
        assert_eq!(rules[0].verbs, ["create"]);
    }

    #[test]
    fn a_spec_change_changes_the_csi_hash() {
        let (mut spec, ctx) = example();
        let before = config_hash(&spec, &ctx);
        spec.csi.audience = "vault".into();
        assert_ne!(before, config_hash(&spec, &ctx));
    }
}
