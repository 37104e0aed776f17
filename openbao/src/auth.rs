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

/// The `aud` claim of a JWT (payload decoded, signature not checked: only OpenBao can judge
/// it; this only keeps a token meant for someone else from being sent).
fn jwt_audiences(jwt: &str) -> std::result::Result<Vec<String>, String> {
    use base64::Engine as _;
    let payload = jwt.trim().split('.').nth(1).ok_or("no payload part")?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| "the payload is not base64url")?;
    let claims: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| "the payload is not JSON")?;
    match claims.get("aud") {
        Some(serde_json::Value::String(a)) => Ok(vec![a.clone()]),
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .map(|a| {
                a.as_str()
                    .map(str::to_string)
                    .ok_or("an audience is not a string")
            })
            .collect::<std::result::Result<_, _>>()
            .map_err(str::to_string),
        _ => Ok(Vec::new()),
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
            | Credentials::Jwt { mount, role, jwt } => {
                self.check_jwt_audience(credentials, jwt)?;
                (
                    format!("auth/{mount}/login"),
                    json!({"role": role, "jwt": jwt.expose()}),
                )
            }
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

    /// With [`OpenBao::with_jwt_audience`]: refuses `jwt` unless its only audience is that one.
    fn check_jwt_audience(&self, credentials: &Credentials, jwt: &SecretString) -> Result<()> {
        let Some(expected) = &self.jwt_audience else {
            return Ok(());
        };
        let what = credentials.describe();
        let audiences = jwt_audiences(jwt.expose()).map_err(|why| {
            Error::Config(format!(
                "the token for {what} is not a JWT ({why}); it was not sent. Mount a projected \
                 ServiceAccount token with audience {expected:?} and use that file"
            ))
        })?;
        if audiences != [expected.as_str()] {
            return Err(Error::Config(format!(
                "the token for {what} is for audiences {audiences:?}, not only {expected:?}; it \
                 was not sent (a token for another audience, such as the Kubernetes API server, \
                 must never reach OpenBao). Mount a projected ServiceAccount token with audience \
                 {expected:?} (serviceAccountToken.audience) and use that file"
            )));
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use base64::Engine as _;

    use super::*;
    use crate::fake::{Fake, start};

    /// An unsigned JWT with these claims (the client only reads the payload).
    fn jwt(claims: serde_json::Value) -> SecretString {
        let b64 = |v: &serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let header = json!({"alg": "RS256", "typ": "JWT"});
        SecretString::new(format!("{}.{}.c2ln", b64(&header), b64(&claims)))
    }

    fn kubernetes(jwt: SecretString) -> Credentials {
        Credentials::Kubernetes {
            mount: "kubernetes".into(),
            role: "kubebao".into(),
            jwt,
        }
    }

    #[tokio::test]
    async fn a_token_for_the_api_server_is_refused_before_any_request_reaches_openbao() {
        let (fake, bao) = start(Fake {
            ttl: 60,
            ..Default::default()
        })
        .await;
        let bao = bao.with_jwt_audience("openbao");
        let api_server = "https://kubernetes.default.svc.cluster.local";
        for aud in [
            json!([api_server, "k3s"]),
            json!(api_server),
            json!(["openbao", api_server]),
            json!([]),
        ] {
            let e = bao
                .login(&kubernetes(jwt(json!({"aud": aud, "sub": "x"}))))
                .await
                .unwrap_err();
            let m = e.to_string();
            assert!(matches!(e, Error::Config(_)), "{aud}: {e:?}");
            assert!(m.contains("projected") && m.contains("\"openbao\""), "{m}");
        }
        let e = bao
            .login(&kubernetes(SecretString::new("not-a-jwt")))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not a JWT"), "{e}");
        assert_eq!(fake.lock().unwrap().logins, 0, "nothing reached OpenBao");
    }

    #[tokio::test]
    async fn a_token_for_exactly_the_openbao_audience_logs_in() {
        let (fake, bao) = start(Fake {
            ttl: 60,
            ..Default::default()
        })
        .await;
        let bao = bao.with_jwt_audience("openbao");
        for aud in [json!("openbao"), json!(["openbao"])] {
            bao.login(&kubernetes(jwt(json!({"aud": aud}))))
                .await
                .unwrap();
        }
        // A client without `with_jwt_audience` checks nothing.
        let (other, unchecked) = start(Fake {
            ttl: 60,
            ..Default::default()
        })
        .await;
        unchecked
            .login(&kubernetes(SecretString::new("opaque")))
            .await
            .unwrap();
        assert_eq!(fake.lock().unwrap().logins, 2);
        assert_eq!(other.lock().unwrap().logins, 1);
    }
}
