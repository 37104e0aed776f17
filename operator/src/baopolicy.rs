//! The BaoPolicy controller: an ACL policy (and Kubernetes-auth roles) in OpenBao, owned by
//! exactly one BaoPolicy, never silently taking over, overwriting or deleting someone else's.

mod roles;

use std::sync::Arc;
use std::time::Instant;

use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};
use kubebao_openbao::{PolicyWrite, PolicyWriteOutcome, SecretString};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::api::baopolicy::DeletionPolicy;
use crate::api::{BaoPolicy, BaoPolicyStatus};
use crate::baosecret::MANAGER;
use crate::conditions::{self, Outcome};
use crate::context::Context;
use crate::hcl;
use crate::lenient::{self, Lenient};
use crate::openbao_path::{self, Shape};

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

/// Reconciles one BaoPolicy (apply or cleanup through the finalizer); a panic is reported on
/// this object alone (see `lenient::guarded`).
pub async fn reconcile(
    obj: Arc<Lenient<BaoPolicy>>,
    ctx: Arc<Context>,
) -> Result<Action, kube::runtime::finalizer::Error<Error>> {
    let client = ctx.client.clone();
    let parsed = reconcile_parsed(obj.clone(), ctx);
    crate::leader::while_leading(lenient::guarded(&client, &obj, parsed)).await
}

async fn reconcile_parsed(
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
    notes: Vec<Note>,
}

/// The key of `bp`'s failure count (the same one the controller's error policy uses).
fn backoff_key(bp: &BaoPolicy) -> String {
    format!("BaoPolicy/{}", bp.name_any())
}

