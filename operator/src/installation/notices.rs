//! Which changes of an installation's status deserve a Kubernetes Event (OpenBao prepared or
//! failing, a component that cannot roll out, a stall, a key rotation, a finished rewrite,
//! installed), found by comparing the status before and after a reconcile. Only changes: a
//! steady-state reconcile publishes nothing. Notes carry what the status already shows, never a
//! secret.

use kube::runtime::events::Recorder;

use crate::installation::types::{
    Condition, KubeBaoInstallation, KubeBaoInstallationSpec, KubeBaoInstallationStatus,
    RewriteStatus,
};

/// One Event to publish.
#[derive(Debug, PartialEq, Eq)]
pub struct Notice {
    /// Warning (true) or Normal.
    pub warning: bool,
    /// CamelCase reason.
    pub reason: String,
    /// What happened, for people.
    pub note: String,
}

impl Notice {
    fn new(warning: bool, reason: &str, note: impl Into<String>) -> Self {
        Self {
            warning,
            reason: reason.into(),
            note: note.into(),
        }
    }
}

/// Component condition reasons that need someone to act (not mere progress such as RollingOut).
const COMPONENT_FAILURES: &[&str] = &["NoNodes", "CredentialsFailed"];

fn find<'a>(conditions: &'a [Condition], t: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == t)
}

/// True when condition `t` is `status` after and was not with the same reason and message before.
fn newly(before: &[Condition], after: &[Condition], t: &str, status: &str) -> Option<Condition> {
    let a = find(after, t).filter(|a| a.status == status)?;
    let same = find(before, t)
        .is_some_and(|b| b.status == a.status && b.reason == a.reason && b.message == a.message);
    (!same).then(|| a.clone())
}

/// The Events that the change from `before` to `after` deserves, in the order they happened.
pub fn notices(
    spec: &KubeBaoInstallationSpec,
    before: &KubeBaoInstallationStatus,
    after: &KubeBaoInstallationStatus,
) -> Vec<Notice> {
    let (b, a) = (&before.conditions[..], &after.conditions[..]);
    let mut out = Vec::new();
    let was_prepared =
        find(b, "OpenBaoReady").is_some_and(|c| c.status == "True" && c.reason == "Prepared");
    if let Some(c) = newly(b, a, "OpenBaoReady", "True")
        && c.reason == "Prepared"
        && !was_prepared
    {
        out.push(Notice::new(false, "OpenBaoPrepared", c.message));
    }
    if let Some(c) = newly(b, a, "OpenBaoReady", "False") {
        out.push(Notice::new(true, &c.reason, c.message));
    }
    out.extend(key_rotated(spec, before, after));
    for t in ["KMSReady", "CSIReady"] {
        if let Some(c) = newly(b, a, t, "False")
            && COMPONENT_FAILURES.contains(&c.reason.as_str())
        {
            out.push(Notice::new(true, &c.reason, c.message));
        }
    }
    out.extend(rewrite_notices(
        before.rewrite.as_ref(),
        after.rewrite.as_ref(),
    ));
    let migration_rewrite =
        |s: &KubeBaoInstallationStatus| s.migration.as_ref().and_then(|m| m.rewrite.clone());
    out.extend(rewrite_notices(
        migration_rewrite(before).as_ref(),
        migration_rewrite(after).as_ref(),
    ));
    if let Some(c) = newly(b, a, "KMSMigratedOff", "True") {
        out.push(Notice::new(false, "KMSMigratedOff", c.message));
    }
    if let Some(c) = newly(b, a, "Stalled", "True")
        && !out.iter().any(|n| n.reason == c.reason)
    {
        out.push(Notice::new(true, &c.reason, c.message));
    }
    let was_ready = find(b, "Ready").is_some_and(|c| c.status == "True");
    if let Some(c) = find(a, "Ready").filter(|c| c.status == "True" && !was_ready) {
        out.push(Notice::new(false, &c.reason, c.message.clone()));
    }
    out
}

fn key_rotated(
    spec: &KubeBaoInstallationSpec,
    before: &KubeBaoInstallationStatus,
    after: &KubeBaoInstallationStatus,
) -> Option<Notice> {
    let (old, new) = (before.key_version?, after.key_version?);
    if new <= old {
        return None;
    }
    let mut note = format!(
        "Transit key {}/{} rotated from version {old} to {new}; the KMS plugin now reports key_id {}",
        spec.kms.transit_mount,
        spec.kms.key_name,
        after.key_id.as_deref().unwrap_or("(unknown)")
    );
    if after.last_rotate_request != before.last_rotate_request
        && let Some(r) = &after.last_rotate_request
    {
        note.push_str(&format!(" (on request {r:?})"));
    }
    Some(Notice::new(false, "KeyRotated", note))
}

/// A rewrite that finished, or started failing.
fn rewrite_notices(
    before: Option<&RewriteStatus>,
    after: Option<&RewriteStatus>,
) -> Option<Notice> {
    let r = after?;
    let how = match r.key_id.as_str() {
        "identity" => "as plaintext (identity)".to_string(),
        id => format!("under key_id {id}"),
    };
    let same = before.filter(|p| p.key_id == r.key_id);
    if r.complete {
        if same.is_some_and(|p| p.complete) {
            return None;
        }
        let note = format!("rewrote {} Secrets so etcd holds them {how}", r.done);
        return Some(Notice::new(false, "RewriteFinished", note));
    }
    if r.failed == 0 || same.is_some_and(|p| p.failed > 0) {
        return None;
    }
    let note = format!(
        "{} Secrets could not be rewritten {how} yet; they are retried every 30 s and the rewrite completes only when none is left (see the operator's log for why)",
        r.failed
    );
    Some(Notice::new(true, "RewriteFailing", note))
}

