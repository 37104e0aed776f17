//! The Mount request's parameters: the SecretProviderClass `parameters` overlaid with the pod
//! information the driver adds, parsed and checked before anything talks to OpenBao.
//!
//! Both KubeBao's names (`openbaoAddress`, …) and vault-csi-provider's (`vaultAddress`, …) are
//! accepted, so a SecretProviderClass written for vault-csi-provider works after changing only
//! `provider:`. Two names of one setting given different values are refused, never resolved
//! by a precedence the author cannot see.

mod objects;

use std::collections::BTreeMap;
use std::sync::Arc;

use kubebao_openbao::SecretString;
use serde::Deserialize;
use serde_json::Value;

use crate::error::MountError;

pub use objects::{
    Encoding, FetchMethod, KeySelector, MAX_NAME, MAX_OBJECTS, MAX_OBJECTS_TEXT, MAX_SEGMENT,
    ObjectSpec, RequestKey, check_object_name, parse_objects,
};

/// Driver-added attribute keys.
pub const POD_NAME: &str = "csi.storage.k8s.io/pod.name";
/// Pod namespace attribute.
pub const POD_NAMESPACE: &str = "csi.storage.k8s.io/pod.namespace";
/// Pod UID attribute.
pub const POD_UID: &str = "csi.storage.k8s.io/pod.uid";
/// ServiceAccount name attribute.
pub const SA_NAME: &str = "csi.storage.k8s.io/serviceAccount.name";
/// ServiceAccount tokens attribute (CSIDriver `tokenRequests`).
pub const SA_TOKENS: &str = "csi.storage.k8s.io/serviceAccount.tokens";

/// Largest `attributes` accepted, in bytes: the SecretProviderClass parameters (`objects` is
/// at most `MAX_OBJECTS_TEXT`) plus the pod's information and tokens.
pub const MAX_ATTRIBUTES: usize = 256 * 1024;

/// Everything one Mount needs, validated.
#[derive(Debug, Clone)]
pub struct MountParams {
    /// OpenBao Kubernetes-auth role to log in as.
    pub role: String,
    /// OpenBao address from the SecretProviderClass (else the agent's default).
    pub address: Option<String>,
    /// Kubernetes auth mount path (else the agent's default).
    pub auth_mount: Option<String>,
    /// ServiceAccount token audience (else the agent's default).
    pub audience: Option<String>,
    /// CA bundle file for the OpenBao server certificate, on the node.
    pub ca_cert_path: Option<String>,
    /// OpenBao namespace.
    pub namespace: Option<String>,
    /// The pod being mounted.
    pub pod: PodInfo,
    /// The objects to mount, in the order given (shared with the parse cache).
    pub objects: Arc<Vec<ObjectSpec>>,
    /// File mode for objects without `filePermission` (the request's `permission`).
    pub default_mode: u32,
}

/// The pod the driver is mounting for.
#[derive(Debug, Clone)]
pub struct PodInfo {
    /// Pod name.
    pub name: String,
    /// Pod namespace.
    pub namespace: String,
    /// Pod UID.
    pub uid: String,
    /// The pod's ServiceAccount.
    pub service_account: String,
    /// ServiceAccount tokens by audience, from the driver (empty when the CSIDriver asks for none).
    pub tokens: BTreeMap<String, SecretString>,
}

pub(crate) fn bad(name: &str, reason: impl Into<String>) -> MountError {
    MountError::BadParameter {
        name: name.to_string(),
        reason: reason.into(),
    }
}

/// The request's attributes as text (the driver sends strings; other scalars written by hand
/// are tolerated).
struct Attributes(BTreeMap<String, String>);

