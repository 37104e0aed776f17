//! The Mount request's parameters: the SecretProviderClass `parameters` overlaid with the pod
//! information the driver adds, parsed and checked before anything talks to OpenBao.
//!
//! Both KubeBao's names (`openbaoAddress`, …) and vault-csi-provider's (`vaultAddress`, …) are
//! accepted, so a SecretProviderClass written for vault-csi-provider works after changing only
//! `provider:`.

use std::collections::{BTreeMap, BTreeSet};

use kubebao_openbao::SecretString;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::MountError;

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
    /// The objects to mount, in the order given.
    pub objects: Vec<ObjectSpec>,
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

/// Which part of a secret's data an object takes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeySelector {
    /// No `secretKey`: the whole data map as JSON.
    Whole,
    /// `secretKey: name`: one value (a dotted name reaches into nested JSON when no key has that exact name).
    One(String),
    /// `secretKey: "*"`: every key as its own file under a directory named `objectName`.
    Each,
}

/// How a stored value is decoded before it is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Written as stored.
    Utf8,
    /// The stored value is base64; the file gets the decoded bytes.
    Base64,
    /// The stored value is hex; the file gets the decoded bytes.
    Hex,
}

/// The HTTP method used to fetch a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FetchMethod {
    /// GET (KV, database credentials); `secretArgs` become query parameters.
    Get,
    /// PUT with `secretArgs` as the JSON body.
    Put,
    /// POST with `secretArgs` as the JSON body (e.g. PKI issue).
    Post,
}

impl FetchMethod {
    /// The HTTP method.
    pub fn http(self) -> http::Method {
        match self {
            FetchMethod::Get => http::Method::GET,
            FetchMethod::Put => http::Method::PUT,
            FetchMethod::Post => http::Method::POST,
        }
    }
}

/// One entry of `objects`.
#[derive(Debug, Clone)]
pub struct ObjectSpec {
    /// File (or directory, for `secretKey: "*"`) name relative to the mount.
    pub name: String,
    /// OpenBao API path, without `/v1/`.
    pub path: String,
    /// Which key(s) to take.
    pub key: KeySelector,
    /// How to call the path.
    pub method: FetchMethod,
    /// Query parameters (GET) or request body (PUT/POST).
    pub args: Map<String, Value>,
    /// How the stored value is encoded.
    pub encoding: Encoding,
    /// File mode, if set.
    pub mode: Option<u32>,
}

impl ObjectSpec {
    /// The identity of the OpenBao call this object needs: objects sharing it share one fetch.
    pub fn request_key(&self) -> RequestKey {
        RequestKey {
            path: self.path.clone(),
            method: self.method,
            // serde_json maps are sorted (no preserve_order), so this is canonical.
            args: Value::Object(self.args.clone()).to_string(),
        }
    }
}

/// A distinct (path, method, args) to fetch once per Mount.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestKey {
    /// API path.
    pub path: String,
    /// Method.
    pub method: FetchMethod,
    /// Canonical JSON of the arguments.
    pub args: String,
}

/// The `objects` entry as written in YAML (field names as vault-csi-provider's).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawObject {
    object_name: Option<String>,
    secret_path: Option<String>,
    #[serde(default)]
    secret_key: Option<String>,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    secret_args: Option<Map<String, Value>>,
    #[serde(default)]
    encoding: Option<String>,
    #[serde(default)]
    file_permission: Option<FilePermission>,
}

/// `filePermission` as written: the scalar's text, so `0640` is not read as the number 640.
struct FilePermission(Value);

impl<'de> Deserialize<'de> for FilePermission {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = FilePermission;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an octal file mode like \"0640\"")
            }
            fn visit_str<E>(self, s: &str) -> Result<FilePermission, E> {
                Ok(FilePermission(Value::String(s.to_string())))
            }
            fn visit_u64<E>(self, n: u64) -> Result<FilePermission, E> {
                Ok(FilePermission(Value::from(n)))
            }
            fn visit_i64<E>(self, n: i64) -> Result<FilePermission, E> {
                Ok(FilePermission(Value::from(n)))
            }
        }
        d.deserialize_str(V)
    }
}

fn bad(name: &str, reason: impl Into<String>) -> MountError {
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

    /// The first of `names` that is set and not blank, trimmed.
    fn get(&self, names: &[&str]) -> Option<String> {
        names
            .iter()
            .find_map(|n| self.0.get(*n))
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    }
}

