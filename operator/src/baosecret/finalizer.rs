//! The finalizer of BaoSecrets with `engine` sources: when one is deleted, every lease it holds
//! or still owes a revocation is revoked before the object goes. Set only on BaoSecrets that
//! may hold leases, so deleting any other BaoSecret stays immediate.

use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kubebao_openbao::SecretString;
use serde_json::json;

use super::held::Held;
use super::leases::{self, Book};
use super::steps::{tenant_denied, tenant_identity, tenant_token};
use super::{MANAGER, write_status};
use crate::api::BaoSecret;
use crate::api::baosecret::BaoSecretSpec;
use crate::conditions::Outcome;
use crate::context::Context;
use crate::openbao_path::{self, Shape};
use crate::tenant::TenantIdentity;

/// The finalizer: its leases are revoked before the BaoSecret goes.
pub const FINALIZER: &str = "kubebao.io/revoke-leases";

/// True when `bs` carries the finalizer.
pub fn is_set(bs: &BaoSecret) -> bool {
    bs.finalizers().iter().any(|f| f == FINALIZER)
}

/// True when `spec` may hold leases (an `engine` source) or `book` still does: the finalizer
/// stays.
pub fn needed(spec: &BaoSecretSpec, book: &Book) -> bool {
    let engine = spec.sources.iter().flatten().any(|s| s.engine.is_some());
    engine || book.holds_leases()
}

