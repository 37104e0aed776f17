//! The node installer: a ConfigMap bundle (the rendered files and `plan.json`), the AppRole
//! credentials Secret, and a DaemonSet on control-plane nodes that runs `kubebao-installer run`
//! with only the manifest and config directories of the host mounted.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, ServiceAccount};
use kube::api::ObjectMeta;
use serde_json::json;

use crate::installation::render::encryption_config::Providers;
use crate::installation::render::{
    CONFIG_HASH_ANNOTATION, Context, encryption_config, hash_of, join, kms_config, labels,
    selector, static_pod,
};
use crate::installation::types::KubeBaoInstallationSpec;

/// Name of the DaemonSet, its ServiceAccount and ConfigMap.
pub const NAME: &str = "kubebao-installer";
/// Name of the Secret with the plugin's AppRole credentials.
pub const CREDENTIALS_SECRET: &str = "kubebao-kms-approle";
/// Port of the installer's `/readyz`.
pub const READY_PORT: u16 = 9879;
/// Where the host root is mounted in the installer container.
pub const HOST_ROOT: &str = "/host";
const BUNDLE_DIR: &str = "/etc/kubebao-installer/bundle";
const SECRETS_DIR: &str = "/etc/kubebao-installer/secrets";

/// Whether the installers should install or remove their files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Write the files.
    Install,
    /// Remove what was written (deletion of the KubeBaoInstallation).
    Uninstall,
}

/// Host path of the installer's state file.
pub fn state_path(spec: &KubeBaoInstallationSpec) -> String {
    join(&spec.kms.config_dir, "installer-state.json")
}

/// `plan.json`: which bundle file goes where, in the order written. The static-pod manifest
/// comes last, so the kubelet never starts the plugin before its config and credentials exist.
/// An uninstall removes every file; after a migration off KMS (`IdentityOnly`) it keeps the
/// `identity`-only EncryptionConfiguration, so kube-apiserver still starts with its flag.
pub fn plan(
    spec: &KubeBaoInstallationSpec,
    ctx: &Context,
    action: Action,
    providers: Providers,
) -> serde_json::Value {
    let kms = &spec.kms;
    let entry = |name: &str, source: &str, path: String, mode: u32| json!({"name": name, "source": source, "path": path, "mode": mode});
    let encryption = entry(
        encryption_config::FILE_NAME,
        "config",
        join(&kms.config_dir, encryption_config::FILE_NAME),
        0o600,
    );
    if action == Action::Uninstall {
        let keep = match providers {
            Providers::IdentityOnly => vec![encryption],
            Providers::KmsFirst | Providers::IdentityFirst => vec![],
        };
        return json!({
            "action": "uninstall",
            "state_path": state_path(spec),
            "files": [],
            "keep": keep,
        });
    }
    let mut files = Vec::new();
    if ctx.ca_pem.is_some() {
        files.push(entry(
            kms_config::CA_FILE,
            "config",
            join(&kms.config_dir, kms_config::CA_FILE),
            0o644,
        ));
    }
    for f in [kms_config::ROLE_ID_FILE, kms_config::SECRET_ID_FILE] {
        files.push(entry(
            f,
            "secret",
            kms_config::credential_path(spec, f),
            0o600,
        ));
    }
    files.push(entry(
        kms_config::FILE_NAME,
        "config",
        kms_config::config_path(spec),
        0o600,
    ));
    files.push(encryption);
    files.push(entry(
        static_pod::FILE_NAME,
        "config",
        join(&kms.manifest_dir, static_pod::FILE_NAME),
        0o600,
    ));
    json!({
        "action": "install",
        "state_path": state_path(spec),
        "files": files,
    })
}

/// The bundle ConfigMap's data: every non-secret file and `plan.json`; the EncryptionConfiguration
/// lists `providers`.
pub fn bundle(
    spec: &KubeBaoInstallationSpec,
    ctx: &Context,
    action: Action,
    providers: Providers,
) -> BTreeMap<String, String> {
    let mut data = BTreeMap::new();
    let pod_hash = static_pod::config_hash(spec, ctx);
    data.insert(
        static_pod::FILE_NAME.into(),
        static_pod::render(spec, ctx, &pod_hash),
    );
    data.insert(kms_config::FILE_NAME.into(), kms_config::render(spec, ctx));
    data.insert(
        encryption_config::FILE_NAME.into(),
        encryption_config::render(&spec.kms, providers),
    );
    if let Some(ca) = &ctx.ca_pem {
        data.insert(kms_config::CA_FILE.into(), ca.clone());
    }
    data.insert(
        "plan.json".into(),
        serde_json::to_string_pretty(&plan(spec, ctx, action, providers)).expect("plan serialises"),
    );
    data
}

