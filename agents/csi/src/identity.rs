//! Logging in as the pod: its ServiceAccount token (from the driver, or a TokenRequest bound
//! to the pod) → OpenBao Kubernetes auth → a token per identity, kept under the shared token
//! rules of `kubebao_openbao::tokens` (one login per identity, renewal at 2/3 of the TTL on
//! next use, a 403 checked with lookup-self, failed logins remembered for a second, at most
//! `MAX_IDENTITIES` identities).
//!
//! The agent's own Kubernetes identity is used only to *ask for* the pod's token
//! (TokenRequest, bound to the pod so it dies with it); every OpenBao read uses the token
//! OpenBao issued to the pod's ServiceAccount.

use std::path::PathBuf;
use std::sync::Arc;

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};
use kubebao_openbao::{
    Credentials, Error as BaoError, OpenBao, SecretString, Token, TokenCache, TokenError,
    TokenOptions,
};
use tokio::sync::Mutex;

use crate::error::{MountError, Who};
use crate::metrics::Metrics;
use crate::params::PodInfo;

/// Most identities whose tokens are kept; past it, dead entries go first, then the least
/// recently used (their tokens are revoked).
pub const MAX_IDENTITIES: usize = 4096;

/// Whose OpenBao token this is: one cache entry per distinct identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdentityKey {
    /// OpenBao address.
    pub address: String,
    /// OpenBao namespace ("" for none).
    pub openbao_namespace: String,
    /// Kubernetes auth mount.
    pub auth_mount: String,
    /// OpenBao role.
    pub role: String,
    /// Pod namespace.
    pub namespace: String,
    /// ServiceAccount.
    pub service_account: String,
}

/// An OpenBao token for a Mount, and whether it came from the cache.
pub struct PodToken {
    /// The OpenBao token.
    pub token: SecretString,
    /// True when no login happened for it in this Mount.
    pub cached: bool,
}

impl From<Token> for PodToken {
    fn from(t: Token) -> Self {
        Self {
            token: t.secret,
            cached: t.cached,
        }
    }
}

/// The per-identity OpenBao token cache, and the way to get pod tokens.
pub struct Identities {
    cache: TokenCache<IdentityKey>,
    kube: KubeClient,
    token_request_seconds: i64,
    metrics: Arc<Metrics>,
}

impl Identities {
    /// A new, empty cache.
    pub fn new(kube: KubeClient, token_request_seconds: i64, metrics: Arc<Metrics>) -> Self {
        let observed = metrics.clone();
        let options = TokenOptions {
            max_entries: MAX_IDENTITIES,
            ..TokenOptions::default()
        };
        Self {
            cache: TokenCache::new(options).with_observer(move |e| observed.token_event(e)),
            kube,
            token_request_seconds,
            metrics,
        }
    }

    /// A token for `key`: the cached one while fresh (renewed when due), else a login as the
    /// pod (one at a time per identity).
    pub async fn token(
        &self,
        key: &IdentityKey,
        client: &OpenBao,
        pod: &PodInfo,
        audience: &str,
    ) -> Result<PodToken, MountError> {
        self.cache
            .token(key, client, || self.credentials(key, pod, audience))
            .await
            .map(PodToken::from)
            .map_err(|e| login_error(e, key, pod))
    }

    /// After OpenBao refused `rejected` (403): Some(token) to retry with once when the token
    /// was dead (revoked, expired) and a fresh login replaced it; None for a policy denial.
    pub async fn denied(
        &self,
        key: &IdentityKey,
        client: &OpenBao,
        pod: &PodInfo,
        audience: &str,
        rejected: &SecretString,
    ) -> Result<Option<PodToken>, MountError> {
        self.cache
            .denied(key, client, rejected, || {
                self.credentials(key, pod, audience)
            })
            .await
            .map(|t| t.map(PodToken::from))
            .map_err(|e| login_error(e, key, pod))
    }

    /// Kubernetes-auth credentials with a fresh pod JWT (fetched for every login).
    async fn credentials(
        &self,
        key: &IdentityKey,
        pod: &PodInfo,
        audience: &str,
    ) -> Result<Credentials, MountError> {
        Ok(Credentials::Kubernetes {
            mount: key.auth_mount.clone(),
            role: key.role.clone(),
            jwt: self.pod_jwt(pod, audience).await?,
        })
    }