/// Publishes `notices` about `obj`.
pub async fn publish(recorder: &Recorder, obj: &KubeBaoInstallation, notices: Vec<Notice>) {
    for n in notices {
        crate::events::publish(recorder, obj, n.warning, &n.reason, n.note).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> KubeBaoInstallationSpec {
        serde_json::from_value(serde_json::json!({"openbao": {"address": "https://bao:8200"}}))
            .unwrap()
    }

    fn with(conditions: &[(&str, bool, &str, &str)]) -> KubeBaoInstallationStatus {
        let mut s = KubeBaoInstallationStatus::default();
        for (t, ok, reason, message) in conditions {
            crate::conditions::set(&mut s.conditions, t, *ok, reason, message, Some(1));
        }
        s
    }

    fn reasons(n: Vec<Notice>) -> Vec<(bool, String)> {
        n.into_iter().map(|n| (n.warning, n.reason)).collect()
    }

    #[test]
    fn a_steady_state_publishes_nothing() {
        let s = with(&[
            ("OpenBaoReady", true, "Prepared", "v1"),
            ("KMSReady", false, "NoNodes", "none"),
            ("Ready", false, "NoNodes", "none"),
        ]);
        assert_eq!(notices(&spec(), &s, &s.clone()), vec![]);
    }

    #[test]
    fn preparing_failing_and_installing_are_published_once() {
        let spec = spec();
        let empty = KubeBaoInstallationStatus::default();
        let failing = with(&[("OpenBaoReady", false, "AuthFailed", "denied")]);
        assert_eq!(
            reasons(notices(&spec, &empty, &failing)),
            vec![(true, "AuthFailed".into())]
        );
        let ready = with(&[
            ("OpenBaoReady", true, "Prepared", "version 1"),
            ("Ready", true, "Installed", "ok"),
        ]);
        assert_eq!(
            reasons(notices(&spec, &failing, &ready)),
            vec![
                (false, "OpenBaoPrepared".into()),
                (false, "Installed".into())
            ]
        );
        // A new key version changes the message, not the state: no second OpenBaoPrepared.
        let mut rotated = with(&[
            ("OpenBaoReady", true, "Prepared", "version 2"),
            ("Ready", true, "Installed", "ok"),
        ]);
        assert_eq!(notices(&spec, &ready, &rotated), vec![]);
        // A stall with the same reason as the OpenBao failure is one Event, not two.
        rotated = with(&[
            ("OpenBaoReady", false, "PrepareFailed", "bad name"),
            ("Stalled", true, "PrepareFailed", "bad name"),
        ]);
        assert_eq!(
            reasons(notices(&spec, &ready, &rotated)),
            vec![(true, "PrepareFailed".into())]
        );
    }

    #[test]
    fn a_rotation_and_a_finished_rewrite_are_published() {
        let spec = spec();
        let before = KubeBaoInstallationStatus {
            key_version: Some(1),
            ..Default::default()
        };
        let mut after = KubeBaoInstallationStatus {
            key_version: Some(2),
            key_id: Some("kb1-b".into()),
            last_rotate_request: Some("r1".into()),
            ..Default::default()
        };
        let n = notices(&spec, &before, &after);
        assert_eq!(n[0].reason, "KeyRotated");
        assert!(n[0].note.contains("version 1 to 2") && n[0].note.contains("\"r1\""));
        let mut rewrite = RewriteStatus {
            key_id: "kb1-b".into(),
            total: 10,
            done: 9,
            failed: 1,
            complete: false,
            ..Default::default()
        };
        let mut steady = after.clone();
        after.rewrite = Some(rewrite.clone());
        // A failure is a warning once, retried; the rewrite is not complete.
        let n = notices(&spec, &steady, &after);
        assert_eq!(reasons(n), vec![(true, "RewriteFailing".into())]);
        steady.rewrite = Some(rewrite.clone());
        assert_eq!(notices(&spec, &steady, &after), vec![]);
        rewrite.failed = 0;
        rewrite.done = 10;
        rewrite.complete = true;
        after.rewrite = Some(rewrite.clone());
        let n = notices(&spec, &steady, &after);
        assert!(n[0].note.contains("rewrote 10 Secrets"), "{:?}", n[0]);
        assert_eq!(reasons(n), vec![(false, "RewriteFinished".into())]);
        assert_eq!(notices(&spec, &after, &after.clone()), vec![]);
    }

    #[test]
    fn a_migration_off_kms_is_published_when_it_finishes() {
        let spec = spec();
        let mut before = with(&[("KMSMigratedOff", false, "RewritingSecrets", "5 done")]);
        let r = RewriteStatus {
            key_id: "identity".into(),
            done: 5,
            complete: true,
            ..Default::default()
        };
        before.migration = Some(crate::installation::types::MigrationStatus {
            rewrite: Some(RewriteStatus {
                complete: false,
                ..r.clone()
            }),
            ..Default::default()
        });
        let mut after = with(&[("KMSMigratedOff", true, "MigratedOff", "no Secret")]);
        after.migration = Some(crate::installation::types::MigrationStatus {
            rewrite: Some(r),
            complete: true,
            ..Default::default()
        });
        let n = notices(&spec, &before, &after);
        assert_eq!(
            reasons(n),
            vec![
                (false, "RewriteFinished".into()),
                (false, "KMSMigratedOff".into())
            ]
        );
        assert_eq!(notices(&spec, &after, &after.clone()), vec![]);
    }
}