/// The hash of the bundle; the DaemonSet's pod template carries it, so any change rolls out
/// node by node. Credentials are not part of it: a renewed secret_id reaches the nodes through
/// the Secret mount, and the installer re-applies when its mounted files change.
pub fn bundle_hash(bundle: &BTreeMap<String, String>) -> String {
    hash_of(bundle)
}

fn meta(spec: &KubeBaoInstallationSpec, ctx: &Context, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(spec.namespace.clone()),
        labels: Some(labels(&ctx.instance, "installer")),
        ..Default::default()
    }
}

/// The bundle ConfigMap.
pub fn config_map(
    spec: &KubeBaoInstallationSpec,
    ctx: &Context,
    bundle: BTreeMap<String, String>,
) -> ConfigMap {
    ConfigMap {
        metadata: meta(spec, ctx, NAME),
        data: Some(bundle),
        ..Default::default()
    }
}

/// The AppRole credentials Secret.
pub fn credentials(
    spec: &KubeBaoInstallationSpec,
    ctx: &Context,
    role_id: &str,
    secret_id: &str,
) -> Secret {
    Secret {
        metadata: meta(spec, ctx, CREDENTIALS_SECRET),
        type_: Some("Opaque".into()),
        data: Some(
            [
                (
                    kms_config::ROLE_ID_FILE.to_string(),
                    ByteString(role_id.as_bytes().to_vec()),
                ),
                (
                    kms_config::SECRET_ID_FILE.to_string(),
                    ByteString(secret_id.as_bytes().to_vec()),
                ),
            ]
            .into(),
        ),
        ..Default::default()
    }
}

/// The installer's ServiceAccount (it needs no API access: no token is mounted).
pub fn service_account(spec: &KubeBaoInstallationSpec, ctx: &Context) -> ServiceAccount {
    ServiceAccount {
        metadata: meta(spec, ctx, NAME),
        automount_service_account_token: Some(false),
        ..Default::default()
    }
}

