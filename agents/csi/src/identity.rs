//! Logging in as the pod: its ServiceAccount token (from the driver, or a TokenRequest bound
//! to the pod) → OpenBao Kubernetes auth → a token per identity, kept under the shared token
//! rules of `kubebao_openbao::tokens` (one login per identity, renewal at 2/3 of the TTL on
//! next use, a 403 checked with lookup-self, failed logins remembered for a second, at most
//! `MAX_IDENTITIES` identities).
//!
//! A cached OpenBao token is shared by the pods of one ServiceAccount, so a request gets it
//! only once its own ServiceAccount token has proven that identity: the token the driver sent
//! passes a TokenReview naming this namespace, ServiceAccount (and pod, for a bound token);
//! without one, the agent's TokenRequest bound to the pod succeeds (the API server checks the
//! pod exists with that uid and runs as that ServiceAccount). A proof is remembered by a hash
//! of the token (or the pod uid) for `PROOF_TTL`, so a rotation poll costs no API call.
//!
//! The agent's own Kubernetes identity is used only to *ask for* the pod's token
//! (TokenRequest, bound to the pod so it dies with it) and to review tokens; every OpenBao read
//! uses the token OpenBao issued to the pod's ServiceAccount.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{
    BoundObjectReference, TokenRequest, TokenRequestSpec, TokenReview, TokenReviewSpec,
};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};
use kubebao_openbao::{
    Credentials, Error as BaoError, OpenBao, SecretString, Token, TokenCache, TokenError,
    TokenOptions,
};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use crate::bounded::BoundedMap;
use crate::error::{MountError, Who};
use crate::metrics::Metrics;
use crate::params::PodInfo;

/// Most identities whose tokens are kept; past it, dead entries go first, then the least
/// recently used (their tokens are revoked).
pub const MAX_IDENTITIES: usize = 4096;
/// How long a reviewed ServiceAccount token, or a pod's TokenRequest, counts as proof.
pub const PROOF_TTL: Duration = Duration::from_secs(600);
/// Most proofs remembered (about 150 bytes each).
const MAX_PROOFS: usize = 8192;
/// The extra field of a TokenReview naming the pod a bound token belongs to.
const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

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

/// What a proof established: this pod of this namespace runs as this ServiceAccount.
#[derive(Clone, PartialEq, Eq)]
struct Claim {
    namespace: String,
    service_account: String,
    uid: String,
}

impl Claim {
    fn of(pod: &PodInfo) -> Self {
        Self {
            namespace: pod.namespace.clone(),
            service_account: pod.service_account.clone(),
            uid: pod.uid.clone(),
        }
    }
}

#[derive(Clone)]
struct Proof {
    claim: Claim,
    until: Instant,
}

