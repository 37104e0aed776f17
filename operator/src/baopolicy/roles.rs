//! The Kubernetes-auth roles a BaoPolicy declares: where they live, who owns them, and how they
//! are written and removed.
//!
//! A role is written or deleted only when this BaoPolicy owns it: it created the role (recorded
//! in its status and in its policy's marker line, see `hcl`) or adopted it (`adopt: true` on
//! that role). A role that exists and is someone else's is refused (`NotOwned`) before anything
//! is written; a role this BaoPolicy created but that no longer grants its policy (taken over
//! since) is never deleted.

use std::collections::BTreeSet;

use kubebao_openbao::SecretString;
use kubebao_openbao::duration::{self, Bounds};
use serde_json::{Map, Value, json};

use super::{bao_outcome, stalled};
use crate::api::baopolicy::KubernetesAuthRole;
use crate::api::{BaoPolicy, BaoPolicyStatus};
use crate::conditions::Outcome;
use crate::context::Context;
use crate::hcl;
use crate::openbao_path::{self, Shape};

/// A role's token TTLs, as OpenBao accepts them (0 = the mount's default).
pub const TTL_BOUNDS: Bounds = Bounds::new(
    std::time::Duration::ZERO,
    std::time::Duration::from_secs(10 * 8760 * 3600),
);

/// A declared role and where it lives.
#[derive(Debug)]
pub struct Role<'a> {
    /// `<mount>/<name>`, as the status and the marker line record it.
    pub at: String,
    /// The spec.
    pub spec: &'a KubernetesAuthRole,
}

/// What OpenBao holds for a role (`None`: no such role).
pub type RoleState = Option<Map<String, Value>>;

/// `<mount>/<name>` of `role`, the mount defaulting to `default_mount`.
pub fn at(role: &KubernetesAuthRole, default_mount: &str) -> String {
    format!(
        "{}/{}",
        role.mount.as_deref().unwrap_or(default_mount),
        role.name
    )
}

/// The API path of the role recorded as `at`; `None` when `at` is not a safe `<mount>/<name>`.
pub fn api_path(at: &str) -> Option<String> {
    let (mount, name) = at.rsplit_once('/')?;
    openbao_path::check("role mount", mount, Shape::Path).ok()?;
    openbao_path::check("role name", name, Shape::Name).ok()?;
    Some(format!("auth/{mount}/role/{name}"))
}

/// The declared roles, each name, mount and TTL checked (`InvalidSpec` naming the field).
pub fn declared<'a>(bp: &'a BaoPolicy, default_mount: &str) -> Result<Vec<Role<'a>>, Outcome> {
    let invalid = |m: String| stalled("InvalidSpec", m);
    let mut roles: Vec<Role> = Vec::new();
    for (i, spec) in bp.spec.roles.iter().flatten().enumerate() {
        let mount = spec.mount.as_deref().unwrap_or(default_mount);
        openbao_path::check(&format!("spec.roles[{i}].name"), &spec.name, Shape::Name)
            .map_err(|e| invalid(e.to_string()))?;
        openbao_path::check(&format!("spec.roles[{i}].mount"), mount, Shape::Path)
            .map_err(|e| invalid(e.to_string()))?;
        for (field, ttl) in [
            ("tokenTTL", &spec.token_ttl),
            ("tokenMaxTTL", &spec.token_max_ttl),
        ] {
            if let Some(ttl) = ttl
                && let Err(e) = duration::parse(ttl, TTL_BOUNDS)
            {
                return Err(invalid(format!("spec.roles[{i}].{field}: {e}")));
            }
        }
        let at = at(spec, default_mount);
        if roles.iter().any(|r| r.at == at) {
            return Err(invalid(format!(
                "spec.roles[{i}] declares role {at} a second time; keep one"
            )));
        }
        roles.push(Role { at, spec });
    }
    Ok(roles)
}

