//! Never pulling encryption from under a running API server, and the safe way off KMS.
//!
//! Once a node installer confirmed an EncryptionConfiguration that reads through the plugin,
//! kube-apiserver may need the plugin to read every Secret, so the plugin stays installed —
//! through deletion and `kms.enabled: false` — until a migration off KMS (`kms.migrateOff`)
//! has completed:
//! 1. the nodes get `identity` first, the plugin second (plaintext writes, KMS data readable);
//! 2. once every node's installer confirmed it (the DaemonSet rollout) and
//!    `kms.apiServerReloadSeconds` passed (kube-apiserver re-reads the file every 60 s with
//!    automatic reload), every Secret is rewritten (`rewrite`), so etcd holds it as plaintext;
//! 3. the nodes get `identity` only, confirmed and waited for the same way;
//! 4. `KMSMigratedOff=True`: nothing is encrypted by the plugin and nothing reads through it,
//!    so deletion or disabling may remove it (keeping the `identity`-only file the API server's
//!    flag points at).

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use crate::installation::controller::{Ctx, Error};
use crate::installation::render::encryption_config::Providers;
use crate::installation::rewrite;
use crate::installation::types::{
    KubeBaoInstallationSpec, KubeBaoInstallationStatus, MigrationStage, MigrationStatus,
    RolloutStatus,
};
use crate::installation::unix;
use crate::installation::verdict::Verdict;

/// The condition a migration off KMS reports.
pub const CONDITION: &str = "KMSMigratedOff";
/// The rewrite's target when migrating off KMS.
const IDENTITY: &str = "identity";

/// True when a migration off KMS is declared and complete.
pub fn migrated_off(spec: &KubeBaoInstallationSpec, status: &KubeBaoInstallationStatus) -> bool {
    spec.kms.migrate_off && status.migration.as_ref().is_some_and(|m| m.complete)
}

/// True when kube-apiserver may still need the plugin to read Secrets: a node confirmed an
/// EncryptionConfiguration that reads through it, and no migration off KMS completed since.
pub fn plugin_in_use(spec: &KubeBaoInstallationSpec, status: &KubeBaoInstallationStatus) -> bool {
    status.kms_config_installed && !migrated_off(spec, status)
}

/// The providers the nodes' EncryptionConfiguration lists now.
pub fn providers(spec: &KubeBaoInstallationSpec, status: &KubeBaoInstallationStatus) -> Providers {
    if !spec.kms.migrate_off {
        return Providers::KmsFirst;
    }
    match status.migration.as_ref().map(|m| m.stage) {
        Some(MigrationStage::IdentityOnly) => Providers::IdentityOnly,
        Some(MigrationStage::IdentityFirst) | None => Providers::IdentityFirst,
    }
}

/// What the user must do to remove the plugin while it is in use (`what`: deletion or
/// disabling).
pub fn in_use_message(what: &str) -> String {
    format!(
        "{what} waits: kube-apiserver may still read Secrets through the KMS plugin (a node installed its EncryptionConfiguration), and removing the plugin would make every KMS-encrypted Secret unreadable. Set spec.kms.migrateOff: true and wait for KMSMigratedOff=True (docs/installation.md, \"Removing KMS safely\"); the plugin is removed after that"
    )
}

/// What the migration does next.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Wait until every node runs the stage's bundle.
    Nodes,
    /// Wait this long for kube-apiserver to use it.
    Reload(Duration),
    /// Rewrite Secrets (stage `IdentityFirst`).
    Rewrite,
    /// The stage is done.
    StageDone,
}

/// Where migration `m` stands at `now` (unix seconds), given the KMS installer rollout `r`;
/// records the nodes' confirmation in `m`.
fn next(m: &mut MigrationStatus, r: &RolloutStatus, reload: u64, now: i64) -> Next {
    if m.config_hash != r.config_hash {
        // Another bundle (the stage changed, or the spec): the nodes confirm it afresh.
        m.config_hash = r.config_hash.clone();
        m.confirmed_at = None;
    }
    if m.confirmed_at.is_none() {
        if r.desired == 0 || r.ready < r.desired {
            return Next::Nodes;
        }
        m.confirmed_at = Timestamp::from_second(now).ok().map(|t| t.to_string());
    }
    let since = m.confirmed_at.as_deref().and_then(unix).unwrap_or(now);
    let wait = since + reload as i64 - now;
    if wait > 0 {
        return Next::Reload(Duration::from_secs(wait as u64));
    }
    match m.stage {
        MigrationStage::IdentityFirst if !m.rewrite.as_ref().is_some_and(|r| r.complete) => {
            Next::Rewrite
        }
        _ => Next::StageDone,
    }
}

