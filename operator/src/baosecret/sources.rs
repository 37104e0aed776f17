//! What a BaoSecret reads: its `secretPath`, or its named `sources` (KV secrets, engine calls,
//! certificates), checked and located. Both forms become one list, so the rest of the sync
//! knows one shape.

use std::collections::HashSet;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::{Map, Value, json};
use sha2::Sha256;

use crate::api::baosecret::{
    BaoSecretSpec, CertificateSource, EngineMethod, EngineSource, MAX_ALT_NAMES, MAX_ENGINE_ARGS,
    MAX_ENGINE_ARGS_TEXT, SecretSource,
};
use crate::api::checks;
use crate::openbao_path::{self, Shape};
use crate::tenant::TenantIdentity;
use kubebao_openbao::duration::{self, Bounds};

/// The name the data of `secretPath` has in templates and in `status.sources`.
pub const SINGLE: &str = "secret";
/// Most sources one BaoSecret reads (each costs a request per refresh).
pub const MAX_SOURCES: usize = 16;

/// One source, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Source {
    /// Its name ([`SINGLE`] for `secretPath`).
    pub name: String,
    /// What is read.
    pub kind: Kind,
}

/// What a source reads.
#[derive(Clone, Debug, PartialEq)]
pub enum Kind {
    /// A KV secret.
    Kv(KvLocation),
    /// A secrets engine call (its answer may hold a lease).
    Engine(EngineRequest),
    /// A PKI certificate.
    Certificate(CertificateRequest),
}

impl Source {
    /// The OpenBao API path read (KV data path, engine path, issue path).
    pub fn path(&self) -> &str {
        match &self.kind {
            Kind::Kv(kv) => &kv.data_path,
            Kind::Engine(e) => &e.path,
            Kind::Certificate(c) => &c.path,
        }
    }

    /// Where its KV data is, for a KV source.
    #[cfg(test)]
    pub fn kv(&self) -> Option<&KvLocation> {
        match &self.kind {
            Kind::Kv(kv) => Some(kv),
            _ => None,
        }
    }
}

/// Where a KV secret path points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvLocation {
    /// 1 or 2.
    pub version: u8,
    /// API path of the data.
    pub data_path: String,
    /// API path of the KV v2 metadata.
    pub metadata_path: Option<String>,
}

/// A secrets engine call, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineRequest {
    /// API path.
    pub path: String,
    /// HTTP method.
    pub method: EngineMethod,
    /// Arguments (query for GET, JSON body otherwise).
    pub args: Map<String, Value>,
}

/// A certificate request, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateRequest {
    /// API path of the issue endpoint.
    pub path: String,
    /// Common name.
    pub common_name: String,
    /// Subject alternative names.
    pub alt_names: Vec<String>,
    /// Requested lifetime, as written (None: the role's TTL).
    pub ttl: Option<String>,
}

/// Lifetime of a certificate: at least 10 s, at most ten years.
const CERTIFICATE_TTL: Bounds =
    Bounds::new(Duration::from_secs(10), Duration::from_secs(87600 * 3600));

/// HMAC (keyed with `key`, the operator's hash key) of who asks and what `source` asks for,
/// recorded with issued credentials: a change of either issues new ones.
pub fn request_hash(key: &[u8], who: &TenantIdentity, source: &Source) -> String {
    let what = match &source.kind {
        Kind::Kv(kv) => json!({"kv": kv.data_path}),
        Kind::Engine(e) => {
            json!({"engine": e.path, "method": format!("{:?}", e.method), "args": e.args})
        }
        Kind::Certificate(c) => json!({
            "certificate": c.path, "commonName": c.common_name,
            "altNames": c.alt_names, "ttl": c.ttl,
        }),
    };
    let text = json!({
        "who": [who.namespace, who.service_account, who.role, who.mount, who.audience, who.openbao_namespace],
        "what": what,
    })
    .to_string();
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(text.as_bytes());
    format!("hmac-sha256:{}", hex::encode(mac.finalize().into_bytes()))
}

/// The sources `spec` reads: exactly one of `secretPath` and `sources`, each path checked
/// (see `openbao_path`), names unique. The message names the field.
pub fn sources(spec: &BaoSecretSpec) -> Result<Vec<Source>, String> {
    match (spec.secret_path.as_str(), &spec.sources) {
        ("", None) => {
            Err("spec.secretPath is not set: set exactly one of secretPath or sources".to_string())
        }
        ("", Some(list)) => listed(list, spec.kv_version),
        (path, None) => Ok(vec![Source {
            name: SINGLE.into(),
            kind: Kind::Kv(locate("spec.secretPath", path, spec.kv_version)?),
        }]),
        (_, Some(_)) => Err(
            "spec.secretPath and spec.sources are both set: set exactly one of them".to_string(),
        ),
    }
}

