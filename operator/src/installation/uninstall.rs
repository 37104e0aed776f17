//! Deleting an installation (its finalizer): ask the node installers to remove the KMS plugin's
//! files and wait for them (bounded by `kms.uninstallGraceSeconds`), delete every object the
//! installation created, remove the plugin's AppRole role and policy, then drop the finalizer.
//! The Transit key is never deleted: Secrets in etcd are encrypted under it. The controller
//! comes here only once kube-apiserver no longer needs the plugin (see `migration`); after a
//! migration off KMS the installers keep the `identity`-only EncryptionConfiguration.

use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;

use crate::installation::controller::{Ctx, Error, patch_status, set_finalizers};
use crate::installation::openbao::{ca_pem, connect};
use crate::installation::render::installer_daemonset::{self as installer, Action as PlanAction};
use crate::installation::render::{self, Context as RenderContext};
use crate::installation::rollout::{self, Objects, apply, delete_if_exists};
use crate::installation::types::{FINALIZER, KubeBaoInstallation, KubeBaoInstallationStatus};
use crate::installation::unix;
use crate::installation::verdict::Verdict;
use crate::installation::{migration, prepare};

/// Deletion: tell the installers to uninstall, wait for them (bounded), delete the objects,
/// remove the plugin's AppRole role and policy, drop the finalizer. The Transit key stays.
pub async fn cleanup(
    obj: &KubeBaoInstallation,
    ctx: &Ctx,
    api: &Api<KubeBaoInstallation>,
    status: KubeBaoInstallationStatus,
) -> Result<Action, Error> {
    if !obj.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    let o = Objects::new(&ctx.client, &obj.spec.namespace);
    if let Some(ds) = o.dss.get_opt(installer::NAME).await? {
        let mut after = status.clone();
        if !nodes_uninstalled(obj, ctx, &o, &ds, &mut after).await? {
            if after != status {
                let mut v = Verdict::default();
                v.part(
                    "KMSReady",
                    false,
                    "Uninstalling",
                    "node installers are removing the KMS plugin's files",
                );
                v.apply(&mut after, obj.metadata.generation);
                patch_status(api, &obj.name_any(), &after).await?;
            }
            return Ok(Action::requeue(Duration::from_secs(5)));
        }
    }
    delete_objects(&o).await?;
    if obj.spec.kms.enabled {
        remove_plugin_access(obj, ctx).await;
    }
    drop_finalizer(obj, api).await?;
    Ok(Action::await_change())
}

/// Asks the node installers to remove the KMS plugin's files (once, recorded as
/// `uninstallStarted` in `status`) and says whether to go on removing the objects: every node
/// confirmed, or the grace period is over (with a Warning event: a node may keep the plugin's
/// files).
pub async fn nodes_uninstalled(
    obj: &KubeBaoInstallation,
    ctx: &Ctx,
    o: &Objects,
    ds: &DaemonSet,
    status: &mut KubeBaoInstallationStatus,
) -> Result<bool, Error> {
    let name = obj.name_any();
    let spec = &obj.spec;
    let ca = ca_pem(ctx, spec).await.ok().flatten();
    let rctx = RenderContext {
        instance: name.clone(),
        ca_pem: ca,
    };
    let providers = migration::providers(spec, status);
    let bundle = installer::bundle(spec, &rctx, PlanAction::Uninstall, providers);
    let hash = installer::bundle_hash(&bundle);
    let started = match status.uninstall_started.clone() {
        Some(s) => s,
        None => {
            apply(&o.cms, installer::config_map(spec, &rctx, bundle), obj).await?;
            apply(&o.dss, installer::daemonset(spec, &rctx, &hash), obj).await?;
            let s = crate::conditions::now();
            status.uninstall_started = Some(s.clone());
            s
        }
    };
    if confirmed(ds, &hash) {
        return Ok(true);
    }
    let elapsed = Timestamp::now().as_second() - unix(&started).unwrap_or(0);
    let grace = spec.kms.uninstall_grace_seconds;
    if elapsed < grace as i64 {
        return Ok(false);
    }
    tracing::warn!(installation = %name, "node installers did not all confirm the uninstall within the grace period; deleting anyway");
    let note = format!(
        "the node installers did not all confirm removing the KMS plugin's files within {grace}s; deleting anyway. Check every control-plane node for the plugin's static pod and the API server's encryption configuration"
    );
    crate::events::publish(&ctx.recorder, obj, true, "UninstallUnconfirmed", note).await;
    Ok(true)
}

