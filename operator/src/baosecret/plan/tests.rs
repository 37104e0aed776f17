//! The sync plan, without a cluster or OpenBao.

use std::time::{Duration, Instant};

use serde_json::json;

use super::sources::locate;
use super::*;
use crate::api::baosecret::KeyMapping;

const SECOND: Duration = Duration::from_secs(1);
const HOUR: Duration = Duration::from_secs(3600);
const METADATA: &str = "secret/metadata/team/app";

/// What the `secretPath` form read, at KV version `version`.
fn read_at(version: Option<u64>) -> Vec<SourceStatus> {
    vec![SourceStatus {
        name: "secret".into(),
        path: "secret/data/team/app".into(),
        version,
    }]
}

fn baosecret(policy: &str, generation: i64) -> BaoSecret {
    serde_json::from_value(json!({
        "apiVersion": "kubebao.io/v1alpha1", "kind": "BaoSecret",
        "metadata": {"name": "app", "namespace": "team", "uid": "uid-1", "generation": generation},
        "spec": {
            "secretPath": "secret/data/team/app",
            "target": {"name": "app-secret", "creationPolicy": policy}
        }
    }))
    .unwrap()
}

/// The BaoSecret as a restarted operator sees it: synced before, status written.
fn with_status(mut bs: BaoSecret, hash: &str, kv_version: u64) -> BaoSecret {
    bs.status = Some(crate::api::BaoSecretStatus {
        data_hash: Some(hash.into()),
        kv_version: Some(kv_version),
        observed_generation: bs.metadata.generation,
        ..Default::default()
    });
    bs
}

/// The check made at `at` for generation 1: hash `h1`, KV version 3, Secret at rv `10`.
fn check(at: Instant) -> Check {
    Check {
        at,
        uid: "uid-1".into(),
        generation: Some(1),
        hash: "h1".into(),
        sources: read_at(Some(3)),
        metadata_denied: false,
        secret_rv: Some("10".into()),
    }
}

fn unchanged_target() -> Target {
    Target::Unchanged {
        rv: Some("10".into()),
    }
}

fn found(owner: Option<&str>, hash: &str) -> Target {
    Target::Found {
        owner: owner.map(str::to_string),
        owned_by: vec![],
        merge_from: vec![],
        type_: Some("Opaque".into()),
        hash: hash.into(),
        rv: Some("11".into()),
    }
}

/// A Secret someone else created, allowing `merge_from` to merge into it, of type `type_`.
fn foreign(merge_from: &[&str], type_: &str) -> Target {
    Target::Found {
        owner: None,
        owned_by: vec![],
        merge_from: merge_from.iter().map(|s| s.to_string()).collect(),
        type_: Some(type_.into()),
        hash: "x".into(),
        rv: Some("11".into()),
    }
}

fn decide(bs: &BaoSecret, last: Option<&Check>, target: &Target, now: Instant) -> (Decision, Plan) {
    let spec = sync_spec(&bs.spec, "team").unwrap();
    plan(bs, last, target, &spec, now, &|_| false).unwrap()
}

fn reason(result: Result<(Decision, Plan), Outcome>) -> (bool, String) {
    let outcome = result.unwrap_err();
    let stalled = matches!(outcome, Outcome::Stalled { .. });
    (stalled, outcome.reason().to_string())
}

#[test]
fn an_intact_secret_within_the_refresh_interval_needs_no_openbao_request() {
    let t0 = Instant::now();
    let last = check(t0);
    let bs = baosecret("Owner", 1);
    let (decision, _) = decide(&bs, Some(&last), &unchanged_target(), t0 + 10 * 60 * SECOND);
    assert_eq!(
        decision,
        Decision::UpToDate(Synced {
            sources: read_at(Some(3)),
            hash: "h1".into(),
            wrote: false,
            checked: false,
            next: 50 * 60 * SECOND,
        })
    );
}