/// The roles this BaoPolicy owns already: those its status lists, and those recorded in the
/// marker line of the policy text `current` when that marker carries this BaoPolicy's `uid`.
pub fn owned(uid: &str, current: Option<&str>, previous: &BaoPolicyStatus) -> BTreeSet<String> {
    let mut owned: BTreeSet<String> = previous.roles.iter().cloned().collect();
    if let Some(text) = current
        && hcl::owner_uid(text) == Some(uid)
    {
        owned.extend(hcl::owned_roles(text));
    }
    owned
}

/// The policies an existing role grants (for messages).
fn grants(state: &Map<String, Value>) -> Vec<String> {
    state
        .get("token_policies")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

async fn read(ctx: &Context, token: &SecretString, path: &str) -> Result<RoleState, Outcome> {
    match ctx
        .metrics
        .openbao("role_read", ctx.bao.read(path, token).await)
    {
        Ok(s) => Ok(s.data),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(bao_outcome(&format!("cannot read role {path}"), &e)),
    }
}

/// What OpenBao holds for each declared role. A role that exists, is not `owned` and not
/// adopted is refused (`NotOwned`) here, before anything is written.
pub async fn read_all(
    ctx: &Context,
    token: &SecretString,
    roles: &[Role<'_>],
    owned: &BTreeSet<String>,
) -> Result<Vec<RoleState>, Outcome> {
    let mut states = Vec::new();
    for role in roles {
        let path = api_path(&role.at).unwrap_or_default();
        let state = read(ctx, token, &path).await?;
        if let Some(existing) = &state
            && !owned.contains(&role.at)
            && !role.spec.adopt
        {
            return Err(stalled(
                "NotOwned",
                format!(
                    "OpenBao role {path} exists and was not created by this BaoPolicy (it grants {:?}); set adopt: true on that role to take it over, or choose another name",
                    grants(existing)
                ),
            ));
        }
        states.push(state);
    }
    Ok(states)
}

/// Writes each role whose OpenBao state differs from its spec; returns the roles taken over.
pub async fn write_all(
    ctx: &Context,
    token: &SecretString,
    roles: &[Role<'_>],
    states: &[RoleState],
    owned: &BTreeSet<String>,
    policy: &str,
) -> Result<Vec<String>, Outcome> {
    let mut adopted = Vec::new();
    for (role, state) in roles.iter().zip(states) {
        let body = body(role.spec, policy);
        if state.as_ref().is_some_and(|c| matches(c, &body)) {
            continue;
        }
        let path = api_path(&role.at).unwrap_or_default();
        ctx.metrics
            .openbao("role_write", ctx.bao.write(&path, token, &body).await)
            .map_err(|e| bao_outcome(&format!("cannot write role {path}"), &e))?;
        if state.is_some() && !owned.contains(&role.at) {
            adopted.push(role.at.clone());
        }
    }
    Ok(adopted)
}

/// Deletes the role recorded as `at` if it still grants `policy`: one that was taken over since
/// (it grants other policies now) is left alone.
pub async fn remove(
    ctx: &Context,
    token: &SecretString,
    at: &str,
    policy: &str,
) -> Result<(), Outcome> {
    let Some(path) = api_path(at) else {
        tracing::warn!(role = %at, "recorded role is not a <mount>/<name> path; not deleting it");
        return Ok(());
    };
    match read(ctx, token, &path).await? {
        None => return Ok(()),
        Some(state) if !grants(&state).iter().any(|p| p == policy) => {
            tracing::info!(role = %path, policy, "role no longer grants this policy; not deleting it");
            return Ok(());
        }
        Some(_) => {}
    }
    match ctx
        .metrics
        .openbao("role_delete", ctx.bao.delete(&path, token).await)
    {
        Ok(()) => Ok(()),
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(bao_outcome(&format!("cannot delete role {path}"), &e)),
    }
}

/// The role's OpenBao body: its bindings, TTLs and audience, granting `policy`.
pub fn body(role: &KubernetesAuthRole, policy: &str) -> Value {
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
pub fn matches(current: &Map<String, Value>, body: &Value) -> bool {
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
            Some(Value::String(s)) => duration::parse(s, TTL_BOUNDS)
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

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn policy(roles: Value) -> BaoPolicy {
        serde_json::from_value(json!({
            "apiVersion": "kubebao.io/v1alpha1", "kind": "BaoPolicy",
            "metadata": {"name": "p", "uid": "u1"},
            "spec": {"rules": [{"path": "a/*", "capabilities": ["read"]}], "roles": roles}
        }))
        .unwrap()
    }

    fn role(name: &str, mount: Option<&str>, ttl: Option<&str>) -> Value {
        json!({"name": name, "mount": mount, "tokenTTL": ttl,
               "boundServiceAccountNames": ["app"], "boundServiceAccountNamespaces": ["team"]})
    }

    #[test]
    fn declared_roles_are_checked_and_located() {
        let bp = policy(json!([
            role("app", None, Some("1h")),
            role("db", Some("k8s/prod"), None)
        ]));
        let roles = declared(&bp, "kubernetes").unwrap();
        let ats: Vec<&str> = roles.iter().map(|r| r.at.as_str()).collect();
        assert_eq!(ats, ["kubernetes/app", "k8s/prod/db"]);
        assert_eq!(
            api_path("k8s/prod/db").as_deref(),
            Some("auth/k8s/prod/role/db")
        );
        assert_eq!(api_path("kubernetes/.."), None);
        assert_eq!(api_path("../../sys/x"), None);
        for (bad, field) in [
            (role("..", None, None), "spec.roles[0].name"),
            (role("a", Some("../../sys"), None), "spec.roles[0].mount"),
            (
                role("a", None, Some("99999999999999999999h")),
                "spec.roles[0].tokenTTL",
            ),
        ] {
            let e = declared(&policy(json!([bad])), "kubernetes").unwrap_err();
            assert_eq!(e.reason(), "InvalidSpec");
            assert!(e.message().starts_with(field), "{}", e.message());
        }
        let twice = policy(json!([
            role("a", None, None),
            role("a", Some("kubernetes"), None)
        ]));
        assert!(declared(&twice, "kubernetes").is_err());
    }

    #[test]
    fn only_a_marker_with_this_uid_records_owned_roles() {
        let status = BaoPolicyStatus {
            roles: vec!["kubernetes/from-status".into()],
            ..Default::default()
        };
        let ours = hcl::wrap_raw(&hcl::marker("u1", &["kubernetes/a".into()]), "");
        let theirs = hcl::wrap_raw(&hcl::marker("u2", &["kubernetes/b".into()]), "");
        let owned_by = |text: Option<&str>| -> Vec<String> {
            owned("u1", text, &status).into_iter().collect()
        };
        assert_eq!(
            owned_by(Some(&ours)),
            ["kubernetes/a", "kubernetes/from-status"]
        );
        assert_eq!(owned_by(Some(&theirs)), ["kubernetes/from-status"]);
        assert_eq!(owned_by(None), ["kubernetes/from-status"]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever a role spec holds: no panic; refused with the field named, or accepted with
        /// an API path inside `auth/<mount>/role/`; and the body grants exactly the policy.
        #[test]
        fn role_specs_never_panic_and_stay_in_their_mount(
            name in "(\\PC|/|\\.){0,20}",
            mount in proptest::option::of("[a-z./]{0,20}"),
            ttl in proptest::option::of("[0-9hmsd.]{0,24}"),
            bound in proptest::collection::vec("\\PC{0,12}", 1..3),
        ) {
            let mut r = role(&name, mount.as_deref(), ttl.as_deref());
            r["boundServiceAccountNames"] = json!(bound);
            let bp = policy(json!([r]));
            match declared(&bp, "kubernetes") {
                Ok(roles) => {
                    let path = api_path(&roles[0].at).unwrap();
                    let inside = path.starts_with("auth/") && path.ends_with(&format!("/role/{name}"));
                    prop_assert!(inside, "{}", path);
                    prop_assert!(!path.split('/').any(|s| s.is_empty() || s == "." || s == ".."));
                    let body = body(roles[0].spec, "the-policy");
                    prop_assert_eq!(&body["token_policies"], &json!(["the-policy"]));
                    prop_assert!(matches(body.as_object().unwrap(), &body));
                }
                Err(e) => prop_assert!(e.message().starts_with("spec.roles[0]."), "{}", e.message()),
            }
        }
    }
}
