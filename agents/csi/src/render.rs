//! Turning an OpenBao response into file contents, and object versions into keyed hashes.

use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{Map, Value};
use sha2::Sha256;

use crate::error::MountError;
use crate::params::{Encoding, KeySelector, ObjectSpec, check_object_name};

/// A file to write, relative to the mount.
pub struct RenderedFile {
    /// Relative path.
    pub path: String,
    /// File mode.
    pub mode: u32,
    /// Contents (secret: never log).
    pub contents: Vec<u8>,
}

/// The key/value data of a response: KV v2's `data.data` (recognised by its shape, `data` +
/// `metadata`), else `data` itself (KV v1, database, PKI, …).
pub fn secret_data(path: &str, data: Map<String, Value>) -> Result<Map<String, Value>, KvDeleted> {
    let is_kv2 = data.len() == 2
        && matches!(data.get("data"), Some(Value::Object(_) | Value::Null))
        && matches!(data.get("metadata"), Some(Value::Object(_)));
    if !is_kv2 {
        return Ok(data);
    }
    let mut data = data;
    match data.remove("data") {
        Some(Value::Object(inner)) => Ok(inner),
        _ => Err(KvDeleted {
            path: path.to_string(),
        }),
    }
}

/// The latest KV v2 version at a path is deleted or destroyed.
pub struct KvDeleted {
    /// API path.
    pub path: String,
}

/// The files one object becomes.
pub fn render(
    obj: &ObjectSpec,
    data: &Map<String, Value>,
    default_mode: u32,
) -> Result<Vec<RenderedFile>, MountError> {
    let mode = obj.mode.unwrap_or(default_mode);
    let bad = |reason: String| MountError::BadValue {
        object: obj.name.clone(),
        reason,
    };
    match &obj.key {
        KeySelector::Whole => {
            // `encoding` needs a key: refused when parsing.
            let contents = serde_json::to_vec(data).map_err(|e| bad(e.to_string()))?;
            Ok(vec![RenderedFile {
                path: obj.name.clone(),
                mode,
                contents,
            }])
        }
        KeySelector::One(key) => {
            let value = lookup(data, key).ok_or_else(|| MountError::KeyNotFound {
                object: obj.name.clone(),
                path: obj.path.clone(),
                key: key.clone(),
                available: data.keys().cloned().collect(),
            })?;
            Ok(vec![RenderedFile {
                path: obj.name.clone(),
                mode,
                contents: contents(value, obj.encoding).map_err(|r| bad(format!("key {key:?}: {r}")))?,
            }])
        }
        KeySelector::Each => data
            .iter()
            .map(|(key, value)| {
                let path = format!("{}/{key}", obj.name);
                if key.contains('/') {
                    return Err(bad(format!(
                        "key {key:?} cannot be a file name (it contains '/'); take it with secretKey instead"
                    )));
                }
                check_object_name(&path)
                    .map_err(|r| bad(format!("key {key:?} cannot be a file name: {r}")))?;
                Ok(RenderedFile {
                    path,
                    mode,
                    contents: contents(value, obj.encoding)
                        .map_err(|r| bad(format!("key {key:?}: {r}")))?,
                })
            })
            .collect(),
    }
}

/// `key` exactly, else a dotted path into nested objects (`tls.crt` → `{"tls":{"crt":…}}`).
fn lookup<'a>(data: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    if let Some(v) = data.get(key) {
        return Some(v);
    }
    let mut parts = key.split('.');
    let mut cur = data.get(parts.next()?)?;
    for p in parts {
        cur = cur.as_object()?.get(p)?;
    }
    Some(cur)
}

/// A value's file contents: strings as they are (decoded for base64/hex), others as JSON.
fn contents(value: &Value, encoding: Encoding) -> Result<Vec<u8>, String> {
    let text = match value {
        Value::String(s) => s,
        other => {
            if encoding != Encoding::Utf8 {
                return Err(format!(
                    "encoding {encoding:?} needs a string value, the key holds {}",
                    kind(other)
                ));
            }
            return serde_json::to_vec(other).map_err(|e| e.to_string());
        }
    };
    match encoding {
        Encoding::Utf8 => Ok(text.as_bytes().to_vec()),
        Encoding::Base64 => {
            let t = text.trim();
            base64::engine::general_purpose::STANDARD
                .decode(t)
                .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(t))
                .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(t))
                .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(t))
                .map_err(|_| "encoding is base64 but the value is not valid base64".to_string())
        }
        Encoding::Hex => hex::decode(text.trim())
            .map_err(|_| "encoding is hex but the value is not valid hex".to_string()),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Object versions: HMAC-SHA256 with an installation key over the object's files, so a
/// version changes exactly when the content does and tells nothing about it to anyone
/// without the key (a plain hash would let a reader of the driver's status confirm a guess).
#[derive(Clone)]
pub struct Versioner {
    key: Vec<u8>,
}