/// Parses a Mount request's `attributes` and `permission`.
pub fn parse(attributes: &str, permission: &str) -> Result<MountParams, MountError> {
    let attrs = Attributes::parse(attributes)?;
    let role = attrs.get(&["roleName"]).ok_or_else(|| {
        bad(
            "roleName",
            "missing: set it to the OpenBao Kubernetes-auth role the pod logs in as",
        )
    })?;
    refuse_unsupported(&attrs)?;
    let address = attrs.get(&["openbaoAddress", "vaultAddress"]);
    if let Some(a) = &address
        && !(a.starts_with("http://") || a.starts_with("https://"))
    {
        return Err(bad(
            "openbaoAddress",
            format!("{a:?} must start with http:// or https://"),
        ));
    }
    let auth_mount = auth_mount(&attrs)?;
    let pod = pod_info(&attrs)?;
    let objects_yaml = attrs.get(&["objects"]).ok_or_else(|| {
        bad(
            "objects",
            "missing: list the secrets to mount (objectName, secretPath, secretKey)",
        )
    })?;
    Ok(MountParams {
        role,
        address,
        auth_mount,
        audience: attrs.get(&["audience"]),
        ca_cert_path: attrs.get(&["openbaoCACertPath", "vaultCACertPath"]),
        namespace: attrs.get(&["openbaoNamespace", "vaultNamespace"]),
        pod,
        objects: cached_objects(&objects_yaml)?,
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
        if attrs.get(&[name]).is_some() {
            return Err(bad(name, format!("not supported by kubebao: {what}")));
        }
    }
    if let Some(skip) = attrs.get(&["vaultSkipTLSVerify", "openbaoSkipTLSVerify"]) {
        match skip.as_str() {
            "false" | "False" | "FALSE" | "0" => {}
            _ => {
                return Err(bad(
                    "vaultSkipTLSVerify",
                    "kubebao never skips TLS verification: give the CA bundle with \
                     openbaoCACertPath (or vaultCACertPath) instead",
                ));
            }
        }
    }
    Ok(())
}

/// The Kubernetes auth mount, without `auth/` and slashes.
fn auth_mount(attrs: &Attributes) -> Result<Option<String>, MountError> {
    let auth_mount = attrs
        .get(&[
            "openbaoAuthMountPath",
            "vaultAuthMountPath",
            "vaultKubernetesMountPath",
        ])
        .map(|m| {
            // vault-csi-provider accepts both "kubernetes" and "auth/kubernetes".
            let m = m.trim_matches('/');
            m.strip_prefix("auth/").unwrap_or(m).to_string()
        });
    if let Some(m) = &auth_mount {
        check_api_path("openbaoAuthMountPath", m)?;
    }
    Ok(auth_mount)
}

/// The pod the driver mounts for, from the attributes it adds.
fn pod_info(attrs: &Attributes) -> Result<PodInfo, MountError> {
    let required = |name: &str| attrs.get(&[name]).ok_or_else(|| missing_pod(name));
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

/// `parse_objects`, remembered per distinct YAML text: every rotation poll of every pod of a
/// SecretProviderClass sends the same text, and YAML parsing is most of a warm Mount's CPU.
fn cached_objects(yaml: &str) -> Result<Vec<ObjectSpec>, MountError> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<Vec<ObjectSpec>>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(hit) = cache.lock().expect("objects cache").get(yaml) {
        return Ok(hit.as_ref().clone());
    }
    let parsed = parse_objects(yaml)?;
    let mut map = cache.lock().expect("objects cache");
    if map.len() >= 512 {
        map.clear();
    }
    map.insert(yaml.to_string(), Arc::new(parsed.clone()));
    Ok(parsed)
}

/// Parses the `objects` YAML list.
pub fn parse_objects(yaml: &str) -> Result<Vec<ObjectSpec>, MountError> {
    let raw: Vec<RawObject> = serde_saphyr::from_str(yaml).map_err(|e| {
        bad(
            "objects",
            format!("not a YAML list of objects (objectName, secretPath, secretKey, method, secretArgs, encoding, filePermission): {e}"),
        )
    })?;
    if raw.is_empty() {
        return Err(bad(
            "objects",
            "the list is empty: name at least one object",
        ));
    }
    let mut names = BTreeSet::new();
    let objects = raw
        .into_iter()
        .enumerate()
        .map(|(i, r)| parse_object(i, r, &mut names))
        .collect::<Result<Vec<_>, _>>()?;
    check_nesting(&names)?;
    Ok(objects)
}

/// One entry of `objects` (the `i`th); its name must not be in `names` yet.
fn parse_object(
    i: usize,
    r: RawObject,
    names: &mut BTreeSet<String>,
) -> Result<ObjectSpec, MountError> {
    let at = |field: &str| format!("objects[{i}].{field}");
    let name = r
        .object_name
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad(&at("objectName"), "missing"))?;
    check_object_name(&name).map_err(|reason| bad(&at("objectName"), reason))?;
    if !names.insert(name.clone()) {
        return Err(bad(
            &at("objectName"),
            format!("{name:?} is used by more than one object; each file needs its own name"),
        ));
    }
    let path = r
        .secret_path
        .map(|s| s.trim().trim_matches('/').to_string())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad(&at("secretPath"), format!("missing for {name:?}")))?;
    check_api_path(&at("secretPath"), &path)?;
    let key = match r.secret_key.as_deref().map(str::trim) {
        None | Some("") => KeySelector::Whole,
        Some("*") => KeySelector::Each,
        Some(k) => KeySelector::One(k.to_string()),
    };
    let method = parse_method(r.method.as_deref()).map_err(|reason| bad(&at("method"), reason))?;
    let encoding =
        parse_encoding(r.encoding.as_deref()).map_err(|reason| bad(&at("encoding"), reason))?;
    let mode = r
        .file_permission
        .map(|v| parse_file_permission(&v.0))
        .transpose()
        .map_err(|reason| bad(&at("filePermission"), reason))?;
    Ok(ObjectSpec {
        name,
        path,
        key,
        method,
        args: r.secret_args.unwrap_or_default(),
        encoding,
        mode,
    })
}

