//! Fakes for unit tests: an OpenBao and a Kubernetes API on loopback that count what they
//! are asked (every request, reads in flight, logins, lease renewals and lookups, reviews).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::routing::any;
use serde_json::{Value, json};

/// What the fake OpenBao does and saw.
#[derive(Default)]
pub struct Bao {
    /// JWTs a Kubernetes login accepts.
    pub accepted_jwts: HashSet<String>,
    /// Delay of each secret read.
    pub read_delay: Duration,
    /// Lease duration of `database/creds/*`, seconds.
    pub lease_seconds: u64,
    /// Refuse lease renewals.
    pub refuse_renewals: bool,
    /// Answer `sys/health` as sealed.
    pub sealed: bool,
    /// Every request, as "METHOD path".
    pub requests: Vec<String>,
    pub logins: u32,
    pub reads: u32,
    pub in_flight: u32,
    pub max_in_flight: u32,
    pub renewals: u32,
    pub lookups: u32,
    /// Live leases: id → expiry.
    pub leases: HashMap<String, Instant>,
    issued: u32,
    tokens: HashSet<String>,
}

/// The fake OpenBao's state.
pub type SharedBao = Arc<Mutex<Bao>>;

fn reply(status: u16, body: Value) -> (StatusCode, [(&'static str, &'static str); 1], String) {
    (
        StatusCode::from_u16(status).unwrap(),
        [("content-type", "application/json")],
        body.to_string(),
    )
}

type Reply = (StatusCode, [(&'static str, &'static str); 1], String);