/// Sets (or, with `on` false, removes) the finalizer: a server-side apply of only that
/// field, so other finalizers and the user's fields stay as they are.
async fn apply(ctx: &Context, bs: &BaoSecret, on: bool) -> Result<(), kube::Error> {
    let ns = bs.namespace().unwrap_or_default();
    let api: Api<BaoSecret> = Api::namespaced(ctx.client.clone(), &ns);
    let finalizers: Vec<&str> = if on { vec![FINALIZER] } else { vec![] };
    let patch = json!({
        "apiVersion": "kubebao.io/v1alpha1",
        "kind": "BaoSecret",
        "metadata": {"name": bs.name_any(), "namespace": ns, "finalizers": finalizers},
    });
    api.patch(
        &bs.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// Adds the finalizer.
pub async fn add(ctx: &Context, bs: &BaoSecret) -> Result<(), kube::Error> {
    apply(ctx, bs, true).await
}

/// Removes the finalizer once `bs` no longer needs it (no engine source, no lease).
pub async fn remove_unneeded(ctx: &Context, bs: &BaoSecret, book: &Book) {
    if !is_set(bs) || needed(&bs.spec, book) || bs.metadata.deletion_timestamp.is_some() {
        return;
    }
    if let Err(e) = apply(ctx, bs, false).await {
        tracing::warn!(baosecret = %bs.name_any(), error = %e, "cannot remove the finalizer; retrying at the next sync");
    }
}

/// One lease owed a revocation at deletion: its id and when it ends anyway.
struct Owed {
    lease_id: String,
    expiry: Option<leases::Secs>,
}

/// Deletion of `bs` (at `key`): revokes every lease it holds or owes, then lets it go. A lease
/// that cannot be revoked (the tenant may no longer log in or revoke) is given up with a
/// Warning event: unrenewed, it ends at its expiry.
pub async fn finalize(
    ctx: &Context,
    held: &Held,
    bs: &BaoSecret,
    key: &str,
) -> Result<Action, kube::Error> {
    if !is_set(bs) {
        held.forget(key);
        return Ok(Action::await_change());
    }
    let ns = bs.namespace().unwrap_or_default();
    let mut status = bs.status.clone().unwrap_or_default();
    let book = Book::from_status(&status);
    let owed: Vec<Owed> = book
        .leases
        .iter()
        .map(|l| (l.lease_id.clone(), l.expiry_time.clone()))
        .chain(
            book.revocations
                .iter()
                .map(|r| (r.lease_id.clone(), r.expiry_time.clone())),
        )
        .map(|(lease_id, expiry)| Owed {
            lease_id,
            expiry: leases::parse(Some(&expiry)),
        })
        .collect();
    let who = tenant_identity(bs, &ns, &ctx.settings);
    let left = revoke_all(ctx, bs, &who, owed).await;
    if left.is_empty() {
        apply(ctx, bs, false).await?;
        held.forget(key);
        ctx.succeeded(&format!("BaoSecret/{key}"));
        return Ok(Action::await_change());
    }
    let remaining = Book {
        revocations: book
            .leases
            .iter()
            .map(leases::retire)
            .chain(book.revocations.iter().cloned())
            .filter(|r| left.contains(&r.lease_id))
            .collect(),
        ..Book::default()
    };
    remaining.record(&mut status);
    write_status(ctx, bs, &ns, &status).await?;
    Ok(Action::requeue(ctx.backoff(&format!("BaoSecret/{key}"))))
}

/// Revokes `owed` as `who`; returns the lease ids still to revoke (OpenBao unavailable, and
/// the lease has not ended anyway).
async fn revoke_all(
    ctx: &Context,
    bs: &BaoSecret,
    who: &TenantIdentity,
    owed: Vec<Owed>,
) -> Vec<String> {
    let now = leases::now();
    let live: Vec<Owed> = owed
        .into_iter()
        .filter(|o| o.expiry.is_some_and(|e| e > now))
        .collect();
    if live.is_empty() {
        return Vec::new();
    }
    let token = match tenant_token(ctx, who).await {
        Ok(t) => t,
        Err(outcome) => return give_up_or_wait(ctx, bs, live, &outcome).await,
    };
    let mut left = Vec::new();
    let mut refused = Vec::new();
    for o in live {
        match revoke_one(ctx, who, &token, &o.lease_id).await {
            Ok(()) => {}
            Err(e) if e.is_unavailable() => left.push(o.lease_id),
            Err(e) => refused.push(format!("{} ({e})", o.lease_id)),
        }
    }
    if !refused.is_empty() {
        let note = format!(
            "cannot revoke {}; unrenewed, they end at their expiry (grant the role's policy update on sys/leases/revoke/<engine path>/*)",
            refused.join(", ")
        );
        ctx.event(bs, true, "LeaseRevocationFailed", note).await;
    }
    left
}

/// Revokes one lease (once more with a fresh token after a 403 on a dead one).
async fn revoke_one(
    ctx: &Context,
    who: &TenantIdentity,
    token: &SecretString,
    lease_id: &str,
) -> Result<(), kubebao_openbao::Error> {
    if openbao_path::check("lease id", lease_id, Shape::Path).is_err() {
        return Ok(());
    }
    let bao = who.client(&ctx.bao);
    let result = match bao.revoke_lease_scoped(token, lease_id).await {
        Err(e) if e.is_permission_denied() => match tenant_denied(ctx, who, token).await {
            Ok(Some(fresh)) => bao.revoke_lease_scoped(&fresh, lease_id).await,
            _ => Err(e),
        },
        other => other,
    };
    ctx.metrics.openbao("revoke_lease", result)
}

/// No token to revoke with: wait while that may pass (OpenBao unavailable), give the leases
/// up (Warning event) when only a change by someone could help (the ServiceAccount or role
/// is gone, e.g. the whole namespace is being deleted).
async fn give_up_or_wait(
    ctx: &Context,
    bs: &BaoSecret,
    live: Vec<Owed>,
    outcome: &Outcome,
) -> Vec<String> {
    if matches!(outcome, Outcome::Retrying { .. }) {
        return live.into_iter().map(|o| o.lease_id).collect();
    }
    let ends: Vec<String> = live
        .iter()
        .map(|o| {
            let end = o.expiry.map(leases::format).unwrap_or_default();
            format!("{} (ends {end})", o.lease_id)
        })
        .collect();
    let note = format!(
        "cannot log in to revoke the leases of this BaoSecret: {}; unrenewed, they end on their own: {}",
        outcome.message(),
        ends.join(", ")
    );
    ctx.event(bs, true, "LeaseRevocationFailed", note).await;
    Vec::new()
}
