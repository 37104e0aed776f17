//! The BaoSecret controller: OpenBao (one KV path, or several named sources: KV secrets,
//! leased engine credentials, certificates) → Kubernetes Secret (copied, or rendered from
//! templates), read as the BaoSecret's own ServiceAccount, refreshed cheaply (KV v2 metadata
//! versions first), written only on change; issued credentials renewed, replaced with overlap
//! and revoked (see `issued.rs`).

mod certificate;
mod data;
mod finalizer;
mod held;
mod issued;
mod leases;
mod plan;
mod sources;
mod steps;
mod template;

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

use held::Held;
use issued::Issuer;
use leases::Book;
pub use plan::Check;
use plan::{Decision, Failure, REJECTED_RETRY, Synced, WritePlan, data_hash, rejected};
use steps::{
    apply_secret, check_metadata, forget_checks, last_check, read_target, remember,
    restart_workloads, tenant_identity, tenant_token,
};

use crate::api::Condition;
use crate::api::baosecret::BaoSecretSpec;
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
    /// Credentials this process issued (engine leases, certificates) and still needs.
    held: Arc<Held>,
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
    let held = Arc::new(Held::default());
    let (live, sweeper, swept) = (reader.clone(), base.clone(), held.clone());
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
            forget_gone(&sweeper, &swept, &live);
        }
    })
    .applied_objects()
    .predicate_filter(predicates::generation, Default::default());
    let (secret_reader, secrets) = watch_secrets(client);
    let ctx = Arc::new(SecretsContext {
        base: base.clone(),
        secrets: secret_reader,
        held: held.clone(),
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
        () = sweep_every(&base, &held, &live) => {}
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
async fn sweep_every(ctx: &Arc<Context>, held: &Held, live: &Store<Lenient<BaoSecret>>) {
    if live.wait_until_ready().await.is_err() {
        return futures::future::pending().await;
    }
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        forget_gone(ctx, held, live);
    }
}

/// Forgets what the operator holds for BaoSecrets no longer in `live` (the watch cache): their
/// last checks, failure counts and issued data, and the tenant tokens no remaining BaoSecret
/// reads with (revoked, in the background). A token that created a lease still held is in
/// use: revoking it would revoke the lease.
fn forget_gone(ctx: &Arc<Context>, held: &Held, live: &Store<Lenient<BaoSecret>>) {
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
    held.retain(|key| keys.contains(key));
    in_use.extend(held.identities());
    ctx.forget_failures("BaoSecret", |key| keys.contains(key));
    ctx.metrics.forget_gone("BaoSecret", |ns, name| {
        keys.contains(&format!("{ns}/{name}"))
    });
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

/// Reconciles one BaoSecret and writes its status (a deleted one: revokes its leases).
pub async fn reconcile(
    bs: Arc<BaoSecret>,
    sctx: Arc<SecretsContext>,
) -> Result<Action, kube::Error> {
    let started = Instant::now();
    let ctx = &sctx.base;
    let ns = bs.namespace().unwrap_or_default();
    let key = format!("{ns}/{}", bs.name_any());
    if bs.metadata.deletion_timestamp.is_some() {
        return finalizer::finalize(ctx, &sctx.held, &bs, &key).await;
    }
    let backoff_key = format!("BaoSecret/{key}");
    let previous = bs.status.clone().unwrap_or_default();
    let mut book = Book::from_status(&previous);
    let (outcome, wait, mut status) = match sync(&bs, &sctx, &ns, &key, &mut book).await {
        Ok(s) => {
            ctx.succeeded(&backoff_key);
            let next = s.next;
            let (outcome, status) = synced_status(&previous, s, &bs.spec);
            (outcome, next, status)
        }
        // Said once; a spec change or a change of the target Secret triggers the next try.
        Err(Failure {
            outcome,
            permanent: true,
        }) => {
            ctx.succeeded(&backoff_key);
            (outcome, REJECTED_RETRY, previous.clone())
        }
        Err(Failure { outcome, .. }) => {
            let wait = ctx.backoff(&backoff_key);
            (outcome, wait, previous.clone())
        }
    };
    // What the sync did to issued credentials counts whether it succeeded or not.
    book.record(&mut status);
    let action = Action::requeue(sooner(wait, &book));
    observe_expiries(ctx, &ns, &bs.name_any(), &book);
    ctx.count_cached();
    ctx.metrics.reconciled("BaoSecret", outcome.result());
    let ready = outcome.is_ready();
    ctx.metrics
        .observe_sync("BaoSecret", &ns, &bs.name_any(), started.elapsed(), ready);
    if ready {
        finalizer::remove_unneeded(ctx, &bs, &book).await;
    }
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

/// `wait`, or sooner when a held lease or certificate needs work before then.
fn sooner(wait: Duration, book: &Book) -> Duration {
    let now = leases::now();
    book.next_work(now)
        .map(|t| Duration::from_secs(u64::try_from(t.saturating_sub(now)).unwrap_or(0)))
        .map_or(wait, |work| wait.min(work.max(Duration::from_secs(1))))
}

/// Publishes when the credentials in `book` expire (the earliest lease and certificate).
fn observe_expiries(ctx: &Context, ns: &str, name: &str, book: &Book) {
    use crate::metrics::Expiry;
    let at = |secs: Option<leases::Secs>| {
        secs.map(|s| std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(s).unwrap_or(0)))
    };
    let (lease, certificate) = book.expiries();
    ctx.metrics
        .set_expiry("BaoSecret", ns, name, Expiry::Lease, at(lease));
    ctx.metrics
        .set_expiry("BaoSecret", ns, name, Expiry::Certificate, at(certificate));
}

/// The Ready outcome and status after a successful sync of `spec`.
fn synced_status(
    previous: &BaoSecretStatus,
    s: Synced,
    spec: &BaoSecretSpec,
) -> (Outcome, BaoSecretStatus) {
    let mut status = previous.clone();
    if s.wrote || status.data_hash.as_deref() != Some(&s.hash) {
        status.last_sync_time = Some(conditions::now());
    }
    // Only a check moves the next one (a reconcile in between keeps the time it had).
    if s.checked || status.next_refresh_time.is_none() {
        status.next_refresh_time = Some(time_in(s.next));
    }
    let single = !spec.secret_path.is_empty();
    status.kv_version = s.sources.first().and_then(|r| r.version).filter(|_| single);
    status.data_hash = Some(s.hash);
    let target = &spec.target.name;
    let message = match status.kv_version {
        Some(v) => format!("Secret {target} holds KV version {v}"),
        None if single => format!("Secret {target} is in sync"),
        None => format!(
            "Secret {target} is in sync with {} sources",
            s.sources.len()
        ),
    };
    status.sources = s.sources;
    let outcome = Outcome::Ready {
        reason: "Synced".into(),
        message,
    };
    (outcome, status)
}

/// The time `after` from now (RFC 3339, seconds).
fn time_in(after: Duration) -> String {
    let now = k8s_openapi::jiff::Timestamp::now();
    now.checked_add(after)
        .unwrap_or(now)
        .round(k8s_openapi::jiff::Unit::Second)
        .unwrap_or(now)
        .to_string()
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
pub(super) async fn write_status(
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
/// the refresh interval unless issued credentials need work, else one metadata request per KV
/// v2 source, the data only when a version moved (or a source is read every time), and a write
/// only on change. Issued credentials come from memory unless they must be issued anew.
async fn sync(
    bs: &BaoSecret,
    sctx: &SecretsContext,
    ns: &str,
    key: &str,
    book: &mut Book,
) -> Result<Synced, Failure> {
    let ctx = &*sctx.base;
    let spec = plan::sync_spec(&bs.spec, ns)?;
    let who = tenant_identity(bs, ns, &ctx.settings);
    let mut issuer = Issuer::new(ctx, &sctx.held, bs, key, &who, &spec, book);
    let last = last_check(ctx, key, &bs.uid().unwrap_or_default());
    let target = read_target(sctx, ns, &bs.spec.target.name, last.as_ref()).await?;
    let leased = |name: &str| Issuer::holds_lease(book, name);
    let planned = plan::plan(bs, last.as_ref(), &target, &spec, Instant::now(), &leased);
    // Leases are renewed and owed revocations made even while the target is refused; without
    // such work a refused target costs no OpenBao request, as before.
    let due = issuer.due(book);
    if !due && let Ok((Decision::UpToDate(synced), _)) = &planned {
        return Ok(synced.clone());
    }
    if !due && let Err(refused) = planned {
        return Err(refused.into());
    }
    let token = tenant_token(ctx, &who).await?;
    issuer.upkeep(book, &token).await?;
    let (decision, mut plan) = planned?;
    let unchanged = match decision {
        Decision::UpToDate(synced) => Some(synced),
        Decision::CheckMetadata { paths } => {
            let seen = check_metadata(ctx, &token, &paths, &plan, &who).await?;
            let synced = plan.after_metadata(&seen);
            if let Some(synced) = &synced {
                remember(ctx, key, plan.check(synced, Instant::now()));
            }
            synced
        }
        Decision::ReadData => None,
    };
    if let Some(synced) = unchanged
        && !issuer.must_rebuild(book)
    {
        return Ok(synced);
    }
    let (read, sources) = issuer.read_all(book, &token, &spec.sources).await?;
    issuer.save(book, ns).await?;
    let data = data::secret_data(&bs.spec, &read)?;
    drop(read);
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
    issuer.written(book);
    let synced = Synced {
        sources,
        hash,
        wrote: write,
        checked: true,
        next: spec.refresh,
    };
    remember(ctx, key, plan.check(&synced, Instant::now()));
    Ok(synced)
}
