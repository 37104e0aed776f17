//! The BaoSecret controller: OpenBao KV → Kubernetes Secret, read as the BaoSecret's own
//! ServiceAccount, refreshed cheaply (KV v2 metadata version first), written only on change.

mod plan;
mod steps;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use serde_json::json;

pub use plan::Check;
use plan::{
    Decision, Failure, REJECTED_RETRY, Synced, WritePlan, data_hash, failed, rejected, select_keys,
};
use steps::{
    apply_secret, forget_checks, last_check, read_kv, read_kv_version, read_target, remember,
    restart_workloads, tenant_identity, tenant_token,
};

use crate::api::Condition;
use crate::api::{BaoSecret, BaoSecretStatus};
use crate::conditions::{self, Outcome};
use crate::context::Context;
use crate::lenient::{self, Lenient};

/// The one field manager for everything the operator applies.
pub const MANAGER: &str = "kubebao-operator";
/// Label on every Secret a BaoSecret writes (value: the BaoSecret's name); the operator
/// watches Secrets with it, so edits and deletions are repaired for every creation policy.
pub const LABEL: &str = "kubebao.io/baosecret";
/// Annotation listing the Secret keys a BaoSecret manages (comma-separated).
pub const KEYS_ANNOTATION: &str = "kubebao.io/managed-keys";
/// Annotation on an existing Secret naming the BaoSecrets (comma-separated) that may merge
/// into it (`creationPolicy: Merge`): the Secret's own opt-in, set by whoever may edit it.
pub const MERGE_ANNOTATION: &str = "kubebao.io/allow-merge-from";
/// What the BaoSecret controller adds to the shared [`Context`]: a metadata-only cache of the
/// Secrets BaoSecrets write, so an unchanged Secret costs no API read.
pub struct SecretsContext {
    /// Shared operator context.
    pub base: Arc<Context>,
    /// Labelled Secrets' metadata (no data, no managedFields).
    pub secrets: Store<PartialObjectMeta<Secret>>,
}

/// How often what the operator holds for deleted BaoSecrets is swept without a deletion event
/// (a reconcile that was still running as its object was deleted, an identity no longer used).
const SWEEP_EVERY: Duration = Duration::from_secs(300);

/// Runs the BaoSecret controller until `stop` resolves.
pub async fn run(
    base: Arc<Context>,
    stop: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = base.client.clone();
    let (reader, writer) = reflector::store::<Lenient<BaoSecret>>();
    let (live, sweeper) = (reader.clone(), base.clone());
    // Status-only updates (our own) do not trigger a reconcile: the generation predicate.
    let baosecrets = watcher(
        Api::<Lenient<BaoSecret>>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(|o| o.managed_fields_mut().clear())
    .reflect(writer)
    .inspect_ok(move |event| {
        // The cache has dropped the object (or re-listed): forget what it no longer holds.
        if matches!(event, watcher::Event::Delete(_) | watcher::Event::InitDone) {
            forget_gone(&sweeper, &live);
        }
    })
    .applied_objects()
    .predicate_filter(predicates::generation, Default::default());
    let (secret_reader, secrets) = watch_secrets(client);
    let ctx = Arc::new(SecretsContext {
        base: base.clone(),
        secrets: secret_reader,
    });
    let checks = base.clone();
    let live = reader.clone();
    let controller = Controller::for_stream(baosecrets, reader)
        .with_config(
            kube::runtime::controller::Config::default().concurrency(base.settings.concurrency),
        )
        .watches_stream(secrets, move |meta: PartialObjectMeta<Secret>| {
            let name = meta.labels().get(LABEL)?.clone();
            let ns = meta.namespace()?;
            // The echo of our own write: nothing to do.
            let ours = checks
                .checks
                .lock()
                .expect("checks lock")
                .get(&format!("{ns}/{name}"))
                .and_then(|c| c.secret_rv.clone());
            if ours.is_some() && ours == meta.resource_version() {
                return None;
            }
            Some(ObjectRef::new(&name).within(&ns))
        })
        .graceful_shutdown_on(stop)
        .run(
            |obj, ctx| {
                crate::leader::while_leading(async move {
                    let client = ctx.base.client.clone();
                    lenient::guarded(&client, &obj, async {
                        match lenient::parsed(&client, &obj).await? {
                            Some(bs) => reconcile(bs, ctx).await,
                            None => Ok(Action::await_change()),
                        }
                    })
                    .await
                })
            },
            |_, e, _| {
                tracing::warn!(error = %e, "BaoSecret status update failed; retrying");
                Action::requeue(Duration::from_secs(5))
            },
            ctx,
        )
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "BaoSecret controller event");
            }
        });
    tokio::select! {
        () = controller => {}
        () = sweep_every(&base, &live) => {}
    }
}