#[test]
fn an_intact_secret_past_the_refresh_checks_metadata_first() {
    let t0 = Instant::now();
    let last = check(t0);
    let bs = baosecret("Owner", 1);
    let later = t0 + HOUR + SECOND;
    let (decision, mut plan) = decide(&bs, Some(&last), &unchanged_target(), later);
    assert_eq!(
        decision,
        Decision::CheckMetadata {
            paths: vec![METADATA.into()]
        }
    );
    // Same version: done with this one request, remembered as checked now.
    let synced = plan
        .clone()
        .after_metadata(&[Metadata::Version(Some(3))])
        .unwrap();
    assert_eq!(
        (
            synced.hash.as_str(),
            synced.wrote,
            synced.checked,
            synced.next
        ),
        ("h1", false, true, HOUR)
    );
    assert_eq!(synced.sources, read_at(Some(3)));
    let remembered = plan.check(&synced, later);
    assert_eq!(
        (remembered.at, remembered.secret_rv.as_deref()),
        (later, Some("10"))
    );
    // A new version: read the data; new data is written and restarts workloads.
    assert!(!plan.current(0, Metadata::Version(Some(4))));
    assert_eq!(plan.after_metadata(&[Metadata::Version(Some(4))]), None);
    assert_eq!(
        plan.write_plan("h2"),
        WritePlan {
            write: true,
            restart: true
        }
    );
}

#[test]
fn a_restarted_operator_checks_metadata_first_when_the_secret_matches_the_status() {
    let bs = with_status(baosecret("Owner", 1), "h1", 3);
    let (decision, plan) = decide(&bs, None, &found(Some("app"), "h1"), Instant::now());
    assert_eq!(
        decision,
        Decision::CheckMetadata {
            paths: vec![METADATA.into()]
        }
    );
    assert_eq!(
        (plan.known[0].version, plan.secret_rv.as_deref()),
        (Some(3), Some("11"))
    );
    let (decision, _) = decide(&bs, None, &found(Some("app"), "edited"), Instant::now());
    assert_eq!(decision, Decision::ReadData);
}

#[test]
fn a_changed_generation_reads_data() {
    let t0 = Instant::now();
    let bs = baosecret("Owner", 2);
    let (decision, plan) = decide(&bs, Some(&check(t0)), &unchanged_target(), t0);
    assert_eq!(decision, Decision::ReadData);
    // The spec changed (keys, labels, type…): written even when the data is the same.
    assert_eq!(
        plan.write_plan("h1"),
        WritePlan {
            write: true,
            restart: false
        }
    );
    let synced = Synced {
        sources: read_at(Some(3)),
        hash: "h1".into(),
        wrote: true,
        checked: true,
        next: HOUR,
    };
    assert_eq!(plan.check(&synced, t0).generation, Some(2));
}

#[test]
fn an_edited_secret_is_rewritten_even_when_openbao_data_is_unchanged() {
    let t0 = Instant::now();
    let bs = baosecret("Owner", 1);
    let (decision, plan) = decide(&bs, Some(&check(t0)), &found(Some("app"), "edited"), t0);
    assert_eq!(decision, Decision::ReadData);
    assert_eq!(
        plan.write_plan("h1"),
        WritePlan {
            write: true,
            restart: false
        }
    );
    // A deleted Secret too.
    let (decision, plan) = decide(&bs, Some(&check(t0)), &Target::Missing, t0);
    assert_eq!(decision, Decision::ReadData);
    assert_eq!(
        plan.write_plan("h1"),
        WritePlan {
            write: true,
            restart: false
        }
    );
}

#[test]
fn a_secret_not_owned_by_this_baosecret_is_refused_unless_merge() {
    let spec = sync_spec(&baosecret("Owner", 1).spec, "team").unwrap();
    let now = Instant::now();
    for owner in [None, Some("other")] {
        for policy in ["Owner", "Orphan"] {
            let bs = baosecret(policy, 1);
            let result = plan(&bs, None, &found(owner, "x"), &spec, now, &|_| false);
            assert_eq!(
                reason(result),
                (true, "TargetExists".into()),
                "{policy} {owner:?}"
            );
        }
    }
    let merge = baosecret("Merge", 1);
    let result = plan(&merge, None, &Target::Missing, &spec, now, &|_| false);
    assert_eq!(reason(result), (false, "TargetNotFound".into()));
    // Unchanged since we wrote it: not read, so not refused.
    assert!(plan(&merge, None, &unchanged_target(), &spec, now, &|_| false).is_ok());
}

