//! The BaoSecret controller: OpenBao KV → Kubernetes Secret, read as the BaoSecret's own
//! ServiceAccount, refreshed cheaply (KV v2 metadata version first), written only on change.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hmac::{Hmac, Mac};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::api::baosecret::{RolloutTarget, WorkloadKind};
use crate::api::{BaoSecret, BaoSecretStatus, CreationPolicy};
use crate::conditions::{Outcome, conditions};
use crate::context::{Context, parse_duration};
use crate::lenient::{self, Lenient};
use crate::tenant::{TenantError, TenantIdentity};

/// The one field manager for everything the operator applies.
pub const MANAGER: &str = "kubebao-operator";
/// Label on every Secret a BaoSecret writes (value: the BaoSecret's name); the operator
/// watches Secrets with it, so edits and deletions are repaired for every creation policy.
pub const LABEL: &str = "kubebao.io/baosecret";
/// Annotation listing the Secret keys a BaoSecret manages (comma-separated).
pub const KEYS_ANNOTATION: &str = "kubebao.io/managed-keys";
const DEFAULT_REFRESH: Duration = Duration::from_secs(3600);

/// The last successful check of one BaoSecret (in memory: a restart costs one read each).
#[derive(Clone, Debug)]
pub struct Check {
    at: Instant,
    uid: String,
    generation: Option<i64>,
    hash: String,
    kv_version: Option<u64>,
    metadata_denied: bool,
    /// resourceVersion of the Secret as last written or verified by us.
    secret_rv: Option<String>,
}

/// What the BaoSecret controller adds to the shared [`Context`]: a metadata-only cache of the
/// Secrets BaoSecrets write, so an unchanged Secret costs no API read.
pub struct SecretsContext {
    /// Shared operator context.
    pub base: Arc<Context>,
    /// Labelled Secrets' metadata (no data, no managedFields).
    pub secrets: Store<PartialObjectMeta<Secret>>,
}

/// Runs the BaoSecret controller until `stop` resolves.
pub async fn run(
    base: Arc<Context>,
    stop: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = base.client.clone();
    let (reader, writer) = reflector::store::<Lenient<BaoSecret>>();
    // Status-only updates (our own) do not trigger a reconcile: the generation predicate.
    let baosecrets = watcher(
        Api::<Lenient<BaoSecret>>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(|o| o.managed_fields_mut().clear())
    .reflect(writer)
    .applied_objects()
    .predicate_filter(predicates::generation, Default::default());
    // Every Secret a BaoSecret writes carries its label, whatever the creation policy, so an
    // edited or deleted Secret is restored (a superset of `.owns()`); metadata only.
    let (secret_reader, secret_writer) = reflector::store::<PartialObjectMeta<Secret>>();
    let secrets = watcher(
        Api::<PartialObjectMeta<Secret>>::all(client),
        watcher::Config::default().labels(LABEL),
    )
    .default_backoff()
    .modify(|o| o.managed_fields_mut().clear())
    .reflect(secret_writer)
    .touched_objects();
    let ctx = Arc::new(SecretsContext {
        base: base.clone(),
        secrets: secret_reader,
    });
    let checks = base.clone();
    Controller::for_stream(baosecrets, reader)
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
            |obj, ctx| async move {
                match lenient::parsed(&ctx.base.client, &obj).await? {
                    Some(bs) => reconcile(bs, ctx).await,
                    None => Ok(Action::await_change()),
                }
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
        })
        .await;
}

/// Where a `secretPath` points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvLocation {
    /// 1 or 2.
    pub version: u8,
    /// API path of the data.
    pub data_path: String,
    /// API path of the KV v2 metadata.
    pub metadata_path: Option<String>,
}

