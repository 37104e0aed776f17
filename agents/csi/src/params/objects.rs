//! The `objects` parameter: the YAML list of what to mount, parsed strictly and checked
//! against the Secrets Store CSI driver's own file path rules before anything is fetched.

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};

use serde::Deserialize;
use serde_json::{Map, Value};

use super::bad;
use crate::bounded::BoundedMap;
use crate::error::MountError;

/// Longest `objects` text accepted, in bytes (about 250 objects written out in full).
pub const MAX_OBJECTS_TEXT: usize = 64 * 1024;
/// Most objects in one SecretProviderClass.
pub const MAX_OBJECTS: usize = 256;
/// Longest object name (file path under the mount), in bytes.
pub const MAX_NAME: usize = 1024;
/// Longest segment of an object name: the driver's (and Linux's) file name limit.
pub const MAX_SEGMENT: usize = 255;
/// Distinct `objects` texts whose parse is remembered, and the bytes they may take.
const CACHE_ENTRIES: usize = 256;
const CACHE_BYTES: usize = 8 * 1024 * 1024;

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
    /// The OpenBao call this object needs (computed once).
    pub request: RequestKey,
}

impl ObjectSpec {
    /// The identity of the OpenBao call this object needs: objects sharing it share one fetch.
    pub fn request_key(&self) -> &RequestKey {
        &self.request
    }