/// The Secrets BaoSecrets write, metadata only: a cache and the stream of changes. Every such
/// Secret carries the [`LABEL`], whatever the creation policy, so an edited or deleted Secret
/// is restored (a superset of `.owns()`).
fn watch_secrets(
    client: kube::Client,
) -> (
    Store<PartialObjectMeta<Secret>>,
    impl futures::Stream<Item = Result<PartialObjectMeta<Secret>, watcher::Error>> + Send,
) {
    let (reader, writer) = reflector::store::<PartialObjectMeta<Secret>>();
    let changes = watcher(
        Api::<PartialObjectMeta<Secret>>::all(client),
        watcher::Config::default().labels(LABEL),
    )
    .default_backoff()
    .modify(|o| o.managed_fields_mut().clear())
    .reflect(writer)
    .map_ok(|event| match event {
        // Deleted, or its label removed: never the echo of our own write.
        watcher::Event::Delete(mut meta) => {
            meta.metadata.resource_version = None;
            watcher::Event::Delete(meta)
        }
        other => other,
    })
    .touched_objects();
    (reader, changes)
}

/// Sweeps every [`SWEEP_EVERY`] (see [`forget_gone`]), once the watch cache is filled.
async fn sweep_every(ctx: &Arc<Context>, live: &Store<Lenient<BaoSecret>>) {
    if live.wait_until_ready().await.is_err() {
        return futures::future::pending().await;
    }
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        forget_gone(ctx, live);
    }
}

/// Forgets what the operator holds for BaoSecrets no longer in `live` (the watch cache): their
/// last checks and failure counts, and the tenant tokens no remaining BaoSecret reads with
/// (revoked, in the background).
fn forget_gone(ctx: &Arc<Context>, live: &Store<Lenient<BaoSecret>>) {
    let objects = live.state();
    let mut keys = HashSet::new();
    let mut in_use = HashSet::new();
    for obj in &objects {
        let ns = obj.namespace().unwrap_or_default();
        keys.insert(format!("{ns}/{}", obj.name_any()));
        if let Lenient::Valid(bs) = &**obj {
            in_use.insert(tenant_identity(bs, &ns, &ctx.settings));
        }
    }
    forget_checks(ctx, |key| keys.contains(key));
    ctx.forget_failures("BaoSecret", |key| keys.contains(key));
    ctx.count_cached();
    let unused = ctx.tenants.unused(&in_use);
    if unused.is_empty() {
        return;
    }
    let ctx = ctx.clone();
    tokio::spawn(async move {
        ctx.tenants.forget(&unused).await;
        ctx.count_cached();
    });
}

/// Reconciles one BaoSecret and writes its status.
pub async fn reconcile(
    bs: Arc<BaoSecret>,
    sctx: Arc<SecretsContext>,
) -> Result<Action, kube::Error> {
    let ctx = &sctx.base;
    let ns = bs.namespace().unwrap_or_default();
    let key = format!("{ns}/{}", bs.name_any());
    let backoff_key = format!("BaoSecret/{key}");
    let previous = bs.status.clone().unwrap_or_default();
    let (outcome, action, mut status) = match sync(&bs, &sctx, &ns, &key).await {
        Ok(s) => {
            ctx.succeeded(&backoff_key);
            let next = Action::requeue(s.next);
            let (outcome, status) = synced_status(&previous, s, &bs.spec.target.name);
            (outcome, next, status)
        }
        // Said once; a spec change or a change of the target Secret triggers the next try.
        Err(Failure {
            outcome,
            permanent: true,
        }) => {
            ctx.succeeded(&backoff_key);
            (outcome, Action::requeue(REJECTED_RETRY), previous.clone())
        }
        Err(Failure { outcome, .. }) => {
            let wait = ctx.backoff(&backoff_key);
            (outcome, Action::requeue(wait), previous.clone())
        }
    };
    ctx.count_cached();
    ctx.metrics.reconciled("BaoSecret", outcome.result());
    if worth_an_event(&previous.conditions, &outcome) {
        announce(ctx, &bs, &key, &outcome).await;
    }
    status.observed_generation = bs.metadata.generation;
    status.conditions =
        conditions::conditions(&previous.conditions, &outcome, bs.metadata.generation);
    if Some(&status) != bs.status.as_ref() {
        write_status(ctx, &bs, &ns, &status).await?;
    }
    Ok(action)
}

