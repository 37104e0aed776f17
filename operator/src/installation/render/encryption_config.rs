//! The kube-apiserver `EncryptionConfiguration`: Secrets go through the KubeBao KMS v2 plugin;
//! `identity` second, so Secrets written before encryption was turned on can still be read
//! (they are encrypted on their next write, or by a rewrite).

use crate::installation::types::KmsSpec;

/// The provider name; stored values start with `k8s:enc:kms:v2:kubebao:`.
pub const PROVIDER_NAME: &str = "kubebao";
/// File name of the EncryptionConfiguration in the config dir.
pub const FILE_NAME: &str = "encryption-config.yaml";

/// Renders the EncryptionConfiguration for the plugin's socket.
pub fn render(kms: &KmsSpec) -> String {
    format!(
        "apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources:
      - secrets
    providers:
      - kms:
          apiVersion: v2
          name: {PROVIDER_NAME}
          endpoint: unix://{socket}
          timeout: 3s
      - identity: {{}}
",
        socket = kms.socket_path
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::installation::render::snapshot::{assert_snapshot, example};

    #[test]
    fn encryption_config_matches_the_snapshot() {
        let (spec, _) = example();
        assert_snapshot("encryption-config.yaml", &render(&spec.kms));
    }

    #[test]
    fn kms_comes_first_and_identity_last_so_old_secrets_stay_readable() {
        let (mut spec, _) = example();
        spec.kms.socket_path = "/run/kb/kms.sock".into();
        let yaml: serde_json::Value = serde_saphyr::from_str(&render(&spec.kms)).unwrap();
        let providers = &yaml["resources"][0]["providers"];
        assert_eq!(providers[0]["kms"]["apiVersion"], "v2");
        assert_eq!(providers[0]["kms"]["name"], "kubebao");
        assert_eq!(providers[0]["kms"]["endpoint"], "unix:///run/kb/kms.sock");
        assert!(providers[1]["identity"].is_object());
        assert_eq!(providers.as_array().unwrap().len(), 2);
    }
}
