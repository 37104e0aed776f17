//! Rewriting every Secret — after a key rotation, so none stays under an old key_id, or off KMS,
//! so none stays KMS-encrypted. kube-apiserver rewrites a Secret on an update when its stored
//! form is not what its first provider writes, so a no-op update is enough. Runs in
//! rate-limited batches across reconciles; the cursor (`status.rewrite`) survives restarts.
//!
//! The cursor is a Secret key (`namespace/name`), not an index: each batch lists the Secrets
//! afresh and takes the next ones after the last one done, in key order, so Secrets created or
//! deleted meanwhile never shift it. Every Secret that existed at the start is reached unless it
//! is deleted first; one created later sorts anywhere, but kube-apiserver wrote it with the
//! configuration the rewrite is for (so Secrets written since the start are skipped, by
//! resourceVersion, and a busy namespace cannot keep the rewrite chasing its tail). Failures are
//! remembered and retried; the rewrite is complete only when none is left.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, PostParams};

use crate::installation::controller::{Ctx, Error};
use crate::installation::types::{
    KubeBaoInstallationSpec, KubeBaoInstallationStatus, RewriteStatus,
};
use crate::installation::unix;

/// Failed Secrets remembered for a retry; more failures than this mean another full pass.
const MAX_RETRY: usize = 100;
/// How long to wait before retrying Secrets whose rewrite failed.
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// What the rotation rewrite should do now.
#[derive(Debug, PartialEq, Eq)]
enum Due {
    /// Nothing: no rotation yet, or every Secret is rewritten under the current key_id.
    Nothing,
    /// Wait this long first (the KMS plugins need time to see the new key).
    Wait(Duration),
    /// Rewrite a batch; `resume` when the status holds progress for the current key_id.
    Now { key_id: String, resume: bool },
}

/// Whether a rewrite after a rotation is due at `now` (unix seconds).
fn due(spec: &KubeBaoInstallationSpec, status: &KubeBaoInstallationStatus, now: i64) -> Due {
    let Some(key_id) = status.key_id.clone() else {
        return Due::Nothing;
    };
    let rotated = status.key_version.unwrap_or(1) > 1;
    let resume = status.rewrite.as_ref().is_some_and(|r| r.key_id == key_id);
    if !rotated || (resume && status.rewrite.as_ref().is_some_and(|r| r.complete)) {
        return Due::Nothing;
    }
    let since = status.key_id_since.as_deref().and_then(unix).unwrap_or(0);
    let wait = since + spec.kms.rewrite_delay_seconds as i64 - now;
    if wait > 0 {
        return Due::Wait(Duration::from_secs(wait as u64));
    }
    Due::Now { key_id, resume }
}

/// One batch of the rewrite after a rotation. Returns when to come back.
pub async fn step(
    ctx: &Ctx,
    spec: &KubeBaoInstallationSpec,
    status: &mut KubeBaoInstallationStatus,
) -> Result<Option<Duration>, Error> {
    let (key_id, resume) = match due(spec, status, Timestamp::now().as_second()) {
        Due::Nothing => return Ok(None),
        Due::Wait(d) => return Ok(Some(d)),
        Due::Now { key_id, resume } => (key_id, resume),
    };
    let mut r = match (resume, status.rewrite.take()) {
        (true, Some(r)) => r,
        _ => start(&key_id),
    };
    let next = batch(ctx, spec.kms.rewrite_per_second, &mut r).await;
    status.rewrite = Some(r);
    next
}

/// A new rewrite towards `key_id` (`identity` when migrating off KMS).
pub fn start(key_id: &str) -> RewriteStatus {
    RewriteStatus {
        key_id: key_id.into(),
        ..Default::default()
    }
}

