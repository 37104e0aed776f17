//! etcd: the API server's storage, and a raw reader for what is really stored.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use tokio::sync::Mutex;

use crate::{Binaries, Component, wait_for};

/// A running etcd, with what it takes to start it again on the same data dir and ports.
pub(crate) struct Etcd {
    /// Held so etcd stops when the test bed does; replaced by a restart.
    process: Mutex<Component>,
    pub client_url: String,
    program: PathBuf,
    dir: PathBuf,
    args: Vec<String>,
}

impl Etcd {
    pub async fn start(bins: &Binaries, dir: &Path) -> Self {
        let client_port = crate::testbed::free_port();
        let peer_port = crate::testbed::free_port();
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let args: Vec<String> = vec![
            "--name=testbed".into(),
            format!("--data-dir={}", dir.join("etcd-data").display()),
            format!("--listen-client-urls={client_url}"),
            format!("--advertise-client-urls={client_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=testbed={peer_url}"),
            "--unsafe-no-fsync".into(),
            "--log-level=warn".into(),
        ];
        let program = bins.etcd.clone();
        let component = launch(&program, dir, &args, &client_url).await;
        Self {
            process: Mutex::new(component),
            client_url,
            program,
            dir: dir.to_path_buf(),
            args,
        }
    }

    /// Kills etcd (SIGKILL, as a crash would) and starts it again on the same data dir and
    /// ports; returns when /health is ok.
    pub async fn restart(&self) {
        let mut process = self.process.lock().await;
        process.kill();
        *process = launch(&self.program, &self.dir, &self.args, &self.client_url).await;
    }
}

/// Starts etcd and waits for its /health.
async fn launch(program: &Path, dir: &Path, args: &[String], client_url: &str) -> Component {
    let mut component = Component::start("etcd", dir, program, args);
    let http = reqwest::Client::new();
    let health = format!("{client_url}/health");
    wait_for("etcd /health", Duration::from_secs(60), || {
        let (http, health) = (http.clone(), health.clone());
        component.assert_running();
        async move {
            let body = http
                .get(&health)
                .send()
                .await
                .map_err(|e| e.to_string())?
                .text()
                .await
                .map_err(|e| e.to_string())?;
            if body.contains("\"health\":\"true\"") {
                Ok(())
            } else {
                Err(body)
            }
        }
    })
    .await;
    component
}

/// The API server's storage, seen directly: what is really stored, and writes that bypass the
/// API server's validation (as an object stored under an older schema would).
#[derive(Clone, Debug)]
pub struct RawEtcd {
    pub(crate) url: String,
    pub(crate) http: reqwest::Client,
}

impl RawEtcd {
    /// The raw stored value, or None when the key does not exist.
    pub async fn get(&self, key: &str) -> Option<Vec<u8>> {
        let body = serde_json::json!({ "key": B64.encode(key) });
        let resp: serde_json::Value = self
            .http
            .post(format!("{}/v3/kv/range", self.url))
            .json(&body)
            .send()
            .await
            .expect("etcd range request")
            .json()
            .await
            .expect("etcd range response");
        let value = resp.get("kvs")?.get(0)?.get("value")?.as_str()?;
        Some(B64.decode(value).expect("etcd value is base64"))
    }

    /// Every key under `prefix` with its raw stored value, in key order.
    pub async fn range(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        let mut end = prefix.as_bytes().to_vec();
        *end.last_mut().expect("a non-empty prefix") += 1;
        let body = serde_json::json!({ "key": B64.encode(prefix), "range_end": B64.encode(&end) });
        let resp: serde_json::Value = self
            .http
            .post(format!("{}/v3/kv/range", self.url))
            .json(&body)
            .send()
            .await
            .expect("etcd range request")
            .json()
            .await
            .expect("etcd range response");
        let kvs = resp["kvs"].as_array().cloned().unwrap_or_default();
        kvs.iter()
            .map(|kv| {
                let decode = |k: &str| {
                    B64.decode(kv[k].as_str().unwrap_or_default())
                        .expect("etcd returns base64")
                };
                (
                    String::from_utf8_lossy(&decode("key")).into_owned(),
                    decode("value"),
                )
            })
            .collect()
    }

    /// Stores `value` under `key` directly, without the API server's validation.
    pub async fn put(&self, key: &str, value: &[u8]) {
        let body = serde_json::json!({ "key": B64.encode(key), "value": B64.encode(value) });
        let resp = self
            .http
            .post(format!("{}/v3/kv/put", self.url))
            .json(&body)
            .send()
            .await
            .expect("etcd put request");
        assert!(resp.status().is_success(), "etcd put: {}", resp.status());
    }
}
