//! The operator's own OpenBao identity: used only for policies, auth roles and the
//! installation's OpenBao preparation, never to read tenant data (BaoSecrets log in as their
//! own ServiceAccount, see `tenant.rs`).
//!
//! Login, renewal, re-login after expiry/revocation and re-reading credential files are
//! `kubebao_openbao::Session`'s job; this adds the bootstrap source the operator alone has (a
//! token in a Kubernetes Secret) and one place to build the session from the command line.

use std::path::PathBuf;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kubebao_openbao::{CredentialSource, Credentials, OpenBao, SecretString, Session};
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
    /// A token in a Kubernetes Secret (`namespace/name`, key `token`), for bootstrap. Read when
    /// the session starts and again after the token is found dead.
    TokenSecret {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
}

/// A logged-in operator identity that renews itself in the background.
pub struct Identity {
    bao: OpenBao,
    kube: kube::Client,
    source: IdentitySource,
    session: Mutex<Option<(Session, tokio::task::JoinHandle<()>)>>,
}

impl Drop for Identity {
    fn drop(&mut self) {
        if let Some((_, task)) = self.session.get_mut().take() {
            task.abort();
        }
    }
}

impl Identity {
    /// An identity that logs in on first use.
    pub fn new(bao: OpenBao, kube: kube::Client, source: IdentitySource) -> Self {
        Self {
            bao,
            kube,
            source,
            session: Mutex::new(None),
        }
    }

    async fn credential_source(&self) -> Result<CredentialSource, IdentityError> {
        Ok(match &self.source {
            IdentitySource::Kubernetes {
                mount,
                role,
                jwt_file,
            } => CredentialSource::KubernetesJwtFile {
                mount: mount.clone(),
                role: role.clone(),
                jwt_file: jwt_file.clone(),
            },
            IdentitySource::TokenFile(path) => CredentialSource::TokenFile(path.clone()),
            IdentitySource::TokenSecret { namespace, name } => {
                let api: Api<Secret> = Api::namespaced(self.kube.clone(), namespace);
                let secret = api.get(name).await.map_err(|e| {
                    IdentityError::Credentials(format!(
                        "cannot read the bootstrap token Secret {namespace}/{name}: {e}"
                    ))
                })?;
                let bytes = secret
                    .data
                    .and_then(|d| d.get("token").cloned())
                    .ok_or_else(|| {
                        IdentityError::Credentials(format!(
                            "Secret {namespace}/{name} has no key `token`"
                        ))
                    })?;
                let token = String::from_utf8(bytes.0).map_err(|_| {
                    IdentityError::Credentials(format!(
                        "Secret {namespace}/{name} key `token` is not UTF-8"
                    ))
                })?;
                CredentialSource::Static(Credentials::Token(SecretString::new(token.trim())))
            }
        })
    }

    async fn session(&self) -> Result<Session, IdentityError> {
        let mut slot = self.session.lock().await;
        if let Some((s, _)) = slot.as_ref() {
            return Ok(s.clone());
        }
        let session = Session::new(self.bao.clone(), self.credential_source().await?);
        let task = session.spawn_renewal();
        *slot = Some((session.clone(), task));
        Ok(session)
    }

    /// A valid token (the session logs in, renews and re-logs in as needed).
    pub async fn token(&self) -> Result<SecretString, IdentityError> {
        let session = self.session().await?;
        session
            .token()
            .await
            .map_err(|e| IdentityError::Login(session.source().describe(), e))
    }

    /// After a 403 with `token`: if the token is dead (revoked, expired), the next `token()`
    /// logs in afresh (a bootstrap Secret is read again); a live token means a policy gap and
    /// changes nothing.
    pub async fn denied(&self, token: &SecretString, error: kubebao_openbao::Error) {
        let Ok(session) = self.session().await else {
            return;
        };
        if session.refresh_after_denied(token, error).await.is_err()
            && matches!(self.source, IdentitySource::TokenSecret { .. })
            && let Some((_, task)) = self.session.lock().await.take()
        {
            task.abort();
        }
    }
}

/// The operator could not authenticate to OpenBao.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Credentials could not be loaded.
    #[error("operator identity: {0}")]
    Credentials(String),
    /// OpenBao refused the login or is unreachable.
    #[error("operator identity: {0} failed: {1}")]
    Login(String, kubebao_openbao::Error),
}