/// A Secret of this BaoSecret whose label someone removed (a user, a GitOps tool).
fn unlabelled(owned_by: &str, hash: &str) -> Target {
    Target::Found {
        owner: None,
        owned_by: vec![owned_by.into()],
        merge_from: vec![],
        type_: Some("Opaque".into()),
        hash: hash.into(),
        rv: Some("11".into()),
    }
}

#[test]
fn a_secret_without_its_label_is_still_ours_by_its_owner_reference_and_relabelled() {
    let t0 = Instant::now();
    let bs = baosecret("Owner", 1);
    // Same data as last written, but no label: written again, which restores the label.
    let (decision, relabel) = decide(&bs, Some(&check(t0)), &unlabelled("uid-1", "h1"), t0);
    assert_eq!(decision, Decision::ReadData);
    assert!(relabel.write_plan("h1").write);
    // Labelled and intact: nothing to do.
    let (decision, _) = decide(&bs, Some(&check(t0)), &found(Some("app"), "h1"), t0);
    assert!(matches!(decision, Decision::UpToDate(_)), "{decision:?}");
    // An ownerReference to another object (another BaoSecret's uid): refused as before.
    let spec = sync_spec(&bs.spec, "team").unwrap();
    for policy in ["Owner", "Orphan"] {
        let bs = baosecret(policy, 1);
        let result = plan(&bs, None, &unlabelled("uid-2", "h1"), &spec, t0, &|_| false);
        assert_eq!(reason(result), (true, "TargetExists".into()), "{policy}");
    }
    // The owner reference is read from the Secret: BaoSecrets' only.
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "app-secret", "ownerReferences": [
            {"apiVersion": "kubebao.io/v1alpha1", "kind": "BaoSecret", "name": "app", "uid": "uid-1"},
            {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": "uid-9"}
        ]}
    }))
    .unwrap();
    let Target::Found {
        owner, owned_by, ..
    } = Target::read(Some(&secret), b"k")
    else {
        panic!("found")
    };
    assert_eq!((owner, owned_by), (None, vec!["uid-1".to_string()]));
}

#[test]
fn data_larger_than_a_secret_holds_is_refused_for_good_naming_its_size() {
    let fits: BTreeMap<String, Vec<u8>> =
        [("k".to_string(), vec![b'x'; MAX_SECRET_BYTES - 1])].into();
    assert_eq!(check_size("app-secret", &fits), Ok(()));
    let big: BTreeMap<String, Vec<u8>> = [("k".to_string(), vec![b'x'; MAX_SECRET_BYTES])].into();
    let failure = check_size("app-secret", &big).unwrap_err();
    assert!(failure.permanent);
    assert!(matches!(failure.outcome, Outcome::Stalled { .. }));
    assert_eq!(failure.outcome.reason(), "SecretTooLarge");
    let message = failure.outcome.message();
    assert!(
        message.starts_with("the data for Secret app-secret is 1048577 bytes")
            && message.contains("at most 1048576 bytes"),
        "{message}"
    );
    // Anything else that fails is retried with backoff.
    let retried = Failure::from(failed(true, "PermissionDenied", "no"));
    assert!(!retried.permanent);
}

#[test]
fn merge_needs_the_secrets_own_opt_in() {
    let spec = sync_spec(&baosecret("Merge", 1).spec, "team").unwrap();
    let now = Instant::now();
    let merge = baosecret("Merge", 1);
    // No annotation, or one naming another BaoSecret: refused, whoever labelled it.
    for target in [
        found(None, "x"),
        found(Some("app"), "x"),
        foreign(&["other"], "Opaque"),
    ] {
        let result = plan(&merge, None, &target, &spec, now, &|_| false);
        assert_eq!(reason(result.clone()), (true, "MergeNotAllowed".into()));
        let message = result.unwrap_err().message().to_string();
        assert!(
            message.contains("kubectl annotate secret app-secret kubebao.io/allow-merge-from=app"),
            "{message}"
        );
    }
    // The Secret names this BaoSecret (alone or in a list): merged.
    for allowed in [&["app"][..], &["other", "app"][..]] {
        let (decision, _) = decide(&merge, None, &foreign(allowed, "Opaque"), now);
        assert_eq!(decision, Decision::ReadData);
    }
    let read = Target::read(
        Some(
            &serde_json::from_value(json!({
                "metadata": {"name": "s", "annotations": {MERGE_ANNOTATION: "other, app"}},
                "type": "kubernetes.io/tls"
            }))
            .unwrap(),
        ),
        b"k",
    );
    assert!(matches!(&read, Target::Found { merge_from, type_, .. }
            if merge_from == &["other", "app"] && type_.as_deref() == Some("kubernetes.io/tls")));
}

