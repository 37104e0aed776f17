//! A real OpenBao server with raft storage, initialised and unsealed by the harness, that a
//! test can stop, restart, seal and unseal. Every request it serves is written to its audit
//! log, so a test can count what one component asked of it (see `audit`).

use std::collections::HashMap;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kubebao_openbao::{ClientConfig, OpenBao, SecretString};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::{Binaries, Component, Pki, wait_for};

/// Path of the audit device every test bed OpenBao declares in its config file (OpenBao 2.7
/// refuses `sys/audit` over the API; config-declared devices are created at unseal).
const AUDIT_DEVICE: &str = "testbed";

/// One request as OpenBao's audit log recorded it. Secret values (request data, tokens) are
/// HMACs there, never plaintext: compare them with `OpenBaoServer::audit_hash`.
#[derive(Clone, Debug)]
pub struct AuditedRequest {
    /// When OpenBao received it.
    pub time: Timestamp,
    /// API path without `/v1/`, e.g. `secret/data/team/app`.
    pub path: String,
    /// `read`, `update`, `create`, `delete` or `list`.
    pub operation: String,
    /// OpenBao's error (e.g. `permission denied`), `None` when it succeeded.
    pub error: Option<String>,
    /// HMAC of the token the request was made with (`None` for logins).
    pub client_token: Option<String>,
    /// Policies of that token.
    pub token_policies: Vec<String>,
    /// Metadata of that token (Kubernetes auth: `role`, `service_account_namespace`, …).
    pub token_metadata: HashMap<String, String>,
    /// The request body, string values HMAC'd (e.g. a login's `role`).
    pub data: Value,
    /// HMAC of the token a login issued.
    pub issued_token: Option<String>,
}

impl AuditedRequest {
    /// A string field of the request body (HMAC'd by OpenBao), e.g. `role` of a login.
    pub fn data_field(&self, key: &str) -> Option<&str> {
        self.data.get(key).and_then(Value::as_str)
    }

    fn from_entry(entry: &Value) -> Option<Self> {
        let request = entry.get("request")?;
        let auth = entry.get("auth");
        let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
        Some(Self {
            time: entry.get("time")?.as_str()?.parse().ok()?,
            path: text(request.get("path"))?,
            operation: text(request.get("operation")).unwrap_or_default(),
            error: text(entry.get("error")),
            client_token: text(request.get("client_token")).filter(|t| !t.is_empty()),
            token_policies: auth
                .and_then(|a| a.get("token_policies"))
                .and_then(Value::as_array)
                .map(|p| p.iter().filter_map(|v| text(Some(v))).collect())
                .unwrap_or_default(),
            token_metadata: auth
                .and_then(|a| a.get("metadata"))
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                        .collect()
                })
                .unwrap_or_default(),
            data: request.get("data").cloned().unwrap_or(Value::Null),
            issued_token: None,
        })
    }
}

/// Requests OpenBao audited, oldest first.
#[derive(Clone, Debug, Default)]
pub struct Audit {
    /// The requests.
    pub requests: Vec<AuditedRequest>,
}

impl Audit {
    /// How many requests there are (a mark for `since`).
    pub fn len(&self) -> usize {
        self.requests.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }

    /// The requests after the first `mark` (a `len()` taken earlier): what happened since.
    pub fn since(&self, mark: usize) -> Audit {
        Audit {
            requests: self.requests.get(mark..).unwrap_or_default().to_vec(),
        }
    }

    /// The requests for which `keep` is true.
    pub fn filter(&self, keep: impl Fn(&AuditedRequest) -> bool) -> Audit {
        Audit {
            requests: self.requests.iter().filter(|r| keep(r)).cloned().collect(),
        }
    }

    /// How many `operation` requests (`read`, `update`, …) there were for exactly `path`.
    pub fn count(&self, path: &str, operation: &str) -> usize {
        self.requests
            .iter()
            .filter(|r| r.path == path && r.operation == operation)
            .count()
    }

    /// Logins at `auth/<mount>/login` whose `field` (e.g. `role`, `secret_id`) has the HMAC
    /// `hashed` (see `OpenBaoServer::audit_hash`).
    pub fn logins(&self, mount: &str, field: &str, hashed: &str) -> Audit {
        let path = format!("auth/{mount}/login");
        self.filter(|r| r.path == path && r.data_field(field) == Some(hashed))
    }
}

/// The audit log read so far: requests, where reading stopped, and requests still waiting for
/// their response entry (by request id).
#[derive(Default)]
struct AuditReader {
    offset: u64,
    audit: Audit,
    pending: HashMap<String, usize>,
}

