//! Rotating the Transit key on a `kubebao.io/rotate` request, exactly once per request, and
//! recording the key's version and key_id (and since when) in the status. One request must never
//! rotate twice, even when OpenBao's answer or the status write is lost, or the operator is
//! killed in between: what was attempted is written to the status (`rotateAttempt`) before the
//! rotate call, and remembered here between reconciles.

use std::collections::HashMap;
use std::sync::Mutex;

use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kubebao_openbao::{OpenBao, SecretString, TransitKey};
use serde_json::json;

use crate::installation::prepare::PrepareError;
use crate::installation::types::{
    KubeBaoInstallation, KubeBaoInstallationStatus, ROTATE_ANNOTATION, RotateAttempt,
};

/// What this operator remembers about each installation's key between reconciles.
#[derive(Default)]
pub struct Rotations {
    /// The last rotation request acted on, by installation name, with the key's latest version
    /// before it. Recorded before the rotate call, so a request whose answer was lost (timeout,
    /// failed status write, stale cached object) is recognised by the key having moved past that
    /// version: one request never rotates twice.
    attempted: Mutex<HashMap<String, (String, u64)>>,
    /// When each installation's current key_id was first seen (same reason as `attempted`).
    seen: Mutex<HashMap<String, (String, String)>>,
}

/// Which `kubebao.io/rotate` request counts as acted on, and — when the current one has not
/// been — the key version to rotate from. `attempted` is the last request this operator tried,
/// with the key's latest version before it: once the key has moved past that version the
/// request is done, even if OpenBao's answer or the status write was lost.
fn rotation_plan(
    request: Option<&str>,
    acted: Option<&str>,
    attempted: Option<&(String, u64)>,
    latest: u64,
) -> (Option<String>, Option<u64>) {
    let acted = match attempted {
        Some((r, before)) if latest > *before => Some(r.clone()),
        _ => acted.map(str::to_string),
    };
    let rotate_from = match request {
        Some(r) if acted.as_deref() != Some(r) => Some(match attempted {
            // Tried before and the key has not moved: the same request, from the same version.
            Some((tried, before)) if tried == r => *before,
            _ => latest,
        }),
        _ => None,
    };
    (acted, rotate_from)
}

/// Acts on the installation's rotation request, if it has one not yet acted on: rotates the key
/// and returns it as it is now. Sets `lastRotateRequest` in `status`.
pub async fn rotate_on_request(
    rotations: &Rotations,
    api: &Api<KubeBaoInstallation>,
    obj: &KubeBaoInstallation,
    (bao, token): (&OpenBao, &SecretString),
    key: TransitKey,
    status: &mut KubeBaoInstallationStatus,
) -> Result<TransitKey, PrepareError> {
    let kms = &obj.spec.kms;
    let name = obj.name_any();
    // What this process attempted, else what the status says was attempted (an operator that
    // was restarted, or a new leader).
    let attempted = rotations
        .attempted
        .lock()
        .expect("rotated")
        .get(&name)
        .cloned()
        .or_else(|| {
            status
                .rotate_attempt
                .as_ref()
                .map(|a| (a.request.clone(), a.from_version))
        });
    let (acted, rotate_from) = rotation_plan(
        obj.annotations().get(ROTATE_ANNOTATION).map(String::as_str),
        status.last_rotate_request.as_deref(),
        attempted.as_ref(),
        key.latest_version,
    );
    status.last_rotate_request = acted;
    let Some(before) = rotate_from else {
        return Ok(key);
    };
    let request = obj.annotations()[ROTATE_ANNOTATION].clone();
    let attempt = RotateAttempt {
        request: request.clone(),
        from_version: before,
    };
    // Durable before the rotate call: if the status cannot be written, do not rotate now.
    api.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"rotateAttempt": attempt}})),
    )
    .await
    .map_err(|e| {
        PrepareError::Refused(format!(
            "cannot record the rotation request {request:?} before rotating (retried): {e}"
        ))
    })?;
    status.rotate_attempt = Some(attempt);
    rotations
        .attempted
        .lock()
        .expect("rotated")
        .insert(name.clone(), (request.clone(), before));
    bao.transit_rotate(token, &kms.transit_mount, &kms.key_name)
        .await?;
    let key = bao
        .transit_key(token, &kms.transit_mount, &kms.key_name)
        .await?;
    tracing::info!(installation = %name, version = key.latest_version, "rotated the Transit key on request");
    status.last_rotate_request = Some(request);
    Ok(key)
}

