//! A fake OpenBao on loopback for the plugin's unit tests: `lookup-self` and one Transit key
//! (read, encrypt, decrypt) that can be rotated, revoked or denied; it counts key reads and
//! can be stopped and started again on the same port.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use kubebao_openbao::{
    ClientConfig, CredentialSource, Credentials, OpenBao, SecretString, Session,
};
use serde_json::{Value, json};

use crate::plugin::{Plugin, PluginSettings};

/// The Transit mount the fake serves.
pub const MOUNT: &str = "transit";
/// The Transit key the fake serves.
pub const KEY: &str = "kms";
/// The plugin's token.
pub const TOKEN: &str = "plugin-token";

/// What the fake holds and saw.
#[derive(Default)]
pub struct State {
    /// Tokens that work.
    pub live: HashSet<String>,
    /// Key versions and their creation times.
    pub versions: BTreeMap<u64, String>,
    /// The policy lacks `decrypt`.
    pub deny_decrypt: bool,
    /// Key reads answered.
    pub key_reads: u32,
}

type Shared = Arc<Mutex<State>>;
type Reply = (StatusCode, HeaderMap, String);

fn reply(status: u16, body: Value) -> Reply {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", "application/json".parse().unwrap());
    (
        StatusCode::from_u16(status).unwrap(),
        headers,
        body.to_string(),
    )
}

fn denied() -> Reply {
    reply(403, json!({"errors": ["permission denied"]}))
}

/// The state, or None (answer 403) when the request's token is not live.
fn authorised<'a>(state: &'a Shared, headers: &HeaderMap) -> Option<MutexGuard<'a, State>> {
    let st = state.lock().unwrap();
    let token = headers
        .get("x-vault-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    st.live.contains(token).then_some(st)
}

async fn lookup(axum::extract::State(s): axum::extract::State<Shared>, h: HeaderMap) -> Reply {
    match authorised(&s, &h) {
        Some(_) => reply(
            200,
            json!({"data": {"ttl": 0, "renewable": false, "policies": ["kms"]}}),
        ),
        None => denied(),
    }
}

async fn read_key(axum::extract::State(s): axum::extract::State<Shared>, h: HeaderMap) -> Reply {
    let Some(mut st) = authorised(&s, &h) else {
        return denied();
    };
    st.key_reads += 1;
    let latest = st.versions.keys().max().copied().unwrap_or(0);
    let keys: serde_json::Map<String, Value> = st
        .versions
        .iter()
        .map(|(v, created)| (v.to_string(), json!(created)))
        .collect();
    reply(
        200,
        json!({"data": {
            "name": KEY, "type": "aes256-gcm96", "latest_version": latest,
            "min_decryption_version": 1, "min_encryption_version": 0, "keys": keys,
            "supports_encryption": true, "deletion_allowed": false, "exportable": false,
        }}),
    )
}

/// A Transit-shaped ciphertext: `vault:vN:` + base64(12-byte nonce ‖ plaintext ‖ 16-byte tag).
pub fn ciphertext(version: u64, plaintext: &[u8]) -> String {
    let raw: Vec<u8> = [&[0u8; 12][..], plaintext, &[0u8; 16]].concat();
    format!("vault:v{version}:{}", B64.encode(raw))
}

async fn encrypt(
    axum::extract::State(s): axum::extract::State<Shared>,
    h: HeaderMap,
    body: String,
) -> Reply {
    if authorised(&s, &h).is_none() {
        return denied();
    }
    let body: Value = serde_json::from_str(&body).unwrap();
    let plaintext = B64.decode(body["plaintext"].as_str().unwrap()).unwrap();
    let version = body["key_version"].as_u64().unwrap();
    reply(
        200,
        json!({"data": {"ciphertext": ciphertext(version, &plaintext)}}),
    )
}

async fn decrypt(
    axum::extract::State(s): axum::extract::State<Shared>,
    h: HeaderMap,
    body: String,
) -> Reply {
    match authorised(&s, &h) {
        Some(st) if !st.deny_decrypt => {}
        _ => return denied(),
    }
    let body: Value = serde_json::from_str(&body).unwrap();
    let text = body["ciphertext"].as_str().unwrap();
    let raw = B64.decode(text.splitn(3, ':').nth(2).unwrap()).unwrap();
    let plaintext = &raw[12..raw.len() - 16];
    reply(200, json!({"data": {"plaintext": B64.encode(plaintext)}}))
}

/// A running (or stopped) fake.
pub struct FakeBao {
    /// What it holds and saw.
    pub state: Shared,
    /// Where it listens.
    pub addr: SocketAddr,
    running: Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    )>,
}

impl FakeBao {
    /// Starts with the plugin's token live and key version 1.
    pub async fn start() -> FakeBao {
        let state = Shared::default();
        {
            let mut st = state.lock().unwrap();
            st.live.insert(TOKEN.into());
            st.versions.insert(1, "2024-01-01T00:00:00Z".into());
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut fake = FakeBao {
            state,
            addr,
            running: None,
        };
        fake.serve(listener);
        fake
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let app = axum::Router::new()
            .route("/v1/auth/token/lookup-self", get(lookup))
            .route(&format!("/v1/{MOUNT}/keys/{KEY}"), get(read_key))
            .route(&format!("/v1/{MOUNT}/encrypt/{KEY}"), post(encrypt))
            .route(&format!("/v1/{MOUNT}/decrypt/{KEY}"), post(decrypt))
            .with_state(self.state.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        self.running = Some((stop, task));
    }

    /// Stops listening and closes every connection (requests then fail as unreachable).
    pub async fn stop(&mut self) {
        if let Some((stop, task)) = self.running.take() {
            let _ = stop.send(());
            task.await.unwrap();
        }
    }

    /// Listens again on the same address.
    pub async fn resume(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    /// The state, to change or inspect.
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Adds a key version; returns its key_id.
    pub fn rotate(&self) -> String {
        let mut st = self.state();
        let version = st.versions.keys().max().unwrap() + 1;
        let created = format!("2024-01-{version:02}T00:00:00Z");
        st.versions.insert(version, created.clone());
        crate::envelope::key_id(MOUNT, KEY, version, &created)
    }

    /// A client for the fake.
    pub fn client(&self) -> OpenBao {
        OpenBao::new(&ClientConfig {
            address: format!("http://{}", self.addr),
            allow_plain_http: true,
            ..Default::default()
        })
        .unwrap()
    }

    /// A plugin using the fake with [`TOKEN`] (no probe run yet).
    pub fn plugin(&self) -> Arc<Plugin> {
        let token = Credentials::Token(SecretString::new(TOKEN));
        let session = Session::new(self.client(), CredentialSource::Static(token));
        Plugin::new(
            session,
            PluginSettings {
                mount: MOUNT.into(),
                key: KEY.into(),
                aad_context: String::new(),
            },
        )
    }
}
