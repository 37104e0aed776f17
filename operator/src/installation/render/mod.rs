//! Rendering: pure functions from a `KubeBaoInstallation` to the files and objects that install
//! it. Nothing here talks to a server, so every output is pinned by a snapshot test.

pub mod csi_daemonset;
pub mod encryption_config;
pub mod installer_daemonset;
pub mod kms_config;
pub mod static_pod;

use std::collections::BTreeMap;

use sha2::{Digest as _, Sha256};

/// Annotation on pod templates (and the static pod) holding the hash of their configuration, so
/// a change of configuration rolls the pods.
pub const CONFIG_HASH_ANNOTATION: &str = "kubebao.io/config-hash";
/// Field manager for server-side apply.
pub const FIELD_MANAGER: &str = "kubebao-operator";

/// Everything rendering needs besides the spec.
#[derive(Clone, Debug, PartialEq)]
pub struct Context {
    /// The KubeBaoInstallation's name (`app.kubernetes.io/instance`).
    pub instance: String,
    /// PEM CA bundle for OpenBao, resolved from `caBundle` or `caSecretRef`.
    pub ca_pem: Option<String>,
}

/// Labels every object the installation creates carries; `component` is kms, csi or installer.
pub fn labels(instance: &str, component: &str) -> BTreeMap<String, String> {
    [
        ("app.kubernetes.io/name", format!("kubebao-{component}")),
        ("app.kubernetes.io/instance", instance.to_string()),
        ("app.kubernetes.io/component", component.to_string()),
        ("app.kubernetes.io/part-of", "kubebao".to_string()),
        ("app.kubernetes.io/managed-by", FIELD_MANAGER.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Labels that select one component's pods (a subset of [`labels`] that never changes).
pub fn selector(instance: &str, component: &str) -> BTreeMap<String, String> {
    [
        ("app.kubernetes.io/name", format!("kubebao-{component}")),
        ("app.kubernetes.io/instance", instance.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// SHA-256 over named parts, hex; the order of `parts` does not matter.
pub fn hash_of(parts: &BTreeMap<String, String>) -> String {
    let mut h = Sha256::new();
    for (k, v) in parts {
        h.update((k.len() as u64).to_be_bytes());
        h.update(k.as_bytes());
        h.update((v.len() as u64).to_be_bytes());
        h.update(v.as_bytes());
    }
    hex::encode(h.finalize())
}

/// YAML for a serialisable value (objects are rendered through JSON so field order is stable).
pub fn to_yaml<T: serde::Serialize>(value: &T) -> String {
    let json = serde_json::to_value(value).expect("rendered objects serialise");
    serde_saphyr::to_string(&json).expect("JSON serialises as YAML")
}

/// `path` joined under `dir` (both host paths).
pub fn join(dir: &str, name: &str) -> String {
    format!("{}/{}", dir.trim_end_matches('/'), name)
}

#[cfg(test)]
pub(crate) mod snapshot {
    //! Golden files: a test fails when rendered output changes. After an intended change,
    //! regenerate with `KUBEBAO_UPDATE_SNAPSHOTS=1 cargo test -p kubebao-operator installation`
    //! and review the diff.

    use std::path::PathBuf;

    pub fn assert_snapshot(name: &str, actual: &str) {
        // file!() is relative to the workspace root (or absolute); the snapshots sit beside it.
        let this = PathBuf::from(file!());
        let this = if this.is_absolute() {
            this
        } else {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join(this)
        };
        let path = this.parent().unwrap().join("snapshots").join(name);
        if std::env::var_os("KUBEBAO_UPDATE_SNAPSHOTS").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, actual).unwrap();
            return;
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "snapshot {} missing ({e}); create it with KUBEBAO_UPDATE_SNAPSHOTS=1",
                path.display()
            )
        });
        if expected != actual {
            let first = expected
                .lines()
                .zip(actual.lines())
                .position(|(a, b)| a != b)
                .unwrap_or_else(|| expected.lines().count().min(actual.lines().count()));
            panic!(
                "rendered {name} differs from {} at line {}:\n--- expected\n{}\n--- actual\n{}\n\
                 If the change is intended, rerun with KUBEBAO_UPDATE_SNAPSHOTS=1 and review the diff.",
                path.display(),
                first + 1,
                expected
                    .lines()
                    .skip(first)
                    .take(5)
                    .collect::<Vec<_>>()
                    .join("\n"),
                actual
                    .lines()
                    .skip(first)
                    .take(5)
                    .collect::<Vec<_>>()
                    .join("\n"),
            );
        }
    }

    /// The spec the snapshots are rendered from: the README example with kubeadm defaults and a CA.
    pub fn example() -> (
        crate::installation::types::KubeBaoInstallationSpec,
        super::Context,
    ) {
        let spec = serde_json::from_value(serde_json::json!({
            "openbao": {"address": "https://openbao.example.com:8200"}
        }))
        .unwrap();
        let ctx = super::Context {
            instance: "kubebao".into(),
            ca_pem: Some("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into()),
        };
        (spec, ctx)
    }
}