/// Since when `id` has been the current key_id: as first seen by this operator, else as the
/// status says when it already names `id`, else `now`.
fn key_id_since(
    seen: Option<&(String, String)>,
    id: &str,
    status: &KubeBaoInstallationStatus,
    now: impl FnOnce() -> String,
) -> String {
    match seen {
        Some((k, t)) if k == id => t.clone(),
        _ if status.key_id.as_deref() == Some(id) => {
            status.key_id_since.clone().unwrap_or_else(now)
        }
        _ => now(),
    }
}

/// Records the key's latest version, its key_id and since when, and the last rotation time in
/// `status`.
pub fn record_key(
    rotations: &Rotations,
    name: &str,
    mount: &str,
    key: &TransitKey,
    status: &mut KubeBaoInstallationStatus,
) {
    let key_id = key.current_key_id(mount);
    if let Some(id) = &key_id {
        let mut seen = rotations.seen.lock().expect("seen");
        let since = key_id_since(seen.get(name), id, status, crate::conditions::now);
        seen.insert(name.to_string(), (id.clone(), since.clone()));
        status.key_id_since = Some(since);
    }
    status.key_id = key_id;
    status.key_version = Some(key.latest_version);
    status.last_rotation = key
        .versions
        .iter()
        .find(|v| v.version == key.latest_version && v.version > 1)
        .map(|v| v.created.clone());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rotate_request_rotates_once_even_when_the_answer_is_lost() {
        let r1 = Some("r1");
        // No request, or one already acted on: nothing to do.
        assert_eq!(rotation_plan(None, None, None, 1), (None, None));
        assert_eq!(rotation_plan(r1, r1, None, 2), (Some("r1".into()), None));
        // A new request rotates from the key's current version.
        assert_eq!(rotation_plan(r1, None, None, 1), (None, Some(1)));
        // The rotate call's answer was lost, but the key moved: done, no second rotation.
        let tried = ("r1".to_string(), 1);
        assert_eq!(
            rotation_plan(r1, None, Some(&tried), 2),
            (Some("r1".into()), None)
        );
        // The call failed and the key did not move: try the same request again.
        assert_eq!(rotation_plan(r1, None, Some(&tried), 1), (None, Some(1)));
        // A newer request after that one rotates again, from the new version.
        assert_eq!(
            rotation_plan(Some("r2"), r1, Some(&tried), 2),
            (Some("r1".into()), Some(2))
        );
    }

    #[test]
    fn a_restarted_operator_does_not_rotate_again_for_an_attempt_in_the_status() {
        // Killed after the rotate call, before the result was recorded: the status holds the
        // attempt (written first), this process remembers nothing, the key moved past it.
        let from_status = ("r1".to_string(), 1);
        assert_eq!(
            rotation_plan(Some("r1"), None, Some(&from_status), 2),
            (Some("r1".into()), None)
        );
        // Killed before the rotate call: the key has not moved, so it rotates, once, from 1.
        assert_eq!(
            rotation_plan(Some("r1"), None, Some(&from_status), 1),
            (None, Some(1))
        );
    }

    #[test]
    fn a_key_id_keeps_the_time_it_was_first_seen() {
        let now = || "2030-01-01T00:00:00Z".to_string();
        let seen = ("kb1-a".to_string(), "2020-01-01T00:00:00Z".to_string());
        let mut status = KubeBaoInstallationStatus::default();
        // Seen by this operator: that time, whatever the status says.
        assert_eq!(
            key_id_since(Some(&seen), "kb1-a", &status, now),
            "2020-01-01T00:00:00Z"
        );
        // A new key_id: now.
        assert_eq!(key_id_since(Some(&seen), "kb1-b", &status, now), now());
        // Not seen yet (a new leader), but the status names it: the status's time.
        status.key_id = Some("kb1-b".into());
        status.key_id_since = Some("2025-01-01T00:00:00Z".into());
        assert_eq!(
            key_id_since(None, "kb1-b", &status, now),
            "2025-01-01T00:00:00Z"
        );
    }
}
