//! A fake OpenBao on loopback for unit tests: Kubernetes login, lookup-self, renew-self, revoke-self.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};

use crate::{ClientConfig, OpenBao};

/// What the fake does and what it saw.
#[derive(Default)]
pub struct Fake {
    /// TTL of issued tokens, seconds.
    pub ttl: u64,
    /// Whether issued tokens are renewable.
    pub renewable: bool,
    /// Most a renewal grants (None: what was asked).
    pub renew_cap: Option<u64>,
    /// Refuse renewals with 403.
    pub refuse_renewal: bool,
    /// Answer logins with this status instead (e.g. 500, 400).
    pub login_status: Option<u16>,
    /// Delay before answering a login.
    pub login_delay: Duration,
    /// Tokens that work.
    pub live: HashSet<String>,
    pub logins: u32,
    pub lookups: u32,
    pub renewals: u32,
    pub revoked: Vec<String>,
    pub issued: u32,
}

pub type Shared = Arc<Mutex<Fake>>;

fn reply(status: u16, body: serde_json::Value) -> (StatusCode, HeaderMap, String) {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", "application/json".parse().unwrap());
    (
        StatusCode::from_u16(status).unwrap(),
        headers,
        body.to_string(),
    )
}

fn token_of(headers: &HeaderMap) -> String {
    headers
        .get("x-vault-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

fn denied() -> (StatusCode, HeaderMap, String) {
    reply(403, serde_json::json!({"errors": ["permission denied"]}))
}

async fn login(State(fake): State<Shared>) -> (StatusCode, HeaderMap, String) {
    let delay = fake.lock().unwrap().login_delay;
    tokio::time::sleep(delay).await;
    let mut f = fake.lock().unwrap();
    f.logins += 1;
    if let Some(status) = f.login_status {
        return reply(status, serde_json::json!({"errors": ["login failed"]}));
    }
    f.issued += 1;
    let token = format!("t{}", f.issued);
    f.live.insert(token.clone());
    reply(
        200,
        serde_json::json!({"auth": {
            "client_token": token, "accessor": "a", "policies": ["default"],
            "lease_duration": f.ttl, "renewable": f.renewable,
        }}),
    )
}

async fn lookup(State(fake): State<Shared>, headers: HeaderMap) -> (StatusCode, HeaderMap, String) {
    let mut f = fake.lock().unwrap();
    f.lookups += 1;
    if !f.live.contains(&token_of(&headers)) {
        return denied();
    }
    reply(
        200,
        serde_json::json!({"data": {"ttl": f.ttl, "renewable": f.renewable, "accessor": "a"}}),
    )
}

async fn renew(
    State(fake): State<Shared>,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, HeaderMap, String) {
    let mut f = fake.lock().unwrap();
    f.renewals += 1;
    let token = token_of(&headers);
    if f.refuse_renewal || !f.live.contains(&token) {
        return denied();
    }
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    let asked: u64 = body["increment"]
        .as_str()
        .unwrap()
        .trim_end_matches('s')
        .parse()
        .unwrap();
    let granted = f.renew_cap.map_or(asked, |cap| cap.min(asked));
    reply(
        200,
        serde_json::json!({"auth": {
            "client_token": token, "lease_duration": granted, "renewable": true,
        }}),
    )
}

async fn revoke(State(fake): State<Shared>, headers: HeaderMap) -> StatusCode {
    let mut f = fake.lock().unwrap();
    let token = token_of(&headers);
    f.live.remove(&token);
    f.revoked.push(token);
    StatusCode::NO_CONTENT
}

/// Starts the fake; returns its state and a client for it.
pub async fn start(fake: Fake) -> (Shared, OpenBao) {
    let shared: Shared = Arc::new(Mutex::new(fake));
    let app = axum::Router::new()
        .route("/v1/auth/{mount}/login", post(login))
        .route("/v1/auth/token/lookup-self", get(lookup))
        .route("/v1/auth/token/renew-self", post(renew))
        .route("/v1/auth/token/revoke-self", post(revoke))
        .with_state(shared.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let client = OpenBao::new(&ClientConfig {
        address: format!("http://{addr}"),
        allow_plain_http: true,
        ..Default::default()
    })
    .unwrap();
    (shared, client)
}
