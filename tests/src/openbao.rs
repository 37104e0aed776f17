//! A real OpenBao server with file storage, initialised and unsealed by the harness, that a
//! test can stop, restart, seal and unseal.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kubebao_openbao::{ClientConfig, OpenBao, SecretString};
use reqwest::Method;
use serde_json::json;
use tokio::sync::Mutex;

use crate::{Binaries, Component, Pki, wait_for};

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
"#,
                data = dir.join("data").display(),
                cluster_port = crate::testbed::free_port(),
                cert = pki.serving_cert.display(),
                key = pki.serving_key.display(),
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
