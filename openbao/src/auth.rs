//! Logging in and keeping a token alive.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::{Error, OpenBao, Result, SecretString};

/// The `auth` block of a login or token lookup.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct Auth {
    /// The client token (redacted in `Debug`).
    pub client_token: SecretString,
    /// The token's accessor (not secret: it cannot be used to read anything).
    #[serde(default)]
    pub accessor: String,
    /// Policies attached to the token.
    #[serde(default)]
    pub policies: Vec<String>,
    /// TTL in seconds (0 = no expiry, e.g. root).
    #[serde(default)]
    pub lease_duration: u64,
    /// Whether `renew-self` can extend it.
    #[serde(default)]
    pub renewable: bool,
}

impl Auth {
    /// The token's TTL.
    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.lease_duration)
    }
}

/// How a process proves who it is to OpenBao.
#[derive(Clone, Debug)]
pub enum Credentials {
    /// A ready token (no login; renewal only).
    Token(SecretString),
    /// AppRole: role_id and secret_id.
    AppRole {
        /// Auth mount, usually `approle`.
        mount: String,
        /// The role_id (an identifier; kept redacted anyway).
        role_id: SecretString,
        /// The secret_id.
        secret_id: SecretString,
    },
    /// Kubernetes auth: a ServiceAccount JWT for a role.
    Kubernetes {
        /// Auth mount, usually `kubernetes`.
        mount: String,
        /// OpenBao role.
        role: String,
        /// The ServiceAccount token.
        jwt: SecretString,
    },
    /// JWT/OIDC auth: a JWT for a role.
    Jwt {
        /// Auth mount, usually `jwt`.
        mount: String,
        /// OpenBao role.
        role: String,
        /// The JWT.
        jwt: SecretString,
    },
}

impl Credentials {
    /// A short description for logs and errors (never the secret parts).
    pub fn describe(&self) -> String {
        match self {
            Credentials::Token(_) => "token".into(),
            Credentials::AppRole { mount, .. } => format!("approle login at auth/{mount}"),
            Credentials::Kubernetes { mount, role, .. } => {
                format!("kubernetes login at auth/{mount} as role {role:?}")
            }
            Credentials::Jwt { mount, role, .. } => {
                format!("jwt login at auth/{mount} as role {role:?}")
            }
        }
    }
}

impl OpenBao {
    /// Logs in with `credentials`; for a plain token, looks it up to learn its TTL.
    pub async fn login(&self, credentials: &Credentials) -> Result<Auth> {
        let (path, body) = match credentials {
            Credentials::Token(token) => return self.lookup_self(token).await,
            Credentials::AppRole {
                mount,
                role_id,
                secret_id,
            } => (
                format!("auth/{mount}/login"),
                json!({"role_id": role_id.expose(), "secret_id": secret_id.expose()}),
            ),
            Credentials::Kubernetes { mount, role, jwt }
            | Credentials::Jwt { mount, role, jwt } => (
                format!("auth/{mount}/login"),
                json!({"role": role, "jwt": jwt.expose()}),
            ),
        };
        let secret = self
            .call(Method::POST, &path, None, Some(&body))
            .await
            .map_err(|e| match e {
                // A refused login is a 400 or 403 depending on the method; make it read the same.
                Error::Invalid { path, message, .. } => Error::PermissionDenied { path, message },
                other => other,
            })?;
        secret.auth.ok_or_else(|| Error::BadResponse {
            path,
            reason: "login returned no auth".into(),
        })
    }

    /// `auth/token/lookup-self`, shaped like a login.
    pub async fn lookup_self(&self, token: &SecretString) -> Result<Auth> {
        let path = "auth/token/lookup-self";
        let secret = self.read(path, token).await?;
        let data = secret.data.ok_or_else(|| Error::BadResponse {
            path: path.into(),
            reason: "no data".into(),
        })?;
        let num = |k: &str| data.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        Ok(Auth {
            client_token: token.clone(),
            accessor: data
                .get("accessor")
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .into(),
            policies: data
                .get("policies")
                .and_then(|v| serde_json::from_value(v.clone()).ok())
                .unwrap_or_default(),
            lease_duration: num("ttl"),
            renewable: data
                .get("renewable")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
        })
    }

    /// `auth/token/renew-self`: extends the token's TTL (up to its max TTL).
    pub async fn renew_self(&self, token: &SecretString, increment: Duration) -> Result<Auth> {
        let path = "auth/token/renew-self";
        let body = json!({"increment": format!("{}s", increment.as_secs())});
        let secret = self
            .call(Method::POST, path, Some(token), Some(&body))
            .await?;
        secret.auth.ok_or_else(|| Error::BadResponse {
            path: path.into(),
            reason: "no auth".into(),
        })
    }

    /// `auth/token/revoke-self`: revokes the token (and the leases it created) at once.
    pub async fn revoke_self(&self, token: &SecretString) -> Result<()> {
        self.request(Method::POST, "auth/token/revoke-self", Some(token), None)
            .await
            .map(|_| ())
    }

    /// `sys/leases/renew`: extends a dynamic secret's lease.
    pub async fn renew_lease(
        &self,
        token: &SecretString,
        lease_id: &str,
        increment: Duration,
    ) -> Result<crate::Secret> {
        let body = json!({"lease_id": lease_id, "increment": increment.as_secs()});
        self.call(Method::PUT, "sys/leases/renew", Some(token), Some(&body))
            .await
    }
}