/// One batch of rewrite `r`: about five seconds' worth of no-op updates at `per_second`.
/// Returns when to come back, or None once `r` is complete.
pub async fn batch(
    ctx: &Ctx,
    per_second: u32,
    r: &mut RewriteStatus,
) -> Result<Option<Duration>, Error> {
    if r.complete {
        return Ok(None);
    }
    let (keys, version) = secret_keys(ctx).await?;
    if r.start_resource_version.is_none() {
        r.start_resource_version = version;
        r.total = keys.len() as u64;
    }
    let since = r.start_resource_version.as_deref();
    let keys: Vec<String> = keys
        .into_iter()
        .filter(|(_, v)| !written_since(v.as_deref(), since))
        .map(|(k, _)| k)
        .collect();
    let rate = per_second.max(1);
    let pause = Duration::from_millis(1000 / rate as u64);
    let (keys, retrying) = match next_work(r, &keys, rate as usize * 5) {
        Work::Complete => {
            r.complete = true;
            return Ok(None);
        }
        Work::Pass(keys) => (keys, false),
        Work::Retry(keys) => (keys, true),
    };
    for key in keys {
        let ok = rewrite_one(ctx, &key).await;
        record(r, key, ok, retrying);
        tokio::time::sleep(pause).await;
    }
    r.total = r.total.max(r.done);
    Ok(Some(if retrying && r.failed > 0 {
        RETRY_AFTER
    } else {
        Duration::from_millis(10)
    }))
}

/// What one batch does.
#[derive(Debug, PartialEq, Eq)]
enum Work {
    /// Rewrite these Secrets: the next ones after the cursor, in key order.
    Pass(Vec<String>),
    /// The pass is over: retry these Secrets whose rewrite failed.
    Retry(Vec<String>),
    /// Every Secret is done.
    Complete,
}

/// The next batch of at most `n` Secrets for `r`, given every Secret key there is now (in any
/// order).
fn next_work(r: &mut RewriteStatus, keys: &[String], n: usize) -> Work {
    let mut pass: Vec<&String> = keys
        .iter()
        .filter(|k| r.after.as_ref().is_none_or(|after| *k > after))
        .collect();
    pass.sort();
    if !pass.is_empty() {
        return Work::Pass(pass.into_iter().take(n).cloned().collect());
    }
    if !r.retry.is_empty() {
        return Work::Retry(r.retry.iter().take(n).cloned().collect());
    }
    if r.failed > 0 {
        // More failures than remembered: go round once more (an update of a Secret already
        // rewritten writes nothing).
        r.after = None;
        r.failed = 0;
        return match keys.is_empty() {
            true => Work::Complete,
            false => next_work(r, keys, n),
        };
    }
    Work::Complete
}

/// Records the outcome of rewriting `key` (`ok`: rewritten or gone) in `r`.
fn record(r: &mut RewriteStatus, key: String, ok: bool, retrying: bool) {
    if retrying {
        r.retry.retain(|k| *k != key);
        if ok {
            r.done += 1;
            r.failed = r.failed.saturating_sub(1);
        } else {
            r.retry.push(key); // to the back, so one stubborn Secret does not block the others
        }
        return;
    }
    r.after = Some(key.clone());
    if ok {
        r.done += 1;
    } else {
        r.failed += 1;
        if r.retry.len() < MAX_RETRY {
            r.retry.push(key);
        }
    }
}

/// True when an object at resourceVersion `version` was written after a list at `since`.
/// resourceVersions are etcd revisions in practice; anything else counts as not written since
/// (rewritten again, which is harmless).
fn written_since(version: Option<&str>, since: Option<&str>) -> bool {
    let number = |v: Option<&str>| v.and_then(|v| v.parse::<u64>().ok());
    matches!((number(version), number(since)), (Some(v), Some(s)) if v > s)
}

/// Every Secret in the cluster as (`namespace/name`, resourceVersion), listed in pages, and
/// the list's resourceVersion.
async fn secret_keys(
    ctx: &Ctx,
) -> Result<(Vec<(String, Option<String>)>, Option<String>), kube::Error> {
    let api: Api<Secret> = Api::all(ctx.client.clone());
    let mut keys = Vec::new();
    let mut version = None;
    let mut lp = ListParams::default().limit(500);
    loop {
        let page = api.list_metadata(&lp).await?;
        version = version.or(page.metadata.resource_version);
        keys.extend(page.items.into_iter().filter_map(|m| {
            let key = format!("{}/{}", m.metadata.namespace?, m.metadata.name?);
            Some((key, m.metadata.resource_version))
        }));
        match page.metadata.continue_ {
            Some(c) if !c.is_empty() => lp = lp.continue_token(&c),
            _ => return Ok((keys, version)),
        }
    }
}

