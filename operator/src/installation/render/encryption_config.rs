//! The kube-apiserver `EncryptionConfiguration`. Normally Secrets go through the KubeBao KMS v2
//! plugin, `identity` second so Secrets written before encryption was turned on can still be
//! read (they are encrypted on their next write, or by a rewrite). A migration off KMS swaps
//! the order (plaintext writes, KMS data still readable), then drops the plugin.

use crate::installation::types::KmsSpec;

/// The provider name; stored values start with `k8s:enc:kms:v2:kubebao:`.
pub const PROVIDER_NAME: &str = "kubebao";
/// File name of the EncryptionConfiguration in the config dir.
pub const FILE_NAME: &str = "encryption-config.yaml";

/// Which providers the EncryptionConfiguration lists, in order (the first one writes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Providers {
    /// The plugin, then `identity`: Secrets are written encrypted.
    KmsFirst,
    /// `identity`, then the plugin: Secrets are written plaintext, KMS data still reads.
    IdentityFirst,
    /// `identity` only: nothing reads through the plugin.
    IdentityOnly,
}

/// Renders the EncryptionConfiguration for the plugin's socket.
pub fn render(kms: &KmsSpec, providers: Providers) -> String {
    let plugin = format!(
        "      - kms:
          apiVersion: v2
          name: {PROVIDER_NAME}
          endpoint: unix://{socket}
          timeout: 3s
",
        socket = kms.socket_path
    );
    let identity = "      - identity: {}\n";
    let list = match providers {
        Providers::KmsFirst => format!("{plugin}{identity}"),
        Providers::IdentityFirst => format!("{identity}{plugin}"),
        Providers::IdentityOnly => identity.to_string(),
    };
    format!(
        "apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources:
      - secrets
    providers:
{list}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::installation::render::snapshot::{assert_snapshot, example};

    #[test]
    fn encryption_config_matches_the_snapshot() {
        let (spec, _) = example();
        assert_snapshot(
            "encryption-config.yaml",
            &render(&spec.kms, Providers::KmsFirst),
        );
    }

    fn providers(p: Providers) -> serde_json::Value {
        let (mut spec, _) = example();
        spec.kms.socket_path = "/run/kb/kms.sock".into();
        let yaml: serde_json::Value = serde_saphyr::from_str(&render(&spec.kms, p)).unwrap();
        yaml["resources"][0]["providers"].clone()
    }

    #[test]
    fn kms_comes_first_and_identity_last_so_old_secrets_stay_readable() {
        let providers = providers(Providers::KmsFirst);
        assert_eq!(providers[0]["kms"]["apiVersion"], "v2");
        assert_eq!(providers[0]["kms"]["name"], "kubebao");
        assert_eq!(providers[0]["kms"]["endpoint"], "unix:///run/kb/kms.sock");
        assert!(providers[1]["identity"].is_object());
        assert_eq!(providers.as_array().unwrap().len(), 2);
    }

    #[test]
    fn migrating_off_writes_plaintext_first_then_drops_the_plugin() {
        let first = providers(Providers::IdentityFirst);
        assert!(first[0]["identity"].is_object());
        assert_eq!(
            first[1]["kms"]["name"], "kubebao",
            "KMS data stays readable"
        );
        assert_eq!(first.as_array().unwrap().len(), 2);
        let only = providers(Providers::IdentityOnly);
        assert!(only[0]["identity"].is_object());
        assert_eq!(only.as_array().unwrap().len(), 1);
    }
}
