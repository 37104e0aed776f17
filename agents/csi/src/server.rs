//! Serving: the gRPC `CSIDriverProvider` on `<dir>/kubebao.sock`, and `/metrics`, `/healthz`
//! and `/readyz` over HTTP on a local address.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kubebao_openbao::OpenBao;
use kubebao_proto::csi::csi_driver_provider_client::CsiDriverProviderClient;
use kubebao_proto::csi::csi_driver_provider_server::{CsiDriverProvider, CsiDriverProviderServer};
use kubebao_proto::csi::{MountRequest, MountResponse, VersionRequest, VersionResponse};
use tokio::net::UnixListener;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

use crate::error::MountError;
use crate::metrics::Metrics;
use crate::params::MAX_ATTRIBUTES;
use crate::provider::Provider;

/// Mounts served at once; more wait (each Mount holds its request, fetched data and
/// response, up to the response limit, so this bounds the agent's memory).
pub const MAX_MOUNTS_IN_FLIGHT: usize = 16;
/// Mounts waiting for a slot; more are refused as busy (the driver retries).
pub const MAX_MOUNTS_WAITING: usize = 64;
/// Largest MountRequest decoded: the attributes limit plus room for the other fields.
pub const MAX_REQUEST_BYTES: usize = 2 * MAX_ATTRIBUTES;

/// The provider name the driver dials: `<dir>/kubebao.sock`.
pub const PROVIDER_NAME: &str = "kubebao";

/// The gRPC service.
pub struct Service {
    provider: Arc<Provider>,
    limit: MountLimit,
}

impl Service {
    /// Wraps a provider.
    pub fn new(provider: Arc<Provider>) -> Self {
        Self {
            provider,
            limit: MountLimit::new(MAX_MOUNTS_IN_FLIGHT, MAX_MOUNTS_WAITING),
        }
    }
}

/// At most `in_flight` Mounts at once and `waiting` queued behind them.
struct MountLimit {
    permits: Semaphore,
    in_flight: usize,
    waiting: AtomicUsize,
    max_waiting: usize,
}

/// Counts one waiting Mount while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl MountLimit {
    fn new(in_flight: usize, max_waiting: usize) -> Self {
        Self {
            permits: Semaphore::new(in_flight),
            in_flight,
            waiting: AtomicUsize::new(0),
            max_waiting,
        }
    }

    /// A slot to serve one Mount in, after waiting for one if need be; Busy when too many wait.
    async fn enter(&self) -> Result<SemaphorePermit<'_>, MountError> {
        if let Ok(permit) = self.permits.try_acquire() {
            return Ok(permit);
        }
        let waiting = self.waiting.fetch_add(1, Ordering::Relaxed) + 1;
        let _counted = Waiting(&self.waiting);
        if waiting > self.max_waiting {
            return Err(MountError::Busy {
                in_flight: self.in_flight,
                waiting: waiting - 1,
            });
        }
        Ok(self
            .permits
            .acquire()
            .await
            .expect("the semaphore is never closed"))
    }
}

#[tonic::async_trait]
impl CsiDriverProvider for Service {
    async fn version(
        &self,
        _request: Request<VersionRequest>,
    ) -> Result<Response<VersionResponse>, Status> {
        Ok(Response::new(VersionResponse {
            version: "v1alpha1".into(),
            runtime_name: PROVIDER_NAME.into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
        }))
    }

    async fn mount(
        &self,
        request: Request<MountRequest>,
    ) -> Result<Response<MountResponse>, Status> {
        let start = Instant::now();
        let req = request.into_inner();
        let pod = pod_label(&req.attributes);
        let metrics = self.provider.metrics().clone();
        let result = async {
            let _slot = self.limit.enter().await?;
            self.provider.mount(&req.attributes, &req.permission).await
        }
        .await;
        let elapsed = start.elapsed();
        metrics.mount_seconds.observe(elapsed.as_secs_f64());
        match result {
            Ok(outcome) => {
                Metrics::count(&metrics.mounts, "ok");
                tracing::info!(
                    pod,
                    objects = outcome.response.object_version.len(),
                    files = outcome.response.files.len(),
                    logins = outcome.logins,
                    ms = elapsed.as_millis() as u64,
                    "mounted"
                );
                Ok(Response::new(outcome.response))
            }
            Err(e) => {
                Metrics::count(&metrics.mounts, e.code());
                tracing::warn!(
                    pod,
                    code = e.code(),
                    ms = elapsed.as_millis() as u64,
                    "mount failed: {e}"
                );
                Err(e.to_status())
            }
        }
    }
}

/// `namespace/name` of the pod, for logs (best effort; parse errors are reported by Mount).
fn pod_label(attributes: &str) -> String {
    let v: serde_json::Value = if attributes.len() <= MAX_ATTRIBUTES {
        serde_json::from_str(attributes).unwrap_or_default()
    } else {
        serde_json::Value::Null
    };
    let get = |k: &str| v.get(k).and_then(|s| s.as_str()).unwrap_or("?").to_string();
    format!(
        "{}/{}",
        get(crate::params::POD_NAMESPACE),
        get(crate::params::POD_NAME)
    )
}

