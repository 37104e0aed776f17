//! The Secret's data from what the sources hold: copied key by key (merged; picked and renamed
//! with `keys`) or rendered from `template`. Messages name keys and sources, never values.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::plan::{Failure, MAX_SECRET_BYTES, failed, rejected};
use super::template::{self, TemplateError};
use crate::api::baosecret::{BaoSecretSpec, KeyMapping};

/// What one source held when read: its name and its KV data (secret values: never log them).
pub type Read = (String, Map<String, Value>);

/// The Secret's data for `spec` from `read` (every source, in the spec's order).
pub fn secret_data(
    spec: &BaoSecretSpec,
    read: &[Read],
) -> Result<BTreeMap<String, Vec<u8>>, Failure> {
    match &spec.template {
        Some(t) => {
            let context = read.iter().cloned().collect();
            template::render(&t.data, &context, MAX_SECRET_BYTES).map_err(|e| match e {
                TemplateError::Failed(m) => failed(true, "TemplateError", m).into(),
                TemplateError::TooLarge(m) => rejected("SecretTooLarge", m),
            })
        }
        None => copy_keys(read, spec.keys.as_deref()).map_err(Failure::from),
    }
}

/// A KV value as Secret bytes: strings as they are, anything else as its JSON text.
fn bytes(v: &Value) -> Vec<u8> {
    match v {
        Value::String(s) => s.clone().into_bytes(),
        other => other.to_string().into_bytes(),
    }
}

/// Copies the sources' keys: all of them (a key in two sources is a `KeyConflict`), or those
/// `keys` names, renamed (a key in none is `KeyNotFound`).
pub fn copy_keys(
    read: &[Read],
    keys: Option<&[KeyMapping]>,
) -> Result<BTreeMap<String, Vec<u8>>, crate::conditions::Outcome> {
    let Some(keys) = keys else {
        return merge_all(read);
    };
    let mut out = BTreeMap::new();
    for (i, m) in keys.iter().enumerate() {
        let (_, data) = source_of(read, i, m)?;
        let value = &data[&m.from];
        out.insert(m.to.clone().unwrap_or_else(|| m.from.clone()), bytes(value));
    }
    Ok(out)
}

/// Every key of every source, refusing a key two sources hold.
fn merge_all(read: &[Read]) -> Result<BTreeMap<String, Vec<u8>>, crate::conditions::Outcome> {
    let mut out = BTreeMap::new();
    let mut from: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, data) in read {
        for (key, value) in data {
            if let Some(first) = from.insert(key, name) {
                return Err(failed(
                    true,
                    "KeyConflict",
                    format!(
                        "key {key:?} is in sources {first:?} and {name:?}; copy each under its own name with spec.keys (e.g. {{source: {name}, from: {key}, to: {name}_{key}}}), or build the Secret with spec.template"
                    ),
                ));
            }
            out.insert(key.clone(), bytes(value));
        }
    }
    Ok(out)
}

