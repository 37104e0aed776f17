//! Logging in as the pod: its ServiceAccount token (from the driver, or a TokenRequest bound
//! to the pod) → OpenBao Kubernetes auth → a token cached per identity until near expiry.
//!
//! The agent's own Kubernetes identity is used only to *ask for* the pod's token
//! (TokenRequest, bound to the pod so it dies with it); every OpenBao read uses the token
//! OpenBao issued to the pod's ServiceAccount.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};
use kubebao_openbao::{Credentials, Error as BaoError, OpenBao, SecretString};
use tokio::sync::Mutex;

use crate::error::{MountError, Who};
use crate::metrics::Metrics;
use crate::params::PodInfo;

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

#[derive(Clone)]
struct CachedToken {
    token: SecretString,
    /// After this the token is replaced by a fresh login (well before it expires).
    refresh_at: Instant,
}

type Slot = Arc<Mutex<Option<CachedToken>>>;

/// An OpenBao token for a Mount, and whether it came from the cache.
pub struct PodToken {
    /// The OpenBao token.
    pub token: SecretString,
    /// True when no login happened for it in this Mount.
    pub cached: bool,
}

/// The per-identity OpenBao token cache, and the way to get pod tokens.
pub struct Identities {
    slots: StdMutex<HashMap<IdentityKey, Slot>>,
    kube: KubeClient,
    token_request_seconds: i64,
    metrics: Arc<Metrics>,
}

impl Identities {
    /// A new, empty cache.
    pub fn new(kube: KubeClient, token_request_seconds: i64, metrics: Arc<Metrics>) -> Self {
        Self {
            slots: StdMutex::new(HashMap::new()),
            kube,
            token_request_seconds,
            metrics,
        }
    }

    fn slot(&self, key: &IdentityKey) -> Slot {
        let mut slots = self.slots.lock().expect("token cache lock");
        if slots.len() > 4096 {
            // Drop identities nobody is logged in as (their slot is not in use and holds nothing fresh).
            let now = Instant::now();
            slots.retain(|_, s| match s.try_lock() {
                Ok(g) => g.as_ref().is_some_and(|t| t.refresh_at > now),
                Err(_) => true,
            });
        }
        slots.entry(key.clone()).or_default().clone()
    }

    /// A token for `key`: the cached one while fresh, else a login (one at a time per identity).
    /// `stale` is a token known to be refused (403): it is dropped and replaced.
    pub async fn token(
        &self,
        key: &IdentityKey,
        client: &OpenBao,
        pod: &PodInfo,
        audience: &str,
        stale: Option<&SecretString>,
    ) -> Result<PodToken, MountError> {
        let slot = self.slot(key);
        let mut guard = slot.lock().await;
        if let Some(cached) = guard.as_ref() {
            let refused = stale.is_some_and(|s| s == &cached.token);
            if !refused && cached.refresh_at > Instant::now() {
                Metrics::count(&self.metrics.token_cache, "hit");
                return Ok(PodToken {
                    token: cached.token.clone(),
                    cached: true,
                });
            }
        }
        Metrics::count(&self.metrics.token_cache, "miss");
        *guard = None;
        let jwt = self.pod_jwt(pod, audience).await?;
        let who = Who {
            role: key.role.clone(),
            namespace: pod.namespace.clone(),
            service_account: pod.service_account.clone(),
        };
        self.metrics.openbao("login");
        let auth = client
            .login(&Credentials::Kubernetes {
                mount: key.auth_mount.clone(),
                role: key.role.clone(),
                jwt,
            })
            .await
            .map_err(|e| {
                let (result, err) = match e {
                    BaoError::PermissionDenied { message, .. } => (
                        "refused",
                        MountError::LoginRefused {
                            who,
                            mount: key.auth_mount.clone(),
                            message,
                        },
                    ),
                    BaoError::NotFound { path } => (
                        "refused",
                        MountError::LoginRefused {
                            who,
                            mount: key.auth_mount.clone(),
                            message: format!(
                                "no auth method at {path}; enable Kubernetes auth there or set openbaoAuthMountPath"
                            ),
                        },
                    ),
                    e if e.is_unavailable() => ("error", MountError::Unavailable(e)),
                    e => (
                        "error",
                        MountError::OpenBao {
                            objects: vec![],
                            source: e,
                        },
                    ),
                };
                Metrics::count(&self.metrics.logins, result);
                err
            })?;
        Metrics::count(&self.metrics.logins, "ok");
        let ttl = if auth.lease_duration == 0 {
            Duration::from_secs(300)
        } else {
            auth.ttl()
        };
        // Refresh at 80% of the TTL: a Mount never starts with a token about to expire.
        let refresh_at = Instant::now() + ttl.mul_f64(0.8);
        let token = auth.client_token.clone();
        *guard = Some(CachedToken {
            token: token.clone(),
            refresh_at,
        });
        Ok(PodToken {
            token,
            cached: false,
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
