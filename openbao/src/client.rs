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
    /// PEM CA bundle that signs the server certificate; when set it replaces the system roots.
    pub ca_pem: Option<Vec<u8>>,
    /// OpenBao namespace (`X-Vault-Namespace`), if any.
    pub namespace: Option<String>,
    /// Per-request timeout; 10 s when not set.
    pub timeout: Option<Duration>,
    /// Accept a plain `http://` address, and only on a loopback host (tests, a local dev
    /// server): a token over plain http to another machine could be read on the way.
    pub allow_plain_http: bool,
}

/// Redirects followed at most, and only within the configured server.
const MAX_REDIRECTS: usize = 3;

/// A client for one OpenBao server. Cheap to clone (the connection pool is shared).
#[derive(Clone, Debug)]
pub struct OpenBao {
    http: reqwest::Client,
    address: String,
    namespace: Option<String>,
    /// The only audience a login JWT may carry (see [`OpenBao::with_jwt_audience`]).
    pub(crate) jwt_audience: Option<String>,
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
    /// Builds a client. Fails on a malformed address or CA bundle, or a plain http address
    /// that is not allowed (see [`ClientConfig::allow_plain_http`]).
    pub fn new(config: &ClientConfig) -> Result<Self> {
        crate::install_crypto_provider();
        let address = config.address.trim_end_matches('/').to_string();
        let base = check_address(&address, config.allow_plain_http)?;
        let mut builder = reqwest::Client::builder()
            .timeout(config.timeout.unwrap_or(Duration::from_secs(10)))
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(60))
            .redirect(same_server_redirects(base))
            .user_agent(concat!("kubebao/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = &config.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| Error::Config(format!("CA bundle is not valid PEM: {e}")))?;
            if certs.is_empty() {
                return Err(Error::Config("CA bundle holds no certificate".into()));
            }
            // Only the configured CA: a certificate from any public CA must not pass for OpenBao.
            builder = builder.tls_certs_only(certs);
        }
        let http = builder
            .build()
            .map_err(|e| Error::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            http,
            address,
            namespace: config.namespace.clone(),
            jwt_audience: None,
        })
    }

    /// This client, refusing every Kubernetes or JWT login whose token is not for exactly
    /// `audience`: checked before the token leaves the process, so a token for anyone else
    /// (such as the Kubernetes API server) is never sent to OpenBao.
    pub fn with_jwt_audience(mut self, audience: impl Into<String>) -> Self {
        self.jwt_audience = Some(audience.into());
        self
    }

    /// This client (same server, TLS and connection pool) speaking to OpenBao namespace
    /// `namespace` (`X-Vault-Namespace`; None: the root namespace).
    pub fn with_namespace(&self, namespace: Option<&str>) -> Self {
        Self {
            namespace: namespace.map(str::to_string),
            ..self.clone()
        }
    }

    /// The OpenBao namespace this client speaks to (None: the root namespace).
    pub fn namespace(&self) -> Option<&str> {
        self.namespace.as_deref()
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
        let resp = req.send().await.map_err(|e| self.send_failed(&e, path))?;
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
            .map_err(|e| self.send_failed(&e, "sys/health"))?;
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

    /// A request that got no usable response: a refused redirect, or the server unreachable.
    fn send_failed(&self, e: &reqwest::Error, path: &str) -> Error {
        if e.is_redirect() {
            // The policy's own message names both servers; retrying would not help.
            let reason = std::error::Error::source(e)
                .map(ToString::to_string)
                .unwrap_or_else(|| e.to_string());
            return Error::BadResponse {
                path: path.to_string(),
                reason,
            };
        }
        self.unreachable(e)
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

/// Parses the address and applies the plain http rule; returns the parsed base URL.
fn check_address(address: &str, allow_plain_http: bool) -> Result<reqwest::Url> {
    let url = reqwest::Url::parse(address)
        .map_err(|e| Error::Config(format!("address {address:?} is not a URL: {e}")))?;
    match url.scheme() {
        "https" => {}
        "http" if allow_plain_http && is_loopback(&url) => {}
        "http" if allow_plain_http => {
            return Err(Error::Config(format!(
                "address {address:?} is plain http to a host that is not loopback: tokens would \
                 cross the network unencrypted; use https:// (with a CA file). Plain http is \
                 allowed only to 127.0.0.0/8, ::1 or localhost"
            )));
        }
        "http" => {
            return Err(Error::Config(format!(
                "address {address:?} is plain http: tokens would cross the network unencrypted; \
                 use https:// (with a CA file), or for an OpenBao on this machine's loopback set \
                 --openbao-allow-plain-http"
            )));
        }
        _ => {
            return Err(Error::Config(format!(
                "address {address:?} must start with https:// (or http:// to a loopback OpenBao)"
            )));
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(Error::Config(format!("address {address:?} names no host")));
    }
    Ok(url)
}

/// 127.0.0.0/8, ::1 or `localhost`.
fn is_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    }
}

/// Follows a redirect only to the configured server (same scheme, host and port), so the
/// `X-Vault-Token` header is never sent anywhere else; any other target is an error.
fn same_server_redirects(base: reqwest::Url) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        let to = attempt.url();
        let same = to.scheme() == base.scheme()
            && to.host_str() == base.host_str()
            && to.port_or_known_default() == base.port_or_known_default();
        if !same {
            let message = format!(
                "OpenBao at {} redirected to {}, another server; KubeBao follows redirects only \
                 within the configured server (its token must not go elsewhere): set the address \
                 to the server that answers",
                origin(&base),
                origin(to)
            );
            attempt.error(message)
        } else if attempt.previous().len() > MAX_REDIRECTS {
            attempt.error(format!(
                "OpenBao at {} redirected more than {MAX_REDIRECTS} times",
                origin(&base)
            ))
        } else {
            attempt.follow()
        }
    })
}