/// Splits `secretPath` into data and metadata API paths.
pub fn locate(secret_path: &str, version: Option<u8>) -> Result<KvLocation, String> {
    let path = secret_path.trim_matches('/');
    let v2_split = path.split_once("/data/");
    match (version, v2_split) {
        (None | Some(2), Some((mount, rest))) if !rest.is_empty() => Ok(KvLocation {
            version: 2,
            data_path: path.to_string(),
            metadata_path: Some(format!("{mount}/metadata/{rest}")),
        }),
        (Some(2), _) => Err(format!(
            "secretPath {secret_path:?} is not a KV v2 API path: write it as <mount>/data/<path>"
        )),
        _ => Ok(KvLocation {
            version: 1,
            data_path: path.to_string(),
            metadata_path: None,
        }),
    }
}

/// HMAC-SHA256 of sorted key/value pairs.
pub fn data_hash(key: &[u8], data: &BTreeMap<String, Vec<u8>>) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    for (k, v) in data {
        mac.update(&(k.len() as u64).to_be_bytes());
        mac.update(k.as_bytes());
        mac.update(&(v.len() as u64).to_be_bytes());
        mac.update(v);
    }
    format!("hmac-sha256:{}", hex::encode(mac.finalize().into_bytes()))
}

fn failed(stalled: bool, reason: &str, message: impl Into<String>) -> Outcome {
    let (reason, message) = (reason.to_string(), message.into());
    if stalled {
        Outcome::Stalled { reason, message }
    } else {
        Outcome::Retrying { reason, message }
    }
}

fn openbao_outcome(e: &kubebao_openbao::Error, who: &TenantIdentity, path: &str) -> Outcome {
    use kubebao_openbao::Error as E;
    match e {
        E::PermissionDenied { .. } => failed(
            true,
            "PermissionDenied",
            format!("{who} may not read {path}: {e}; grant the role's policy read on it"),
        ),
        E::NotFound { .. } => failed(true, "SecretNotFound", format!("{e}")),
        e if e.is_unavailable() => failed(false, "OpenBaoUnavailable", e.to_string()),
        e => failed(true, "OpenBaoError", e.to_string()),
    }
}

/// What a successful sync did.
struct Synced {
    kv_version: Option<u64>,
    hash: String,
    wrote: bool,
    next: Duration,
}

/// Reconciles one BaoSecret and writes its status.
pub async fn reconcile(
    bs: Arc<BaoSecret>,
    sctx: Arc<SecretsContext>,
) -> Result<Action, kube::Error> {
    let ctx = &sctx.base;
    let ns = bs.namespace().unwrap_or_default();
    let key = format!("{ns}/{}", bs.name_any());
    let previous = bs.status.clone().unwrap_or_default();
    let result = sync(&bs, &sctx, &ns, &key, &previous).await;
    let (outcome, action, mut status) = match result {
        Ok(s) => {
            ctx.succeeded(&key);
            let mut status = previous.clone();
            if s.wrote || status.data_hash.as_deref() != Some(&s.hash) {
                status.last_sync_time = Some(
                    k8s_openapi::jiff::Timestamp::now()
                        .round(k8s_openapi::jiff::Unit::Second)
                        .expect("round")
                        .to_string(),
                );
            }
            status.kv_version = s.kv_version;
            status.data_hash = Some(s.hash);
            let message = match s.kv_version {
                Some(v) => format!("Secret {} holds KV version {v}", bs.spec.target.name),
                None => format!("Secret {} is in sync", bs.spec.target.name),
            };
            (
                Outcome::Ready {
                    reason: "Synced".into(),
                    message,
                },
                Action::requeue(s.next),
                status,
            )
        }
        Err(outcome) => {
            let wait = ctx.backoff(&key);
            (outcome, Action::requeue(wait), previous.clone())
        }
    };
    ctx.metrics.reconciled(
        "BaoSecret",
        if matches!(outcome, Outcome::Ready { .. }) {
            "ok"
        } else {
            outcome.reason()
        },
    );
    let ready_before = previous.conditions.iter().find(|c| c.type_ == "Ready");
    let warning = !matches!(outcome, Outcome::Ready { .. });
    // Events for problems and recoveries only: a first successful sync is in the status
    // already, and 1,000 new BaoSecrets should not mean 1,000 extra API writes.
    let changed = if warning {
        ready_before.is_none_or(|c| c.reason != outcome.reason() || c.message != outcome.message())
    } else {
        ready_before.is_some_and(|c| c.status != "True")
    };
    if changed {
        if warning {
            tracing::warn!(baosecret = %key, reason = outcome.reason(), message = outcome.message(), "BaoSecret not ready");
        } else {
            tracing::info!(baosecret = %key, message = outcome.message(), "BaoSecret ready");
        }
        ctx.event(
            &*bs,
            warning,
            outcome.reason(),
            outcome.message().to_string(),
        )
        .await;
    }
    status.observed_generation = bs.metadata.generation;
    status.conditions = conditions(&previous.conditions, &outcome, bs.metadata.generation);
    if Some(&status) != bs.status.as_ref() {
        let api: Api<BaoSecret> = Api::namespaced(ctx.client.clone(), &ns);
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
    }
    Ok(action)
}