/// The per-identity OpenBao token cache, and the way to get (and prove) pod tokens.
pub struct Identities {
    cache: Arc<TokenCache<IdentityKey>>,
    proofs: BoundedMap<[u8; 32], Proof>,
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
            cache: Arc::new(
                TokenCache::new(options).with_observer(move |e| observed.token_event(e)),
            ),
            proofs: BoundedMap::new(MAX_PROOFS, usize::MAX),
            kube,
            token_request_seconds,
            metrics,
        }
    }

    /// Identities whose tokens are held.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    /// True when no identity is held.
    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// Forgets `keys` in the background, revoking the tokens KubeBao logged in for.
    pub fn forget(&self, keys: Vec<IdentityKey>) {
        if keys.is_empty() {
            return;
        }
        let cache = self.cache.clone();
        tokio::spawn(async move {
            for key in keys {
                cache.forget(&key).await;
            }
        });
    }

    /// A token for `key`, once the request has proven the pod's identity: the cached one
    /// while fresh (renewed when due), else a login as the pod (one at a time per identity).
    pub async fn token(
        &self,
        key: &IdentityKey,
        client: &OpenBao,
        pod: &PodInfo,
        audience: &str,
    ) -> Result<PodToken, MountError> {
        let jwt = self.prove(pod, audience).await?;
        self.cache
            .token(key, client, || self.credentials(key, pod, audience, jwt))
            .await
            .map(PodToken::from)
            .map_err(|e| login_error(e, key, pod))
    }

    /// After OpenBao refused `rejected` (403): Some(token) to retry with once when the token
    /// was dead (revoked, expired) and a fresh login replaced it; None for a policy denial.
    /// Called after `token` proved the pod's identity in the same Mount.
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
                self.credentials(key, pod, audience, None)
            })
            .await
            .map(|t| t.map(PodToken::from))
            .map_err(|e| login_error(e, key, pod))
    }

    /// Proves that the request speaks for the pod it names (see the module doc); returns a
    /// JWT already in hand for a login (the driver's, or one just requested).
    async fn prove(
        &self,
        pod: &PodInfo,
        audience: &str,
    ) -> Result<Option<SecretString>, MountError> {
        let claim = Claim::of(pod);
        let now = Instant::now();
        let driver = driver_jwt(pod, audience);
        let key: [u8; 32] = match &driver {
            Some((aud, jwt)) => proof_key(&["jwt", aud, jwt.expose()]),
            None => proof_key(&["pod", &pod.uid]),
        };
        let proven = self
            .proofs
            .get(&key)
            .is_some_and(|p| p.claim == claim && p.until > now);
        let jwt = match driver {
            Some((_, jwt)) if proven => return Ok(Some(jwt)),
            None if proven => return Ok(None),
            Some((aud, jwt)) => {
                self.review(&jwt, &aud, pod).await?;
                jwt
            }
            // The TokenRequest bound to the pod is the proof.
            None => self.token_request(pod, audience).await?,
        };
        let until = now + PROOF_TTL;
        self.proofs.insert(key, Proof { claim, until }, 1);
        Ok(Some(jwt))
    }

    /// Kubernetes-auth credentials: `jwt` when one is in hand, else a fresh pod JWT.
    async fn credentials(
        &self,
        key: &IdentityKey,
        pod: &PodInfo,
        audience: &str,
        jwt: Option<SecretString>,
    ) -> Result<Credentials, MountError> {
        let jwt = match jwt {
            Some(jwt) => jwt,
            None => self.pod_jwt(pod, audience).await?,
        };
        Ok(Credentials::Kubernetes {
            mount: key.auth_mount.clone(),
            role: key.role.clone(),
            jwt,
        })
    }

    /// The pod's ServiceAccount JWT for `audience`: from the driver's `serviceAccount.tokens`,
    /// else a TokenRequest bound to the pod.
    async fn pod_jwt(&self, pod: &PodInfo, audience: &str) -> Result<SecretString, MountError> {
        match driver_jwt(pod, audience) {
            Some((_, jwt)) => Ok(jwt),
            None => self.token_request(pod, audience).await,
        }
    }

    /// A token for the pod's ServiceAccount from a TokenRequest bound to the pod.
    async fn token_request(
        &self,
        pod: &PodInfo,
        audience: &str,
    ) -> Result<SecretString, MountError> {
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

    /// Asks the API server whether `jwt` (for `audience`) is the pod's own token.
    async fn review(
        &self,
        jwt: &SecretString,
        audience: &str,
        pod: &PodInfo,
    ) -> Result<(), MountError> {
        let cannot = |reason: String| {
            Metrics::count(&self.metrics.token_reviews, "error");
            MountError::NoToken {
                namespace: pod.namespace.clone(),
                service_account: pod.service_account.clone(),
                audience: audience.to_string(),
                reason: format!(
                    "the agent cannot check the token the driver sent (TokenReview): {reason}; \
                     it needs RBAC create on tokenreviews.authentication.k8s.io"
                ),
            }
        };
        let client = self.kube.get().await.map_err(cannot)?;
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(jwt.expose().to_string()),
                audiences: (!audience.is_empty()).then(|| vec![audience.to_string()]),
            },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(client)
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| cannot(e.to_string()))?;
        let refused = |reason: String| {
            Metrics::count(&self.metrics.token_reviews, "refused");
            MountError::BadToken {
                namespace: pod.namespace.clone(),
                pod: pod.name.clone(),
                service_account: pod.service_account.clone(),
                reason,
            }
        };
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.unwrap_or_else(|| "no reason given".into());
            return Err(refused(format!(
                "the Kubernetes API does not accept it ({why})"
            )));
        }
        let user = status.user.unwrap_or_default();
        let expected = format!(
            "system:serviceaccount:{}:{}",
            pod.namespace, pod.service_account
        );
        let username = user.username.unwrap_or_default();
        if username != expected {
            return Err(refused(format!("it is a token of {username:?}")));
        }
        let bound_to = user.extra.unwrap_or_default().remove(POD_UID_EXTRA);
        if let Some(uids) = bound_to
            && !uids.contains(&pod.uid)
        {
            return Err(refused(format!(
                "it is bound to another pod (uid {uids:?}, not {})",
                pod.uid
            )));
        }
        Metrics::count(&self.metrics.token_reviews, "ok");
        Ok(())
    }
}

/// The token the driver sent for `audience`, with the audience it was requested for: the one
/// for `audience`, or with no audience configured the only one sent.
fn driver_jwt(pod: &PodInfo, audience: &str) -> Option<(String, SecretString)> {
    if let Some(t) = pod.tokens.get(audience) {
        return Some((audience.to_string(), t.clone()));
    }
    if audience.is_empty() && pod.tokens.len() == 1 {
        return pod
            .tokens
            .iter()
            .next()
            .map(|(aud, t)| (aud.clone(), t.clone()));
    }
    None
}

/// SHA-256 of the parts, NUL-separated: what a proof is remembered by (never the token).
fn proof_key(parts: &[&str]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    h.finalize().into()
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

    /// A client already built (tests; an embedding program).
    pub fn with_client(client: kube::Client) -> Self {
        Self {
            kubeconfig: None,
            client: Mutex::new(Some(client)),
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