/// One step of the migration off KMS, after the KMS rollout (`status.kms`: the bundle the nodes
/// get and how many run it). Reports `KMSMigratedOff`; returns when to come back.
pub async fn step(
    ctx: &Ctx,
    spec: &KubeBaoInstallationSpec,
    v: &mut Verdict,
    status: &mut KubeBaoInstallationStatus,
) -> Result<Option<Duration>, Error> {
    if !spec.kms.migrate_off {
        status.migration = None;
        status.conditions.retain(|c| c.type_ != CONDITION);
        return Ok(None);
    }
    let Some(r) = status.kms.clone() else {
        return Ok(None);
    };
    let m = status.migration.get_or_insert_with(Default::default);
    if m.complete {
        v.part(CONDITION, true, "MigratedOff", done_message(m));
        return Ok(None);
    }
    let reload = spec.kms.api_server_reload_seconds;
    let stage = stage_name(m.stage);
    let now = Timestamp::now().as_second();
    match next(m, &r, reload, now) {
        Next::Nodes => {
            let msg = format!(
                "{}/{} control-plane nodes have the {stage} EncryptionConfiguration",
                r.ready, r.desired
            );
            v.part(CONDITION, false, "SwitchingNodes", msg);
            Ok(Some(Duration::from_secs(10)))
        }
        Next::Reload(wait) => {
            let msg = format!(
                "every control-plane node has the {stage} EncryptionConfiguration; waiting {}s more for kube-apiserver to use it (kms.apiServerReloadSeconds)",
                wait.as_secs()
            );
            v.part(CONDITION, false, "WaitingForAPIServer", msg);
            Ok(Some(wait))
        }
        Next::Rewrite => {
            let rw = m.rewrite.get_or_insert_with(|| rewrite::start(IDENTITY));
            let next = rewrite::batch(ctx, spec.kms.rewrite_per_second, rw).await?;
            let msg = format!(
                "kube-apiserver writes plaintext now; rewriting every Secret: {} done, {} failed (retried), of {}",
                rw.done, rw.failed, rw.total
            );
            v.part(CONDITION, false, "RewritingSecrets", msg);
            Ok(Some(next.unwrap_or(Duration::from_millis(10))))
        }
        Next::StageDone => {
            if m.stage == MigrationStage::IdentityFirst {
                // Every Secret is plaintext: drop the plugin from the configuration.
                m.stage = MigrationStage::IdentityOnly;
                m.config_hash.clear();
                m.confirmed_at = None;
                v.part(CONDITION, false, "SwitchingNodes", "every Secret is stored as plaintext; switching the nodes to an identity-only EncryptionConfiguration");
                return Ok(Some(Duration::from_secs(1)));
            }
            m.complete = true;
            v.part(CONDITION, true, "MigratedOff", done_message(m));
            Ok(Some(Duration::from_secs(1)))
        }
    }
}

fn stage_name(stage: MigrationStage) -> &'static str {
    match stage {
        MigrationStage::IdentityFirst => "identity-first",
        MigrationStage::IdentityOnly => "identity-only",
    }
}

fn done_message(m: &MigrationStatus) -> String {
    let n = m.rewrite.as_ref().map_or(0, |r| r.done);
    format!(
        "no Secret is KMS-encrypted any more ({n} rewritten as plaintext) and kube-apiserver uses an identity-only EncryptionConfiguration; delete the installation or set kms.enabled: false to remove the plugin"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::installation::types::RewriteStatus;

    fn rollout(hash: &str, desired: i32, ready: i32) -> RolloutStatus {
        RolloutStatus {
            config_hash: hash.into(),
            desired,
            ready,
            summary: String::new(),
        }
    }

    #[test]
    fn each_stage_waits_for_every_node_then_for_the_api_server_reload() {
        let mut m = MigrationStatus::default();
        let t = 1_900_000_000;
        assert_eq!(next(&mut m, &rollout("a", 3, 2), 120, t), Next::Nodes);
        assert_eq!(next(&mut m, &rollout("a", 0, 0), 120, t), Next::Nodes);
        assert_eq!(
            next(&mut m, &rollout("a", 3, 3), 120, t),
            Next::Reload(Duration::from_secs(120))
        );
        assert_eq!(
            next(&mut m, &rollout("a", 3, 3), 120, t + 100),
            Next::Reload(Duration::from_secs(20))
        );
        // Confirmed once: a node going unready later does not restart the wait.
        assert_eq!(
            next(&mut m, &rollout("a", 3, 2), 120, t + 120),
            Next::Rewrite
        );
        m.rewrite = Some(RewriteStatus {
            complete: true,
            ..Default::default()
        });
        assert_eq!(
            next(&mut m, &rollout("a", 3, 3), 120, t + 130),
            Next::StageDone
        );
        // A new bundle (the next stage, or a spec change) is confirmed and waited for afresh.
        m.stage = MigrationStage::IdentityOnly;
        assert_eq!(next(&mut m, &rollout("b", 3, 1), 120, t + 140), Next::Nodes);
        assert_eq!(
            next(&mut m, &rollout("b", 3, 3), 120, t + 150),
            Next::Reload(Duration::from_secs(120))
        );
        assert_eq!(
            next(&mut m, &rollout("b", 3, 3), 120, t + 270),
            Next::StageDone
        );
    }

    #[test]
    fn the_plugin_stays_in_use_until_a_declared_migration_is_complete() {
        let mut spec: KubeBaoInstallationSpec =
            serde_json::from_value(serde_json::json!({"openbao": {"address": "https://b"}}))
                .unwrap();
        let mut s = KubeBaoInstallationStatus::default();
        assert!(!plugin_in_use(&spec, &s), "never installed on a node");
        assert_eq!(providers(&spec, &s), Providers::KmsFirst);
        s.kms_config_installed = true;
        assert!(plugin_in_use(&spec, &s));
        spec.kms.migrate_off = true;
        assert_eq!(providers(&spec, &s), Providers::IdentityFirst);
        let mut m = MigrationStatus::default();
        s.migration = Some(m.clone());
        assert!(plugin_in_use(&spec, &s));
        m.stage = MigrationStage::IdentityOnly;
        s.migration = Some(m.clone());
        assert_eq!(providers(&spec, &s), Providers::IdentityOnly);
        assert!(plugin_in_use(&spec, &s), "not complete yet");
        m.complete = true;
        s.migration = Some(m);
        assert!(!plugin_in_use(&spec, &s));
        // Declaring KMS again puts it back in use.
        spec.kms.migrate_off = false;
        assert!(plugin_in_use(&spec, &s));
        assert_eq!(providers(&spec, &s), Providers::KmsFirst);
    }
}