    /// Roughly the bytes this object takes in memory (for the parse cache's budget).
    fn weight(&self) -> usize {
        std::mem::size_of::<Self>()
            + 2 * (self.name.len() + self.path.len() + self.request.args.len())
            + match &self.key {
                KeySelector::One(k) => k.len(),
                _ => 0,
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

/// `parse_objects`, remembered per distinct text: every rotation poll of every pod of a
/// SecretProviderClass sends the same text, and YAML parsing is most of a warm Mount's CPU.
/// Texts over `MAX_OBJECTS_TEXT` are refused before they are parsed or kept.
pub(super) fn cached_objects(yaml: &str) -> Result<Arc<Vec<ObjectSpec>>, MountError> {
    check_text_size(yaml)?;
    let cache = cache();
    let key: Arc<str> = Arc::from(yaml);
    if let Some(hit) = cache.get(&key) {
        return Ok(hit);
    }
    let parsed = Arc::new(parse_objects(yaml)?);
    let weight = yaml.len() + parsed.iter().map(ObjectSpec::weight).sum::<usize>();
    cache.insert(key, parsed.clone(), weight);
    Ok(parsed)
}

type Cache = BoundedMap<Arc<str>, Arc<Vec<ObjectSpec>>>;

fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(|| BoundedMap::new(CACHE_ENTRIES, CACHE_BYTES))
}

fn check_text_size(yaml: &str) -> Result<(), MountError> {
    if yaml.len() > MAX_OBJECTS_TEXT {
        return Err(bad(
            "objects",
            format!(
                "the text is {} bytes, more than {MAX_OBJECTS_TEXT}: split the objects over \
                 several SecretProviderClasses (volumes)",
                yaml.len()
            ),
        ));
    }
    Ok(())
}

/// Parses the `objects` YAML list.
pub fn parse_objects(yaml: &str) -> Result<Vec<ObjectSpec>, MountError> {
    check_text_size(yaml)?;
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
    if raw.len() > MAX_OBJECTS {
        return Err(bad(
            "objects",
            format!(
                "{} objects, more than {MAX_OBJECTS}: split them over several SecretProviderClasses (volumes)",
                raw.len()
            ),
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
    if encoding != Encoding::Utf8 && key == KeySelector::Whole {
        return Err(bad(
            &at("encoding"),
            "applies to one key's value, and no secretKey is set (the whole data is written as \
             JSON): set secretKey (or \"*\"), or remove encoding",
        ));
    }
    let mode = r
        .file_permission
        .map(|v| parse_file_permission(&v.0))
        .transpose()
        .map_err(|reason| bad(&at("filePermission"), reason))?;
    let args = r.secret_args.unwrap_or_default();
    let request = RequestKey {
        path: path.clone(),
        method,
        // serde_json maps are sorted (no preserve_order), so this is canonical.
        args: Value::Object(args.clone()).to_string(),
    };
    Ok(ObjectSpec {
        name,
        path,
        key,
        method,
        args,
        encoding,
        mode,
        request,
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

/// "a" and "a/b" cannot both exist: one would be a file and a directory at once (and with
/// `secretKey: "*"`, both objects would write under "a/").
fn check_nesting(names: &BTreeSet<String>) -> Result<(), MountError> {
    for a in names {
        let prefix = format!("{a}/");
        if let Some(b) = names.range(prefix.clone()..).next()
            && b.starts_with(&prefix)
        {
            return Err(bad(
                "objects",
                format!(
                    "objectName {a:?} is both a file and the directory of {b:?}; two objects \
                     cannot write under one path"
                ),
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

/// An objectName becomes a path under the pod's mount. Refused here is everything the
/// Secrets Store CSI driver would refuse when writing it (its `fileutil.Validate`: empty,
/// absolute, a `..` segment, a first segment starting with `..`, which its atomic writer
/// reserves, a segment over 255 bytes, a path `filepath.Clean` would change), so the error
/// comes before any OpenBao call and says what to write instead.
pub fn check_object_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".into());
    }
    if name.contains('\0') {
        return Err("contains a NUL byte".into());
    }
    if name.starts_with('/') {
        return Err(format!(
            "{name:?} is an absolute path; use a relative file name"
        ));
    }
    if name.len() > MAX_NAME {
        return Err(format!("is longer than {MAX_NAME} bytes"));
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
            s if s.len() > MAX_SEGMENT => {
                return Err(format!(
                    "a segment of {name:?} is longer than {MAX_SEGMENT} bytes"
                ));
            }
            _ => {}
        }
    }
    if name.starts_with("..") {
        return Err(format!(
            "{name:?} starts with \"..\", which the driver reserves for its own files \
             (..data); rename it"
        ));
    }
    Ok(())
}

/// An OpenBao API path from a parameter: no traversal, query or fragment.
pub(super) fn check_api_path(name: &str, path: &str) -> Result<(), MountError> {
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
        for name in ["a", "dir/file.pem", "dir/..hidden", "a..b", ".hidden"] {
            assert!(check_object_name(name).is_ok(), "{name:?} refused");
        }
    }

    /// The driver's `validatePath` + `filepath.Clean` rules, each with the name it refuses.
    #[test]
    fn every_name_the_driver_refuses_is_refused_with_a_reason() {
        let long_segment = "s".repeat(256);
        let long_name = ["d"; 600].join("/");
        let cases = [
            ("", "is empty"),
            ("/etc/passwd", "absolute path"),
            ("../x", "must stay inside the mount"),
            ("a/../../x", "must stay inside the mount"),
            ("..", "must stay inside the mount"),
            ("..data", "reserves"),
            ("..2024_01_01/x", "reserves"),
            ("a/./b", "must stay inside the mount"),
            ("./a", "must stay inside the mount"),
            ("a//b", "empty path segment"),
            ("a/", "empty path segment"),
            (long_segment.as_str(), "longer than 255"),
            (long_name.as_str(), "longer than 1024"),
        ];
        for (name, why) in cases {
            let err = check_object_name(name).expect_err(name);
            assert!(err.contains(why), "{name:?}: {err}");
        }
        // At the limits: accepted.
        assert!(check_object_name(&"s".repeat(255)).is_ok());
        assert!(check_object_name(&["d"; 512].join("/")[..1023]).is_ok());
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
        // Two objects writing one file: a "*" object's files and a named object inside it.
        let same_file = parse_objects(
            "- {objectName: d, secretPath: x/a, secretKey: \"*\"}\n- {objectName: d/password, secretPath: x/b, secretKey: password}\n",
        )
        .unwrap_err();
        assert!(
            same_file
                .to_string()
                .contains("cannot write under one path"),
            "{same_file}"
        );
        // Names differing only by surrounding blanks are one file.
        let blanks = parse_objects(
            "- {objectName: \"a \", secretPath: x/a}\n- {objectName: a, secretPath: x/b}\n",
        )
        .unwrap_err();
        assert!(
            blanks.to_string().contains("more than one object"),
            "{blanks}"
        );
    }

    #[test]
    fn a_field_given_twice_in_one_object_is_refused() {
        let e = parse_objects("- {objectName: a, objectName: b, secretPath: x/a}").unwrap_err();
        assert!(e.to_string().contains("objects"), "{e}");
    }

    #[test]
    fn encoding_without_a_key_is_refused_before_any_read() {
        let e = parse_objects("- {objectName: a, secretPath: x/a, encoding: base64}").unwrap_err();
        assert!(e.to_string().contains("objects[0].encoding"), "{e}");
        assert!(e.to_string().contains("set secretKey"), "{e}");
        assert!(
            parse_objects("- {objectName: a, secretPath: x/a, secretKey: k, encoding: hex}")
                .is_ok()
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
    fn text_size_and_object_count_are_capped() {
        let one = |i: usize| format!("- {{objectName: o{i}, secretPath: x/a}}\n");
        let at_cap: String = (0..MAX_OBJECTS).map(one).collect();
        assert_eq!(parse_objects(&at_cap).unwrap().len(), MAX_OBJECTS);
        let over: String = (0..=MAX_OBJECTS).map(one).collect();
        let e = parse_objects(&over).unwrap_err().to_string();
        assert!(e.contains("more than 256"), "{e}");
        let padded = format!("{}#{}\n", one(0), "x".repeat(MAX_OBJECTS_TEXT));
        let e = cached_objects(&padded).unwrap_err().to_string();
        assert!(e.contains("bytes, more than 65536"), "{e}");
    }

    #[test]
    fn distinct_texts_keep_the_parse_cache_within_its_budget() {
        // Each text near the size cap, all different: about 230 KiB each once parsed, so the
        // byte budget binds long before the entry cap (the e2e test measures the process).
        let filler = "y".repeat(200);
        for i in 0..100 {
            let text: String = (0..250)
                .map(|j| format!("- {{objectName: o{j}, secretPath: x/{filler}/{i}}}\n"))
                .collect();
            assert!(text.len() <= MAX_OBJECTS_TEXT);
            cached_objects(&text).unwrap();
            assert!(cache().weight() <= CACHE_BYTES, "{}", cache().weight());
            assert!(cache().len() <= CACHE_ENTRIES);
        }
        assert!(
            cache().weight() > CACHE_BYTES / 2,
            "the budget is used, not bypassed"
        );
    }

    #[test]
    fn objects_sharing_a_call_share_one_request_key() {
        let objs = parse_objects(
            "- {objectName: a, secretPath: pki/issue/web, method: post, secretArgs: {common_name: w, ttl: 1h}}\n- {objectName: b, secretPath: /pki/issue/web/, method: POST, secretArgs: {ttl: 1h, common_name: w}}\n",
        )
        .unwrap();
        assert_eq!(objs[0].request_key(), objs[1].request_key());
        assert_eq!(objs[0].args["ttl"], json!("1h"));
    }
}