/// Binds `<dir>/kubebao.sock` privately (see `kubebao_proto::socket::bind_private`).
pub fn bind_socket(
    dir: &Path,
) -> Result<(UnixListener, PathBuf), kubebao_proto::socket::SocketError> {
    let path = dir.join(format!("{PROVIDER_NAME}.sock"));
    Ok((kubebao_proto::socket::bind_private(&path)?, path))
}

/// Serves gRPC on `listener` until `shutdown` completes. The socket is removed at once (the
/// driver stops dialing a gone provider), in-flight Mounts get `grace` to finish, then the
/// server stops even if a client keeps an idle connection open. `health` reports serving
/// from the moment the server runs until shutdown begins.
pub async fn serve_grpc(
    listener: UnixListener,
    socket: PathBuf,
    provider: Arc<Provider>,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> Result<(), tonic::transport::Error> {
    let stopping = Arc::new(tokio::sync::Notify::new());
    let notify = stopping.clone();
    let remove = socket.clone();
    let signal_health = health.clone();
    let signal = async move {
        shutdown.await;
        signal_health.serving.store(false, Ordering::SeqCst);
        let _ = std::fs::remove_file(&remove);
        notify.notify_one();
    };
    let service = CsiDriverProviderServer::new(Service::new(provider))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let serve = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), signal);
    tokio::pin!(serve);
    health.serving.store(true, Ordering::SeqCst);
    let result = tokio::select! {
        r = &mut serve => r,
        _ = async { stopping.notified().await; tokio::time::sleep(grace).await } => {
            tracing::warn!("connections still open {grace:?} after shutdown began; stopping anyway");
            Ok(())
        }
    };
    health.serving.store(false, Ordering::SeqCst);
    let _ = std::fs::remove_file(&socket);
    result
}

/// What `/healthz` and `/readyz` check: the gRPC socket answers a `Version` call (healthz),
/// and the default OpenBao answers, initialised and unsealed (readyz).
pub struct Health {
    socket: PathBuf,
    serving: AtomicBool,
    openbao: Option<OpenBao>,
    /// The last readiness answer and when, so probes cannot hammer OpenBao.
    last_ready: std::sync::Mutex<Option<(Instant, Result<String, String>)>>,
}

/// How long a readiness answer is reused.
const READY_CACHE: Duration = Duration::from_secs(1);
/// How long a health check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

impl Health {
    /// Checks for the socket at `socket` and, when set, the agent's default OpenBao.
    pub fn new(socket: PathBuf, openbao: Option<OpenBao>) -> Self {
        Self {
            socket,
            serving: AtomicBool::new(false),
            openbao,
            last_ready: std::sync::Mutex::new(None),
        }
    }

    /// Ok when the gRPC server serves: started, not shutting down, and a `Version` call over
    /// the socket answers.
    pub async fn live(&self) -> Result<(), String> {
        if !self.serving.load(Ordering::SeqCst) {
            return Err("the gRPC server is not serving (starting or shutting down)".into());
        }
        let socket = self.socket.display().to_string();
        let call = async {
            let channel = tonic::transport::Endpoint::try_from(format!("unix://{socket}"))
                .map_err(|e| e.to_string())?
                .connect()
                .await
                .map_err(|e| format!("cannot connect: {e}"))?;
            CsiDriverProviderClient::new(channel)
                .version(VersionRequest {
                    version: "v1alpha1".into(),
                })
                .await
                .map(|_| ())
                .map_err(|e| format!("Version failed: {}", e.message()))
        };
        match tokio::time::timeout(CHECK_TIMEOUT, call).await {
            Ok(r) => r.map_err(|e| format!("socket {socket}: {e}")),
            Err(_) => Err(format!(
                "socket {socket}: no answer within {CHECK_TIMEOUT:?}"
            )),
        }
    }

    /// Ok (with what was checked) when live and the default OpenBao can serve reads.
    pub async fn ready(&self) -> Result<String, String> {
        if let Some((at, answer)) = self.last_ready.lock().expect("ready cache").clone()
            && at.elapsed() < READY_CACHE
        {
            return answer;
        }
        let answer = self.check_ready().await;
        *self.last_ready.lock().expect("ready cache") = Some((Instant::now(), answer.clone()));
        answer
    }

    async fn check_ready(&self) -> Result<String, String> {
        self.live().await?;
        let Some(bao) = &self.openbao else {
            return Ok(
                "ok: serving; no default OpenBao (--openbao-addr) to check, each \
                       SecretProviderClass names its own"
                    .into(),
            );
        };
        let addr = bao.address();
        match tokio::time::timeout(CHECK_TIMEOUT, bao.health()).await {
            Err(_) => Err(format!(
                "OpenBao at {addr}: no answer within {CHECK_TIMEOUT:?}"
            )),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(h)) if !h.initialized => Err(format!("OpenBao at {addr} is not initialised")),
            Ok(Ok(h)) if h.sealed => Err(format!("OpenBao at {addr} is sealed")),
            Ok(Ok(_)) => Ok(format!("ok: serving; OpenBao at {addr} unsealed")),
        }
    }
}

