//! The I/O of one BaoSecret sync, one small step each; `plan.rs` decides which ones run.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use kubebao_openbao::{KvSecret, SecretString};
use serde_json::{Map, Value, json};

use super::certificate::{CA_CRT, TLS_CRT, TLS_KEY};
use super::plan::{
    Check, Failure, MAX_SECRET_BYTES, Metadata, Plan, Target, data_size, failed, rejected,
    unchanged,
};
use super::sources::KvLocation;
use super::{KEYS_ANNOTATION, LABEL, MANAGER, SecretsContext};
use crate::api::BaoSecret;
use crate::api::CreationPolicy;
use crate::api::baosecret::{BaoSecretSpec, RolloutTarget, WorkloadKind};
use crate::conditions::Outcome;
use crate::context::{Context, Settings};
use crate::tenant::{TenantError, TenantIdentity};

/// The last check of the BaoSecret at `key`, if it was made for this `uid`.
pub fn last_check(ctx: &Context, key: &str, uid: &str) -> Option<Check> {
    ctx.checks
        .lock()
        .expect("checks lock")
        .get(key)
        .filter(|c| c.uid == uid)
        .cloned()
}

/// Remembers a successful check.
pub fn remember(ctx: &Context, key: &str, check: Check) {
    ctx.checks
        .lock()
        .expect("checks lock")
        .insert(key.to_string(), check);
}

/// Forgets the checks of BaoSecrets that are gone (`live` is false for their `namespace/name`).
pub fn forget_checks(ctx: &Context, live: impl Fn(&str) -> bool) {
    ctx.checks
        .lock()
        .expect("checks lock")
        .retain(|key, _| live(key));
}

