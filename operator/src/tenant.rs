//! OpenBao tokens for BaoSecrets, obtained as the BaoSecret's own ServiceAccount
//! (TokenRequest → Kubernetes auth) and cached per identity until near expiry: one login per
//! identity per token lifetime, never one per reconcile.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Api;
use kube::api::PostParams;
use kubebao_openbao::{Credentials, OpenBao, SecretString};
use tokio::sync::Mutex;

use crate::metrics::Metrics;

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

struct Cached {
    token: SecretString,
    obtained: Instant,
    ttl: Duration,
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

/// Re-login after a 403 at most this often per identity, so a BaoSecret whose role simply
/// lacks the path costs one OpenBao request per retry, not two.
const RELOGIN_AFTER_DENIED: Duration = Duration::from_secs(300);

/// The token cache.
#[derive(Default)]
pub struct TenantTokens {
    slots: std::sync::Mutex<HashMap<TenantIdentity, Arc<Mutex<Option<Cached>>>>>,
}

impl TenantTokens {
    fn slot(&self, id: &TenantIdentity) -> Arc<Mutex<Option<Cached>>> {
        self.slots
            .lock()
            .expect("token cache lock")
            .entry(id.clone())
            .or_default()
            .clone()
    }

    /// A token for `id`, logging in only when none is cached or it is within 20% of expiry.
    pub async fn token(
        &self,
        kube: &kube::Client,
        bao: &OpenBao,
        metrics: &Metrics,
        id: &TenantIdentity,
    ) -> Result<SecretString, TenantError> {
        let slot = self.slot(id);
        let mut held = slot.lock().await;
        if let Some(c) = held.as_ref()
            && (c.ttl.is_zero() || c.obtained.elapsed() < c.ttl * 4 / 5)
        {
            return Ok(c.token.clone());
        }
        let sas: Api<ServiceAccount> = Api::namespaced(kube.clone(), &id.namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![id.audience.clone()],
                expiration_seconds: Some(600),
                ..Default::default()
            },
            ..Default::default()
        };
        let jwt = sas
            .create_token_request(&id.service_account, &PostParams::default(), &request)
            .await
            .map_err(|source| TenantError::TokenRequest {
                namespace: id.namespace.clone(),
                name: id.service_account.clone(),
                source,
            })?
            .status
            .map(|s| s.token)
            .unwrap_or_default();
        let credentials = Credentials::Kubernetes {
            mount: id.mount.clone(),
            role: id.role.clone(),
            jwt: SecretString::new(jwt),
        };
        let auth = metrics
            .openbao("login", bao.login(&credentials).await)
            .map_err(|source| TenantError::Login {
                identity: id.to_string(),
                source,
            })?;
        let token = auth.client_token.clone();
        let ttl = auth.ttl();
        *held = Some(Cached {
            token: auth.client_token,
            obtained: Instant::now(),
            ttl,
        });
        Ok(token)
    }

    /// After a 403: drop the cached token if it is old enough that it may have been revoked.
    pub async fn denied(&self, id: &TenantIdentity) {
        let slot = self.slot(id);
        let mut held = slot.lock().await;
        if held
            .as_ref()
            .is_some_and(|c| c.obtained.elapsed() >= RELOGIN_AFTER_DENIED)
        {
            *held = None;
        }
    }
}