/// `method`: GET (the default), PUT or POST, in any case.
fn parse_method(raw: Option<&str>) -> Result<FetchMethod, String> {
    match raw.map(|m| m.trim().to_ascii_uppercase()).as_deref() {
        None | Some("") | Some("GET") => Ok(FetchMethod::Get),
        Some("PUT") => Ok(FetchMethod::Put),
        Some("POST") => Ok(FetchMethod::Post),
        Some(other) => Err(format!("{other:?} is not one of GET, PUT, POST")),
    }
}

/// `encoding`: utf-8 (the default), base64 or hex, in any case.
fn parse_encoding(raw: Option<&str>) -> Result<Encoding, String> {
    match raw.map(|e| e.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("utf-8") | Some("utf8") => Ok(Encoding::Utf8),
        Some("base64") => Ok(Encoding::Base64),
        Some("hex") => Ok(Encoding::Hex),
        Some(other) => Err(format!("{other:?} is not one of utf-8, base64, hex")),
    }
}

/// "a" and "a/b" cannot both exist: one would be a file and a directory at once.
fn check_nesting(names: &BTreeSet<String>) -> Result<(), MountError> {
    for a in names {
        let prefix = format!("{a}/");
        if let Some(b) = names.range(prefix.clone()..).next()
            && b.starts_with(&prefix)
        {
            return Err(bad(
                "objects",
                format!("objectName {a:?} is both a file and the directory of {b:?}"),
            ));
        }
    }
    Ok(())
}

/// `filePermission`: octal digits as written ("0640", 0640, 640, "0o640"), like chmod.
fn parse_file_permission(v: &Value) -> Result<u32, String> {
    let mode = match v {
        Value::String(s) => {
            let s = s.trim();
            let digits = s.strip_prefix("0o").unwrap_or(s);
            u32::from_str_radix(digits, 8)
                .map_err(|_| format!("{s:?} is not an octal file mode like \"0640\""))?
        }
        Value::Number(n) => {
            let n = n
                .as_u64()
                .ok_or_else(|| format!("{n} is not a file mode"))?;
            if n > 0o777 {
                return Err(format!(
                    "{n} is not a file mode; write it as an octal string like \"0640\""
                ));
            }
            n as u32
        }
        other => return Err(format!("{other} is not a file mode like \"0640\"")),
    };
    if mode > 0o777 {
        return Err(format!("{mode:o} is more than 0777"));
    }
    Ok(mode)
}