#[test]
fn secret_types_kubernetes_acts_on_are_never_targets() {
    let now = Instant::now();
    for forbidden in crate::api::checks::FORBIDDEN_TARGET_TYPES {
        // Declared as the target type: refused before anything is read.
        let mut bs = baosecret("Owner", 1);
        bs.spec.target.type_ = Some(forbidden.into());
        let e = sync_spec(&bs.spec, "team").unwrap_err();
        assert_eq!(e.reason(), "ForbiddenTargetType");
        assert!(
            e.message().starts_with("spec.target.type "),
            "{}",
            e.message()
        );
        // An existing Secret of that type, even one that opts in to a merge.
        let merge = baosecret("Merge", 1);
        let spec = sync_spec(&merge.spec, "team").unwrap();
        let result = plan(
            &merge,
            None,
            &foreign(&["app"], forbidden),
            &spec,
            now,
            &|_| false,
        );
        assert_eq!(reason(result), (true, "ForbiddenTargetType".into()));
    }
}

#[test]
fn unchanged_data_is_not_written() {
    let t0 = Instant::now();
    let bs = baosecret("Owner", 1);
    let (_, plan) = decide(&bs, Some(&check(t0)), &unchanged_target(), t0 + 2 * HOUR);
    assert_eq!(
        plan.write_plan("h1"),
        WritePlan {
            write: false,
            restart: false
        }
    );
}

#[test]
fn restart_only_when_the_hash_changed_from_a_known_one() {
    // A new BaoSecret: the first write restarts nothing.
    let bs = baosecret("Owner", 1);
    let (_, plan) = decide(&bs, None, &Target::Missing, Instant::now());
    assert_eq!(plan.known_hash, None);
    assert_eq!(
        plan.write_plan("h1"),
        WritePlan {
            write: true,
            restart: false
        }
    );
    // Known from the status after a restart of the operator.
    let bs = with_status(baosecret("Owner", 1), "h1", 3);
    let (_, plan) = decide(&bs, None, &found(Some("app"), "h1"), Instant::now());
    assert!(!plan.write_plan("h1").restart);
    assert!(plan.write_plan("h2").restart);
}

#[test]
fn metadata_denied_reads_data_directly_from_then_on() {
    let t0 = Instant::now();
    let bs = baosecret("Owner", 1);
    let later = t0 + 2 * HOUR;
    let (decision, mut plan) = decide(&bs, Some(&check(t0)), &unchanged_target(), later);
    assert_eq!(
        decision,
        Decision::CheckMetadata {
            paths: vec![METADATA.into()]
        }
    );
    assert_eq!(plan.after_metadata(&[Metadata::Denied]), None);
    let synced = Synced {
        sources: read_at(Some(3)),
        hash: "h1".into(),
        wrote: false,
        checked: true,
        next: HOUR,
    };
    let remembered = plan.check(&synced, later);
    assert!(remembered.metadata_denied);
    let (decision, plan) = decide(
        &bs,
        Some(&remembered),
        &unchanged_target(),
        later + 2 * HOUR,
    );
    assert_eq!(decision, Decision::ReadData);
    assert!(plan.check(&synced, later).metadata_denied);
    // Within the refresh interval it still costs nothing.
    let (decision, _) = decide(&bs, Some(&remembered), &unchanged_target(), later + SECOND);
    assert!(matches!(decision, Decision::UpToDate(_)));
}