/// Rewrites Secret `key` (`namespace/name`) unchanged, retrying on conflicts. True when it is
/// rewritten or gone; false when it could not be written (logged).
async fn rewrite_one(ctx: &Ctx, key: &str) -> bool {
    let Some((ns, name)) = key.split_once('/') else {
        return true;
    };
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    for _ in 0..3 {
        let s = match api.get_opt(name).await {
            Ok(None) => return true,
            Ok(Some(s)) => s,
            Err(e) => {
                tracing::warn!(secret = %key, error = %e, "cannot read a Secret to rewrite it; retrying later");
                return false;
            }
        };
        match api.replace(name, &PostParams::default(), &s).await {
            Ok(_) => return true,
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => continue,
            Err(e) => {
                tracing::warn!(secret = %key, error = %e, "cannot rewrite a Secret; retrying later");
                return false;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn spec() -> KubeBaoInstallationSpec {
        serde_json::from_value(serde_json::json!({"openbao": {"address": "https://bao:8200"}}))
            .unwrap()
    }

    #[test]
    fn a_rewrite_starts_after_a_rotation_and_its_delay_and_resumes_until_complete() {
        let spec = spec();
        let delay = spec.kms.rewrite_delay_seconds as i64;
        let since = "2030-01-01T00:00:00Z";
        let t = unix(since).unwrap();
        let mut s = KubeBaoInstallationStatus {
            key_id: Some("kb1-b".into()),
            key_version: Some(1),
            key_id_since: Some(since.into()),
            ..Default::default()
        };
        // Never rotated: nothing to rewrite.
        assert_eq!(due(&spec, &s, t + delay), Due::Nothing);
        s.key_version = Some(2);
        if delay > 0 {
            assert_eq!(
                due(&spec, &s, t),
                Due::Wait(Duration::from_secs(delay as u64))
            );
        }
        let start = Due::Now {
            key_id: "kb1-b".into(),
            resume: false,
        };
        assert_eq!(due(&spec, &s, t + delay), start);
        // Progress under an older key_id starts over.
        let mut r = RewriteStatus {
            key_id: "kb1-a".into(),
            complete: true,
            ..Default::default()
        };
        s.rewrite = Some(r.clone());
        assert_eq!(due(&spec, &s, t + delay), start);
        r.key_id = "kb1-b".into();
        r.complete = false;
        s.rewrite = Some(r.clone());
        let resume = Due::Now {
            key_id: "kb1-b".into(),
            resume: true,
        };
        assert_eq!(due(&spec, &s, t + delay), resume);
        r.complete = true;
        s.rewrite = Some(r);
        assert_eq!(due(&spec, &s, t + delay), Due::Nothing);
    }

    /// Runs a rewrite over `world` in batches of `n`; before each batch `churn` changes the
    /// world (batch number, world). `fails` says whether rewriting a key fails now. Returns every
    /// key rewritten, in order, and the final status.
    fn run(
        world: &mut BTreeSet<String>,
        n: usize,
        mut churn: impl FnMut(usize, &mut BTreeSet<String>),
        mut fails: impl FnMut(&str) -> bool,
    ) -> (Vec<String>, RewriteStatus) {
        let mut r = start("kb1-b");
        r.total = world.len() as u64;
        let mut rewritten = Vec::new();
        for b in 0..10_000 {
            churn(b, world);
            let keys: Vec<String> = world.iter().rev().cloned().collect(); // any order
            let (batch, retrying) = match next_work(&mut r, &keys, n) {
                Work::Complete => {
                    r.complete = true;
                    return (rewritten, r);
                }
                Work::Pass(k) => (k, false),
                Work::Retry(k) => (k, true),
            };
            for key in batch {
                let ok = !world.contains(&key) || !fails(&key);
                if ok && world.contains(&key) {
                    rewritten.push(key.clone());
                }
                record(&mut r, key, ok, retrying);
            }
        }
        panic!("the rewrite never completed: {r:?}");
    }

    fn keys(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}{i:03}")).collect()
    }

    #[test]
    fn secrets_created_and_deleted_between_batches_never_make_the_rewrite_skip_one() {
        let start: BTreeSet<String> = keys("app/s-", 40)
            .into_iter()
            .chain(keys("kube-system/k-", 10))
            .chain(keys("a-b/x-", 5)) // sorts after "a/" by key, before it by namespace
            .collect();
        let mut world = start.clone();
        let mut deleted = BTreeSet::new();
        let (rewritten, r) = run(
            &mut world,
            4,
            |b, w| {
                // Delete Secrets of the start in key order — the ones already done, shifting
                // every index — and every third batch the last one, not done yet; create
                // Secrets before and after the cursor.
                let of_start = |w: &BTreeSet<String>| {
                    w.iter()
                        .filter(|k| start.contains(*k))
                        .cloned()
                        .collect::<Vec<_>>()
                };
                let left = of_start(w);
                let mut doomed = left.first().cloned().into_iter().collect::<Vec<_>>();
                if b % 3 == 0 {
                    doomed.extend(left.last().cloned());
                }
                for k in doomed {
                    w.remove(&k);
                    deleted.insert(k);
                }
                w.insert(format!("app/a-new-{b:03}"));
                w.insert(format!("zz/new-{b:03}"));
            },
            |_| false,
        );
        let rewritten: BTreeSet<String> = rewritten.into_iter().collect();
        for k in &start {
            assert!(
                rewritten.contains(k) || deleted.contains(k),
                "{k} existed at the start and was skipped"
            );
        }
        assert!(r.complete && r.retry.is_empty());
        assert_eq!(r.failed, 0);
        assert!(r.done as usize >= start.difference(&deleted).count());
        assert!(
            deleted.iter().filter(|k| start.contains(*k)).count() > 10,
            "Secrets of the start were deleted along the way"
        );
    }

    #[test]
    fn failures_are_counted_retried_and_the_rewrite_completes_only_without_any() {
        let mut world: BTreeSet<String> = keys("ns/s-", 20).into_iter().collect();
        let mut attempts = std::collections::HashMap::<String, u32>::new();
        let mut r = start("identity");
        // s-003 fails three times, s-007 once.
        let mut fails = |k: &str| {
            let a = attempts.entry(k.to_string()).or_default();
            *a += 1;
            (k == "ns/s-003" && *a <= 3) || (k == "ns/s-007" && *a <= 1)
        };
        let all: Vec<String> = world.iter().cloned().collect();
        assert_eq!(
            next_work(&mut r, &all, 100),
            Work::Pass(all.clone()),
            "one pass"
        );
        for k in &all {
            record(&mut r, k.clone(), !fails(k), false);
        }
        assert_eq!((r.done, r.failed), (18, 2));
        assert_eq!(r.retry, vec!["ns/s-003", "ns/s-007"]);
        // A retried Secret deleted meanwhile is done, not a failure.
        world.remove("ns/s-007");
        let mut rounds = 0;
        loop {
            let all: Vec<String> = world.iter().cloned().collect();
            match next_work(&mut r, &all, 100) {
                Work::Complete => break,
                Work::Pass(k) => panic!("the pass is over, not {k:?}"),
                Work::Retry(k) => {
                    rounds += 1;
                    for key in k {
                        let ok = !world.contains(&key) || !fails(&key);
                        record(&mut r, key, ok, true);
                    }
                }
            }
        }
        assert_eq!(rounds, 3);
        assert_eq!((r.done, r.failed), (20, 0));
        assert!(r.retry.is_empty());
    }

    #[test]
    fn more_failures_than_remembered_make_another_full_pass() {
        let all = keys("ns/s-", MAX_RETRY + 20);
        let mut r = start("identity");
        let Work::Pass(batch) = next_work(&mut r, &all, all.len()) else {
            panic!("a pass")
        };
        for k in batch {
            record(&mut r, k, false, false);
        }
        assert_eq!(r.failed as usize, MAX_RETRY + 20);
        assert_eq!(r.retry.len(), MAX_RETRY);
        // The remembered ones succeed on retry, the rest were never remembered: another pass.
        let Work::Retry(batch) = next_work(&mut r, &all, all.len()) else {
            panic!("retries")
        };
        for k in batch {
            record(&mut r, k, true, true);
        }
        assert_eq!(r.failed, 20);
        assert_eq!(next_work(&mut r, &all, 5), Work::Pass(all[..5].to_vec()));
        assert_eq!(r.failed, 0, "the new pass counts afresh");
    }

    #[test]
    fn secrets_written_since_the_start_are_skipped_by_resource_version() {
        assert!(written_since(Some("1200"), Some("1100")));
        assert!(!written_since(Some("1100"), Some("1100")));
        assert!(!written_since(Some("900"), Some("1100")));
        // Not a number, or no start: rewrite it (harmless).
        assert!(!written_since(Some("abc"), Some("1100")));
        assert!(!written_since(Some("1200"), None));
    }
}
