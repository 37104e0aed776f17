//! The KubeBaoInstallation controller: its wiring and one reconcile as a short sequence of
//! steps — one installation per cluster, finalizer, prepare OpenBao (`openbao`), install the KMS
//! plugin and the CSI provider (`rollout`), migrate off KMS (`migration`) or rewrite Secrets
//! after a rotation (`rewrite`), then conditions (`verdict`), Events (`notices`) and status.
//! Deletion is `uninstall`, once kube-apiserver no longer needs the plugin (`migration`): until
//! then the plugin stays installed, through deletion or `kms.enabled: false`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use futures::future::BoxFuture;
use k8s_openapi::api::apps::v1::DaemonSet;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::Recorder;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use kubebao_openbao::{OpenBao, SecretString};
use serde_json::json;

use crate::installation::openbao::{self, Logins, Prepared};
use crate::installation::render::Context as RenderContext;
use crate::installation::rotation::Rotations;
use crate::installation::types::{FINALIZER, KubeBaoInstallation, KubeBaoInstallationStatus};
use crate::installation::verdict::Verdict;
use crate::installation::{migration, notices, rewrite, rollout, uninstall};
use crate::lenient::{self, Lenient};
use crate::metrics::Metrics;

/// The `kind` label of this controller's metrics.
const KIND: &str = "KubeBaoInstallation";

/// Fetches the operator's own OpenBao token (its leader-wide identity).
pub type TokenFn = Arc<dyn Fn() -> BoxFuture<'static, Result<SecretString, String>> + Send + Sync>;

/// The operator's own OpenBao connection, used when a KubeBaoInstallation names no auth.
#[derive(Clone)]
pub struct OperatorIdentity {
    /// Client for the operator's configured OpenBao address.
    pub bao: OpenBao,
    /// Returns a valid token.
    pub token: TokenFn,
}

/// What an installation may use of the operator running it.
#[derive(Clone, Debug)]
pub struct Operator {
    /// The operator's namespace: the only one an installation's Secret references may name.
    pub namespace: String,
    /// The audience of the operator's projected ServiceAccount token; an `auth.kubernetes`
    /// login sends only a token for exactly this audience.
    pub jwt_audience: String,
}

/// Shared controller state.
pub struct Ctx {
    /// Kubernetes client.
    pub client: Client,
    /// The operator running this controller.
    pub operator: Operator,
    /// The operator's identity, if it has one.
    pub fallback: Option<OperatorIdentity>,
    /// Publishes Events about installations.
    pub recorder: Recorder,
    /// Tokens from `auth.kubernetes` logins (see `openbao::connect`).
    pub(super) logins: Logins,
    /// Rotation requests acted on and key_ids seen (see `rotation`).
    pub(super) rotations: Rotations,
    /// Where reconciles are counted and timed.
    pub metrics: Arc<Metrics>,
}

impl Ctx {
    /// A context for `client`, publishing Events through `recorder`.
    pub fn new(
        client: Client,
        operator: Operator,
        fallback: Option<OperatorIdentity>,
        recorder: Recorder,
    ) -> Self {
        Self {
            client,
            operator,
            fallback,
            recorder,
            logins: Logins::new(Default::default()),
            rotations: Default::default(),
            metrics: Default::default(),
        }
    }
}

/// A reconcile failure that is retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

/// Runs the controller until `shutdown` resolves, counting and timing reconciles in `metrics`.
pub async fn run(
    client: Client,
    operator: Operator,
    fallback: Option<OperatorIdentity>,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let ctx = Arc::new(Ctx {
        metrics,
        ..Ctx::new(client.clone(), operator, fallback, recorder)
    });
    let managed =
        watcher::Config::default().labels("app.kubernetes.io/managed-by=kubebao-operator");
    Controller::new(
        Api::<Lenient<KubeBaoInstallation>>::all(client.clone()),
        watcher::Config::default(),
    )
    // Not `.owns()`: for a cluster-scoped owner it enqueues the owner under the child's
    // namespace, a different key than the main watch's, so one installation could be reconciled
    // twice at once (two rotations for one request, stale writes). Map to the cluster-scoped key.
    .watches(Api::<DaemonSet>::all(client), managed, owning_installations)
    .graceful_shutdown_on(shutdown)
    .run(
        |o, c| crate::leader::while_leading(reconcile(o, c)),
        error_policy,
        ctx,
    )
    .for_each(|r| async move {
        if let Err(e) = r {
            tracing::debug!(error = %e, "KubeBaoInstallation controller event");
        }
    })
    .await;
}

/// The installations that own `ds`, keyed as the main watch keys them (no namespace).
fn owning_installations(ds: DaemonSet) -> Vec<ObjectRef<Lenient<KubeBaoInstallation>>> {
    ds.metadata
        .owner_references
        .unwrap_or_default()
        .into_iter()
        .filter(|o| {
            o.kind == KubeBaoInstallation::kind(&())
                && o.api_version == KubeBaoInstallation::api_version(&())
        })
        .map(|o| ObjectRef::new(&o.name))
        .collect()
}