fn managed_data(secret: &Secret) -> BTreeMap<String, Vec<u8>> {
    let keys: Vec<&str> = secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(KEYS_ANNOTATION))
        .map(|k| k.split(',').filter(|k| !k.is_empty()).collect())
        .unwrap_or_default();
    let data = secret.data.clone().unwrap_or_default();
    keys.into_iter()
        .map(|k| {
            (
                k.to_string(),
                data.get(k)
                    .map(|b| b.0.clone())
                    .unwrap_or_else(|| b"\0missing".to_vec()),
            )
        })
        .collect()
}

async fn sync(
    bs: &BaoSecret,
    sctx: &SecretsContext,
    ns: &str,
    key: &str,
    status: &BaoSecretStatus,
) -> Result<Synced, Outcome> {
    let ctx = &*sctx.base;
    let spec = &bs.spec;
    if let Some(target_ns) = &spec.target.namespace
        && target_ns != ns
    {
        return Err(failed(
            true,
            "CrossNamespaceTarget",
            format!(
                "target.namespace {target_ns:?} is not this BaoSecret's namespace {ns:?}; a BaoSecret writes only into its own namespace (remove target.namespace or create the BaoSecret in {target_ns:?})"
            ),
        ));
    }
    let refresh = match &spec.refresh_interval {
        None => DEFAULT_REFRESH,
        Some(s) => parse_duration(s)
            .filter(|d| *d >= Duration::from_secs(1))
            .ok_or_else(|| {
                failed(
                    true,
                    "InvalidSpec",
                    format!("refreshInterval {s:?} is not a duration of at least 1s"),
                )
            })?,
    };
    let location =
        locate(&spec.secret_path, spec.kv_version).map_err(|m| failed(true, "InvalidSpec", m))?;
    let policy = spec.target.creation_policy;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let uid = bs.uid().unwrap_or_default();
    let last = ctx
        .checks
        .lock()
        .expect("checks lock")
        .get(key)
        .filter(|c| c.uid == uid)
        .cloned();
    // Unchanged since we last wrote or verified it (same resourceVersion in the metadata
    // cache): no need to read it from the API.
    let cached_rv = sctx
        .secrets
        .get(&ObjectRef::new(&spec.target.name).within(ns))
        .and_then(|m| m.resource_version());
    let unchanged =
        cached_rv.is_some() && last.as_ref().and_then(|c| c.secret_rv.clone()) == cached_rv;
    let existing = if unchanged {
        None
    } else {
        secrets.get_opt(&spec.target.name).await.map_err(|e| {
            failed(
                false,
                "KubernetesError",
                format!("cannot read Secret {}: {e}", spec.target.name),
            )
        })?
    };
    if let Some(s) = &existing {
        let ours = s.labels().get(LABEL).map(String::as_str) == Some(bs.name_any().as_str());
        if !ours && policy != CreationPolicy::Merge {
            return Err(failed(
                true,
                "TargetExists",
                format!(
                    "Secret {} exists and is not managed by this BaoSecret; delete it, rename the target, or use creationPolicy: Merge",
                    spec.target.name
                ),
            ));
        }
    } else if policy == CreationPolicy::Merge && !unchanged {
        return Err(failed(
            false,
            "TargetNotFound",
            format!(
                "creationPolicy Merge needs an existing Secret {}; create it or use Owner",
                spec.target.name
            ),
        ));
    }

    let known_hash = last
        .as_ref()
        .map(|c| c.hash.clone())
        .or_else(|| status.data_hash.clone());
    let known_version = last
        .as_ref()
        .map(|c| c.kv_version)
        .unwrap_or(status.kv_version);
    let generation_current = last.as_ref().map(|c| c.generation) == Some(bs.metadata.generation)
        || (last.is_none() && status.observed_generation == bs.metadata.generation);
    let intact = unchanged
        || existing
            .as_ref()
            .is_some_and(|s| Some(data_hash(&ctx.hash_key, &managed_data(s))) == known_hash);
    let secret_rv = if unchanged {
        cached_rv
    } else {
        existing.as_ref().and_then(|s| s.resource_version())
    };
    if let Some(c) = &last
        && intact
        && generation_current
        && c.at.elapsed() < refresh
    {
        return Ok(Synced {
            kv_version: c.kv_version,
            hash: c.hash.clone(),
            wrote: false,
            next: refresh - c.at.elapsed(),
        });
    }

    let who = TenantIdentity {
        namespace: ns.to_string(),
        service_account: spec
            .service_account_name
            .clone()
            .unwrap_or_else(|| "default".into()),
        role: spec.role.clone().unwrap_or_else(|| ns.to_string()),
        mount: spec
            .auth_mount
            .clone()
            .unwrap_or_else(|| ctx.settings.auth_mount.clone()),
        audience: spec
            .audience
            .clone()
            .unwrap_or_else(|| ctx.settings.token_audience.clone()),
    };
    let token = ctx
        .tenants
        .token(&ctx.client, &ctx.bao, &ctx.metrics, &who)
        .await
        .map_err(|e| match &e {
            TenantError::TokenRequest { source: kube::Error::Api(s), .. } if s.code == 404 => {
                failed(true, "ServiceAccountNotFound", e.to_string())
            }
            TenantError::TokenRequest { .. } => failed(false, "TokenRequestFailed", e.to_string()),
            TenantError::Login { source, .. } if source.is_unavailable() => {
                failed(false, "OpenBaoUnavailable", e.to_string())
            }
            TenantError::Login { .. } => failed(
                true,
                "LoginDenied",
                format!("{e}; check that the role exists and is bound to this ServiceAccount and namespace"),
            ),
        })?;

    let metadata_denied = last.as_ref().is_some_and(|c| c.metadata_denied);
    let mut now_metadata_denied = metadata_denied;
    if let (Some(meta_path), true) = (
        &location.metadata_path,
        intact && generation_current && !metadata_denied,
    ) {
        match ctx
            .metrics
            .openbao("kv_metadata", ctx.bao.read(meta_path, &token).await)
        {
            Ok(meta) => {
                let v = meta
                    .data
                    .as_ref()
                    .and_then(|d| d.get("current_version"))
                    .and_then(Value::as_u64);
                if v.is_some() && v == known_version {
                    let hash = known_hash.clone().unwrap_or_default();
                    remember(
                        ctx,
                        key,
                        &uid,
                        bs.metadata.generation,
                        &hash,
                        v,
                        false,
                        secret_rv,
                    );
                    return Ok(Synced {
                        kv_version: v,
                        hash,
                        wrote: false,
                        next: refresh,
                    });
                }
            }
            Err(e) if e.is_permission_denied() => {
                // The role may read data but not metadata: read data directly from now on
                // (still one request per refresh).
                now_metadata_denied = true;
            }
            Err(e) => return Err(openbao_outcome(&e, &who, meta_path)),
        }
    }

    let read = if location.version == 2 {
        ctx.metrics.openbao(
            "kv_read",
            ctx.bao.kv2_read_api_path(&token, &location.data_path).await,
        )
    } else {
        ctx.metrics.openbao(
            "kv_read",
            ctx.bao.kv1_read(&token, &location.data_path).await,
        )
    };
    let kv = match read {
        Ok(kv) => kv,
        Err(e) => {
            if e.is_permission_denied() {
                ctx.tenants.denied(&who).await;
            }
            return Err(openbao_outcome(&e, &who, &location.data_path));
        }
    };
    let kv_version = (location.version == 2).then_some(kv.version);
    let data =
        select_keys(&kv.data, spec.keys.as_deref()).map_err(|m| failed(true, "KeyNotFound", m))?;
    let hash = data_hash(&ctx.hash_key, &data);

    let mut wrote = false;
    let mut secret_rv = secret_rv;
    if !(intact && generation_current && known_hash.as_deref() == Some(&hash)) {
        secret_rv = apply_secret(bs, ctx, &secrets, &data).await?;
        wrote = true;
    }
    if known_hash.is_some()
        && known_hash.as_deref() != Some(&hash)
        && let Some(targets) = &spec.rollout_restart_targets
    {
        restart_workloads(bs, ctx, ns, targets).await;
    }
    remember(
        ctx,
        key,
        &uid,
        bs.metadata.generation,
        &hash,
        kv_version,
        now_metadata_denied,
        secret_rv,
    );
    Ok(Synced {
        kv_version,
        hash,
        wrote,
        next: refresh,
    })
}

