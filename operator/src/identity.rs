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
        /// The token's only allowed audience, checked before every login.
        audience: String,
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
                ..
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
        let bao = match &self.source {
            // Every login of the session (renewals too) checks the token's audience first.
            IdentitySource::Kubernetes { audience, .. } => {
                self.bao.clone().with_jwt_audience(audience)
            }
            _ => self.bao.clone(),
        };
        let session = Session::new(bao, self.credential_source().await?);
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

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{Arc, Mutex};

    use base64::Engine as _;

    use super::*;

    /// Paths a server on loopback was asked for.
    pub(crate) type Requests = Arc<Mutex<Vec<String>>>;

    /// A server on loopback that answers every request 404 (a Kubernetes `Status` body, which
    /// OpenBao clients read as "nothing found") and records its path.
    pub(crate) async fn counting_server() -> (String, Requests) {
        let requests: Requests = Default::default();
        let seen = requests.clone();
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
            seen.lock().unwrap().push(uri.path().to_string());
            let body = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404,"errors":[]}"#;
            async move {
                let json = [("content-type", "application/json")];
                (axum::http::StatusCode::NOT_FOUND, json, body)
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}"), requests)
    }

    /// A Kubernetes client for `url`.
    pub(crate) fn kube_client(url: &str) -> kube::Client {
        kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap()
    }

    /// An unsigned ServiceAccount-token-shaped JWT for `audiences`, in a file.
    pub(crate) fn jwt_file(dir: &std::path::Path, audiences: &[&str]) -> PathBuf {
        let b64 = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let claims = serde_json::json!({"aud": audiences, "sub": "system:serviceaccount:kubebao-system:kubebao-operator"});
        let jwt = format!(
            "{}.{}.c2ln",
            b64(serde_json::json!({"alg": "RS256"})),
            b64(claims)
        );
        let path = dir.join(format!("token-{}", audiences.join("+").replace('/', "_")));
        std::fs::write(&path, jwt).unwrap();
        path
    }

    #[tokio::test]
    async fn the_operator_never_sends_a_token_for_the_api_server_to_openbao() {
        let (address, requests) = counting_server().await;
        let bao = OpenBao::new(&kubebao_openbao::ClientConfig {
            address,
            allow_plain_http: true,
            ..Default::default()
        })
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let api_server = "https://kubernetes.default.svc.cluster.local";
        for audiences in [&[api_server][..], &[api_server, "openbao"], &["vault"]] {
            let identity = Identity::new(
                bao.clone(),
                kube_client("http://127.0.0.1:9"),
                IdentitySource::Kubernetes {
                    mount: "kubernetes".into(),
                    role: "kubebao".into(),
                    jwt_file: jwt_file(dir.path(), audiences),
                    audience: "openbao".into(),
                },
            );
            let e = identity.token().await.unwrap_err().to_string();
            assert!(
                e.contains("not only \"openbao\"") && e.contains("projected ServiceAccount token"),
                "{e}"
            );
        }
        assert_eq!(
            *requests.lock().unwrap(),
            [] as [String; 0],
            "nothing reached OpenBao"
        );
        // The projected token for exactly OpenBao's audience is sent (this fake answers 404).
        let identity = Identity::new(
            bao,
            kube_client("http://127.0.0.1:9"),
            IdentitySource::Kubernetes {
                mount: "kubernetes".into(),
                role: "kubebao".into(),
                jwt_file: jwt_file(dir.path(), &["openbao"]),
                audience: "openbao".into(),
            },
        );
        assert!(identity.token().await.is_err());
        assert_eq!(*requests.lock().unwrap(), ["/v1/auth/kubernetes/login"]);
    }
}