fn error_policy(obj: Arc<Lenient<KubeBaoInstallation>>, e: &Error, _: Arc<Ctx>) -> Action {
    tracing::warn!(installation = %obj.name_any(), error = %e, "KubeBaoInstallation reconcile failed; retrying");
    Action::requeue(Duration::from_secs(15))
}

/// Writes `status` (a merge patch of the status subresource).
pub(super) async fn patch_status(
    api: &Api<KubeBaoInstallation>,
    name: &str,
    status: &KubeBaoInstallationStatus,
) -> Result<(), Error> {
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": status})),
    )
    .await?;
    Ok(())
}

/// How a reconcile of a valid installation ended, for the metrics.
enum Ended {
    /// Installed or tried to: `ready` when the outcome was Ready.
    Synced { ready: bool },
    /// Being uninstalled: the object is going.
    Removing,
}

/// Reconciles one KubeBaoInstallation, timing it (an error counts as not Ready).
pub async fn reconcile(
    obj: Arc<Lenient<KubeBaoInstallation>>,
    ctx: Arc<Ctx>,
) -> Result<Action, Error> {
    let Some(obj) = lenient::parsed(&ctx.client, &obj).await? else {
        return Ok(Action::await_change());
    };
    let started = Instant::now();
    let name = obj.name_any();
    let ended = reconcile_valid(obj, ctx.clone()).await;
    let (metrics, elapsed) = (&ctx.metrics, started.elapsed());
    match &ended {
        Ok((_, Ended::Removing)) => metrics.forget(KIND, "", &name),
        Ok((_, Ended::Synced { ready })) => metrics.observe_sync(KIND, "", &name, elapsed, *ready),
        Err(_) => metrics.observe_sync(KIND, "", &name, elapsed, false),
    }
    ended.map(|(action, _)| action)
}

async fn reconcile_valid(
    obj: Arc<KubeBaoInstallation>,
    ctx: Arc<Ctx>,
) -> Result<(Action, Ended), Error> {
    let name = obj.name_any();
    let api: Api<KubeBaoInstallation> = Api::all(ctx.client.clone());
    let status = obj.status.clone().unwrap_or_default();
    let deleting = obj.metadata.deletion_timestamp.is_some();
    let in_use = migration::plugin_in_use(&obj.spec, &status);
    if deleting && !in_use {
        let action = uninstall::cleanup(&obj, &ctx, &api, status).await?;
        return Ok((action, Ended::Removing));
    }
    let in_charge = installation_in_charge(&ctx.client).await?;
    if in_charge.as_deref() != Some(name.as_str()) {
        let mut v = Verdict::default();
        let other = in_charge.unwrap_or_default();
        v.stall("Conflict", format!("KubeBaoInstallation {other:?} already installs KubeBao in this cluster; only one takes effect. Delete this one or {other:?}"));
        let ready = finish(&ctx, &obj, &api, v, status).await?;
        return Ok((
            Action::requeue(Duration::from_secs(300)),
            Ended::Synced { ready },
        ));
    }
    if !deleting {
        ensure_finalizer(&obj, &api).await?;
    }
    // While kube-apiserver may need the plugin, it stays installed whatever the spec says:
    // removing it is what a migration off KMS makes safe.
    let mut v = Verdict::default();
    let held = if !in_use {
        None
    } else if deleting {
        Some("deletion")
    } else if !obj.spec.kms.enabled {
        Some("disabling the KMS plugin")
    } else {
        None
    };
    let obj = match held {
        Some(what) => {
            if !obj.spec.kms.migrate_off {
                v.stall("KMSInUse", migration::in_use_message(what));
            }
            let mut keep = (*obj).clone();
            keep.spec.kms.enabled = true;
            Arc::new(keep)
        }
        None => obj,
    };
    let (requeue, ready) = install(&ctx, &obj, v, status).await?;
    Ok((Action::requeue(requeue), Ended::Synced { ready }))
}