impl AuditReader {
    /// Reads the complete lines appended since the last call.
    fn update(&mut self, path: &Path) -> Audit {
        let mut file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return self.audit.clone(),
            Err(e) => panic!("read the OpenBao audit log {}: {e}", path.display()),
        };
        let mut text = String::new();
        file.seek(SeekFrom::Start(self.offset))
            .and_then(|_| file.read_to_string(&mut text))
            .unwrap_or_else(|e| panic!("read the OpenBao audit log {}: {e}", path.display()));
        // A line OpenBao is still writing is left for the next call.
        let complete = text.rfind('\n').map_or(0, |i| i + 1);
        for line in text[..complete].lines().filter(|l| !l.is_empty()) {
            let entry: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("audit log line is not JSON ({e}): {line}"));
            self.add(&entry);
        }
        self.offset += complete as u64;
        self.audit.clone()
    }

    fn add(&mut self, entry: &Value) {
        let id = entry
            .pointer("/request/id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        match entry.get("type").and_then(Value::as_str) {
            Some("request") => {
                if let Some(r) = AuditedRequest::from_entry(entry) {
                    self.pending.insert(id, self.audit.requests.len());
                    self.audit.requests.push(r);
                }
            }
            Some("response") => {
                if let Some(r) = self
                    .pending
                    .remove(&id)
                    .and_then(|i| self.audit.requests.get_mut(i))
                {
                    if r.error.is_none() {
                        r.error = entry.get("error").and_then(Value::as_str).map(Into::into);
                    }
                    // A login's response carries the new token; any other's, the caller's.
                    if r.client_token.is_none() {
                        r.issued_token = entry
                            .pointer("/auth/client_token")
                            .and_then(Value::as_str)
                            .map(Into::into);
                    }
                }
            }
            _ => {}
        }
    }
}

/// A running OpenBao server.
pub struct OpenBaoServer {
    bao: PathBuf,
    dir: PathBuf,
    config: PathBuf,
    addr: String,
    tls_addr: String,
    ca_pem: Vec<u8>,
    root_token: SecretString,
    unseal_key: String,
    process: Mutex<Option<Component>>,
    audit_log: PathBuf,
    audit: std::sync::Mutex<AuditReader>,
}

