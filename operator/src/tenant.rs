//! OpenBao tokens for BaoSecrets, obtained as the BaoSecret's own ServiceAccount
//! (TokenRequest → Kubernetes auth). Caching, renewal, re-login after a revoked token and
//! revocation of forgotten tokens follow the one set of rules in `kubebao_openbao::tokens`;
//! this module only says how a tenant proves who it is and names the failures.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Api;
use kube::api::PostParams;
use kubebao_openbao::tokens::{TokenCache, TokenError, TokenEvent, TokenOptions};
use kubebao_openbao::{Credentials, OpenBao, SecretString};

use crate::metrics::Metrics;

/// Lifetime of the ServiceAccount token used for one login (it is sent to OpenBao once).
const LOGIN_JWT_SECONDS: i64 = 600;

/// Who a BaoSecret reads OpenBao as.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct TenantIdentity {
    /// The BaoSecret's namespace.
    pub namespace: String,
    /// ServiceAccount in that namespace.
    pub service_account: String,
    /// OpenBao role.
    pub role: String,
    /// Kubernetes auth mount.
    pub mount: String,
    /// Token audience.
    pub audience: String,
}

impl std::fmt::Display for TenantIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "role {:?} as {}/{} (auth/{})",
            self.role, self.namespace, self.service_account, self.mount
        )
    }
}

/// A failed tenant login.
#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    /// TokenRequest for the ServiceAccount failed.
    #[error(
        "cannot get a token for ServiceAccount {namespace}/{name}: {source}; check that it exists and the operator may create serviceaccounts/token"
    )]
    TokenRequest {
        /// Namespace.
        namespace: String,
        /// ServiceAccount.
        name: String,
        /// Kubernetes error.
        source: kube::Error,
    },
    /// OpenBao refused the login or is unavailable.
    #[error("OpenBao login {identity} failed: {source}")]
    Login {
        /// Who.
        identity: String,
        /// OpenBao error.
        source: kubebao_openbao::Error,
    },
}

/// The tenants' OpenBao tokens, one per identity.
pub struct TenantTokens {
    cache: TokenCache<TenantIdentity>,
    /// The identities tokens were handed out for (noted after each call, so a sweep never
    /// misses one the cache holds).
    held: Mutex<HashSet<TenantIdentity>>,
}

impl TenantTokens {
    /// An empty cache; logins, renewals and token checks are counted in `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        let cache = TokenCache::new(TokenOptions::default()).with_observer(move |event| {
            let (op, result) = match event {
                TokenEvent::LoggedIn => ("login", "ok"),
                TokenEvent::LoginFailed(e) => ("login", e.kind()),
                TokenEvent::Renewed => ("renew_token", "ok"),
                TokenEvent::RenewalFailed(e) => ("renew_token", e.kind()),
                TokenEvent::Checked(Ok(_)) => ("lookup_token", "ok"),
                TokenEvent::Checked(Err(e)) => ("lookup_token", e.kind()),
                TokenEvent::Revoked(Ok(())) => ("revoke_token", "ok"),
                TokenEvent::Revoked(Err(e)) => ("revoke_token", e.kind()),
                _ => return,
            };
            metrics.openbao_request(op, result);
        });
        Self {
            cache,
            held: Mutex::default(),
        }
    }

    /// How many identities have a cached token.
    pub fn cached_identities(&self) -> usize {
        self.cache.len()
    }

    /// The identities held that are not in `in_use` (no BaoSecret reads as them any more),
    /// no longer counted as held; pass them to [`TenantTokens::forget`].
    pub fn unused(&self, in_use: &HashSet<TenantIdentity>) -> Vec<TenantIdentity> {
        let mut held = self.held.lock().expect("held identities lock");
        let unused = held.difference(in_use).cloned().collect();
        held.retain(|id| in_use.contains(id));
        unused
    }

    /// Forgets `identities` and revokes the tokens KubeBao logged in for.
    pub async fn forget(&self, identities: &[TenantIdentity]) {
        for id in identities {
            self.cache.forget(id).await;
        }
    }

    fn note(&self, id: &TenantIdentity) {
        let mut held = self.held.lock().expect("held identities lock");
        if !held.contains(id) {
            held.insert(id.clone());
        }
    }

    /// A token for `id`: the held one while fresh, else a renewal or a login.
    pub async fn token(
        &self,
        kube: &kube::Client,
        bao: &OpenBao,
        id: &TenantIdentity,
    ) -> Result<SecretString, TenantError> {
        let token = self.cache.token(id, bao, || credentials(kube, id)).await;
        self.note(id);
        token.map(|t| t.secret).map_err(|e| tenant_error(id, e))
    }

    /// After OpenBao answered 403 to `rejected`: a token to retry with once when `rejected`
    /// was dead (revoked, expired), None when the 403 is a policy denial.
    pub async fn denied(
        &self,
        kube: &kube::Client,
        bao: &OpenBao,
        id: &TenantIdentity,
        rejected: &SecretString,
    ) -> Result<Option<SecretString>, TenantError> {
        let token = self
            .cache
            .denied(id, bao, rejected, || credentials(kube, id))
            .await;
        self.note(id);
        token
            .map(|t| t.map(|t| t.secret))
            .map_err(|e| tenant_error(id, e))
    }
}

fn tenant_error(id: &TenantIdentity, e: TokenError<kube::Error>) -> TenantError {
    match e {
        TokenError::Credentials(source) => TenantError::TokenRequest {
            namespace: id.namespace.clone(),
            name: id.service_account.clone(),
            source,
        },
        TokenError::Login(source) => TenantError::Login {
            identity: id.to_string(),
            source,
        },
    }
}

/// Kubernetes-auth credentials for `id`: a short-lived token of its ServiceAccount, for the
/// OpenBao audience only.
async fn credentials(kube: &kube::Client, id: &TenantIdentity) -> Result<Credentials, kube::Error> {
    let sas: Api<ServiceAccount> = Api::namespaced(kube.clone(), &id.namespace);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![id.audience.clone()],
            expiration_seconds: Some(LOGIN_JWT_SECONDS),
            ..Default::default()
        },
        ..Default::default()
    };
    let jwt = sas
        .create_token_request(&id.service_account, &PostParams::default(), &request)
        .await?
        .status
        .map(|s| s.token)
        .unwrap_or_default();
    Ok(Credentials::Kubernetes {
        mount: id.mount.clone(),
        role: id.role.clone(),
        jwt: SecretString::new(jwt),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(service_account: &str) -> TenantIdentity {
        TenantIdentity {
            namespace: "team".into(),
            service_account: service_account.into(),
            role: "team".into(),
            mount: "kubernetes".into(),
            audience: "openbao".into(),
        }
    }

    #[test]
    fn identities_no_baosecret_uses_are_handed_out_once_to_be_forgotten() {
        let tokens = TenantTokens::new(Arc::new(Metrics::default()));
        for sa in ["a", "b", "c"] {
            tokens.note(&identity(sa));
        }
        let in_use = HashSet::from([identity("a")]);
        let mut unused = tokens.unused(&in_use);
        unused.sort_by(|x, y| x.service_account.cmp(&y.service_account));
        assert_eq!(unused, [identity("b"), identity("c")]);
        assert!(tokens.unused(&in_use).is_empty());
        // The one still in use goes once nothing uses it either.
        assert_eq!(tokens.unused(&HashSet::new()), [identity("a")]);
    }
}