/// `scheme://host:port` of a URL, for messages (never the path or query).
fn origin(url: &reqwest::Url) -> String {
    let port = url
        .port_or_known_default()
        .map(|p| format!(":{p}"))
        .unwrap_or_default();
    format!("{}://{}{port}", url.scheme(), url.host_str().unwrap_or(""))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::http::{HeaderMap, Uri};
    use axum::response::{IntoResponse, Redirect};

    use super::*;

    fn config(address: &str, allow_plain_http: bool) -> ClientConfig {
        ClientConfig {
            address: address.into(),
            allow_plain_http,
            ..Default::default()
        }
    }

    fn refused(address: &str, allow_plain_http: bool) -> String {
        match OpenBao::new(&config(address, allow_plain_http)) {
            Err(Error::Config(m)) => m,
            other => panic!("{address} (opt-in {allow_plain_http}) was not refused: {other:?}"),
        }
    }

    #[test]
    fn plain_http_to_a_host_that_is_not_loopback_is_refused_even_with_the_opt_in() {
        for a in [
            "http://bao.example:8200",
            "http://10.0.0.1:8200",
            "http://[fd00::1]:8200",
            "http://localhost.example.com:8200",
            "http://128.0.0.1:8200",
        ] {
            let m = refused(a, true);
            assert!(m.contains("not loopback") && m.contains("https://"), "{m}");
        }
    }

    #[test]
    fn plain_http_to_loopback_is_refused_without_the_opt_in() {
        for a in [
            "http://127.0.0.1:8200",
            "http://localhost:8200",
            "http://[::1]:8200",
        ] {
            let m = refused(a, false);
            assert!(m.contains("--openbao-allow-plain-http"), "{m}");
        }
    }

    #[test]
    fn plain_http_to_loopback_with_the_opt_in_and_https_anywhere_are_accepted() {
        for a in [
            "http://127.0.0.1:8200",
            "http://127.8.9.10:8200/",
            "http://LOCALHOST:8200",
            "http://[::1]:8200",
        ] {
            OpenBao::new(&config(a, true)).unwrap_or_else(|e| panic!("{a}: {e}"));
        }
        OpenBao::new(&config("https://bao.example:8200", false)).unwrap();
        assert!(refused("ftp://127.0.0.1:8200", true).contains("https://"));
        assert!(refused("bao.example:8200", false).contains("https://"));
    }

    /// Requests that reached a server: the path and whether they carried a token.
    type Seen = Arc<Mutex<Vec<(String, bool)>>>;

    /// A loopback server that redirects `/v1/go` to `redirect_to` and answers anything else
    /// with a small secret; it records every request.
    async fn server(redirect_to: &str) -> (String, Seen) {
        let seen: Seen = Default::default();
        let (record, redirect_to) = (seen.clone(), redirect_to.to_string());
        let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap| {
            let token = headers.contains_key("x-vault-token");
            record.lock().unwrap().push((uri.path().into(), token));
            let redirect_to = redirect_to.clone();
            async move {
                if uri.path() == "/v1/go" {
                    Redirect::temporary(&redirect_to).into_response()
                } else {
                    let json = [("content-type", "application/json")];
                    (json, r#"{"data":{"ok":true}}"#).into_response()
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}"), seen)
    }

    fn seen(s: &Seen) -> Vec<(String, bool)> {
        s.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn a_redirect_to_another_server_is_an_error_and_the_token_never_reaches_it() {
        let (other, other_seen) = server("").await;
        let port = other.rsplit(':').next().unwrap();
        let token = SecretString::new("s.secret-token");
        for other_origin in [other.clone(), format!("http://localhost:{port}")] {
            let (first, first_seen) = server(&format!("{other_origin}/v1/here")).await;
            let bao = OpenBao::new(&config(&first, true)).unwrap();
            let e = bao.read("go", &token).await.unwrap_err();
            let m = e.to_string();
            assert!(matches!(e, Error::BadResponse { .. }), "{e:?}");
            assert!(m.contains(&first) && m.contains(&other_origin), "{m}");
            assert!(
                m.contains("another server") && !m.contains("secret-token"),
                "{m}"
            );
            assert_eq!(seen(&first_seen), [("/v1/go".to_string(), true)]);
        }
        assert_eq!(seen(&other_seen), [], "the other server was called");
    }

    #[tokio::test]
    async fn a_redirect_within_the_server_is_followed_with_the_token() {
        let (addr, seen_by) = server("/v1/here").await;
        let bao = OpenBao::new(&config(&addr, true)).unwrap();
        let secret = bao.read("go", &SecretString::new("t")).await.unwrap();
        assert_eq!(secret.data.unwrap()["ok"], true);
        let expected = [("/v1/go".to_string(), true), ("/v1/here".to_string(), true)];
        assert_eq!(seen(&seen_by), expected);
    }

    #[tokio::test]
    async fn a_redirect_loop_within_the_server_stops() {
        let (addr, seen_by) = server("/v1/go").await;
        let bao = OpenBao::new(&config(&addr, true)).unwrap();
        let e = bao.read("go", &SecretString::new("t")).await.unwrap_err();
        assert!(
            e.to_string().contains("redirected more than 3 times"),
            "{e}"
        );
        assert_eq!(seen(&seen_by).len(), 1 + MAX_REDIRECTS);
    }

    /// A CA and a serving certificate for 127.0.0.1 it signs: (CA PEM, cert DER, key DER).
    fn ca_and_serving_cert(name: &str) -> (String, Vec<u8>, Vec<u8>) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} CA"));
        let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        (ca_pem, cert.der().to_vec(), key.serialize_der())
    }

    /// A TLS server on loopback answering `sys/health` with a fixed body; returns its address.
    fn tls_server(cert: Vec<u8>, key: Vec<u8>) -> String {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        use std::io::{Read, Write};
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key));
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![CertificateDer::from(cert)], key)
            .unwrap();
        let config = Arc::new(config);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for tcp in listener.incoming().flatten() {
                let conn = rustls::ServerConnection::new(config.clone()).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.ends_with(b"\r\n\r\n") {
                    match tls.read(&mut buf) {
                        Ok(n) if n > 0 => request.extend_from_slice(&buf[..n]),
                        _ => break,
                    }
                }
                let body = r#"{"initialized":true,"sealed":false,"version":"tls-test"}"#;
                let _ = write!(
                    tls,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.flush();
            }
        });
        format!("https://{addr}")
    }

    /// Set only in the child process of `a_configured_ca_replaces_the_system_roots`.
    const SYSTEM_ROOTS_FILE: &str = "KUBEBAO_TEST_SYSTEM_ROOTS_FILE";

    #[tokio::test]
    async fn a_configured_ca_replaces_the_system_roots() {
        // The system roots come from SSL_CERT_FILE when it is set; a variable can only be set
        // for a new process (no `unsafe` here), so the check runs in a child process: this
        // same test, run again by its exact name with the variables set.
        if let Ok(roots) = std::env::var(SYSTEM_ROOTS_FILE) {
            return system_roots_child(&roots).await;
        }
        let roots =
            std::env::temp_dir().join(format!("kubebao-system-roots-{}.pem", std::process::id()));
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "client::tests::a_configured_ca_replaces_the_system_roots",
            ])
            .args(["--nocapture", "--test-threads=1"])
            .env("SSL_CERT_FILE", &roots)
            .env("SSL_CERT_DIR", "/nonexistent")
            .env(SYSTEM_ROOTS_FILE, &roots)
            .output()
            .unwrap();
        let _ = std::fs::remove_file(&roots);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "child failed:\n{stdout}\n{stderr}"
        );
    }

    /// The child half: `roots` is the file SSL_CERT_FILE names.
    async fn system_roots_child(roots: &str) {
        crate::install_crypto_provider();
        // A "public" CA the system trusts signs the server's certificate.
        let (public_ca, cert, key) = ca_and_serving_cert("public");
        std::fs::write(roots, public_ca).unwrap();
        let address = tls_server(cert, key);
        let no_ca = OpenBao::new(&config(&address, false)).unwrap();
        let health = no_ca
            .health()
            .await
            .expect("trusted through the system roots");
        assert_eq!(health.version, "tls-test");
        // With OpenBao's own CA configured, the system roots no longer count.
        let (own_ca, _, _) = ca_and_serving_cert("own");
        let with_ca = OpenBao::new(&ClientConfig {
            ca_pem: Some(own_ca.into_bytes()),
            ..config(&address, false)
        })
        .unwrap();
        let e = with_ca.health().await.unwrap_err();
        assert!(matches!(e, Error::Unreachable { .. }), "{e:?}");
        assert!(e.to_string().contains("certificate"), "{e}");
    }
}