#[allow(clippy::too_many_arguments)]
fn remember(
    ctx: &Context,
    key: &str,
    uid: &str,
    generation: Option<i64>,
    hash: &str,
    kv_version: Option<u64>,
    metadata_denied: bool,
    secret_rv: Option<String>,
) {
    ctx.checks.lock().expect("checks lock").insert(
        key.to_string(),
        Check {
            at: Instant::now(),
            uid: uid.to_string(),
            generation,
            hash: hash.to_string(),
            kv_version,
            metadata_denied,
            secret_rv,
        },
    );
}

/// Picks and renames keys; non-string values are stored as their JSON text.
pub fn select_keys(
    data: &serde_json::Map<String, Value>,
    keys: Option<&[crate::api::baosecret::KeyMapping]>,
) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let bytes = |v: &Value| match v {
        Value::String(s) => s.clone().into_bytes(),
        other => other.to_string().into_bytes(),
    };
    match keys {
        None => Ok(data.iter().map(|(k, v)| (k.clone(), bytes(v))).collect()),
        Some(keys) => keys
            .iter()
            .map(|m| {
                let v = data.get(&m.from).ok_or_else(|| {
                    let mut have: Vec<&String> = data.keys().collect();
                    have.sort();
                    format!(
                        "key {:?} is not in the OpenBao secret; it has {have:?}",
                        m.from
                    )
                })?;
                Ok((m.to.clone().unwrap_or_else(|| m.from.clone()), bytes(v)))
            })
            .collect(),
    }
}

