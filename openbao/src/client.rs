//! The HTTP core: one `reqwest` client, error classification, JSON in and out.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::{Error, Result, Secret, SecretString};

/// How to reach an OpenBao server.
#[derive(Clone, Debug, Default)]
pub struct ClientConfig {
    /// Base address, e.g. `https://openbao.example:8200`.
    pub address: String,
    /// PEM CA bundle that signs the server certificate (in addition to the system roots).
    pub ca_pem: Option<Vec<u8>>,
    /// OpenBao namespace (`X-Vault-Namespace`), if any.
    pub namespace: Option<String>,
    /// Per-request timeout; 10 s when not set.
    pub timeout: Option<Duration>,
}

/// A client for one OpenBao server. Cheap to clone (the connection pool is shared).
#[derive(Clone, Debug)]
pub struct OpenBao {
    http: reqwest::Client,
    address: String,
    namespace: Option<String>,
}

/// `sys/health`, as the status code and body report it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    /// The server has been initialised.
    pub initialized: bool,
    /// The server is sealed.
    pub sealed: bool,
    /// The server is a standby node.
    pub standby: bool,
    /// Server version.
    pub version: String,
}

impl OpenBao {
    /// Builds a client. Fails on a malformed address or CA bundle.
    pub fn new(config: &ClientConfig) -> Result<Self> {
        crate::install_crypto_provider();
        let address = config.address.trim_end_matches('/').to_string();
        if !(address.starts_with("http://") || address.starts_with("https://")) {
            return Err(Error::Config(format!(
                "address {address:?} must start with http:// or https://"
            )));
        }
        let mut builder = reqwest::Client::builder()
            .timeout(config.timeout.unwrap_or(Duration::from_secs(10)))
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("kubebao/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = &config.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| Error::Config(format!("CA bundle is not valid PEM: {e}")))?;
            if certs.is_empty() {
                return Err(Error::Config("CA bundle holds no certificate".into()));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| Error::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            http,
            address,
            namespace: config.namespace.clone(),
        })
    }

    /// The server address this client talks to.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Sends one API request to `/v1/<path>` and returns the parsed body (None for 204).
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&SecretString>,
        body: Option<&Value>,
    ) -> Result<Option<Value>> {
        let path = path.trim_start_matches('/');
        let url = format!("{}/v1/{}", self.address, path);
        let mut req = self
            .http
            .request(method, &url)
            .header("X-Vault-Request", "true");
        if let Some(token) = token {
            req = req.header("X-Vault-Token", token.expose());
        }
        if let Some(ns) = &self.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await.map_err(|e| self.unreachable(&e))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| self.unreachable(&e))?;
        if status == StatusCode::NO_CONTENT || (status.is_success() && bytes.is_empty()) {
            return Ok(None);
        }
        if status.is_success() {
            return serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::BadResponse {
                    path: path.to_string(),
                    reason: format!("body is not JSON: {e}"),
                });
        }
        Err(self.classify(status, path, &bytes))
    }

    /// `request` for calls that return a secret-shaped body.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&SecretString>,
        body: Option<&Value>,
    ) -> Result<Secret> {
        let value = self.request(method, path, token, body).await?;
        match value {
            None => Ok(Secret::default()),
            Some(v) => serde_json::from_value(v).map_err(|e| Error::BadResponse {
                path: path.to_string(),
                reason: format!("not a secret response: {e}"),
            }),
        }
    }

    /// GET `path`.
    pub async fn read(&self, path: &str, token: &SecretString) -> Result<Secret> {
        self.call(Method::GET, path, Some(token), None).await
    }

    /// POST `body` to `path`.
    pub async fn write(&self, path: &str, token: &SecretString, body: &Value) -> Result<Secret> {
        self.call(Method::POST, path, Some(token), Some(body)).await
    }

    /// DELETE `path`.
    pub async fn delete(&self, path: &str, token: &SecretString) -> Result<()> {
        self.request(Method::DELETE, path, Some(token), None)
            .await
            .map(|_| ())
    }

    /// `sys/health`: never fails on a sealed or standby server, only when unreachable.
    pub async fn health(&self) -> Result<Health> {
        let url = format!(
            "{}/v1/sys/health?standbyok=true&sealedcode=200&uninitcode=200&perfstandbyok=true",
            self.address
        );
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| self.unreachable(&e))?;
        let status = resp.status();
        let body: Value = resp.json().await.map_err(|e| Error::BadResponse {
            path: "sys/health".into(),
            reason: format!("body is not JSON ({status}): {e}"),
        })?;
        let flag = |k: &str| body.get(k).and_then(Value::as_bool).unwrap_or(false);
        Ok(Health {
            initialized: flag("initialized"),
            sealed: flag("sealed"),
            standby: flag("standby"),
            version: body
                .get("version")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        })
    }

    fn unreachable(&self, e: &reqwest::Error) -> Error {
        // reqwest's Display does not include bodies; the source chain says why (refused, TLS).
        let mut reason = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            reason.push_str(": ");
            reason.push_str(&s.to_string());
            source = s.source();
        }
        Error::Unreachable {
            addr: self.address.clone(),
            reason,
        }
    }

    fn classify(&self, status: StatusCode, path: &str, body: &[u8]) -> Error {
        let errors: Vec<String> = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v.get("errors").cloned())
            .and_then(|e| serde_json::from_value(e).ok())
            .unwrap_or_default();
        let message = if errors.is_empty() {
            status
                .canonical_reason()
                .unwrap_or("no error text")
                .to_string()
        } else {
            errors.join("; ")
        };
        let path = path.split('?').next().unwrap_or(path).to_string();
        match status.as_u16() {
            403 => Error::PermissionDenied { path, message },
            404 => Error::NotFound { path },
            503 if message.contains("sealed") || message.contains("not initialized") => {
                Error::Sealed {
                    addr: self.address.clone(),
                }
            }
            code @ 400..=499 => Error::Invalid {
                path,
                status: code,
                message,
            },
            code => Error::Server {
                path,
                status: code,
                message,
            },
        }
    }
}