/// The Ready outcome and status after a successful sync into Secret `target`.
fn synced_status(
    previous: &BaoSecretStatus,
    s: Synced,
    target: &str,
) -> (Outcome, BaoSecretStatus) {
    let mut status = previous.clone();
    if s.wrote || status.data_hash.as_deref() != Some(&s.hash) {
        status.last_sync_time = Some(conditions::now());
    }
    status.kv_version = s.kv_version;
    status.data_hash = Some(s.hash);
    let message = match s.kv_version {
        Some(v) => format!("Secret {target} holds KV version {v}"),
        None => format!("Secret {target} is in sync"),
    };
    let outcome = Outcome::Ready {
        reason: "Synced".into(),
        message,
    };
    (outcome, status)
}

/// Events for problems and recoveries only: a first successful sync is in the status already,
/// and 1,000 new BaoSecrets should not mean 1,000 extra API writes.
fn worth_an_event(previous: &[Condition], outcome: &Outcome) -> bool {
    if outcome.is_ready() {
        previous
            .iter()
            .find(|c| c.type_ == "Ready")
            .is_some_and(|c| c.status != "True")
    } else {
        conditions::ready_changed(previous, outcome)
    }
}

/// Logs and publishes a change of `bs`'s Ready condition.
async fn announce(ctx: &Context, bs: &BaoSecret, key: &str, outcome: &Outcome) {
    let warning = !outcome.is_ready();
    if warning {
        tracing::warn!(baosecret = %key, reason = outcome.reason(), message = outcome.message(), "BaoSecret not ready");
    } else {
        tracing::info!(baosecret = %key, message = outcome.message(), "BaoSecret ready");
    }
    let note = outcome.message().to_string();
    ctx.event(bs, warning, outcome.reason(), note).await;
}

/// Writes `bs`'s status (server-side apply of the status subresource).
async fn write_status(
    ctx: &Context,
    bs: &BaoSecret,
    ns: &str,
    status: &BaoSecretStatus,
) -> Result<(), kube::Error> {
    let api: Api<BaoSecret> = Api::namespaced(ctx.client.clone(), ns);
    let patch = json!({
        "apiVersion": "kubebao.io/v1alpha1",
        "kind": "BaoSecret",
        "status": status,
    });
    api.patch_status(
        &bs.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// Brings the target Secret in line with OpenBao at the least cost: no OpenBao request within
/// the refresh interval, else at most one (metadata or data), and a write only on change.
async fn sync(
    bs: &BaoSecret,
    sctx: &SecretsContext,
    ns: &str,
    key: &str,
) -> Result<Synced, Failure> {
    let ctx = &*sctx.base;
    let spec = plan::sync_spec(&bs.spec, ns)?;
    let last = last_check(ctx, key, &bs.uid().unwrap_or_default());
    let target = read_target(sctx, ns, &bs.spec.target.name, last.as_ref()).await?;
    let (decision, mut plan) = plan::plan(bs, last.as_ref(), &target, &spec, Instant::now())?;
    let metadata_path = match decision {
        Decision::UpToDate(synced) => return Ok(synced),
        Decision::CheckMetadata { path } => Some(path),
        Decision::ReadData => None,
    };
    let who = tenant_identity(bs, ns, &ctx.settings);
    let token = tenant_token(ctx, &who).await?;
    if let Some(path) = metadata_path {
        let metadata = read_kv_version(ctx, &token, &path, &who).await?;
        if let Some(synced) = plan.after_metadata(metadata) {
            remember(ctx, key, plan.check(&synced, Instant::now()));
            return Ok(synced);
        }
    }
    let kv = read_kv(ctx, &token, &spec.location, &who).await?;
    let data = select_keys(&kv.data, bs.spec.keys.as_deref())
        .map_err(|m| failed(true, "KeyNotFound", m))?;
    for key in data.keys() {
        crate::api::checks::secret_key("the Secret key", key)
            .map_err(|m| rejected("InvalidKey", m))?;
    }
    plan::check_size(&bs.spec.target.name, &data)?;
    let hash = data_hash(&ctx.hash_key, &data);
    let WritePlan { write, restart } = plan.write_plan(&hash);
    if write {
        plan.secret_rv = apply_secret(bs, ctx, ns, &data).await?;
    }
    if restart && let Some(targets) = &bs.spec.rollout_restart_targets {
        restart_workloads(bs, ctx, ns, targets).await;
    }
    let synced = Synced {
        kv_version: (spec.location.version == 2).then_some(kv.version),
        hash,
        wrote: write,
        next: spec.refresh,
    };
    remember(ctx, key, plan.check(&synced, Instant::now()));
    Ok(synced)
}