async fn apply_secret(
    bs: &BaoSecret,
    ctx: &Context,
    secrets: &Api<Secret>,
    data: &BTreeMap<String, Vec<u8>>,
) -> Result<Option<String>, Outcome> {
    let spec = &bs.spec;
    let mut labels = spec.target.labels.clone().unwrap_or_default();
    labels.insert(LABEL.into(), bs.name_any());
    labels.insert("app.kubernetes.io/managed-by".into(), "kubebao".into());
    let mut annotations = spec.target.annotations.clone().unwrap_or_default();
    annotations.insert(
        KEYS_ANNOTATION.into(),
        data.keys().cloned().collect::<Vec<_>>().join(","),
    );
    let owner_references = (spec.target.creation_policy == CreationPolicy::Owner).then(|| {
        vec![OwnerReference {
            controller: Some(true),
            ..bs.controller_owner_ref(&()).expect("BaoSecret has a uid")
        }]
    });
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(spec.target.name.clone()),
            namespace: bs.namespace(),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references,
            ..Default::default()
        },
        // Merge leaves the type of the existing Secret alone (it is immutable).
        type_: match spec.target.creation_policy {
            CreationPolicy::Merge => None,
            _ => Some(spec.target.type_.clone().unwrap_or_else(|| "Opaque".into())),
        },
        data: Some(
            data.iter()
                .map(|(k, v)| (k.clone(), ByteString(v.clone())))
                .collect(),
        ),
        ..Default::default()
    };
    let mut value = serde_json::to_value(&secret).expect("Secret serializes");
    value["apiVersion"] = json!("v1");
    value["kind"] = json!("Secret");
    ctx.metrics.secret_writes.inc();
    let written = secrets
        .patch(
            &spec.target.name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&value),
        )
        .await
        .map_err(|e| {
            failed(
                false,
                "SecretWriteFailed",
                format!("cannot write Secret {}: {e}", spec.target.name),
            )
        })?;
    Ok(written.resource_version())
}