#[test]
fn kv_v1_has_no_metadata_and_reads_data() {
    let t0 = Instant::now();
    let mut bs = baosecret("Owner", 1);
    bs.spec.secret_path = "kv1/team/app".into();
    let (decision, _) = decide(&bs, Some(&check(t0)), &unchanged_target(), t0 + 2 * HOUR);
    assert_eq!(decision, Decision::ReadData);
}

#[test]
fn a_written_secret_is_remembered_by_its_new_resource_version() {
    let bs = baosecret("Owner", 1);
    let (_, mut plan) = decide(&bs, None, &Target::Missing, Instant::now());
    plan.secret_rv = Some("12".into());
    let synced = Synced {
        sources: read_at(Some(1)),
        hash: "h1".into(),
        wrote: true,
        checked: true,
        next: HOUR,
    };
    let remembered = plan.check(&synced, Instant::now());
    assert_eq!(remembered.secret_rv.as_deref(), Some("12"));
    assert!(unchanged(Some(&remembered), Some("12")));
    assert!(!unchanged(Some(&remembered), Some("13")));
    assert!(!unchanged(Some(&remembered), None));
    assert!(!unchanged(None, Some("12")));
}

#[test]
fn spec_errors_say_what_to_fix() {
    let mut bs = baosecret("Owner", 1);
    assert_eq!(sync_spec(&bs.spec, "team").unwrap().refresh, HOUR);
    bs.spec.refresh_interval = Some("90s".into());
    assert_eq!(sync_spec(&bs.spec, "team").unwrap().refresh, 90 * SECOND);
    bs.spec.refresh_interval = Some("1d".into());
    assert_eq!(sync_spec(&bs.spec, "team").unwrap().refresh, 24 * HOUR);
    // Too short, beyond any sane range (once overflowed and panicked), not a duration.
    for bad in ["500ms", "99999999999999999999h", "soon"] {
        bs.spec.refresh_interval = Some(bad.into());
        let e = sync_spec(&bs.spec, "team").unwrap_err();
        assert_eq!(e.reason(), "InvalidSpec");
        assert!(
            e.message().contains("refreshInterval") && e.message().contains("between 1s and"),
            "{}",
            e.message()
        );
    }
    bs.spec.refresh_interval = None;
    bs.spec.target.namespace = Some("other".into());
    let e = sync_spec(&bs.spec, "team").unwrap_err();
    assert_eq!(e.reason(), "CrossNamespaceTarget");
    bs.spec.target.namespace = Some("team".into());
    bs.spec.secret_path = "kv/app".into();
    bs.spec.kv_version = Some(2);
    assert_eq!(
        sync_spec(&bs.spec, "team").unwrap_err().reason(),
        "InvalidSpec"
    );
}

#[test]
fn a_read_secret_is_hashed_over_the_keys_it_says_we_manage() {
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {
            "name": "app-secret", "resourceVersion": "7",
            "labels": {LABEL: "app"},
            "annotations": {KEYS_ANNOTATION: "password"}
        },
        "data": {"password": "aHVudGVyMg==", "extra": "eA=="}
    }))
    .unwrap();
    let managed = [("password".to_string(), b"hunter2".to_vec())].into();
    assert_eq!(
        Target::read(Some(&secret), b"k"),
        Target::Found {
            owner: Some("app".into()),
            owned_by: vec![],
            merge_from: vec![],
            type_: None,
            hash: data_hash(b"k", &managed),
            rv: Some("7".into()),
        }
    );
    let mut edited = secret.clone();
    edited.data.as_mut().unwrap().remove("password");
    let Target::Found { hash, .. } = Target::read(Some(&edited), b"k") else {
        panic!("found")
    };
    assert_ne!(hash, data_hash(b"k", &managed));
    assert_eq!(Target::read(None, b"k"), Target::Missing);
}

#[test]
fn hash_is_keyed_and_reveals_nothing() {
    let data: BTreeMap<String, Vec<u8>> = [("password".to_string(), b"hunter2".to_vec())].into();
    let a = data_hash(b"key-a", &data);
    assert_ne!(a, data_hash(b"key-b", &data));
    assert!(!a.contains("hunter2"));
    assert_eq!(a, data_hash(b"key-a", &data));
}

mod properties;
mod sources;