impl Versioner {
    /// With a key (at least 16 bytes).
    pub fn new(key: Vec<u8>) -> Self {
        Self { key }
    }

    /// The version of an object made of `files`.
    pub fn version(&self, object: &str, files: &[RenderedFile]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(object.as_bytes());
        mac.update(&[0]);
        for f in files {
            mac.update(&(f.path.len() as u64).to_be_bytes());
            mac.update(f.path.as_bytes());
            mac.update(&f.mode.to_be_bytes());
            mac.update(&(f.contents.len() as u64).to_be_bytes());
            mac.update(&f.contents);
        }
        // 128 bits: plenty to notice a change, short in the driver's status objects.
        hex::encode(&mac.finalize().into_bytes()[..16])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::parse_objects;
    use serde_json::json;

    fn obj(yaml: &str) -> ObjectSpec {
        parse_objects(yaml).unwrap().remove(0)
    }

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn kv2_responses_are_unwrapped_and_kv1_kept() {
        let kv2 = map(json!({"data": {"password": "p"}, "metadata": {"version": 3}}));
        assert_eq!(
            secret_data("secret/data/x", kv2).ok().unwrap(),
            map(json!({"password": "p"}))
        );
        let kv1 = map(json!({"password": "p", "data": "d"}));
        assert_eq!(secret_data("kv/x", kv1.clone()).ok().unwrap(), kv1);
        let deleted = map(json!({"data": null, "metadata": {"version": 3}}));
        assert!(secret_data("secret/data/x", deleted).is_err());
    }

    #[test]
    fn one_key_whole_data_and_every_key() {
        let data = map(json!({"password": "p@ss", "port": 5432, "tls": {"crt": "C"}}));
        let one = render(
            &obj("- {objectName: a, secretPath: s/x, secretKey: password}"),
            &data,
            0o644,
        )
        .unwrap();
        assert_eq!(one[0].contents, b"p@ss");
        let num = render(
            &obj("- {objectName: a, secretPath: s/x, secretKey: port}"),
            &data,
            0o644,
        )
        .unwrap();
        assert_eq!(num[0].contents, b"5432");
        let nested = render(
            &obj("- {objectName: a, secretPath: s/x, secretKey: tls.crt}"),
            &data,
            0o644,
        )
        .unwrap();
        assert_eq!(nested[0].contents, b"C");
        let whole = render(&obj("- {objectName: a, secretPath: s/x}"), &data, 0o644).unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&whole[0].contents).unwrap(),
            Value::Object(data.clone())
        );
        let each = render(
            &obj("- {objectName: d, secretPath: s/x, secretKey: \"*\", filePermission: \"0600\"}"),
            &data,
            0o644,
        )
        .unwrap();
        let paths: Vec<_> = each.iter().map(|f| (f.path.as_str(), f.mode)).collect();
        assert_eq!(
            paths,
            [("d/password", 0o600), ("d/port", 0o600), ("d/tls", 0o600)]
        );
    }

    #[test]
    fn missing_key_names_the_keys_that_exist_but_no_values() {
        let data = map(json!({"user": "admin", "password": "hunter2"}));
        let err = render(
            &obj("- {objectName: a, secretPath: s/x, secretKey: pasword}"),
            &data,
            0o644,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            err.contains("\"password\"") && err.contains("\"user\""),
            "{err}"
        );
        assert!(
            !err.contains("hunter2") && !err.contains("admin\","),
            "{err}"
        );
    }

    #[test]
    fn base64_and_hex_values_are_decoded() {
        let data = map(json!({"b": "AAEC/w==", "h": "0001ff"}));
        let b = render(
            &obj("- {objectName: a, secretPath: s/x, secretKey: b, encoding: base64}"),
            &data,
            0o644,
        )
        .unwrap();
        assert_eq!(b[0].contents, [0, 1, 2, 255]);
        let h = render(
            &obj("- {objectName: a, secretPath: s/x, secretKey: h, encoding: hex}"),
            &data,
            0o644,
        )
        .unwrap();
        assert_eq!(h[0].contents, [0, 1, 255]);
        let bad = render(
            &obj("- {objectName: a, secretPath: s/x, secretKey: h, encoding: base64}"),
            &map(json!({"h": "%%"})),
            0o644,
        );
        assert!(bad.is_err());
    }

    #[test]
    fn versions_follow_content_and_depend_on_the_key() {
        let v = Versioner::new(vec![7; 32]);
        let f = |c: &[u8]| {
            vec![RenderedFile {
                path: "a".into(),
                mode: 0o644,
                contents: c.to_vec(),
            }]
        };
        assert_eq!(v.version("a", &f(b"x")), v.version("a", &f(b"x")));
        assert_ne!(v.version("a", &f(b"x")), v.version("a", &f(b"y")));
        assert_ne!(
            v.version("a", &f(b"x")),
            Versioner::new(vec![8; 32]).version("a", &f(b"x"))
        );
        assert_eq!(v.version("a", &f(b"x")).len(), 32);
    }
}