async fn apply(bp: Arc<BaoPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let key = backoff_key(&bp);
    let previous = bp.status.clone().unwrap_or_default();
    let result = converge(&bp, &ctx, &previous).await;
    let (outcome, action, mut status) = match result {
        Ok(done) => {
            ctx.succeeded(&key);
            for (reason, note) in done.notes {
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
    ctx.count_cached();
    ctx.metrics.reconciled("BaoPolicy", outcome.result());
    let elapsed = started.elapsed();
    ctx.metrics
        .observe_sync("BaoPolicy", "", &bp.name_any(), elapsed, outcome.is_ready());
    if conditions::ready_changed(&previous.conditions, &outcome) {
        tracing::info!(baopolicy = %bp.name_any(), reason = outcome.reason(), message = outcome.message(), "BaoPolicy condition");
        let note = outcome.message().to_string();
        ctx.event(&*bp, !outcome.is_ready(), outcome.reason(), note)
            .await;
    }
    status.observed_generation = bp.metadata.generation;
    status.conditions =
        conditions::conditions(&previous.conditions, &outcome, bp.metadata.generation);
    if Some(&status) != bp.status.as_ref() {
        write_status(&ctx, &bp, &status).await?;
    }
    Ok(action)
}

/// Writes `bp`'s status (server-side apply of the status subresource).
async fn write_status(
    ctx: &Context,
    bp: &BaoPolicy,
    status: &BaoPolicyStatus,
) -> Result<(), kube::Error> {
    let api: Api<BaoPolicy> = Api::all(ctx.client.clone());
    let patch = json!({"apiVersion": "kubebao.io/v1alpha1", "kind": "BaoPolicy", "status": status});
    api.patch_status(
        &bp.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

async fn operator_token(ctx: &Context) -> Result<SecretString, Outcome> {
    ctx.identity.token().await.map_err(|e| Outcome::Retrying {
        reason: "OperatorLoginFailed".into(),
        message: e.to_string(),
    })
}

/// An event to publish after a successful apply: reason and note.
type Note = (&'static str, String);

/// Makes OpenBao hold `bp`'s policy and roles: checks and claims first, then every ownership
/// check against OpenBao, and only then any write (a refusal writes nothing).
async fn converge(
    bp: &BaoPolicy,
    ctx: &Context,
    previous: &BaoPolicyStatus,
) -> Result<Done, Outcome> {
    let name = policy_name(bp);
    let uid = bp.uid().unwrap_or_default();
    let field = if bp.spec.name.is_some() {
        "spec.name"
    } else {
        "metadata.name"
    };
    openbao_path::check(field, &name, Shape::Name)
        .map_err(|e| stalled("InvalidSpec", e.to_string()))?;
    let declared = roles::declared(bp, &ctx.settings.auth_mount)?;
    check_claims(ctx, bp, &name, &declared).await?;
    let mut ats: Vec<String> = declared.iter().map(|r| r.at.clone()).collect();
    ats.sort();
    let desired = desired_policy(bp, &hcl::marker(&uid, &ats))?;
    let token = operator_token(ctx).await?;
    let current = read_policy(ctx, &token, &name).await?;
    let owned = roles::owned(&uid, current.as_deref(), previous);
    let states = roles::read_all(ctx, &token, &declared, &owned).await?;
    let mut notes =
        Vec::from_iter(sync_policy(bp, ctx, &token, &name, &desired, current, previous).await?);
    let adopted = roles::write_all(ctx, &token, &declared, &states, &owned, &name).await?;
    if !adopted.is_empty() {
        notes.push(("Adopted", format!("took over existing role(s) {adopted:?}")));
    }
    for old in owned.iter().filter(|r| !ats.contains(r)) {
        roles::remove(ctx, &token, old, &name).await?;
    }
    Ok(Done {
        status: BaoPolicyStatus {
            policy_name: Some(name),
            roles: ats,
            policy_hash: Some(sha(&desired)),
            ..previous.clone()
        },
        notes,
    })
}

/// Live BaoPolicies that parse (objects that do not parse claim nothing).
async fn live_policies(ctx: &Context) -> Result<Vec<BaoPolicy>, Outcome> {
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
        .filter(|p| p.meta().deletion_timestamp.is_none())
        .collect())
}

/// The BaoPolicy that claimed first: oldest, then by object name.
fn oldest<'a>(claimants: impl Iterator<Item = &'a BaoPolicy>) -> Option<&'a BaoPolicy> {
    claimants.min_by(|a, b| {
        (a.meta().creation_timestamp.clone(), a.name_any())
            .cmp(&(b.meta().creation_timestamp.clone(), b.name_any()))
    })
}

/// Refuses a policy name or a role another (older) BaoPolicy already manages.
async fn check_claims(
    ctx: &Context,
    bp: &BaoPolicy,
    name: &str,
    declared: &[roles::Role<'_>],
) -> Result<(), Outcome> {
    let all = live_policies(ctx).await?;
    let uid = bp.uid();
    if let Some(first) = oldest(all.iter().filter(|p| policy_name(p) == name))
        && first.uid() != uid
    {
        return Err(stalled(
            "Conflict",
            format!(
                "BaoPolicy {} already manages OpenBao policy {name:?}; give this one another spec.name",
                first.name_any()
            ),
        ));
    }
    let mount = &ctx.settings.auth_mount;
    for role in declared {
        let claims = |p: &&BaoPolicy| {
            p.spec
                .roles
                .iter()
                .flatten()
                .any(|r| roles::at(r, mount) == role.at)
        };
        if let Some(first) = oldest(all.iter().filter(claims))
            && first.uid() != uid
        {
            return Err(stalled(
                "Conflict",
                format!(
                    "BaoPolicy {} already manages role {}; remove it from one of the two",
                    first.name_any(),
                    role.at
                ),
            ));
        }
    }
    Ok(())
}

/// The policy text `bp` declares, under its ownership `marker` line.
fn desired_policy(bp: &BaoPolicy, marker: &str) -> Result<String, Outcome> {
    match (&bp.spec.rules, &bp.spec.hcl) {
        (Some(rules), None) => {
            hcl::render(marker, rules).map_err(|e| stalled("InvalidRule", e.to_string()))
        }
        (None, Some(raw)) => Ok(hcl::wrap_raw(marker, raw)),
        _ => Err(stalled(
            "InvalidSpec",
            "set exactly one of spec.rules and spec.hcl",
        )),
    }
}

/// Compares the policy in OpenBao (`current`) with `desired` and writes it when it differs:
/// created when missing, overwritten only when it is ours (or adopted). Returns what is worth an
/// event.
async fn sync_policy(
    bp: &BaoPolicy,
    ctx: &Context,
    token: &SecretString,
    name: &str,
    desired: &str,
    current: Option<String>,
    previous: &BaoPolicyStatus,
) -> Result<Option<Note>, Outcome> {
    match current {
        Some(text) if text == desired => Ok(None),
        None => {
            if write_policy(ctx, token, name, desired, PolicyWrite::CreateOnly).await?
                == PolicyWriteOutcome::AlreadyExists
            {
                return Err(Outcome::Retrying {
                    reason: "CreatedConcurrently".into(),
                    message: format!(
                        "policy {name} appeared while it was being created; checking again"
                    ),
                });
            }
            Ok((previous.policy_name.as_deref() == Some(name)).then(|| {
                (
                    "DriftRepaired",
                    format!("policy {name} was deleted in OpenBao; recreated"),
                )
            }))
        }
        Some(text) => {
            let note = overwrite_note(bp, name, desired, &text, previous)?;
            write_policy(ctx, token, name, desired, PolicyWrite::Overwrite).await?;
            Ok(Some(note))
        }
    }
}

/// Whether an existing, different policy `current` may be overwritten, and what to say: not
/// ours and not adopted is refused.
fn overwrite_note(
    bp: &BaoPolicy,
    name: &str,
    desired: &str,
    current: &str,
    previous: &BaoPolicyStatus,
) -> Result<Note, Outcome> {
    let uid = bp.uid().unwrap_or_default();
    let marked_ours = hcl::owner_uid(current) == Some(uid.as_str());
    let ours = marked_ours || previous.policy_name.as_deref() == Some(name);
    if !ours && !bp.spec.adopt {
        return Err(stalled(
            "NotOwned",
            format!(
                "OpenBao policy {name:?} exists and was not created by this BaoPolicy; set spec.adopt: true to take it over, or choose another spec.name"
            ),
        ));
    }
    Ok(if !ours {
        (
            "Adopted",
            format!("took over existing OpenBao policy {name}"),
        )
    } else if previous.policy_hash.as_deref() == Some(sha(desired).as_str()) {
        (
            "DriftRepaired",
            format!("policy {name} was changed in OpenBao; restored"),
        )
    } else {
        ("Updated", format!("policy {name} updated"))
    })
}

/// The policy text in OpenBao (`None`: no such policy).
async fn read_policy(
    ctx: &Context,
    token: &SecretString,
    name: &str,
) -> Result<Option<String>, Outcome> {
    match ctx
        .metrics
        .openbao("policy_read", ctx.bao.policy_read(token, name).await)
    {
        Ok(current) => Ok(current),
        Err(e) => {
            let outcome = bao_outcome(&format!("cannot read policy {name}"), &e);
            if e.is_permission_denied() {
                // Revoked or expired token, or a policy gap: the session tells them apart.
                ctx.identity.denied(token, e).await;
            }
            Err(outcome)
        }
    }
}

/// Writes the policy text.
async fn write_policy(
    ctx: &Context,
    token: &SecretString,
    name: &str,
    desired: &str,
    mode: PolicyWrite,
) -> Result<PolicyWriteOutcome, Outcome> {
    ctx.metrics
        .openbao(
            "policy_write",
            ctx.bao.policy_write(token, name, desired, mode).await,
        )
        .map_err(|e| bao_outcome(&format!("cannot write policy {name}"), &e))
}

/// Removes what `bp` owns from OpenBao (unless `Retain`), then forgets its failure count and
/// metrics.
async fn cleanup(bp: Arc<BaoPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    let action = remove_from_openbao(&bp, &ctx).await?;
    ctx.succeeded(&backoff_key(&bp));
    ctx.metrics.forget("BaoPolicy", "", &bp.name_any());
    ctx.count_cached();
    Ok(action)
}

async fn remove_from_openbao(bp: &BaoPolicy, ctx: &Context) -> Result<Action, Error> {
    if bp.spec.deletion_policy == DeletionPolicy::Retain {
        ctx.event(
            bp,
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
    let token = operator_token(ctx).await.map_err(fail)?;
    let current = ctx
        .metrics
        .openbao("policy_read", ctx.bao.policy_read(&token, &name).await)
        .map_err(|e| fail(bao_outcome(&format!("cannot read policy {name}"), &e)))?;
    let uid = bp.uid().unwrap_or_default();
    let owned = roles::owned(&uid, current.as_deref(), &status);
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
    for role in &owned {
        roles::remove(ctx, &token, role, &name)
            .await
            .map_err(fail)?;
    }
    ctx.event(
        bp,
        false,
        "Deleted",
        format!(
            "removed policy {name} and {} role(s) from OpenBao",
            owned.len()
        ),
    )
    .await;
    Ok(Action::await_change())
}