/// The target Secret: not read when the metadata cache shows the resourceVersion we last wrote
/// or verified, else read from the API.
pub async fn read_target(
    sctx: &SecretsContext,
    ns: &str,
    name: &str,
    last: Option<&Check>,
) -> Result<Target, Outcome> {
    let cached_rv = sctx
        .secrets
        .get(&ObjectRef::new(name).within(ns))
        .and_then(|m| m.resource_version());
    if unchanged(last, cached_rv.as_deref()) {
        return Ok(Target::Unchanged { rv: cached_rv });
    }
    let ctx = &*sctx.base;
    let secret = Api::<Secret>::namespaced(ctx.client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(|e| {
            failed(
                false,
                "KubernetesError",
                format!("cannot read Secret {name}: {e}"),
            )
        })?;
    Ok(Target::read(secret.as_ref(), &ctx.hash_key))
}

/// Who reads OpenBao for `bs`: its ServiceAccount, role, auth mount, audience and OpenBao
/// namespace.
pub fn tenant_identity(bs: &BaoSecret, ns: &str, settings: &Settings) -> TenantIdentity {
    let spec = &bs.spec;
    TenantIdentity {
        namespace: ns.to_string(),
        service_account: spec
            .service_account_name
            .clone()
            .unwrap_or_else(|| "default".into()),
        role: spec.role.clone().unwrap_or_else(|| ns.to_string()),
        mount: spec
            .auth_mount
            .clone()
            .unwrap_or_else(|| settings.auth_mount.clone()),
        audience: spec
            .audience
            .clone()
            .unwrap_or_else(|| settings.token_audience.clone()),
        openbao_namespace: spec.openbao_namespace.clone(),
    }
}

/// An OpenBao token for `who` (cached by the tenant token cache).
pub async fn tenant_token(ctx: &Context, who: &TenantIdentity) -> Result<SecretString, Outcome> {
    ctx.tenants
        .token(&ctx.client, &ctx.bao, who)
        .await
        .map_err(tenant_outcome)
}

/// After OpenBao refused `who`'s `token`: a fresh token to retry with once when the refused
/// one was dead (revoked, expired); None when the refusal is the role's policy.
pub async fn tenant_denied(
    ctx: &Context,
    who: &TenantIdentity,
    token: &SecretString,
) -> Result<Option<SecretString>, Outcome> {
    ctx.tenants
        .denied(&ctx.client, &ctx.bao, who, token)
        .await
        .map_err(tenant_outcome)
}

/// The condition for a failed tenant login.
fn tenant_outcome(e: TenantError) -> Outcome {
    match &e {
        TenantError::TokenRequest {
            source: kube::Error::Api(s),
            ..
        } if s.code == 404 => failed(true, "ServiceAccountNotFound", e.to_string()),
        TenantError::TokenRequest {
            source: kube::Error::Api(s),
            namespace,
            ..
        } if s.code == 403 => failed(
            true,
            "NamespaceNotEnabled",
            format!(
                "the operator may not create ServiceAccount tokens in namespace {namespace:?}: \
                 a cluster admin adds it to the chart's rbac.tokenNamespaces (empty: every \
                 namespace)"
            ),
        ),
        TenantError::TokenRequest { .. } => failed(false, "TokenRequestFailed", e.to_string()),
        TenantError::Login { source, .. } if source.is_unavailable() => {
            failed(false, "OpenBaoUnavailable", e.to_string())
        }
        TenantError::Login { .. } => failed(
            true,
            "LoginDenied",
            format!(
                "{e}; check that the role exists and is bound to this ServiceAccount and namespace"
            ),
        ),
    }
}

/// The condition for an OpenBao error while `who` accessed `path`.
pub fn openbao_outcome(e: &kubebao_openbao::Error, who: &TenantIdentity, path: &str) -> Outcome {
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

/// Reads the sources' KV v2 metadata at `paths` in order, stopping at the first that is not at
/// the version the Secret holds (the data is read then anyway).
pub async fn check_metadata(
    ctx: &Context,
    token: &SecretString,
    paths: &[String],
    plan: &Plan,
    who: &TenantIdentity,
) -> Result<Vec<Metadata>, Outcome> {
    let mut seen = Vec::with_capacity(paths.len());
    for (i, path) in paths.iter().enumerate() {
        let metadata = read_kv_version(ctx, token, path, who).await?;
        seen.push(metadata);
        if !plan.current(i, metadata) {
            break;
        }
    }
    Ok(seen)
}

/// Reads a KV source's data; returns it with its KV v2 version (None for KV v1).
pub async fn read_kv_source(
    ctx: &Context,
    token: &SecretString,
    location: &KvLocation,
    who: &TenantIdentity,
) -> Result<(Map<String, Value>, Option<u64>), Outcome> {
    let kv = read_kv(ctx, token, location, who).await?;
    Ok((kv.data, (location.version == 2).then_some(kv.version)))
}

/// Reads the current version from the KV v2 metadata at `path`.
async fn read_kv_version(
    ctx: &Context,
    token: &SecretString,
    path: &str,
    who: &TenantIdentity,
) -> Result<Metadata, Outcome> {
    match ctx
        .metrics
        .openbao("kv_metadata", who.client(&ctx.bao).read(path, token).await)
    {
        Ok(meta) => Ok(Metadata::Version(
            meta.data
                .as_ref()
                .and_then(|d| d.get("current_version"))
                .and_then(Value::as_u64),
        )),
        Err(e) if e.is_permission_denied() => Ok(Metadata::Denied),
        Err(e) => Err(openbao_outcome(&e, who, path)),
    }
}

/// Reads the KV data (v1 or v2); a refused token that turns out dead is replaced and the read
/// retried once.
async fn read_kv(
    ctx: &Context,
    token: &SecretString,
    location: &KvLocation,
    who: &TenantIdentity,
) -> Result<KvSecret, Outcome> {
    let path = &location.data_path;
    let outcome = |e: kubebao_openbao::Error| openbao_outcome(&e, who, path);
    match read_kv_once(ctx, token, location, who).await {
        Err(e) if e.is_permission_denied() => match tenant_denied(ctx, who, token).await? {
            Some(fresh) => read_kv_once(ctx, &fresh, location, who)
                .await
                .map_err(outcome),
            None => Err(outcome(e)),
        },
        read => read.map_err(outcome),
    }
}

async fn read_kv_once(
    ctx: &Context,
    token: &SecretString,
    location: &KvLocation,
    who: &TenantIdentity,
) -> kubebao_openbao::Result<KvSecret> {
    let path = &location.data_path;
    let bao = who.client(&ctx.bao);
    let read = if location.version == 2 {
        bao.kv2_read_api_path(token, path).await
    } else {
        bao.kv1_read(token, path).await
    };
    ctx.metrics.openbao("kv_read", read)
}

/// The Secret `bs` declares, holding `data`.
fn desired_secret(bs: &BaoSecret, data: &BTreeMap<String, Vec<u8>>) -> Value {
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
            _ => Some(secret_type(spec, data)),
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
    value
}

/// The target Secret's type: `target.type`, else `kubernetes.io/tls` when the data is exactly
/// one certificate source's (`tls.crt`, `tls.key`, `ca.crt`), else `Opaque`.
fn secret_type(spec: &BaoSecretSpec, data: &BTreeMap<String, Vec<u8>>) -> String {
    if let Some(t) = &spec.target.type_ {
        return t.clone();
    }
    let one_certificate = matches!(spec.sources.as_deref(), Some([s]) if s.certificate.is_some());
    let tls_keys = data
        .keys()
        .map(String::as_str)
        .eq([CA_CRT, TLS_CRT, TLS_KEY]);
    if one_certificate && spec.keys.is_none() && spec.template.is_none() && tls_keys {
        "kubernetes.io/tls".into()
    } else {
        "Opaque".into()
    }
}

/// Writes the target Secret (server-side apply); returns its new resourceVersion. A write the
/// API server refuses for good (invalid, too large, an immutable field) is a permanent
/// failure; anything else is retried with backoff.
pub async fn apply_secret(
    bs: &BaoSecret,
    ctx: &Context,
    ns: &str,
    data: &BTreeMap<String, Vec<u8>>,
) -> Result<Option<String>, Failure> {
    let name = &bs.spec.target.name;
    ctx.metrics.secret_writes.inc();
    let written = Api::<Secret>::namespaced(ctx.client.clone(), ns)
        .patch(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&desired_secret(bs, data)),
        )
        .await
        .map_err(|e| write_failure(name, data, &e))?;
    Ok(written.resource_version())
}

/// Why writing Secret `name` with `data` failed: for good when the API server refuses it as
/// too large (`SecretTooLarge`, with the sizes) or invalid (`SecretRejected`, e.g. an
/// immutable field), else retried with backoff.
fn write_failure(name: &str, data: &BTreeMap<String, Vec<u8>>, e: &kube::Error) -> Failure {
    use crate::conditions::{api_message, refused_as_too_large, refused_for_good};
    if refused_as_too_large(e) {
        let size = data_size(data);
        return rejected(
            "SecretTooLarge",
            format!(
                "Kubernetes refuses Secret {name} as too large: {}; this BaoSecret writes {size} bytes (keys and values) into it, and a Secret holds at most {MAX_SECRET_BYTES} bytes in all (with creationPolicy Merge the Secret's own keys count too): select fewer keys with spec.keys",
                api_message(e)
            ),
        );
    }
    if refused_for_good(e) {
        return rejected(
            "SecretRejected",
            format!(
                "Kubernetes refuses Secret {name} as this BaoSecret declares it: {}; change the spec (or the data in OpenBao) so that it is a valid Secret",
                api_message(e)
            ),
        );
    }
    failed(
        false,
        "SecretWriteFailed",
        format!("cannot write Secret {name}: {e}"),
    )
    .into()
}

/// Restarts each workload (pod template annotation); each result is an event, never an error.
pub async fn restart_workloads(bs: &BaoSecret, ctx: &Context, ns: &str, targets: &[RolloutTarget]) {
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
                let note = format!("restarted {:?} {} after the data changed", t.kind, t.name);
                ctx.event(bs, false, "RolloutRestarted", note).await;
            }
            Err(e) => {
                let note = format!("cannot restart {:?} {}: {e}", t.kind, t.name);
                ctx.event(bs, true, "RolloutRestartFailed", note).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16, reason: &str, message: &str) -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure(message, reason)
                .with_code(code)
                .boxed(),
        )
    }

    #[test]
    fn a_refused_write_is_told_once_and_a_transient_one_retried() {
        let data: BTreeMap<String, Vec<u8>> = [("blob".to_string(), vec![b'x'; 600])].into();
        let too_long =
            "Secret \"big\" is invalid: data: Too long: may not be more than 1048576 bytes";
        let f = write_failure("big", &data, &api_error(422, "Invalid", too_long));
        assert!(f.permanent);
        assert_eq!(f.outcome.reason(), "SecretTooLarge");
        let message = f.outcome.message();
        assert!(
            message.contains(too_long) && message.contains("writes 604 bytes"),
            "{message}"
        );
        let immutable = "Secret \"s\" is invalid: type: Invalid value: \"b\": field is immutable";
        let f = write_failure("s", &data, &api_error(422, "Invalid", immutable));
        assert!(f.permanent);
        assert!(matches!(f.outcome, Outcome::Stalled { .. }));
        assert_eq!(f.outcome.reason(), "SecretRejected");
        assert!(f.outcome.message().contains("field is immutable"));
        for transient in [
            api_error(409, "Conflict", "the object has been modified"),
            api_error(503, "ServiceUnavailable", "try again"),
        ] {
            let f = write_failure("s", &data, &transient);
            assert!(!f.permanent);
            assert!(matches!(f.outcome, Outcome::Retrying { .. }));
            assert_eq!(f.outcome.reason(), "SecretWriteFailed");
        }
    }
}
