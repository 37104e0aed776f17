//! The KMS plugin's config file (`<configDir>/kms.yaml`), read by `kubebao-kms --config`.
//!
//! The plugin runs before the API server is up, so it gets everything from files on the host:
//! this config, the OpenBao CA bundle and its AppRole role_id / secret_id.

use crate::installation::render::{Context, join};
use crate::installation::types::KubeBaoInstallationSpec;

/// File name of the agent config in the config dir.
pub const FILE_NAME: &str = "kms.yaml";
/// File name of the OpenBao CA bundle in the config dir.
pub const CA_FILE: &str = "openbao-ca.crt";
/// File names of the AppRole credentials (in `<configDir>/approle/` and in the Secret).
pub const ROLE_ID_FILE: &str = "role-id";
/// See [`ROLE_ID_FILE`].
pub const SECRET_ID_FILE: &str = "secret-id";

/// Host path of the config file.
pub fn config_path(spec: &KubeBaoInstallationSpec) -> String {
    join(&spec.kms.config_dir, FILE_NAME)
}

/// Host path of a credential file.
pub fn credential_path(spec: &KubeBaoInstallationSpec, file: &str) -> String {
    join(&join(&spec.kms.config_dir, "approle"), file)
}

/// Renders the plugin's config: the YAML file `kubebao-kms --config` reads (keys are the
/// plugin's flag names; unknown keys are refused by the plugin, so this stays in step with it).
pub fn render(spec: &KubeBaoInstallationSpec, ctx: &Context) -> String {
    let kms = &spec.kms;
    let mut out = String::new();
    out.push_str(
        "# Rendered by kubebao-operator from the KubeBaoInstallation; edits are overwritten.\n",
    );
    let mut line = |k: &str, v: &str| out.push_str(&format!("{k}: {}\n", quote(v)));
    line("socket", &kms.socket_path);
    line("http-addr", &format!("127.0.0.1:{}", kms.health_port));
    line("openbao-addr", &spec.openbao.address);
    if ctx.ca_pem.is_some() {
        line("openbao-ca-file", &join(&kms.config_dir, CA_FILE));
    }
    if let Some(ns) = &spec.openbao.namespace {
        line("openbao-namespace", ns);
    }
    line("transit-mount", &kms.transit_mount);
    line("transit-key", &kms.key_name);
    line("auth-method", "approle");
    line("auth-mount", &kms.approle_mount);
    line("role-id-file", &credential_path(spec, ROLE_ID_FILE));
    line("secret-id-file", &credential_path(spec, SECRET_ID_FILE));
    line("log-format", "json");
    out
}

/// A YAML double-quoted scalar (JSON strings are valid YAML), so no value can inject keys.
fn quote(v: &str) -> String {
    serde_json::to_string(v).expect("strings serialise")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::installation::render::snapshot::{assert_snapshot, example};

    #[test]
    fn kms_config_matches_the_snapshot() {
        let (spec, ctx) = example();
        assert_snapshot("kms.yaml", &render(&spec, &ctx));
    }

    #[test]
    fn kms_config_is_yaml_pointing_at_the_key_and_the_credential_files() {
        let (mut spec, mut ctx) = example();
        spec.kms.config_dir = "/srv/kb/".into();
        spec.kms.key_name = "k1".into();
        ctx.ca_pem = None;
        let yaml: serde_json::Value = serde_saphyr::from_str(&render(&spec, &ctx)).unwrap();
        assert_eq!(yaml["transit-key"], "k1");
        assert_eq!(yaml["secret-id-file"], "/srv/kb/approle/secret-id");
        assert!(yaml.get("openbao-ca-file").is_none());
    }
}