impl Attributes {
    fn parse(attributes: &str) -> Result<Self, MountError> {
        if attributes.len() > MAX_ATTRIBUTES {
            return Err(bad(
                "attributes",
                format!(
                    "{} bytes, more than {MAX_ATTRIBUTES}: the SecretProviderClass parameters are \
                     too large; split the objects over several SecretProviderClasses",
                    attributes.len()
                ),
            ));
        }
        let attrs: BTreeMap<String, Value> = serde_json::from_str(attributes)
            .map_err(|e| bad("attributes", format!("not a JSON object: {e}")))?;
        Ok(Self(
            attrs
                .into_iter()
                .map(|(k, v)| {
                    let s = match v {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    (k, s)
                })
                .collect(),
        ))
    }

    /// `name`, trimmed, unless unset or blank.
    fn get(&self, name: &str) -> Option<String> {
        self.0
            .get(name)
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    }

    /// The one value of a setting that has several names (`names`, KubeBao's first), each
    /// value seen through `normal`; two names with different values are refused.
    fn one_of(
        &self,
        names: &[&str],
        normal: impl Fn(&str) -> String,
    ) -> Result<Option<String>, MountError> {
        let mut found: Option<(&str, String)> = None;
        for name in names {
            let Some(value) = self.get(name).map(|v| normal(&v)) else {
                continue;
            };
            match &found {
                Some((first, v)) if *v != value => {
                    return Err(bad(
                        first,
                        format!(
                            "{first} is {v:?} but {name} is {value:?}: they name one setting; \
                             keep one of them"
                        ),
                    ));
                }
                Some(_) => {}
                None => found = Some((name, value)),
            }
        }
        Ok(found.map(|(_, v)| v))
    }
}

/// Parses a Mount request's `attributes` and `permission`.
pub fn parse(attributes: &str, permission: &str) -> Result<MountParams, MountError> {
    let attrs = Attributes::parse(attributes)?;
    let role = attrs.get("roleName").ok_or_else(|| {
        bad(
            "roleName",
            "missing: set it to the OpenBao Kubernetes-auth role the pod logs in as",
        )
    })?;
    refuse_unsupported(&attrs)?;
    let same = |v: &str| v.to_string();
    let address = attrs.one_of(&["openbaoAddress", "vaultAddress"], |a| {
        a.trim_end_matches('/').to_string()
    })?;
    if let Some(a) = &address
        && !(a.starts_with("http://") || a.starts_with("https://"))
    {
        return Err(bad(
            "openbaoAddress",
            format!("{a:?} must start with https:// (or http:// to a loopback OpenBao)"),
        ));
    }
    let auth_mount = auth_mount(&attrs)?;
    let pod = pod_info(&attrs)?;
    let objects_yaml = attrs.get("objects").ok_or_else(|| {
        bad(
            "objects",
            "missing: list the secrets to mount (objectName, secretPath, secretKey)",
        )
    })?;
    Ok(MountParams {
        role,
        address,
        auth_mount,
        audience: attrs.get("audience"),
        ca_cert_path: attrs.one_of(&["openbaoCACertPath", "vaultCACertPath"], same)?,
        namespace: attrs.one_of(&["openbaoNamespace", "vaultNamespace"], same)?,
        pod,
        objects: objects::cached_objects(&objects_yaml)?,
        default_mode: parse_permission(permission)?,
    })
}

/// vault-csi-provider settings KubeBao does not support, refused with what to do instead.
fn refuse_unsupported(attrs: &Attributes) -> Result<(), MountError> {
    for (name, what) in [
        (
            "vaultCADirectory",
            "give one CA bundle file with openbaoCACertPath",
        ),
        (
            "vaultTLSServerName",
            "use an address whose host name the certificate names",
        ),
        (
            "vaultTLSClientCertPath",
            "client certificates are not supported",
        ),
        (
            "vaultTLSClientKeyPath",
            "client certificates are not supported",
        ),
    ] {
        if attrs.get(name).is_some() {
            return Err(bad(name, format!("not supported by kubebao: {what}")));
        }
    }
    let skip = attrs.one_of(&["openbaoSkipTLSVerify", "vaultSkipTLSVerify"], |v| {
        v.to_ascii_lowercase()
    })?;
    match skip.as_deref() {
        None | Some("false") | Some("0") => Ok(()),
        Some(_) => Err(bad(
            "vaultSkipTLSVerify",
            "kubebao never skips TLS verification: give the CA bundle with \
             openbaoCACertPath (or vaultCACertPath) instead",
        )),
    }
}

/// The Kubernetes auth mount, without `auth/` and slashes.
fn auth_mount(attrs: &Attributes) -> Result<Option<String>, MountError> {
    let auth_mount = attrs.one_of(
        &[
            "openbaoAuthMountPath",
            "vaultAuthMountPath",
            "vaultKubernetesMountPath",
        ],
        |m| {
            // vault-csi-provider accepts both "kubernetes" and "auth/kubernetes".
            let m = m.trim_matches('/');
            m.strip_prefix("auth/").unwrap_or(m).to_string()
        },
    )?;
    if let Some(m) = &auth_mount {
        objects::check_api_path("openbaoAuthMountPath", m)?;
    }
    Ok(auth_mount)
}

/// The pod the driver mounts for, from the attributes it adds.
fn pod_info(attrs: &Attributes) -> Result<PodInfo, MountError> {
    let required = |name: &str| attrs.get(name).ok_or_else(|| missing_pod(name));
    Ok(PodInfo {
        name: required(POD_NAME)?,
        namespace: required(POD_NAMESPACE)?,
        uid: required(POD_UID)?,
        service_account: required(SA_NAME)?,
        tokens: parse_tokens(attrs.0.get(SA_TOKENS).map(String::as_str))?,
    })
}

fn missing_pod(name: &str) -> MountError {
    bad(
        name,
        "missing: the Secrets Store CSI driver adds it; is this request coming from the driver?",
    )
}

fn parse_tokens(raw: Option<&str>) -> Result<BTreeMap<String, SecretString>, MountError> {
    #[derive(Deserialize)]
    struct Token {
        token: SecretString,
    }
    let Some(raw) = raw.map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(BTreeMap::new());
    };
    // Never echo the parse error's input: it holds tokens.
    let tokens: BTreeMap<String, Token> = serde_json::from_str(raw).map_err(|e| {
        bad(
            SA_TOKENS,
            format!(
                "not a JSON map of audience to {{\"token\", \"expirationTimestamp\"}} (line {}, column {})",
                e.line(),
                e.column()
            ),
        )
    })?;
    Ok(tokens.into_iter().map(|(k, v)| (k, v.token)).collect())
}

