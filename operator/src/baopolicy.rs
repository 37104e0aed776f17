//! The BaoPolicy controller: an ACL policy (and Kubernetes-auth roles) in OpenBao, owned by
//! exactly one BaoPolicy, never silently taking over or overwriting someone else's.

use std::sync::Arc;

use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};
use kubebao_openbao::{PolicyWrite, PolicyWriteOutcome, SecretString};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::api::baopolicy::{DeletionPolicy, KubernetesAuthRole};
use crate::api::{BaoPolicy, BaoPolicyStatus};
use crate::baosecret::MANAGER;
use crate::conditions::{Outcome, conditions};
use crate::context::Context;
use crate::hcl;
use crate::lenient::{self, Lenient};

/// Finalizer that removes the policy and roles from OpenBao before the object goes.
pub const FINALIZER: &str = "kubebao.io/openbao-cleanup";

/// The OpenBao policy name a BaoPolicy manages.
pub fn policy_name(bp: &BaoPolicy) -> String {
    bp.spec.name.clone().unwrap_or_else(|| bp.name_any())
}

fn sha(s: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(s.as_bytes())))
}

fn stalled(reason: &str, message: impl Into<String>) -> Outcome {
    Outcome::Stalled {
        reason: reason.into(),
        message: message.into(),
    }
}

fn bao_outcome(what: &str, e: &kubebao_openbao::Error) -> Outcome {
    use kubebao_openbao::Error as E;
    match e {
        e if e.is_unavailable() => Outcome::Retrying {
            reason: "OpenBaoUnavailable".into(),
            message: format!("{what}: {e}"),
        },
        E::PermissionDenied { .. } => stalled(
            "PermissionDenied",
            format!(
                "{what}: {e}; the operator's OpenBao identity needs its policy on sys/policies/acl/* and auth/*/role/*"
            ),
        ),
        E::Invalid { .. } => stalled("Rejected", format!("{what}: {e}")),
        e => stalled("OpenBaoError", format!("{what}: {e}")),
    }
}

/// Error of the finalizer wrapper (Kubernetes API failures only; OpenBao problems become
/// conditions).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes call failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Cleanup in OpenBao failed; the finalizer stays and the deletion is retried.
    #[error("cleanup in OpenBao: {0}")]
    Cleanup(String),
}

/// Reconciles one BaoPolicy (apply or cleanup through the finalizer).
pub async fn reconcile(
    obj: Arc<Lenient<BaoPolicy>>,
    ctx: Arc<Context>,
) -> Result<Action, kube::runtime::finalizer::Error<Error>> {
    // An object that does not parse waits, deletion included: without the spec the OpenBao
    // policy to remove is unknown.
    let Some(bp) = lenient::parsed(&ctx.client, &obj)
        .await
        .map_err(|e| kube::runtime::finalizer::Error::ApplyFailed(Error::Kube(e)))?
    else {
        return Ok(Action::await_change());
    };
    let api: Api<BaoPolicy> = Api::all(ctx.client.clone());
    finalizer(&api, FINALIZER, bp, |event| async {
        match event {
            Finalizer::Apply(bp) => apply(bp, ctx.clone()).await,
            Finalizer::Cleanup(bp) => cleanup(bp, ctx.clone()).await,
        }
    })
    .await
}

