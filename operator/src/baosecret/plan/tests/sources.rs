//! Plans for BaoSecrets with several sources, templates and an OpenBao namespace.

use super::*;

/// A BaoSecret reading `sources` (name, secretPath) with extra spec `fields`.
fn with_sources(sources: &[(&str, &str)], fields: serde_json::Value) -> BaoSecret {
    let mut bs = baosecret("Owner", 1);
    let mut spec = serde_json::to_value(&bs.spec).unwrap();
    spec.as_object_mut().unwrap().remove("secretPath");
    spec["sources"] = sources
        .iter()
        .map(|(name, path)| json!({"name": name, "secretPath": path}))
        .collect();
    for (k, v) in fields.as_object().unwrap() {
        spec[k] = v.clone();
    }
    bs.spec = serde_json::from_value(spec).unwrap();
    bs
}

/// What two KV v2 sources `db` and `cache` read, at versions `db` and `cache`.
fn two_read(db: u64, cache: u64) -> Vec<SourceStatus> {
    let at = |name: &str, version| SourceStatus {
        name: name.into(),
        path: format!("secret/data/team/{name}"),
        version: Some(version),
    };
    vec![at("db", db), at("cache", cache)]
}

#[test]
fn several_kv_v2_sources_cost_one_metadata_request_each_and_data_only_on_a_new_version() {
    let bs = with_sources(
        &[
            ("db", "secret/data/team/db"),
            ("cache", "secret/data/team/cache"),
        ],
        json!({}),
    );
    let t0 = Instant::now();
    let last = Check {
        sources: two_read(3, 7),
        ..check(t0)
    };
    let later = t0 + 2 * HOUR;
    let (decision, mut plan) = decide(&bs, Some(&last), &unchanged_target(), later);
    assert_eq!(
        decision,
        Decision::CheckMetadata {
            paths: vec![
                "secret/metadata/team/db".into(),
                "secret/metadata/team/cache".into()
            ]
        }
    );
    let same = [Metadata::Version(Some(3)), Metadata::Version(Some(7))];
    let synced = plan.clone().after_metadata(&same).unwrap();
    assert_eq!((synced.sources, synced.wrote), (two_read(3, 7), false));
    // The second source moved: the data is read. The first moved: the second is not asked.
    assert!(plan.current(0, same[0]) && !plan.current(1, Metadata::Version(Some(8))));
    assert_eq!(
        plan.clone()
            .after_metadata(&[same[0], Metadata::Version(Some(8))]),
        None
    );
    assert!(!plan.current(0, Metadata::Version(Some(4))));
    assert_eq!(plan.after_metadata(&[Metadata::Version(Some(4))]), None);
    // A restarted operator knows the versions from status.sources.
    let mut restarted = bs.clone();
    restarted.status = Some(crate::api::BaoSecretStatus {
        data_hash: Some("h1".into()),
        sources: two_read(3, 7),
        observed_generation: Some(1),
        ..Default::default()
    });
    let (decision, plan) = decide(&restarted, None, &found(Some("app"), "h1"), later);
    assert!(matches!(decision, Decision::CheckMetadata { .. }));
    assert_eq!(plan.known, two_read(3, 7));
    // A KV v1 source has no metadata: the data is read.
    let mixed = with_sources(
        &[("db", "secret/data/team/db"), ("legacy", "kv1/team/app")],
        json!({}),
    );
    let (decision, _) = decide(&mixed, Some(&last), &unchanged_target(), later);
    assert_eq!(decision, Decision::ReadData);
}

#[test]
fn sources_keys_templates_and_namespaces_are_checked_before_any_read() {
    let both = with_sources(
        &[("db", "secret/data/team/db")],
        json!({"keys": [{"from": "a"}], "template": {"data": {"k": "x"}}}),
    );
    let cases = [
        (
            both,
            "InvalidSpec",
            "spec.keys and spec.template are both set",
        ),
        (
            with_sources(
                &[("db", "secret/data/team/db")],
                json!({"keys": [{"from": "a", "source": "cache"}]}),
            ),
            "InvalidSpec",
            "spec.keys[0].source \"cache\" is not one of the sources [\"db\"]",
        ),
        (
            with_sources(
                &[("db", "secret/data/team/db")],
                json!({"template": {"data": {"dsn": "a\n{{ db.user }"}}}),
            ),
            "TemplateError",
            "spec.template.data[\"dsn\"] line 2: syntax error",
        ),
        (
            with_sources(
                &[("db", "secret/data/team/db")],
                json!({"template": {"data": {"../x": "{{ db.user }}"}}}),
            ),
            "InvalidSpec",
            "spec.template.data key \"../x\"",
        ),
        (
            with_sources(
                &[("db", "secret/data/team/db")],
                json!({"openbaoNamespace": "team-a/../root"}),
            ),
            "InvalidSpec",
            "spec.openbaoNamespace \"team-a/../root\" has a \"..\" segment",
        ),
        (
            with_sources(
                &[("db", "secret/data/team/db"), ("db", "secret/data/x")],
                json!({}),
            ),
            "InvalidSpec",
            "spec.sources[1].name \"db\" is the name of an earlier source",
        ),
    ];
    for (bs, reason, message) in cases {
        let e = sync_spec(&bs.spec, "team").unwrap_err();
        assert!(matches!(e, Outcome::Stalled { .. }), "{e:?}");
        assert_eq!(e.reason(), reason, "{}", e.message());
        assert!(e.message().contains(message), "{}", e.message());
    }
    let fine = with_sources(
        &[("db", "secret/data/team/db")],
        json!({"openbaoNamespace": "org/team-a", "keys": [{"from": "a", "source": "db"}]}),
    );
    assert_eq!(sync_spec(&fine.spec, "team").unwrap().sources.len(), 1);
}