/// The installing steps of one reconcile (OpenBao, the two components, the rewrite after a
/// rotation, the migration off KMS), then the status. Returns when to come back, and whether
/// the installation is Ready.
async fn install(
    ctx: &Ctx,
    obj: &KubeBaoInstallation,
    mut v: Verdict,
    mut status: KubeBaoInstallationStatus,
) -> Result<(Duration, bool), Error> {
    let api: Api<KubeBaoInstallation> = Api::all(ctx.client.clone());
    let spec = &obj.spec;
    openbao::refuse_foreign_secrets(spec, &ctx.operator.namespace, &mut v);
    let ca = match openbao::ca_pem(ctx, spec).await {
        Ok(ca) => ca,
        Err(e) => {
            v.stall("CABundleMissing", e);
            None
        }
    };
    let prepared = openbao::prepare(ctx, obj, &ca, &mut v, &mut status).await;
    let rctx = RenderContext {
        instance: obj.name_any(),
        ca_pem: ca,
    };
    rollout::kms(ctx, obj, &rctx, &prepared, &mut v, &mut status).await?;
    rollout::csi(ctx, obj, &rctx, &mut v, &mut status).await?;
    let mut requeue = match prepared {
        Prepared::Failed => Duration::from_secs(30),
        Prepared::NotNeeded | Prepared::Ready(_) => Duration::from_secs(300),
    };
    if status.uninstall_started.is_some() {
        requeue = requeue.min(Duration::from_secs(5));
    }
    // The migration off KMS (when not declared: forgetting any), else the rewrite after a
    // rotation: while migrating, kube-apiserver writes plaintext anyway.
    if (spec.kms.enabled || !spec.kms.migrate_off)
        && let Some(next) = migration::step(ctx, spec, &mut v, &mut status).await?
    {
        requeue = requeue.min(next);
    }
    if spec.kms.enabled
        && spec.kms.rewrite_after_rotation
        && !spec.kms.migrate_off
        && let Some(next) = rewrite::step(ctx, spec, &mut status).await?
    {
        requeue = requeue.min(next);
    }
    let ready = finish(ctx, obj, &api, v, status).await?;
    Ok((requeue, ready))
}

/// The installation that takes effect: one per cluster, the oldest (then by name); one being
/// deleted still counts until its finalizer is gone. The others say why they do nothing.
async fn installation_in_charge(client: &Client) -> Result<Option<String>, kube::Error> {
    let all = Api::<Lenient<KubeBaoInstallation>>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    Ok(all
        .items
        .iter()
        .filter(|o| {
            o.meta().deletion_timestamp.is_none() || o.finalizers().iter().any(|f| f == FINALIZER)
        })
        .min_by_key(|o| {
            (
                o.meta().creation_timestamp.clone().map(|t| t.0),
                o.name_any(),
            )
        })
        .map(|o| o.name_any()))
}

/// Adds the finalizer that runs `uninstall` on deletion.
async fn ensure_finalizer(
    obj: &KubeBaoInstallation,
    api: &Api<KubeBaoInstallation>,
) -> Result<(), kube::Error> {
    if obj.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(());
    }
    let mut finalizers = obj.finalizers().to_vec();
    finalizers.push(FINALIZER.into());
    set_finalizers(obj, api, finalizers).await
}

/// Replaces the installation's finalizers with `finalizers`.
pub(super) async fn set_finalizers(
    obj: &KubeBaoInstallation,
    api: &Api<KubeBaoInstallation>,
    finalizers: Vec<String>,
) -> Result<(), kube::Error> {
    api.patch(
        &obj.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": finalizers}})),
    )
    .await?;
    Ok(())
}

/// Turns the verdict into conditions, counts the reconcile, writes the status, then publishes
/// an Event for each change worth one (after the write, so a failed write does not publish
/// twice). Returns whether the installation is Ready.
async fn finish(
    ctx: &Ctx,
    obj: &KubeBaoInstallation,
    api: &Api<KubeBaoInstallation>,
    v: Verdict,
    mut status: KubeBaoInstallationStatus,
) -> Result<bool, Error> {
    let generation = obj.metadata.generation;
    let ready = v.apply(&mut status, generation);
    let reason = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map_or("Unknown", |c| c.reason.as_str());
    ctx.metrics
        .reconciled(KIND, if ready { "ok" } else { reason });
    status.observed_generation = generation;
    patch_status(api, &obj.name_any(), &status).await?;
    let before = obj.status.clone().unwrap_or_default();
    let changes = notices::notices(&obj.spec, &before, &status);
    notices::publish(&ctx.recorder, obj, changes).await;
    Ok(ready)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_owned_daemonset_wakes_its_installation_under_the_same_key_as_the_main_watch() {
        let mut inst = KubeBaoInstallation::new(
            "kubebao",
            serde_json::from_value(json!({"openbao": {"address": "https://bao:8200"}})).unwrap(),
        );
        inst.metadata.uid = Some("u1".into());
        let ds = DaemonSet {
            metadata: kube::api::ObjectMeta {
                name: Some("kubebao-installer".into()),
                namespace: Some("kube-system".into()),
                owner_references: inst.controller_owner_ref(&()).map(|o| vec![o]),
                ..Default::default()
            },
            ..Default::default()
        };
        // The same key, so the controller never runs two reconciles of one installation at once.
        assert_eq!(
            owning_installations(ds),
            vec![ObjectRef::from_obj(&Lenient::Valid(inst))]
        );
    }
}