    /// The pod's ServiceAccount JWT for `audience`: from the driver's `serviceAccount.tokens`,
    /// else a TokenRequest bound to the pod.
    async fn pod_jwt(&self, pod: &PodInfo, audience: &str) -> Result<SecretString, MountError> {
        if let Some(t) = pod.tokens.get(audience) {
            return Ok(t.clone());
        }
        // No audience configured and the driver sent exactly one token: that is the one meant.
        if audience.is_empty() && pod.tokens.len() == 1 {
            return Ok(pod.tokens.values().next().expect("one token").clone());
        }
        let no_token = |reason: String| MountError::NoToken {
            namespace: pod.namespace.clone(),
            service_account: pod.service_account.clone(),
            audience: audience.to_string(),
            reason,
        };
        let client = self.kube.get().await.map_err(|e| {
            Metrics::count(&self.metrics.token_requests, "error");
            no_token(format!(
                "the driver sent none for this audience (audiences sent: {:?}; add it to the CSIDriver's \
                 tokenRequests) and the agent cannot reach the Kubernetes API to ask for one: {e}",
                pod.tokens.keys().collect::<Vec<_>>()
            ))
        })?;
        let api: Api<ServiceAccount> = Api::namespaced(client, &pod.namespace);
        let req = TokenRequest {
            spec: TokenRequestSpec {
                audiences: if audience.is_empty() {
                    vec![]
                } else {
                    vec![audience.to_string()]
                },
                expiration_seconds: Some(self.token_request_seconds),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(pod.name.clone()),
                    uid: Some(pod.uid.clone()),
                }),
            },
            ..Default::default()
        };
        match api
            .create_token_request(&pod.service_account, &PostParams::default(), &req)
            .await
        {
            Ok(tr) => {
                Metrics::count(&self.metrics.token_requests, "ok");
                tr.status
                    .map(|s| SecretString::new(s.token))
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| no_token("the TokenRequest returned no token".into()))
            }
            Err(e) => {
                Metrics::count(&self.metrics.token_requests, "error");
                Err(no_token(format!(
                    "TokenRequest bound to pod {}/{} failed: {e}; the agent needs RBAC create on \
                     serviceaccounts/token, or add the audience to the CSIDriver's tokenRequests",
                    pod.namespace, pod.name
                )))
            }
        }
    }
}

/// A failed login, said in terms of the Mount.
fn login_error(e: TokenError<MountError>, key: &IdentityKey, pod: &PodInfo) -> MountError {
    let refused = |message: String| MountError::LoginRefused {
        who: Who {
            role: key.role.clone(),
            namespace: pod.namespace.clone(),
            service_account: pod.service_account.clone(),
        },
        mount: key.auth_mount.clone(),
        message,
    };
    match e {
        TokenError::Credentials(e) => e,
        TokenError::Login(BaoError::PermissionDenied { message, .. }) => refused(message),
        TokenError::Login(BaoError::NotFound { path }) => refused(format!(
            "no auth method at {path}; enable Kubernetes auth there or set openbaoAuthMountPath"
        )),
        TokenError::Login(e) if e.is_unavailable() => MountError::Unavailable(e),
        TokenError::Login(e) => MountError::OpenBao {
            objects: vec![],
            source: e,
        },
    }
}

/// The agent's Kubernetes client, made on first use (only TokenRequests need it).
pub struct KubeClient {
    kubeconfig: Option<PathBuf>,
    client: Mutex<Option<kube::Client>>,
}

impl KubeClient {
    /// In-cluster config (or `KUBECONFIG`), or the given kubeconfig file.
    pub fn new(kubeconfig: Option<PathBuf>) -> Self {
        Self {
            kubeconfig,
            client: Mutex::new(None),
        }
    }

    async fn get(&self) -> Result<kube::Client, String> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let config = match &self.kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?;
                kube::Config::from_custom_kubeconfig(kc, &Default::default())
                    .await
                    .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
            }
            None => kube::Config::infer()
                .await
                .map_err(|e| format!("no in-cluster config or kubeconfig: {e}"))?,
        };
        let client =
            kube::Client::try_from(config).map_err(|e| format!("Kubernetes client: {e}"))?;
        *slot = Some(client.clone());
        Ok(client)
    }
}