struct Done {
    status: BaoPolicyStatus,
    note: Option<(&'static str, String)>,
}

async fn apply(bp: Arc<BaoPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    let key = format!("BaoPolicy/{}", bp.name_any());
    let previous = bp.status.clone().unwrap_or_default();
    let result = converge(&bp, &ctx, &previous).await;
    let (outcome, action, mut status) = match result {
        Ok(done) => {
            ctx.succeeded(&key);
            if let Some((reason, note)) = done.note {
                ctx.event(&*bp, false, reason, note).await;
            }
            (
                Outcome::Ready {
                    reason: "Synced".into(),
                    message: format!(
                        "policy {} is in OpenBao as declared",
                        done.status.policy_name.clone().unwrap_or_default()
                    ),
                },
                Action::requeue(ctx.settings.policy_resync),
                done.status,
            )
        }
        Err(outcome) => (
            outcome,
            Action::requeue(ctx.backoff(&key)),
            previous.clone(),
        ),
    };
    ctx.metrics.reconciled(
        "BaoPolicy",
        if matches!(outcome, Outcome::Ready { .. }) {
            "ok"
        } else {
            outcome.reason()
        },
    );
    let ready_before = previous.conditions.iter().find(|c| c.type_ == "Ready");
    if ready_before.is_none_or(|c| c.reason != outcome.reason() || c.message != outcome.message()) {
        let warning = !matches!(outcome, Outcome::Ready { .. });
        tracing::info!(baopolicy = %bp.name_any(), reason = outcome.reason(), message = outcome.message(), "BaoPolicy condition");
        ctx.event(
            &*bp,
            warning,
            outcome.reason(),
            outcome.message().to_string(),
        )
        .await;
    }
    status.observed_generation = bp.metadata.generation;
    status.conditions = conditions(&previous.conditions, &outcome, bp.metadata.generation);
    if Some(&status) != bp.status.as_ref() {
        let api: Api<BaoPolicy> = Api::all(ctx.client.clone());
        let patch =
            json!({"apiVersion": "kubebao.io/v1alpha1", "kind": "BaoPolicy", "status": status});
        api.patch_status(
            &bp.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    }
    Ok(action)
}

/// The BaoPolicy that claims `name` first (oldest, then by object name) among live objects.
/// Objects that do not parse claim nothing.
async fn first_claimant(ctx: &Context, name: &str) -> Result<Option<BaoPolicy>, Outcome> {
    let api: Api<Lenient<BaoPolicy>> = Api::all(ctx.client.clone());
    let all = api
        .list(&ListParams::default())
        .await
        .map_err(|e| Outcome::Retrying {
            reason: "KubernetesError".into(),
            message: format!("cannot list BaoPolicies: {e}"),
        })?;
    Ok(all
        .items
        .into_iter()
        .filter_map(|p| match p {
            Lenient::Valid(p) => Some(p),
            Lenient::Invalid { .. } => None,
        })
        .filter(|p| p.meta().deletion_timestamp.is_none() && policy_name(p) == name)
        .min_by(|a, b| {
            (a.meta().creation_timestamp.clone(), a.name_any())
                .cmp(&(b.meta().creation_timestamp.clone(), b.name_any()))
        }))
}

async fn operator_token(ctx: &Context) -> Result<SecretString, Outcome> {
    ctx.identity.token().await.map_err(|e| Outcome::Retrying {
        reason: "OperatorLoginFailed".into(),
        message: e.to_string(),
    })
}

async fn converge(
    bp: &BaoPolicy,
    ctx: &Context,
    previous: &BaoPolicyStatus,
) -> Result<Done, Outcome> {
    let name = policy_name(bp);
    let uid = bp.uid().unwrap_or_default();
    if let Some(first) = first_claimant(ctx, &name).await?
        && first.uid().as_deref() != Some(uid.as_str())
    {
        return Err(stalled(
            "Conflict",
            format!(
                "BaoPolicy {} already manages OpenBao policy {name:?}; give this one another spec.name",
                first.name_any()
            ),
        ));
    }
    let desired = match (&bp.spec.rules, &bp.spec.hcl) {
        (Some(rules), None) => {
            hcl::render(&uid, rules).map_err(|e| stalled("InvalidRule", e.to_string()))?
        }
        (None, Some(raw)) => hcl::wrap_raw(&uid, raw),
        _ => {
            return Err(stalled(
                "InvalidSpec",
                "set exactly one of spec.rules and spec.hcl",
            ));
        }
    };
    let token = operator_token(ctx).await?;
    let current = match ctx
        .metrics
        .openbao("policy_read", ctx.bao.policy_read(&token, &name).await)
    {
        Ok(current) => current,
        Err(e) => {
            let outcome = bao_outcome(&format!("cannot read policy {name}"), &e);
            if e.is_permission_denied() {
                // Revoked or expired token, or a policy gap: the session tells them apart.
                ctx.identity.denied(&token, e).await;
            }
            return Err(outcome);
        }
    };
    let mut note = None;
    match current {
        Some(text) if text == desired => {}
        None => {
            let outcome = ctx
                .metrics
                .openbao(
                    "policy_write",
                    ctx.bao
                        .policy_write(&token, &name, &desired, PolicyWrite::CreateOnly)
                        .await,
                )
                .map_err(|e| bao_outcome(&format!("cannot write policy {name}"), &e))?;
            if outcome == PolicyWriteOutcome::AlreadyExists {
                return Err(Outcome::Retrying {
                    reason: "CreatedConcurrently".into(),
                    message: format!(
                        "policy {name} appeared while it was being created; checking again"
                    ),
                });
            }
            if previous.policy_name.as_deref() == Some(name.as_str()) {
                note = Some((
                    "DriftRepaired",
                    format!("policy {name} was deleted in OpenBao; recreated"),
                ));
            }
        }
        Some(text) => {
            let marked_ours = hcl::owner_uid(&text) == Some(uid.as_str());
            let ours = marked_ours || previous.policy_name.as_deref() == Some(name.as_str());
            if !ours && !bp.spec.adopt {
                return Err(stalled(
                    "NotOwned",
                    format!(
                        "OpenBao policy {name:?} exists and was not created by this BaoPolicy; set spec.adopt: true to take it over, or choose another spec.name"
                    ),
                ));
            }
            ctx.metrics
                .openbao(
                    "policy_write",
                    ctx.bao
                        .policy_write(&token, &name, &desired, PolicyWrite::Overwrite)
                        .await,
                )
                .map_err(|e| bao_outcome(&format!("cannot write policy {name}"), &e))?;
            note = Some(if !ours {
                (
                    "Adopted",
                    format!("took over existing OpenBao policy {name}"),
                )
            } else if previous.policy_hash.as_deref() == Some(sha(&desired).as_str()) {
                (
                    "DriftRepaired",
                    format!("policy {name} was changed in OpenBao; restored"),
                )
            } else {
                ("Updated", format!("policy {name} updated"))
            });
        }
    }
    let roles = sync_roles(bp, ctx, &token, &name, previous).await?;
    Ok(Done {
        status: BaoPolicyStatus {
            policy_name: Some(name),
            roles,
            policy_hash: Some(sha(&desired)),
            ..previous.clone()
        },
        note,
    })
}

fn role_path(ctx: &Context, role: &KubernetesAuthRole) -> String {
    let mount = role
        .mount
        .clone()
        .unwrap_or_else(|| ctx.settings.auth_mount.clone());
    format!("{mount}/{}", role.name)
}

fn role_body(role: &KubernetesAuthRole, policy: &str) -> Value {
    let mut body = json!({
        "bound_service_account_names": role.bound_service_account_names,
        "bound_service_account_namespaces": role.bound_service_account_namespaces,
        "token_policies": [policy],
    });
    if let Some(ttl) = &role.token_ttl {
        body["token_ttl"] = json!(ttl);
    }
    if let Some(ttl) = &role.token_max_ttl {
        body["token_max_ttl"] = json!(ttl);
    }
    if let Some(aud) = &role.audience {
        body["audience"] = json!(aud);
    }
    body
}

/// True when OpenBao's role already says what `body` says (TTLs are compared as seconds).
fn role_matches(current: &serde_json::Map<String, Value>, body: &Value) -> bool {
    let list = |v: Option<&Value>| -> Vec<String> {
        let mut l: Vec<String> = v
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        l.sort();
        l
    };
    let secs = |v: Option<&Value>| -> u64 {
        match v {
            Some(Value::Number(n)) => n.as_u64().unwrap_or(0),
            Some(Value::String(s)) => crate::context::parse_duration(s)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            _ => 0,
        }
    };
    [
        "bound_service_account_names",
        "bound_service_account_namespaces",
        "token_policies",
    ]
    .iter()
    .all(|k| list(current.get(*k)) == list(body.get(*k)))
        && ["token_ttl", "token_max_ttl"]
            .iter()
            .all(|k| secs(current.get(*k)) == secs(body.get(*k)))
        && current
            .get("audience")
            .and_then(Value::as_str)
            .unwrap_or("")
            == body.get("audience").and_then(Value::as_str).unwrap_or("")
}

async fn sync_roles(
    bp: &BaoPolicy,
    ctx: &Context,
    token: &SecretString,
    policy: &str,
    previous: &BaoPolicyStatus,
) -> Result<Vec<String>, Outcome> {
    let mut written = Vec::new();
    for role in bp.spec.roles.iter().flatten() {
        let at = role_path(ctx, role);
        let (mount, name) = at.rsplit_once('/').expect("mount/name");
        let path = format!("auth/{mount}/role/{name}");
        let body = role_body(role, policy);
        let current = match ctx
            .metrics
            .openbao("role_read", ctx.bao.read(&path, token).await)
        {
            Ok(s) => s.data,
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(bao_outcome(&format!("cannot read role {path}"), &e)),
        };
        if !current.as_ref().is_some_and(|c| role_matches(c, &body)) {
            ctx.metrics
                .openbao("role_write", ctx.bao.write(&path, token, &body).await)
                .map_err(|e| bao_outcome(&format!("cannot write role {path}"), &e))?;
        }
        written.push(at);
    }
    for old in previous.roles.iter().filter(|r| !written.contains(r)) {
        delete_role(ctx, token, old).await?;
    }
    written.sort();
    Ok(written)
}

async fn delete_role(ctx: &Context, token: &SecretString, at: &str) -> Result<(), Outcome> {
    let Some((mount, name)) = at.rsplit_once('/') else {
        return Ok(());
    };
    let path = format!("auth/{mount}/role/{name}");
    match ctx
        .metrics
        .openbao("role_delete", ctx.bao.delete(&path, token).await)
    {
        Ok(()) => Ok(()),
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(bao_outcome(&format!("cannot delete role {path}"), &e)),
    }
}

async fn cleanup(bp: Arc<BaoPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    if bp.spec.deletion_policy == DeletionPolicy::Retain {
        ctx.event(
            &*bp,
            false,
            "Retained",
            "deletionPolicy Retain: policy and roles left in OpenBao".into(),
        )
        .await;
        return Ok(Action::await_change());
    }
    let status = bp.status.clone().unwrap_or_default();
    let Some(name) = status.policy_name.clone() else {
        // Never owned anything in OpenBao (e.g. a conflicting or not-owned object): nothing to do.
        return Ok(Action::await_change());
    };
    let fail = |o: Outcome| Error::Cleanup(o.message().to_string());
    let token = operator_token(&ctx).await.map_err(fail)?;
    let current = ctx
        .metrics
        .openbao("policy_read", ctx.bao.policy_read(&token, &name).await)
        .map_err(|e| fail(bao_outcome(&format!("cannot read policy {name}"), &e)))?;
    let uid = bp.uid().unwrap_or_default();
    match current {
        Some(text) if hcl::owner_uid(&text).is_some_and(|o| o != uid) => {
            tracing::info!(policy = %name, "policy now carries another owner's marker; not deleting it");
        }
        Some(_) => {
            ctx.metrics
                .openbao("policy_delete", ctx.bao.policy_delete(&token, &name).await)
                .map_err(|e| fail(bao_outcome(&format!("cannot delete policy {name}"), &e)))?;
        }
        None => {}
    }
    for role in &status.roles {
        delete_role(&ctx, &token, role).await.map_err(fail)?;
    }
    ctx.event(
        &*bp,
        false,
        "Deleted",
        format!(
            "removed policy {name} and {} role(s) from OpenBao",
            status.roles.len()
        ),
    )
    .await;
    Ok(Action::await_change())
}
