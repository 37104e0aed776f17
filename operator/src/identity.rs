//! The operator's own OpenBao identity: used only for policies and auth roles (BaoPolicy),
//! never to read tenant data (BaoSecrets log in as their own ServiceAccount, see `tenant.rs`).
//!
//! Minimal login + renewal: `kubebao_openbao::Session` (a parallel work item) was not committed
//! when this was written; switch to it once it is.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kubebao_openbao::{Credentials, OpenBao, SecretString};
use tokio::sync::Mutex;

/// Where the operator's own credentials come from.
#[derive(Clone, Debug)]
pub enum IdentitySource {
    /// Kubernetes auth as the operator's ServiceAccount (token read from `jwt_file` each login).
    Kubernetes {
        /// Auth mount.
        mount: String,
        /// OpenBao role.
        role: String,
        /// Projected ServiceAccount token file.
        jwt_file: PathBuf,
    },
    /// A token in a file (re-read on every login, so a rotated file is picked up).
    TokenFile(PathBuf),
    /// A token in a Kubernetes Secret (`namespace/name`, key `token`), for bootstrap.
    TokenSecret {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
}

struct Held {
    token: SecretString,
    obtained: Instant,
    ttl: Duration,
    renewable: bool,
}

/// A logged-in operator identity that renews itself on use.
pub struct Identity {
    bao: OpenBao,
    kube: kube::Client,
    source: IdentitySource,
    held: Mutex<Option<Held>>,
}

impl Identity {
    /// An identity that logs in on first use.
    pub fn new(bao: OpenBao, kube: kube::Client, source: IdentitySource) -> Self {
        Self {
            bao,
            kube,
            source,
            held: Mutex::new(None),
        }
    }

    async fn credentials(&self) -> Result<Credentials, String> {
        match &self.source {
            IdentitySource::Kubernetes {
                mount,
                role,
                jwt_file,
            } => {
                let jwt = tokio::fs::read_to_string(jwt_file).await.map_err(|e| {
                    format!(
                        "cannot read the ServiceAccount token {}: {e}",
                        jwt_file.display()
                    )
                })?;
                Ok(Credentials::Kubernetes {
                    mount: mount.clone(),
                    role: role.clone(),
                    jwt: SecretString::new(jwt.trim()),
                })
            }
            IdentitySource::TokenFile(path) => {
                let token = tokio::fs::read_to_string(path).await.map_err(|e| {
                    format!("cannot read the OpenBao token file {}: {e}", path.display())
                })?;
                Ok(Credentials::Token(SecretString::new(token.trim())))
            }
            IdentitySource::TokenSecret { namespace, name } => {
                let api: Api<Secret> = Api::namespaced(self.kube.clone(), namespace);
                let secret = api.get(name).await.map_err(|e| {
                    format!("cannot read the bootstrap token Secret {namespace}/{name}: {e}")
                })?;
                let bytes = secret
                    .data
                    .and_then(|d| d.get("token").cloned())
                    .ok_or_else(|| format!("Secret {namespace}/{name} has no key `token`"))?;
                let token = String::from_utf8(bytes.0)
                    .map_err(|_| format!("Secret {namespace}/{name} key `token` is not UTF-8"))?;
                Ok(Credentials::Token(SecretString::new(token.trim())))
            }
        }
    }

    /// A valid token: the held one, renewed past half its TTL, or a fresh login.
    pub async fn token(&self) -> Result<SecretString, IdentityError> {
        let mut held = self.held.lock().await;
        if let Some(h) = held.as_mut() {
            let age = h.obtained.elapsed();
            if h.ttl.is_zero() || age < h.ttl / 2 {
                return Ok(h.token.clone());
            }
            if h.renewable
                && age < h.ttl
                && let Ok(auth) = self
                    .bao
                    .renew_self(&h.token, h.ttl.max(Duration::from_secs(60)))
                    .await
            {
                h.obtained = Instant::now();
                h.ttl = auth.ttl();
                return Ok(h.token.clone());
            }
        }
        let credentials = self
            .credentials()
            .await
            .map_err(IdentityError::Credentials)?;
        let auth = self
            .bao
            .login(&credentials)
            .await
            .map_err(|e| IdentityError::Login(credentials.describe(), e))?;
        let token = auth.client_token.clone();
        let ttl = auth.ttl();
        *held = Some(Held {
            token: auth.client_token,
            obtained: Instant::now(),
            ttl,
            renewable: auth.renewable,
        });
        Ok(token)
    }

    /// Drops the held token (after a 403 that may mean it was revoked).
    pub async fn forget(&self) {
        *self.held.lock().await = None;
    }
}

/// The operator could not authenticate to OpenBao.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Credentials could not be loaded.
    #[error("operator identity: {0}")]
    Credentials(String),
    /// OpenBao refused the login.
    #[error("operator identity: {0} failed: {1}")]
    Login(String, kubebao_openbao::Error),
}
