//! Whatever a spec holds (schema-valid or written around the API server), planning never
//! panics, and a refused value is refused with a message naming its field.

use proptest::prelude::*;

use super::*;
use crate::api::baosecret::{SecretSource, SecretTemplate};

/// Text that mixes valid path and duration characters with every kind of trouble.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9./_+@=-]{0,40}",
        "[0-9.hmsd]{0,30}",
        "\\PC{0,30}",
        Just("secret/data/../../sys/policies/acl/x".to_string()),
        Just("99999999999999999999h".to_string()),
        Just("kubernetes.io/service-account-token".to_string()),
        Just("{{ db.password }}".to_string()),
        Just("{% for %}".to_string()),
    ]
}

/// Sets one spec field (by its name in the schema) to `value`.
fn set(spec: &mut BaoSecretSpec, field: &str, value: String) {
    match field {
        "secretPath" => spec.secret_path = value,
        "refreshInterval" => spec.refresh_interval = Some(value),
        "role" => spec.role = Some(value),
        "authMount" => spec.auth_mount = Some(value),
        "serviceAccountName" => spec.service_account_name = Some(value),
        "target.name" => spec.target.name = value,
        "target.type" => spec.target.type_ = Some(value),
        "target.namespace" => spec.target.namespace = Some(value),
        "openbaoNamespace" => spec.openbao_namespace = Some(value),
        "sources.name" | "sources.secretPath" => {
            let (name, path) = match field {
                "sources.name" => (value, "secret/data/a".to_string()),
                _ => ("db".to_string(), value),
            };
            spec.secret_path = String::new();
            spec.kv_version = None;
            spec.sources = Some(vec![SecretSource {
                name,
                secret_path: Some(path),
                kv_version: None,
                engine: None,
                certificate: None,
            }]);
        }
        "template" => {
            spec.template = Some(SecretTemplate {
                data: [("k".to_string(), value)].into(),
            })
        }
        "keys" => {
            spec.keys = Some(vec![KeyMapping {
                source: None,
                from: "k".into(),
                to: Some(value),
            }])
        }
        _ => unreachable!("{field}"),
    }
}

/// The field a refusal of `field` names.
fn named(field: &str) -> &str {
    match field {
        "keys" => "spec.keys[0].to",
        "sources.name" => "spec.sources[0].name",
        "sources.secretPath" => "spec.sources[0].secretPath",
        "template" => "spec.template.data[\"k\"]",
        other => other,
    }
}

const FIELDS: [&str; 13] = [
    "secretPath",
    "refreshInterval",
    "role",
    "authMount",
    "serviceAccountName",
    "target.name",
    "target.type",
    "target.namespace",
    "keys",
    "openbaoNamespace",
    "sources.name",
    "sources.secretPath",
    "template",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn a_refused_field_is_named_and_nothing_panics(
        field in proptest::sample::select(&FIELDS[..]),
        value in text(),
        policy in proptest::sample::select(&["Owner", "Merge", "Orphan"][..]),
        version in proptest::option::of(0u8..4),
    ) {
        let mut bs = baosecret(policy, 1);
        bs.spec.kv_version = version.filter(|v| (1..=2).contains(v));
        set(&mut bs.spec, field, value);
        match sync_spec(&bs.spec, "team") {
            Ok(spec) => {
                // Accepted: the paths built from it stay inside the named one.
                let location = spec.sources[0].kv().expect("a KV source");
                for path in [Some(&location.data_path), location.metadata_path.as_ref()].into_iter().flatten() {
                    prop_assert!(path.split('/').all(|s| !s.is_empty() && s != "." && s != ".."), "{}", path);
                }
                prop_assert!(spec.refresh >= SECOND);
                for target in [Target::Missing, found(Some("app"), "h"), unchanged_target()] {
                    let _ = plan(&bs, None, &target, &spec, Instant::now(), &|_| false);
                }
            }
            Err(outcome) => {
                let stalled = matches!(outcome, Outcome::Stalled { .. });
                prop_assert!(stalled, "{:?}", outcome);
                prop_assert!(outcome.message().contains(named(field)), "{field}: {}", outcome.message());
            }
        }
    }

    #[test]
    fn locate_never_panics_and_never_leaves_the_named_path(path in text(), version in proptest::option::of(1u8..=2)) {
        match locate("spec.secretPath", &path, version) {
            Ok(at) => {
                prop_assert!(at.data_path == path);
                prop_assert!(!path.split('/').any(|s| s == ".." || s == "."));
            }
            Err(e) => prop_assert!(e.starts_with("spec.secretPath "), "{}", e),
        }
    }
}