/// The source mapping `keys[i]` (`m`) takes its key from: the one it names, else the one
/// source that has the key.
fn source_of<'a>(
    read: &'a [Read],
    i: usize,
    m: &KeyMapping,
) -> Result<&'a Read, crate::conditions::Outcome> {
    let from = &m.from;
    let not_found = |what: String| failed(true, "KeyNotFound", what);
    if let Some(name) = &m.source {
        let source = read.iter().find(|(n, _)| n == name).ok_or_else(|| {
            not_found(format!(
                "spec.keys[{i}].source {name:?} is not one of the sources {:?}",
                names(read)
            ))
        })?;
        if !source.1.contains_key(from) {
            return Err(not_found(format!(
                "key {from:?} is not in source {name:?}; it has {:?}",
                keys_of(&source.1)
            )));
        }
        return Ok(source);
    }
    let holding: Vec<&Read> = read.iter().filter(|(_, d)| d.contains_key(from)).collect();
    match holding[..] {
        [one] => Ok(one),
        [] if read.len() == 1 => Err(not_found(format!(
            "key {from:?} is not in the OpenBao secret; it has {:?}",
            keys_of(&read[0].1)
        ))),
        [] => Err(not_found(format!(
            "key {from:?} is in none of the sources; they have {}",
            read.iter()
                .map(|(n, d)| format!("{n}: {:?}", keys_of(d)))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
        [first, second, ..] => Err(failed(
            true,
            "KeyConflict",
            format!(
                "spec.keys[{i}]: key {from:?} is in sources {:?} and {:?}; name one with spec.keys[{i}].source, or build the Secret with spec.template",
                first.0, second.0
            ),
        )),
    }
}

/// The sources' names.
fn names(read: &[Read]) -> Vec<&str> {
    read.iter().map(|(n, _)| n.as_str()).collect()
}

/// The keys of `data`, sorted (names only).
fn keys_of(data: &Map<String, Value>) -> Vec<&String> {
    let mut keys: Vec<&String> = data.keys().collect();
    keys.sort();
    keys
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn read(sources: serde_json::Value) -> Vec<Read> {
        sources
            .as_object()
            .unwrap()
            .iter()
            .map(|(n, d)| (n.clone(), d.as_object().unwrap().clone()))
            .collect()
    }

    fn map(source: Option<&str>, from: &str, to: Option<&str>) -> KeyMapping {
        KeyMapping {
            source: source.map(str::to_string),
            from: from.into(),
            to: to.map(str::to_string),
        }
    }

    #[test]
    fn selects_and_renames_keys() {
        let one = read(json!({"secret": {"user": "u", "pass": "p", "n": 3}}));
        let out = copy_keys(&one, Some(&[map(None, "pass", Some("password"))])).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out["password"], b"p");
        let err = copy_keys(&one, Some(&[map(None, "nope", None)])).unwrap_err();
        assert_eq!(err.reason(), "KeyNotFound");
        assert!(
            err.message().contains("\"n\", \"pass\", \"user\""),
            "{}",
            err.message()
        );
        assert_eq!(copy_keys(&one, None).unwrap()["n"], b"3");
    }

    #[test]
    fn sources_merge_and_a_key_in_two_is_a_conflict_naming_both() {
        let two = read(json!({"db": {"user": "u", "password": "s3cret"}, "cache": {"url": "r"}}));
        let out = copy_keys(&two, None).unwrap();
        assert_eq!(out.keys().collect::<Vec<_>>(), ["password", "url", "user"]);
        let clash = read(json!({"db": {"password": "s3cret"}, "cache": {"password": "other"}}));
        let e = copy_keys(&clash, None).unwrap_err();
        assert_eq!(e.reason(), "KeyConflict");
        let m = e.message();
        assert!(
            m.contains("key \"password\" is in sources \"cache\" and \"db\"")
                || m.contains("key \"password\" is in sources \"db\" and \"cache\""),
            "{m}"
        );
        assert!(
            m.contains("spec.keys") && m.contains("spec.template"),
            "{m}"
        );
        assert!(!m.contains("s3cret") && !m.contains("other"), "{m}");
        // Named by source, both can be copied.
        let keys = [
            map(Some("db"), "password", Some("db_password")),
            map(Some("cache"), "password", Some("cache_password")),
        ];
        let out = copy_keys(&clash, Some(&keys)).unwrap();
        assert_eq!(out["db_password"], b"s3cret");
        assert_eq!(out["cache_password"], b"other");
        // Not named: which one is meant is unclear.
        let e = copy_keys(&clash, Some(&[map(None, "password", None)])).unwrap_err();
        assert_eq!(e.reason(), "KeyConflict");
        assert!(
            e.message().contains("spec.keys[0].source"),
            "{}",
            e.message()
        );
        let e = copy_keys(&clash, Some(&[map(Some("nope"), "password", None)])).unwrap_err();
        assert_eq!(e.reason(), "KeyNotFound");
        let e = copy_keys(&clash, Some(&[map(None, "user", None)])).unwrap_err();
        assert!(
            e.message().contains("in none of the sources"),
            "{}",
            e.message()
        );
    }
}