/// `spec.sources`, checked.
fn listed(list: &[SecretSource], kv_version: Option<u8>) -> Result<Vec<Source>, String> {
    if kv_version.is_some() {
        return Err(
            "spec.kvVersion belongs to spec.secretPath; with spec.sources, set kvVersion in each source"
                .into(),
        );
    }
    if list.is_empty() || list.len() > MAX_SOURCES {
        return Err(format!(
            "spec.sources holds {} sources: give between 1 and {MAX_SOURCES}",
            list.len()
        ));
    }
    let mut seen = HashSet::new();
    let mut sources = Vec::with_capacity(list.len());
    for (i, s) in list.iter().enumerate() {
        let field = format!("spec.sources[{i}]");
        checks::source_name(&format!("{field}.name"), &s.name)?;
        if !seen.insert(s.name.as_str()) {
            return Err(format!(
                "{field}.name {:?} is the name of an earlier source: each source needs its own name",
                s.name
            ));
        }
        sources.push(Source {
            name: s.name.clone(),
            kind: kind(&field, s)?,
        });
    }
    Ok(sources)
}

/// What source `s` (the spec field `field`) reads: exactly one of its kinds, checked.
fn kind(field: &str, s: &SecretSource) -> Result<Kind, String> {
    if s.kv_version.is_some() && s.secret_path.is_none() {
        return Err(format!("{field}.kvVersion belongs to secretPath"));
    }
    match (&s.secret_path, &s.engine, &s.certificate) {
        (Some(path), None, None) => Ok(Kind::Kv(locate(
            &format!("{field}.secretPath"),
            path,
            s.kv_version,
        )?)),
        (None, Some(e), None) => Ok(Kind::Engine(engine(&format!("{field}.engine"), e)?)),
        (None, None, Some(c)) => Ok(Kind::Certificate(certificate(
            &format!("{field}.certificate"),
            c,
        )?)),
        _ => Err(format!(
            "{field} needs secretPath (a KV secret), engine (a secrets engine call) or certificate (a PKI certificate): exactly one of them"
        )),
    }
}

/// An API path of at least two segments (a mount and more), checked like every OpenBao path.
fn api_path(field: &str, path: &str) -> Result<(), String> {
    openbao_path::check(field, path, Shape::Path).map_err(|e| e.to_string())?;
    if !path.contains('/') {
        return Err(format!(
            "{field} {path:?} names a mount only: write the API path below it (e.g. database/creds/app)"
        ));
    }
    Ok(())
}

/// An engine call: its path, and arguments that are bounded (and scalars for GET, which sends
/// them as query parameters).
fn engine(field: &str, e: &EngineSource) -> Result<EngineRequest, String> {
    api_path(&format!("{field}.path"), &e.path)?;
    let args = e.args.clone().unwrap_or_default();
    let text = Value::Object(args.clone()).to_string().len();
    if args.len() > MAX_ENGINE_ARGS || text > MAX_ENGINE_ARGS_TEXT {
        return Err(format!(
            "{field}.args holds {} arguments in {text} bytes: give at most {MAX_ENGINE_ARGS} in {MAX_ENGINE_ARGS_TEXT} bytes",
            args.len()
        ));
    }
    if e.method == EngineMethod::Get
        && let Some((k, _)) = args
            .iter()
            .find(|(_, v)| matches!(v, Value::Object(_) | Value::Array(_) | Value::Null))
    {
        return Err(format!(
            "{field}.args.{k} is not a string, number or boolean: GET sends arguments as query parameters; use method PUT or POST for structured arguments"
        ));
    }
    Ok(EngineRequest {
        path: e.path.clone(),
        method: e.method,
        args,
    })
}

/// A certificate request: an issue path, names a certificate can hold, a bounded TTL.
fn certificate(field: &str, c: &CertificateSource) -> Result<CertificateRequest, String> {
    let path_field = format!("{field}.path");
    api_path(&path_field, &c.path)?;
    let segments: Vec<&str> = c.path.split('/').collect();
    if segments.len() < 3 || segments[segments.len() - 2] != "issue" {
        return Err(format!(
            "{path_field} {:?} is not a PKI issue path: write <mount>/issue/<role>",
            c.path
        ));
    }
    certificate_name(&format!("{field}.commonName"), &c.common_name)?;
    let alt_names = c.alt_names.clone().unwrap_or_default();
    if alt_names.len() > MAX_ALT_NAMES {
        return Err(format!(
            "{field}.altNames holds {} names: at most {MAX_ALT_NAMES}",
            alt_names.len()
        ));
    }
    for (i, name) in alt_names.iter().enumerate() {
        certificate_name(&format!("{field}.altNames[{i}]"), name)?;
    }
    if let Some(ttl) = &c.ttl {
        duration::parse(ttl, CERTIFICATE_TTL).map_err(|e| format!("{field}.ttl: {e}"))?;
    }
    Ok(CertificateRequest {
        path: c.path.clone(),
        common_name: c.common_name.clone(),
        alt_names,
        ttl: c.ttl.clone(),
    })
}