async fn bao(
    State(fake): State<SharedBao>,
    method: Method,
    uri: Uri,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Reply {
    let path = uri.path().trim_start_matches("/v1/").to_string();
    let token = headers
        .get("x-vault-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let delay = {
        let mut f = fake.lock().unwrap();
        f.requests.push(format!("{method} {path}"));
        f.read_delay
    };
    if path.starts_with("auth/") && path.ends_with("/login") {
        return login(&fake, &body);
    }
    if path == "sys/health" {
        let sealed = fake.lock().unwrap().sealed;
        return reply(200, json!({"initialized": true, "sealed": sealed}));
    }
    if !fake.lock().unwrap().tokens.contains(&token) {
        return reply(403, json!({"errors": ["permission denied"]}));
    }
    match path.as_str() {
        "sys/leases/renew" => renew(&fake, &body),
        "sys/leases/lookup" => lookup(&fake, &body),
        p => read(&fake, p, delay).await,
    }
}

fn login(fake: &SharedBao, body: &Value) -> Reply {
    let mut f = fake.lock().unwrap();
    f.logins += 1;
    let jwt = body["jwt"].as_str().unwrap_or_default();
    if !f.accepted_jwts.contains(jwt) {
        return reply(403, json!({"errors": ["permission denied"]}));
    }
    f.issued += 1;
    let token = format!("t{}", f.issued);
    f.tokens.insert(token.clone());
    reply(
        200,
        json!({"auth": {"client_token": token, "accessor": "a", "policies": ["default"],
                        "lease_duration": 3600, "renewable": true}}),
    )
}

async fn read(fake: &SharedBao, path: &str, delay: Duration) -> Reply {
    {
        let mut f = fake.lock().unwrap();
        f.reads += 1;
        f.in_flight += 1;
        f.max_in_flight = f.max_in_flight.max(f.in_flight);
    }
    tokio::time::sleep(delay).await;
    let mut f = fake.lock().unwrap();
    f.in_flight -= 1;
    if path.starts_with("database/creds/") {
        let id = format!("{path}/{}", f.reads);
        let ttl = f.lease_seconds;
        f.leases
            .insert(id.clone(), Instant::now() + Duration::from_secs(ttl));
        return reply(
            200,
            json!({"lease_id": id, "lease_duration": ttl, "renewable": true,
                   "data": {"username": format!("user-{}", f.reads), "password": "pw"}}),
        );
    }
    reply(
        200,
        json!({"data": {"data": {"password": format!("pw-{path}")}, "metadata": {"version": 1}}}),
    )
}

fn renew(fake: &SharedBao, body: &Value) -> Reply {
    let mut f = fake.lock().unwrap();
    f.renewals += 1;
    let id = body["lease_id"].as_str().unwrap_or_default().to_string();
    let live = f.leases.get(&id).is_some_and(|t| *t > Instant::now());
    if f.refuse_renewals || !live {
        return reply(
            400,
            json!({"errors": ["lease not found or lease is not renewable"]}),
        );
    }
    let ttl = body["increment"].as_u64().unwrap_or(f.lease_seconds);
    f.leases
        .insert(id.clone(), Instant::now() + Duration::from_secs(ttl));
    reply(
        200,
        json!({"lease_id": id, "lease_duration": ttl, "renewable": true}),
    )
}

fn lookup(fake: &SharedBao, body: &Value) -> Reply {
    let mut f = fake.lock().unwrap();
    f.lookups += 1;
    let id = body["lease_id"].as_str().unwrap_or_default();
    match f.leases.get(id) {
        Some(t) if *t > Instant::now() => {
            let ttl = t.saturating_duration_since(Instant::now()).as_secs();
            reply(200, json!({"data": {"id": id, "ttl": ttl}}))
        }
        _ => reply(400, json!({"errors": ["invalid lease"]})),
    }
}

/// Starts the fake OpenBao; returns its state and `http://` address.
pub async fn start_bao(fake: Bao) -> (SharedBao, String) {
    let shared = Arc::new(Mutex::new(fake));
    let app = axum::Router::new()
        .route("/v1/{*path}", any(bao))
        .with_state(shared.clone());
    (shared, serve(app).await)
}

async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// What the fake Kubernetes API knows and saw.
#[derive(Default)]
pub struct Kube {
    /// JWT → (username, pod uid) the TokenReview reports; other JWTs are not authenticated.
    pub tokens: BTreeMap<String, (String, String)>,
    /// Pods by uid: (namespace, name, ServiceAccount).
    pub pods: BTreeMap<String, (String, String, String)>,
    pub reviews: u32,
    pub token_requests: u32,
}

/// The fake Kubernetes API's state.
pub type SharedKube = Arc<Mutex<Kube>>;

async fn kube(State(fake): State<SharedKube>, uri: Uri, body: Bytes) -> Reply {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let path = uri.path().to_string();
    let mut f = fake.lock().unwrap();
    if path == "/apis/authentication.k8s.io/v1/tokenreviews" {
        f.reviews += 1;
        let jwt = body["spec"]["token"].as_str().unwrap_or_default();
        let status = match f.tokens.get(jwt) {
            Some((user, uid)) => json!({"authenticated": true, "user": {"username": user,
                "extra": {"authentication.kubernetes.io/pod-uid": [uid]}}}),
            None => json!({"authenticated": false, "error": "invalid bearer token"}),
        };
        let mut review = body.clone();
        review["status"] = status;
        return reply(201, review);
    }
    // /api/v1/namespaces/{ns}/serviceaccounts/{sa}/token
    let parts: Vec<&str> = path.split('/').collect();
    if let [
        "",
        "api",
        "v1",
        "namespaces",
        ns,
        "serviceaccounts",
        sa,
        "token",
    ] = parts[..]
    {
        f.token_requests += 1;
        let bound = &body["spec"]["boundObjectRef"];
        let uid = bound["uid"].as_str().unwrap_or_default();
        let name = bound["name"].as_str().unwrap_or_default();
        let known = f
            .pods
            .get(uid)
            .is_some_and(|(pns, pname, psa)| pns == ns && pname == name && psa == sa);
        if !known {
            return reply(
                404,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                       "message": format!("pods \"{name}\" not found"), "reason": "NotFound", "code": 404}),
            );
        }
        let mut tr = body.clone();
        tr["status"] = json!({"token": format!("minted-{uid}"), "expirationTimestamp": "2099-01-01T00:00:00Z"});
        return reply(201, tr);
    }
    reply(
        404,
        json!({"kind": "Status", "code": 404, "message": "no such path"}),
    )
}

/// Starts the fake Kubernetes API; returns its state and a client for it.
pub async fn start_kube(fake: Kube) -> (SharedKube, kube::Client) {
    let shared = Arc::new(Mutex::new(fake));
    let app = axum::Router::new()
        .route("/{*path}", any(kube))
        .with_state(shared.clone());
    let url = serve(app).await;
    let config = kube::Config::new(url.parse().unwrap());
    (shared, kube::Client::try_from(config).unwrap())
}