async fn restart_workloads(bs: &BaoSecret, ctx: &Context, ns: &str, targets: &[RolloutTarget]) {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let patch = json!({"spec": {"template": {"metadata": {"annotations": {"kubebao.io/restartedAt": now}}}}});
    for t in targets {
        let params = PatchParams::default();
        let result = match t.kind {
            WorkloadKind::Deployment => Api::<Deployment>::namespaced(ctx.client.clone(), ns)
                .patch(&t.name, &params, &Patch::Merge(&patch))
                .await
                .map(|_| ()),
            WorkloadKind::StatefulSet => Api::<StatefulSet>::namespaced(ctx.client.clone(), ns)
                .patch(&t.name, &params, &Patch::Merge(&patch))
                .await
                .map(|_| ()),
            WorkloadKind::DaemonSet => Api::<DaemonSet>::namespaced(ctx.client.clone(), ns)
                .patch(&t.name, &params, &Patch::Merge(&patch))
                .await
                .map(|_| ()),
        };
        match result {
            Ok(()) => {
                ctx.metrics.rollout_restarts.inc();
                ctx.event(
                    bs,
                    false,
                    "RolloutRestarted",
                    format!("restarted {:?} {} after the data changed", t.kind, t.name),
                )
                .await;
            }
            Err(e) => {
                ctx.event(
                    bs,
                    true,
                    "RolloutRestartFailed",
                    format!("cannot restart {:?} {}: {e}", t.kind, t.name),
                )
                .await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_kv_v2_and_v1_paths() {
        let v2 = locate("secret/data/myapp", None).unwrap();
        assert_eq!(v2.version, 2);
        assert_eq!(v2.metadata_path.as_deref(), Some("secret/metadata/myapp"));
        let v1 = locate("kv1/app/db", None).unwrap();
        assert_eq!((v1.version, v1.metadata_path), (1, None));
        assert!(locate("kv/app", Some(2)).is_err());
    }

    #[test]
    fn hash_is_keyed_and_reveals_nothing() {
        let data: BTreeMap<String, Vec<u8>> =
            [("password".to_string(), b"hunter2".to_vec())].into();
        let a = data_hash(b"key-a", &data);
        assert_ne!(a, data_hash(b"key-b", &data));
        assert!(!a.contains("hunter2"));
        assert_eq!(a, data_hash(b"key-a", &data));
    }

    #[test]
    fn selects_and_renames_keys() {
        let data = json!({"user": "u", "pass": "p", "n": 3})
            .as_object()
            .unwrap()
            .clone();
        let keys = vec![crate::api::baosecret::KeyMapping {
            from: "pass".into(),
            to: Some("password".into()),
        }];
        let out = select_keys(&data, Some(&keys)).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out["password"], b"p");
        let missing = vec![crate::api::baosecret::KeyMapping {
            from: "nope".into(),
            to: None,
        }];
        let err = select_keys(&data, Some(&missing)).unwrap_err();
        assert!(err.contains("\"n\", \"pass\", \"user\""), "{err}");
        assert_eq!(select_keys(&data, None).unwrap()["n"], b"3");
    }
}