impl std::fmt::Debug for OpenBaoServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenBaoServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl OpenBaoServer {
    /// Starts, initialises (one unseal key) and unseals a server in `dir`.
    pub async fn start(bins: &Binaries, pki: &Pki, dir: &Path) -> Self {
        let dir = dir.join("openbao");
        std::fs::create_dir_all(dir.join("data")).expect("openbao dir");
        let port = crate::testbed::free_port();
        let tls_port = crate::testbed::free_port();
        let addr = format!("http://127.0.0.1:{port}");
        let tls_addr = format!("https://127.0.0.1:{tls_port}");
        let config = dir.join("config.hcl");
        let audit_log = dir.join("audit.log");
        std::fs::write(
            &config,
            format!(
                r#"storage "raft" {{
  path = "{data}"
  node_id = "testbed"
}}
cluster_addr = "http://127.0.0.1:{cluster_port}"
listener "tcp" {{
  address = "127.0.0.1:{port}"
  tls_disable = true
}}
listener "tcp" {{
  address = "127.0.0.1:{tls_port}"
  tls_cert_file = "{cert}"
  tls_key_file = "{key}"
}}
api_addr = "{addr}"
ui = false
log_level = "warn"
audit "file" "{AUDIT_DEVICE}" {{
  description = "every request, so tests can count what a component asked"
  options {{
    file_path = "{audit}"
  }}
}}
"#,
                data = dir.join("data").display(),
                cluster_port = crate::testbed::free_port(),
                cert = pki.serving_cert.display(),
                key = pki.serving_key.display(),
                audit = audit_log.display(),
            ),
        )
        .expect("write openbao config");
        let mut server = Self {
            bao: bins.bao.clone(),
            dir,
            config,
            addr,
            tls_addr,
            ca_pem: std::fs::read(&pki.ca_cert).expect("read CA"),
            root_token: SecretString::default(),
            unseal_key: String::new(),
            process: Mutex::new(None),
            audit_log,
            audit: Default::default(),
        };
        server.launch().await;
        let init = server
            .unauthenticated()
            .request(
                Method::PUT,
                "sys/init",
                None,
                Some(&json!({"secret_shares": 1, "secret_threshold": 1})),
            )
            .await
            .expect("initialise OpenBao")
            .expect("init response");
        server.unseal_key = init["keys_base64"][0]
            .as_str()
            .expect("unseal key")
            .to_string();
        server.root_token = SecretString::new(init["root_token"].as_str().expect("root token"));
        server.unseal().await;
        server
    }

    async fn launch(&self) {
        let args = vec![
            "server".to_string(),
            format!("-config={}", self.config.display()),
        ];
        let mut component = Component::start("openbao", &self.dir, &self.bao, &args);
        let client = self.unauthenticated();
        wait_for("OpenBao to listen", Duration::from_secs(60), || {
            component.assert_running();
            let client = client.clone();
            async move { client.health().await.map(|_| ()).map_err(|e| e.to_string()) }
        })
        .await;
        *self.process.lock().await = Some(component);
    }

    fn unauthenticated(&self) -> OpenBao {
        OpenBao::new(&ClientConfig {
            address: self.addr.clone(),
            // Generous: init and unseal on raft are slow on a busy 2-core machine, and a
            // timed-out init cannot be retried (its keys would be lost).
            timeout: Some(Duration::from_secs(60)),
            // The test bed's server listens on loopback only.
            allow_plain_http: true,
            ..Default::default()
        })
        .expect("client")
    }

    /// Plain-HTTP address, e.g. `http://127.0.0.1:8200`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// TLS address (certificate signed by the test bed CA, see `ca_pem`).
    pub fn tls_addr(&self) -> &str {
        &self.tls_addr
    }

    /// The CA that signs the TLS listener's certificate.
    pub fn ca_pem(&self) -> &[u8] {
        &self.ca_pem
    }

    /// The root token.
    pub fn root_token(&self) -> &SecretString {
        &self.root_token
    }

    /// A client for the plain-HTTP address.
    pub fn client(&self) -> OpenBao {
        self.unauthenticated()
    }

    /// Calls the API as root; panics with OpenBao's error on failure (test set-up only).
    pub async fn root(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Option<serde_json::Value> {
        self.client()
            .request(method, path, Some(&self.root_token), body.as_ref())
            .await
            .unwrap_or_else(|e| panic!("OpenBao {path}: {e}"))
    }

    /// Enables a secrets engine at `path` (e.g. `("secret", "kv", Some(2))`, `("transit", "transit", None)`).
    pub async fn enable_engine(&self, path: &str, engine: &str, kv_version: Option<u8>) {
        let mut body = json!({"type": engine});
        if let Some(v) = kv_version {
            body["options"] = json!({"version": v.to_string()});
        }
        self.root(Method::POST, &format!("sys/mounts/{path}"), Some(body))
            .await;
        if kv_version == Some(2) {
            // A new KV v2 mount upgrades itself first and refuses requests for a moment.
            let client = self.client();
            wait_for(
                "the KV v2 mount to finish its upgrade",
                Duration::from_secs(30),
                || {
                    let client = client.clone();
                    async move {
                        client
                            .read(&format!("{path}/config"), &self.root_token)
                            .await
                            .map(|_| ())
                            .map_err(|e| e.to_string())
                    }
                },
            )
            .await;
        }
    }

    /// Enables an auth method at `path`.
    pub async fn enable_auth(&self, path: &str, method: &str) {
        self.root(
            Method::POST,
            &format!("sys/auth/{path}"),
            Some(json!({"type": method})),
        )
        .await;
    }

    /// Every request audited so far, oldest first (a response's error and issued token
    /// included once OpenBao has written it, which is before the caller sees the response).
    pub fn audit(&self) -> Audit {
        self.audit
            .lock()
            .expect("audit reader lock")
            .update(&self.audit_log)
    }

    /// The audit log file (one JSON object per line).
    pub fn audit_log(&self) -> &Path {
        &self.audit_log
    }

    /// `value` as the audit log shows it (HMAC-SHA256 with the audit device's salt), to find
    /// a known role, secret_id or token in `audit()` without logging it in plaintext.
    pub async fn audit_hash(&self, value: &str) -> String {
        self.root(
            Method::POST,
            &format!("sys/audit-hash/{AUDIT_DEVICE}"),
            Some(json!({"input": value})),
        )
        .await
        .and_then(|r| {
            r.pointer("/data/hash")
                .or(r.get("hash"))
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .expect("sys/audit-hash answers with a hash")
    }

    /// Seals the server (it keeps running).
    pub async fn seal(&self) {
        self.root(Method::PUT, "sys/seal", None).await;
    }

    /// Unseals with the harness's key.
    pub async fn unseal(&self) {
        let client = self.unauthenticated();
        let resp = client
            .request(
                Method::PUT,
                "sys/unseal",
                None,
                Some(&json!({"key": self.unseal_key})),
            )
            .await
            .expect("unseal")
            .expect("unseal response");
        assert_eq!(
            resp["sealed"],
            json!(false),
            "OpenBao still sealed after unseal"
        );
        wait_for("OpenBao to become active", Duration::from_secs(30), || {
            let client = client.clone();
            async move {
                let h = client.health().await.map_err(|e| e.to_string())?;
                if !h.sealed && !h.standby {
                    Ok(())
                } else {
                    Err(format!("{h:?}"))
                }
            }
        })
        .await;
    }

    /// Stops the server process (requests then fail as unreachable).
    pub async fn stop(&self) {
        if let Some(mut p) = self.process.lock().await.take() {
            p.stop();
        }
    }

    /// Starts the server again on the same address and storage, and unseals it.
    pub async fn restart(&self) {
        self.stop().await;
        self.launch().await;
        self.unseal().await;
    }
}