/// `permission` is the pod's default file mode as a decimal JSON number ("420" = 0644).
fn parse_permission(raw: &str) -> Result<u32, MountError> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Ok(0o644);
    }
    let mode: u32 = serde_json::from_str(raw).map_err(|_| {
        bad(
            "permission",
            format!("{raw:?} is not a JSON number (the driver sends e.g. \"420\" for 0644)"),
        )
    })?;
    if mode > 0o777 {
        return Err(bad(
            "permission",
            format!("{raw} is not a file mode (at most 511 = 0777)"),
        ));
    }
    Ok(mode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn attrs(extra: Value) -> String {
        let mut base = json!({
            "csi.storage.k8s.io/pod.name": "web-0",
            "csi.storage.k8s.io/pod.namespace": "shop",
            "csi.storage.k8s.io/pod.uid": "1234",
            "csi.storage.k8s.io/serviceAccount.name": "web",
            "csi.storage.k8s.io/serviceAccount.tokens": "{\"openbao\":{\"token\":\"jwt\",\"expirationTimestamp\":\"2030-01-01T00:00:00Z\"}}",
            "secretProviderClass": "kubebao-secrets",
        });
        for (k, v) in extra.as_object().unwrap() {
            base[k] = v.clone();
        }
        base.to_string()
    }

    #[test]
    fn the_original_plans_secret_provider_class_parses() {
        let objects = "- objectName: \"db-password\"\n  secretPath: \"secret/data/myapp/db\"\n  secretKey: \"password\"\n";
        let p = parse(
            &attrs(json!({"roleName": "my-app", "objects": objects})),
            "420",
        )
        .unwrap();
        assert_eq!(p.role, "my-app");
        assert_eq!(p.default_mode, 0o644);
        assert_eq!(p.pod.namespace, "shop");
        assert_eq!(p.pod.tokens["openbao"].expose(), "jwt");
        assert_eq!(p.objects.len(), 1);
        let o = &p.objects[0];
        assert_eq!(o.name, "db-password");
        assert_eq!(o.path, "secret/data/myapp/db");
        assert_eq!(o.key, KeySelector::One("password".into()));
        assert_eq!(o.method, FetchMethod::Get);
        assert_eq!(o.encoding, Encoding::Utf8);
    }

    #[test]
    fn vault_csi_provider_parameter_names_are_accepted() {
        let p = parse(
            &attrs(json!({
                "roleName": "r",
                "vaultAddress": "https://bao:8200",
                "vaultKubernetesMountPath": "auth/k8s",
                "vaultCACertPath": "/ca.pem",
                "vaultNamespace": "team",
                "vaultSkipTLSVerify": "false",
                "audience": "vault",
                "objects": "- objectName: a\n  secretPath: pki/issue/web\n  method: PUT\n  secretArgs:\n    common_name: web.example\n",
            })),
            "",
        )
        .unwrap();
        assert_eq!(p.address.as_deref(), Some("https://bao:8200"));
        assert_eq!(p.auth_mount.as_deref(), Some("k8s"));
        assert_eq!(p.ca_cert_path.as_deref(), Some("/ca.pem"));
        assert_eq!(p.namespace.as_deref(), Some("team"));
        assert_eq!(p.audience.as_deref(), Some("vault"));
        assert_eq!(p.objects[0].method, FetchMethod::Put);
        assert_eq!(p.objects[0].args["common_name"], json!("web.example"));
    }

    #[test]
    fn skip_tls_verify_is_refused() {
        let err = parse(
            &attrs(json!({"roleName": "r", "vaultSkipTLSVerify": "true", "objects": "- objectName: a\n  secretPath: x/y\n"})),
            "420",
        )
        .unwrap_err();
        assert!(err.to_string().contains("vaultSkipTLSVerify"), "{err}");
    }

    #[test]
    fn token_parse_errors_do_not_echo_tokens() {
        let e = parse(
            &attrs(json!({"roleName": "r", "objects": "- {objectName: a, secretPath: x/a}", SA_TOKENS: "{\"aud\": \"eyJsecret"})),
            "420",
        )
        .unwrap_err();
        assert!(!e.to_string().contains("eyJsecret"), "{e}");
    }

    #[test]
    fn two_names_of_one_setting_with_different_values_are_refused() {
        let objects = "- {objectName: a, secretPath: x/a}";
        let cases = [
            (
                json!({"openbaoAddress": "https://a:8200", "vaultAddress": "https://b:8200"}),
                "vaultAddress",
            ),
            (
                json!({"openbaoCACertPath": "/a.pem", "vaultCACertPath": "/b.pem"}),
                "vaultCACertPath",
            ),
            (
                json!({"openbaoNamespace": "a", "vaultNamespace": "b"}),
                "vaultNamespace",
            ),
            (
                json!({"vaultAuthMountPath": "k8s", "vaultKubernetesMountPath": "kubernetes"}),
                "vaultKubernetesMountPath",
            ),
            (
                json!({"openbaoAuthMountPath": "a", "vaultAuthMountPath": "b"}),
                "vaultAuthMountPath",
            ),
        ];
        for (extra, second) in cases {
            let mut extra = extra;
            extra["roleName"] = json!("r");
            extra["objects"] = json!(objects);
            let err = parse(&attrs(extra.clone()), "420").expect_err(&extra.to_string());
            let msg = err.to_string();
            assert!(
                msg.contains(second) && msg.contains("keep one of them"),
                "{msg}"
            );
        }
        // The same setting under both names, written alike or equivalently: accepted.
        let p = parse(
            &attrs(json!({"roleName": "r", "objects": objects,
                "openbaoAddress": "https://a:8200/", "vaultAddress": "https://a:8200",
                "vaultAuthMountPath": "auth/k8s", "vaultKubernetesMountPath": "/k8s/",
                "openbaoSkipTLSVerify": "false", "vaultSkipTLSVerify": "FALSE"})),
            "420",
        )
        .unwrap();
        assert_eq!(p.address.as_deref(), Some("https://a:8200"));
        assert_eq!(p.auth_mount.as_deref(), Some("k8s"));
    }

    #[test]
    fn oversized_attributes_are_refused_before_parsing() {
        let huge = "x".repeat(MAX_ATTRIBUTES);
        let err = parse(&attrs(json!({"roleName": "r", "objects": huge})), "420").unwrap_err();
        assert!(err.to_string().contains("more than 262144"), "{err}");
    }
}