/// An objectName becomes a path under the pod's mount: it must stay inside it.
pub fn check_object_name(name: &str) -> Result<(), String> {
    if name.contains('\0') {
        return Err("contains a NUL byte".into());
    }
    if name.starts_with('/') {
        return Err(format!(
            "{name:?} is an absolute path; use a relative file name"
        ));
    }
    if name.len() > 1024 {
        return Err("is longer than 1024 bytes".into());
    }
    for segment in name.split('/') {
        match segment {
            "" => {
                return Err(format!(
                    "{name:?} has an empty path segment (\"//\" or a trailing \"/\")"
                ));
            }
            "." | ".." => {
                return Err(format!(
                    "{name:?} contains {segment:?}; object names must stay inside the mount"
                ));
            }
            s if s.len() > 255 => {
                return Err(format!("a segment of {name:?} is longer than 255 bytes"));
            }
            _ => {}
        }
    }
    Ok(())
}

/// An OpenBao API path from a parameter: no traversal, query or fragment.
fn check_api_path(name: &str, path: &str) -> Result<(), MountError> {
    if path.contains(['?', '#', '\0', '\\']) {
        return Err(bad(
            name,
            format!("{path:?} contains '?', '#', '\\\\' or NUL; give arguments with secretArgs"),
        ));
    }
    if path
        .split('/')
        .any(|s| s == ".." || s == "." || s.is_empty())
    {
        return Err(bad(
            name,
            format!("{path:?} has an empty, \".\" or \"..\" segment"),
        ));
    }
    Ok(())
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
    fn file_permissions_are_octal() {
        let objs = parse_objects(
            "- {objectName: a, secretPath: x/a, filePermission: \"0640\"}\n- {objectName: b, secretPath: x/b, filePermission: 0600}\n- {objectName: c, secretPath: x/c, filePermission: 0o400}\n",
        )
        .unwrap();
        assert_eq!(objs[0].mode, Some(0o640));
        assert_eq!(objs[1].mode, Some(0o600));
        assert_eq!(objs[2].mode, Some(0o400));
        // Written like chmod: digits are octal, quoted or not.
        let plain =
            parse_objects("- {objectName: a, secretPath: x/a, filePermission: 640}").unwrap();
        assert_eq!(plain[0].mode, Some(0o640));
        assert!(parse_objects("- {objectName: a, secretPath: x/a, filePermission: 999}").is_err());
        assert!(parse_objects("- {objectName: a, secretPath: x/a, filePermission: 1777}").is_err());
    }

    #[test]
    fn object_names_must_stay_inside_the_mount() {
        for name in ["../etc/passwd", "/abs", "a//b", "a/", "a/../b", ".", "a\0b"] {
            assert!(check_object_name(name).is_err(), "{name:?} accepted");
        }
        for name in ["a", "dir/file.pem", "..hidden", "a..b"] {
            assert!(check_object_name(name).is_ok(), "{name:?} refused");
        }
    }

    #[test]
    fn duplicate_and_conflicting_names_are_refused() {
        let dup = parse_objects(
            "- {objectName: a, secretPath: x/a}\n- {objectName: a, secretPath: x/b}\n",
        )
        .unwrap_err();
        assert!(dup.to_string().contains("more than one object"), "{dup}");
        let nested = parse_objects(
            "- {objectName: a, secretPath: x/a}\n- {objectName: a/b, secretPath: x/b}\n",
        )
        .unwrap_err();
        assert!(
            nested.to_string().contains("both a file and the directory"),
            "{nested}"
        );
    }

    #[test]
    fn unknown_object_fields_and_bad_values_name_the_field() {
        let e = parse_objects("- {objectName: a, secretPath: x/a, secretKy: p}").unwrap_err();
        assert!(e.to_string().contains("secretKy"), "{e}");
        let e = parse_objects("- {objectName: a, secretPath: x/a, method: DELETE}").unwrap_err();
        assert!(e.to_string().contains("objects[0].method"), "{e}");
        let e = parse_objects("- {objectName: a, secretPath: ../sys/x}").unwrap_err();
        assert!(e.to_string().contains("objects[0].secretPath"), "{e}");
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
}