/// True when installer DaemonSet `ds` runs the uninstall bundle `hash` and every node is ready
/// with it (each node confirmed).
fn confirmed(ds: &DaemonSet, hash: &str) -> bool {
    let r = rollout::rollout(Some(ds), hash);
    let running = ds
        .spec
        .as_ref()
        .and_then(|s| {
            s.template
                .metadata
                .as_ref()?
                .annotations
                .as_ref()?
                .get(render::CONFIG_HASH_ANNOTATION)
                .cloned()
        })
        .as_deref()
        == Some(hash);
    running && r.ready >= r.desired
}

/// Deletes every object the installation created.
async fn delete_objects(o: &Objects) -> Result<(), kube::Error> {
    rollout::remove_kms(o).await?;
    rollout::remove_csi(o).await?;
    delete_if_exists(&o.secrets, installer::CREDENTIALS_SECRET).await?;
    Ok(())
}

/// Removes the plugin's AppRole role (revoking every secret_id) and its policy. Failures are
/// reported (log and Warning event) but do not block the deletion.
async fn remove_plugin_access(obj: &KubeBaoInstallation, ctx: &Ctx) {
    let name = obj.name_any();
    let spec = &obj.spec;
    let ca = ca_pem(ctx, spec).await.ok().flatten();
    let role = prepare::plugin_role_name(&spec.kms);
    let path = format!("auth/{}/role/{role}", spec.kms.approle_mount);
    let note = match connect(ctx, spec, &ca).await {
        Ok(conn) => {
            let (bao, token) = (&conn.bao, &conn.token);
            let mut left = Vec::new();
            if let Err(e) = bao.delete(&path, token).await
                && !e.is_not_found()
            {
                tracing::warn!(installation = %name, error = %e, "cannot remove the plugin's AppRole role; remove {path} by hand");
                left.push(format!("AppRole role {path} ({e})"));
            }
            if let Err(e) = bao.policy_delete(token, &role).await {
                tracing::warn!(installation = %name, error = %e, "cannot remove the plugin's policy; remove it by hand");
                left.push(format!("policy {role} ({e})"));
            }
            conn.forget(ctx).await;
            if left.is_empty() {
                return;
            }
            format!(
                "could not remove from OpenBao: {}; remove them by hand",
                left.join(", ")
            )
        }
        Err((_, e)) => {
            tracing::warn!(installation = %name, error = %e, "cannot reach OpenBao to remove the plugin's AppRole and policy");
            format!(
                "cannot reach OpenBao to remove the KMS plugin's AppRole role {path} and policy {role} ({e}); remove them by hand"
            )
        }
    };
    crate::events::publish(&ctx.recorder, obj, true, "CleanupIncomplete", note).await;
}

/// Removes this operator's finalizer, letting Kubernetes delete the installation.
async fn drop_finalizer(
    obj: &KubeBaoInstallation,
    api: &Api<KubeBaoInstallation>,
) -> Result<(), kube::Error> {
    let finalizers: Vec<String> = obj
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    set_finalizers(obj, api, finalizers).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{DaemonSetSpec, DaemonSetStatus};
    use k8s_openapi::api::core::v1::PodTemplateSpec;
    use kube::api::ObjectMeta;

    fn installer_ds(hash: &str, desired: i32, ready: i32) -> DaemonSet {
        let template = PodTemplateSpec {
            metadata: Some(ObjectMeta {
                annotations: Some([(render::CONFIG_HASH_ANNOTATION.into(), hash.into())].into()),
                ..Default::default()
            }),
            spec: None,
        };
        DaemonSet {
            metadata: ObjectMeta {
                generation: Some(1),
                ..Default::default()
            },
            spec: Some(DaemonSetSpec {
                template,
                ..Default::default()
            }),
            status: Some(DaemonSetStatus {
                observed_generation: Some(1),
                desired_number_scheduled: desired,
                updated_number_scheduled: Some(ready),
                number_ready: ready,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn an_uninstall_is_confirmed_when_every_node_runs_the_uninstall_bundle() {
        assert!(confirmed(&installer_ds("u", 3, 3), "u"));
        assert!(!confirmed(&installer_ds("u", 3, 2), "u"));
        // Still the install bundle: nothing confirmed yet.
        assert!(!confirmed(&installer_ds("i", 3, 3), "u"));
    }
}
