//! OpenBao tokens for BaoSecrets, obtained as the BaoSecret's own ServiceAccount
//! (TokenRequest → Kubernetes auth). Caching, renewal, re-login after a revoked token and
//! revocation of forgotten tokens follow the one set of rules in `kubebao_openbao::tokens`;
//! this module only says how a tenant proves who it is and names the failures.
//!
//! Everything that selects what a token is valid for is part of the identity, and so of the
//! cache key: the ServiceAccount, role, auth mount, audience and OpenBao namespace. Two
//! BaoSecrets that differ in any of them never share a token.
//!
//! Leases: OpenBao revokes a lease when the token that created it is revoked or expires. So a
//! token is forgotten (and revoked) only once no BaoSecret reads as its identity and no lease
//! it created is held (the caller counts such identities as in use), and BaoSecrets holding
//! leases ask for the token when its renewal is due ([`TenantTokens::upkeep_in`]), which keeps
//! it alive; [`TenantTokens::remaining`] tells whether a lease's token is still the one kept
//! alive, and until when it lives otherwise.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
    /// OpenBao namespace of the login and the reads (None: the operator's own setting).
    pub openbao_namespace: Option<String>,
}

impl TenantIdentity {
    /// The OpenBao client for this identity: the operator's, speaking to the identity's
    /// OpenBao namespace when it names one (same server and connection pool).
    pub fn client(&self, bao: &OpenBao) -> OpenBao {
        match &self.openbao_namespace {
            Some(ns) => bao.with_namespace(Some(ns)),
            None => bao.clone(),
        }
    }
}

impl std::fmt::Display for TenantIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "role {:?} as {}/{} (auth/{}",
            self.role, self.namespace, self.service_account, self.mount
        )?;
        match &self.openbao_namespace {
            Some(ns) => write!(f, " in OpenBao namespace {ns:?})"),
            None => write!(f, ")"),
        }
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

    /// How long `token` lives on while it is the one held for `id` (`Duration::MAX` without
    /// expiry); None once the cache holds another (or none). A lease dies with the token that
    /// created it: this tells whether that token is still kept alive.
    pub fn remaining(&self, id: &TenantIdentity, token: &SecretString) -> Option<Duration> {
        self.cache.remaining(id, token)
    }

    /// How long until the token held for `id` is due for renewal (the cache renews it when it
    /// is next used); None without a token or for one without expiry.
    pub fn upkeep_in(&self, id: &TenantIdentity) -> Option<Duration> {
        self.cache.upkeep_in(id)
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
        self.token_with(bao, id, || credentials(kube, id)).await
    }

    /// [`TenantTokens::token`] with the credentials `credentials` fetches for a login.
    async fn token_with<F, Fut>(
        &self,
        bao: &OpenBao,
        id: &TenantIdentity,
        credentials: F,
    ) -> Result<SecretString, TenantError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Credentials, kube::Error>>,
    {
        let token = self.cache.token(id, &id.client(bao), credentials).await;
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
            .denied(id, &id.client(bao), rejected, || credentials(kube, id))
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
            openbao_namespace: None,
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

    /// A fake OpenBao whose Kubernetes logins (any mount) answer with a token naming the
    /// OpenBao namespace and mount the request was for; returns its address and the logins.
    async fn fake_openbao() -> (String, Arc<Mutex<Vec<String>>>) {
        use axum::extract::Path;
        use axum::http::HeaderMap;
        use axum::routing::post;
        let logins = Arc::new(Mutex::new(Vec::new()));
        let seen = logins.clone();
        let app = axum::Router::new().route(
            "/v1/auth/{mount}/login",
            post(move |Path(mount): Path<String>, headers: HeaderMap| {
                let seen = seen.clone();
                async move {
                    let ns = headers
                        .get("X-Vault-Namespace")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("root");
                    let token = format!("token-{ns}-{mount}");
                    seen.lock().unwrap().push(token.clone());
                    let body = serde_json::json!({"auth": {
                        "client_token": token, "accessor": "a", "policies": [],
                        "lease_duration": 3600, "renewable": false
                    }});
                    ([("content-type", "application/json")], body.to_string())
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (addr, logins)
    }

    #[tokio::test]
    async fn one_service_account_in_two_openbao_namespaces_or_mounts_gets_two_tokens() {
        kubebao_openbao::install_crypto_provider();
        let (addr, logins) = fake_openbao().await;
        let bao = OpenBao::new(&kubebao_openbao::ClientConfig {
            address: addr,
            allow_plain_http: true,
            ..Default::default()
        })
        .unwrap();
        let tokens = TenantTokens::new(Arc::new(Metrics::default()));
        let login = |id: &TenantIdentity| {
            let (mount, role) = (id.mount.clone(), id.role.clone());
            move || async move {
                Ok(Credentials::Kubernetes {
                    mount,
                    role,
                    jwt: SecretString::new("jwt"),
                })
            }
        };
        let root = identity("app");
        let team_a = TenantIdentity {
            openbao_namespace: Some("team-a".into()),
            ..identity("app")
        };
        let other_mount = TenantIdentity {
            mount: "k8s-2".into(),
            ..team_a.clone()
        };
        let mut got = Vec::new();
        for id in [&root, &team_a, &other_mount, &team_a, &root] {
            let token = tokens.token_with(&bao, id, login(id)).await.unwrap();
            got.push(token.expose().to_string());
        }
        assert_eq!(
            got,
            [
                "token-root-kubernetes",
                "token-team-a-kubernetes",
                "token-team-a-k8s-2",
                "token-team-a-kubernetes",
                "token-root-kubernetes",
            ]
        );
        // One login each; the repeats came from the cache.
        assert_eq!(logins.lock().unwrap().len(), 3);
        assert_eq!(tokens.cached_identities(), 3);
        assert!(
            team_a
                .to_string()
                .contains("in OpenBao namespace \"team-a\"")
        );
    }
}