/// A name a certificate holds: a DNS name (`*` wildcards) or an e-mail address.
fn certificate_name(field: &str, name: &str) -> Result<(), String> {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '*');
    let ok = !name.is_empty()
        && name.len() <= checks::MAX_KUBE_NAME
        && edge(name.chars().next())
        && name
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.*@".contains(c));
    if ok {
        return Ok(());
    }
    Err(format!(
        "{field} {:?} is not a DNS name or e-mail address: letters, digits, - _ . * @, at most {} characters",
        name.chars().take(64).collect::<String>(),
        checks::MAX_KUBE_NAME
    ))
}

/// Checks the KV secret path `secret_path` (the spec field `field`; see `openbao_path`) and
/// splits it into data and metadata API paths.
pub fn locate(field: &str, secret_path: &str, version: Option<u8>) -> Result<KvLocation, String> {
    openbao_path::check(field, secret_path, Shape::Path).map_err(|e| e.to_string())?;
    let path = secret_path;
    if !path.contains('/') {
        return Err(format!(
            "{field} {secret_path:?} names a mount only: write <mount>/data/<path> (KV v2) or <mount>/<path> (KV v1)"
        ));
    }
    let v2_split = path.split_once("/data/");
    match (version, v2_split) {
        (None | Some(2), Some((mount, rest))) if !rest.is_empty() => Ok(KvLocation {
            version: 2,
            data_path: path.to_string(),
            metadata_path: Some(format!("{mount}/metadata/{rest}")),
        }),
        (Some(2), _) => Err(format!(
            "{field} {secret_path:?} is not a KV v2 API path: write it as <mount>/data/<path>"
        )),
        _ => Ok(KvLocation {
            version: 1,
            data_path: path.to_string(),
            metadata_path: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn spec(fields: serde_json::Value) -> BaoSecretSpec {
        let mut spec = json!({"target": {"name": "app"}});
        spec.as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        serde_json::from_value(spec).unwrap()
    }

    #[test]
    fn secret_path_is_one_source_named_secret() {
        let found = sources(&spec(json!({"secretPath": "secret/data/app"}))).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].name, SINGLE);
        assert_eq!(
            found[0].kv().unwrap().metadata_path.as_deref(),
            Some("secret/metadata/app")
        );
    }

    #[test]
    fn named_sources_keep_their_order_and_versions() {
        let found = sources(&spec(json!({"sources": [
            {"name": "db", "secretPath": "secret/data/db"},
            {"name": "legacy", "secretPath": "kv1/app", "kvVersion": 1}
        ]})))
        .unwrap();
        let names: Vec<_> = found
            .iter()
            .map(|s| (s.name.as_str(), s.kv().unwrap().version))
            .collect();
        assert_eq!(names, [("db", 2), ("legacy", 1)]);
    }

    #[test]
    fn each_refusal_names_the_field() {
        let cases = [
            (json!({}), "spec.secretPath is not set"),
            (
                json!({"secretPath": "secret/data/a", "sources": [{"name": "a", "secretPath": "secret/data/a"}]}),
                "both set",
            ),
            (json!({"sources": []}), "spec.sources holds 0 sources"),
            (
                json!({"sources": [{"name": "a", "secretPath": "secret/data/a"}], "kvVersion": 2}),
                "spec.kvVersion belongs to spec.secretPath",
            ),
            (
                json!({"sources": [{"name": "Db", "secretPath": "secret/data/a"}]}),
                "spec.sources[0].name \"Db\"",
            ),
            (
                json!({"sources": [{"name": "a", "secretPath": "secret/data/a"}, {"name": "a", "secretPath": "secret/data/b"}]}),
                "spec.sources[1].name \"a\" is the name of an earlier source",
            ),
            (
                json!({"sources": [{"name": "a"}]}),
                "spec.sources[0] needs secretPath (a KV secret), engine",
            ),
            (
                json!({"sources": [{"name": "a", "secretPath": "secret/data/a", "engine": {"path": "database/creds/a"}}]}),
                "spec.sources[0] needs secretPath (a KV secret), engine",
            ),
            (
                json!({"sources": [{"name": "a", "engine": {"path": "database/creds/a"}, "kvVersion": 2}]}),
                "spec.sources[0].kvVersion belongs to secretPath",
            ),
            (
                json!({"sources": [{"name": "a", "engine": {"path": "database/../sys/x"}}]}),
                "spec.sources[0].engine.path \"database/../sys/x\" has a \"..\" segment",
            ),
            (
                json!({"sources": [{"name": "a", "engine": {"path": "database"}}]}),
                "spec.sources[0].engine.path \"database\" names a mount only",
            ),
            (
                json!({"sources": [{"name": "a", "engine": {"path": "aws/creds/x", "args": {"x": {"y": 1}}}}]}),
                "spec.sources[0].engine.args.x is not a string",
            ),
            (
                json!({"sources": [{"name": "a", "certificate": {"path": "pki/sign/web", "commonName": "a.example.com"}}]}),
                "spec.sources[0].certificate.path \"pki/sign/web\" is not a PKI issue path",
            ),
            (
                json!({"sources": [{"name": "a", "certificate": {"path": "pki/issue/web", "commonName": "a b"}}]}),
                "spec.sources[0].certificate.commonName \"a b\"",
            ),
            (
                json!({"sources": [{"name": "a", "certificate": {"path": "pki/issue/web", "commonName": "a.example.com", "altNames": ["ok.example.com", "-bad"]}}]}),
                "spec.sources[0].certificate.altNames[1]",
            ),
            (
                json!({"sources": [{"name": "a", "certificate": {"path": "pki/issue/web", "commonName": "a.example.com", "ttl": "1s"}}]}),
                "spec.sources[0].certificate.ttl",
            ),
            (
                json!({"sources": [{"name": "a", "secretPath": "secret/data/../x"}]}),
                "spec.sources[0].secretPath \"secret/data/../x\" has a \"..\" segment",
            ),
        ];
        for (fields, expected) in cases {
            let e = sources(&spec(fields.clone())).unwrap_err();
            assert!(e.contains(expected), "{fields}: {e}");
        }
        let many: Vec<_> = (0..17)
            .map(|i| json!({"name": format!("s{i}"), "secretPath": "secret/data/a"}))
            .collect();
        let e = sources(&spec(json!({ "sources": many }))).unwrap_err();
        assert!(e.contains("between 1 and 16"), "{e}");
    }

    #[test]
    fn engine_and_certificate_sources_are_siblings_of_kv_ones() {
        let found = sources(&spec(json!({"sources": [
            {"name": "db", "engine": {"path": "database/creds/app"}},
            {"name": "tls", "certificate": {"path": "pki/issuer/x/issue/web", "commonName": "*.example.com", "altNames": ["a@example.com"], "ttl": "24h"}},
            {"name": "kv", "secretPath": "secret/data/a"}
        ]})))
        .unwrap();
        assert!(
            matches!(&found[0].kind, Kind::Engine(e) if e.method == EngineMethod::Get && e.args.is_empty())
        );
        assert!(matches!(&found[1].kind, Kind::Certificate(c) if c.alt_names.len() == 1));
        assert_eq!(found[1].path(), "pki/issuer/x/issue/web");
        assert!(found[2].kv().is_some() && found[0].kv().is_none());
    }

    #[test]
    fn the_request_hash_changes_with_who_asks_and_what() {
        let who = TenantIdentity {
            namespace: "team".into(),
            service_account: "default".into(),
            role: "team".into(),
            mount: "kubernetes".into(),
            audience: "openbao".into(),
            openbao_namespace: None,
        };
        let found = sources(&spec(json!({"sources": [
            {"name": "a", "engine": {"path": "database/creds/app"}},
            {"name": "b", "engine": {"path": "database/creds/app", "args": {"x": 1}}},
            {"name": "c", "engine": {"path": "database/creds/app", "method": "POST"}}
        ]})))
        .unwrap();
        let hash = |who: &TenantIdentity, s: &Source| request_hash(b"k", who, s);
        let base = hash(&who, &found[0]);
        assert_eq!(base, hash(&who, &found[0]));
        assert_ne!(base, hash(&who, &found[1]), "args");
        assert_ne!(base, hash(&who, &found[2]), "method");
        let other = TenantIdentity {
            service_account: "app".into(),
            ..who.clone()
        };
        assert_ne!(base, hash(&other, &found[0]), "who");
        assert_ne!(base, request_hash(b"other key", &who, &found[0]));
    }

    #[test]
    fn locates_kv_v2_and_v1_paths() {
        let v2 = locate("f", "secret/data/myapp", None).unwrap();
        assert_eq!(v2.version, 2);
        assert_eq!(v2.metadata_path.as_deref(), Some("secret/metadata/myapp"));
        let v1 = locate("f", "kv1/app/db", None).unwrap();
        assert_eq!((v1.version, v1.metadata_path), (1, None));
        assert!(locate("f", "kv/app", Some(2)).is_err());
    }
}