/// `/metrics`, `/healthz` (the socket serves) and `/readyz` (and OpenBao answers); a failed
/// check is 503 with the reason.
pub fn http_router(metrics: Arc<Metrics>, health: Arc<Health>) -> axum::Router {
    use axum::routing::get;
    let answer = |r: Result<String, String>| match r {
        Ok(text) => (http::StatusCode::OK, text),
        Err(why) => (http::StatusCode::SERVICE_UNAVAILABLE, why),
    };
    let live = health.clone();
    axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(
                            http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.encode(),
                    )
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let live = live.clone();
                async move { answer(live.live().await.map(|()| "ok".to_string())) }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let health = health.clone();
                async move { answer(health.ready().await) }
            }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::Settings;
    use crate::testing::{Bao, start_bao};

    async fn get(url: &str) -> (u16, String) {
        let r = reqwest::get(url).await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    fn health_for(address: &str, socket: PathBuf) -> (Arc<Provider>, Arc<Health>) {
        let settings = Settings {
            openbao_addr: Some(address.to_string()),
            allow_plain_http: true,
            ..Settings::default()
        };
        let provider = Arc::new(Provider::new(
            settings,
            vec![1; 32],
            Arc::new(Metrics::new()),
        ));
        let default = provider.default_client().unwrap().unwrap();
        (provider, Arc::new(Health::new(socket, Some(default))))
    }

    async fn serve_http(health: Arc<Health>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let router = http_router(Arc::new(Metrics::new()), health);
        tokio::spawn(async move { axum::serve(listener, router).await });
        url
    }

    #[tokio::test]
    async fn healthz_and_readyz_tell_the_truth() {
        let (bao, address) = start_bao(Bao::default()).await;
        let dir = tempfile::tempdir().unwrap();
        let (listener, socket) = bind_socket(dir.path()).unwrap();
        let (provider, health) = health_for(&address, socket.clone());
        let url = serve_http(health.clone()).await;
        assert_eq!(
            get(&format!("{url}/healthz")).await.0,
            503,
            "not serving yet"
        );

        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_grpc(
            listener,
            socket,
            provider,
            health.clone(),
            async move {
                let _ = stopped.await;
            },
            Duration::from_secs(1),
        ));
        for _ in 0..50 {
            if health.live().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(get(&format!("{url}/healthz")).await, (200, "ok".into()));
        let (code, text) = get(&format!("{url}/readyz")).await;
        assert_eq!(code, 200, "{text}");

        bao.lock().unwrap().sealed = true;
        tokio::time::sleep(READY_CACHE).await;
        let (code, text) = get(&format!("{url}/readyz")).await;
        assert_eq!(code, 503);
        assert!(text.contains("is sealed"), "{text}");
        assert_eq!(
            get(&format!("{url}/healthz")).await.0,
            200,
            "sealed OpenBao: still alive"
        );
        bao.lock().unwrap().sealed = false;
        tokio::time::sleep(READY_CACHE).await;
        assert_eq!(get(&format!("{url}/readyz")).await.0, 200);

        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
        let (code, text) = get(&format!("{url}/healthz")).await;
        assert_eq!(code, 503);
        assert!(text.contains("not serving"), "{text}");
        tokio::time::sleep(READY_CACHE).await;
        assert_eq!(get(&format!("{url}/readyz")).await.0, 503);
    }

    #[tokio::test]
    async fn healthz_fails_when_the_socket_does_not_answer() {
        let dir = tempfile::tempdir().unwrap();
        let (_, health) = health_for("http://127.0.0.1:1", dir.path().join("kubebao.sock"));
        // Marked serving, but nothing answers on the socket.
        health.serving.store(true, Ordering::SeqCst);
        let err = health.live().await.unwrap_err();
        assert!(err.contains("cannot connect"), "{err}");
    }

    #[tokio::test]
    async fn readyz_fails_while_openbao_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let (listener, socket) = bind_socket(dir.path()).unwrap();
        let (provider, health) = health_for("http://127.0.0.1:1", socket.clone());
        tokio::spawn(serve_grpc(
            listener,
            socket,
            provider,
            health.clone(),
            std::future::pending(),
            Duration::from_secs(1),
        ));
        for _ in 0..50 {
            if health.live().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let err = health.ready().await.unwrap_err();
        assert!(err.contains("127.0.0.1:1"), "{err}");
    }

    #[tokio::test]
    async fn mounts_past_the_waiting_limit_are_refused_as_busy() {
        let limit = Arc::new(MountLimit::new(1, 1));
        let held = limit.enter().await.unwrap();
        let waiter = {
            let limit = limit.clone();
            tokio::spawn(async move { limit.enter().await.map(|_| ()).is_ok() })
        };
        while limit.waiting.load(Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        let busy = limit.enter().await.expect_err("over the waiting limit");
        assert_eq!(busy.code(), "busy");
        assert_eq!(busy.grpc_code(), tonic::Code::Unavailable);
        drop(held);
        assert!(waiter.await.unwrap(), "the waiter gets the freed slot");
        assert_eq!(limit.waiting.load(Ordering::Relaxed), 0);
    }
}