/// The installer DaemonSet.
pub fn daemonset(spec: &KubeBaoInstallationSpec, ctx: &Context, bundle_hash: &str) -> DaemonSet {
    let kms = &spec.kms;
    let host = |dir: &str| format!("{HOST_ROOT}{}", dir.trim_end_matches('/'));
    let mut ds: DaemonSet = serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "spec": {
            "selector": {"matchLabels": selector(&ctx.instance, "installer")},
            // One control-plane node at a time: a bad configuration stops at the first node.
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {
                    "labels": labels(&ctx.instance, "installer"),
                    "annotations": {CONFIG_HASH_ANNOTATION: bundle_hash},
                },
                "spec": {
                    "serviceAccountName": NAME,
                    "automountServiceAccountToken": false,
                    "priorityClassName": "system-node-critical",
                    "nodeSelector": kms.node_selector,
                    "tolerations": kms.tolerations,
                    "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "installer",
                        "image": kms.image,
                        "imagePullPolicy": kms.image_pull_policy,
                        "command": ["/usr/local/bin/kubebao-installer"],
                        "args": [
                            "run",
                            format!("--bundle={BUNDLE_DIR}"),
                            format!("--secrets={SECRETS_DIR}"),
                            format!("--host-root={HOST_ROOT}"),
                            format!("--listen=0.0.0.0:{READY_PORT}"),
                        ],
                        "ports": [{"name": "readyz", "containerPort": READY_PORT}],
                        "readinessProbe": {
                            "httpGet": {"path": "/readyz", "port": READY_PORT},
                            "periodSeconds": 5,
                        },
                        "resources": {
                            "requests": {"cpu": "5m", "memory": "16Mi"},
                            "limits": {"memory": "64Mi"},
                        },
                        // Root to write root-owned host files, without any capability.
                        "securityContext": {
                            "runAsUser": 0,
                            "runAsNonRoot": false,
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        "volumeMounts": [
                            {"name": "bundle", "mountPath": BUNDLE_DIR, "readOnly": true},
                            {"name": "credentials", "mountPath": SECRETS_DIR, "readOnly": true},
                            {"name": "manifests", "mountPath": host(&kms.manifest_dir)},
                            {"name": "config", "mountPath": host(&kms.config_dir)},
                        ],
                    }],
                    "volumes": [
                        {"name": "bundle", "configMap": {"name": NAME}},
                        {"name": "credentials", "secret": {"secretName": CREDENTIALS_SECRET, "defaultMode": 0o400}},
                        {"name": "manifests", "hostPath": {"path": kms.manifest_dir, "type": "DirectoryOrCreate"}},
                        {"name": "config", "hostPath": {"path": kms.config_dir, "type": "DirectoryOrCreate"}},
                    ],
                },
            },
        },
    }))
    .expect("the installer DaemonSet is valid");
    ds.metadata = meta(spec, ctx, NAME);
    ds
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::installation::render::snapshot::{assert_snapshot, example};
    use crate::installation::render::to_yaml;

    #[test]
    fn installer_daemonset_matches_the_snapshot() {
        let (spec, ctx) = example();
        let hash = bundle_hash(&bundle(&spec, &ctx, Action::Install, Providers::KmsFirst));
        assert_snapshot(
            "installer-daemonset.yaml",
            &to_yaml(&daemonset(&spec, &ctx, &hash)),
        );
    }

    #[test]
    fn installer_plan_matches_the_snapshot() {
        let (spec, ctx) = example();
        assert_snapshot(
            "plan.json",
            &bundle(&spec, &ctx, Action::Install, Providers::KmsFirst)["plan.json"],
        );
    }

    #[test]
    fn the_installer_runs_on_control_plane_nodes_one_at_a_time() {
        let (spec, ctx) = example();
        let ds = daemonset(&spec, &ctx, "h");
        let s = ds.spec.unwrap();
        let ru = s.update_strategy.unwrap().rolling_update.unwrap();
        assert_eq!(
            ru.max_unavailable,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
        );
        let pod = s.template.spec.unwrap();
        assert!(
            pod.node_selector
                .unwrap()
                .contains_key("node-role.kubernetes.io/control-plane")
        );
        assert!(
            pod.tolerations
                .unwrap()
                .iter()
                .any(|t| t.key.as_deref() == Some("node-role.kubernetes.io/control-plane"))
        );
    }

    #[test]
    fn a_spec_change_changes_the_bundle_hash() {
        let (mut spec, ctx) = example();
        let before = bundle_hash(&bundle(&spec, &ctx, Action::Install, Providers::KmsFirst));
        spec.kms.image = "example.com/kubebao:2".into();
        assert_ne!(
            before,
            bundle_hash(&bundle(&spec, &ctx, Action::Install, Providers::KmsFirst))
        );
    }

    #[test]
    fn uninstalling_changes_the_hash_so_every_node_gets_the_new_plan() {
        let (spec, ctx) = example();
        assert_ne!(
            bundle_hash(&bundle(&spec, &ctx, Action::Install, Providers::KmsFirst)),
            bundle_hash(&bundle(&spec, &ctx, Action::Uninstall, Providers::KmsFirst))
        );
    }

    #[test]
    fn the_manifest_is_written_last() {
        let (spec, ctx) = example();
        let plan = plan(&spec, &ctx, Action::Install, Providers::KmsFirst);
        let files = plan["files"].as_array().unwrap();
        assert_eq!(
            files.last().unwrap()["path"],
            "/etc/kubernetes/manifests/kubebao-kms.yaml"
        );
    }

    #[test]
    fn a_migration_off_kms_changes_the_hash_and_an_uninstall_after_it_keeps_identity_only() {
        let (spec, ctx) = example();
        let hash = |p| bundle_hash(&bundle(&spec, &ctx, Action::Install, p));
        assert_ne!(hash(Providers::KmsFirst), hash(Providers::IdentityFirst));
        assert_ne!(
            hash(Providers::IdentityFirst),
            hash(Providers::IdentityOnly)
        );
        let removal = plan(&spec, &ctx, Action::Uninstall, Providers::KmsFirst);
        assert_eq!(removal["action"], "uninstall");
        assert_eq!(
            removal["keep"],
            json!([]),
            "removes everything it installed"
        );
        let after = plan(&spec, &ctx, Action::Uninstall, Providers::IdentityOnly);
        assert_eq!(
            after["keep"][0]["path"],
            "/etc/kubebao/encryption-config.yaml"
        );
        assert_eq!(after["keep"].as_array().unwrap().len(), 1);
        let b = bundle(&spec, &ctx, Action::Uninstall, Providers::IdentityOnly);
        assert!(!b["encryption-config.yaml"].contains("kms:"));
    }
}
