//! Serving: the gRPC `CSIDriverProvider` on `<dir>/kubebao.sock`, and `/metrics` + `/healthz`
//! over HTTP on a local address.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kubebao_proto::csi::csi_driver_provider_server::{CsiDriverProvider, CsiDriverProviderServer};
use kubebao_proto::csi::{MountRequest, MountResponse, VersionRequest, VersionResponse};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

use crate::metrics::Metrics;
use crate::provider::Provider;

/// The provider name the driver dials: `<dir>/kubebao.sock`.
pub const PROVIDER_NAME: &str = "kubebao";

/// The gRPC service.
pub struct Service {
    provider: Arc<Provider>,
}

impl Service {
    /// Wraps a provider.
    pub fn new(provider: Arc<Provider>) -> Self {
        Self { provider }
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
        let result = self.provider.mount(&req.attributes, &req.permission).await;
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
    let v: serde_json::Value = serde_json::from_str(attributes).unwrap_or_default();
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
/// server stops even if a client keeps an idle connection open.
pub async fn serve_grpc(
    listener: UnixListener,
    socket: PathBuf,
    provider: Arc<Provider>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> Result<(), tonic::transport::Error> {
    let stopping = Arc::new(tokio::sync::Notify::new());
    let notify = stopping.clone();
    let remove = socket.clone();
    let signal = async move {
        shutdown.await;
        let _ = std::fs::remove_file(&remove);
        notify.notify_one();
    };
    let serve = tonic::transport::Server::builder()
        .add_service(CsiDriverProviderServer::new(Service::new(provider)))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), signal);
    tokio::pin!(serve);
    let result = tokio::select! {
        r = &mut serve => r,
        _ = async { stopping.notified().await; tokio::time::sleep(grace).await } => {
            tracing::warn!("connections still open {grace:?} after shutdown began; stopping anyway");
            Ok(())
        }
    };
    let _ = std::fs::remove_file(&socket);
    result
}

/// `/metrics` and `/healthz`.
pub fn http_router(metrics: Arc<Metrics>) -> axum::Router {
    use axum::routing::get;
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
        .route("/healthz", get(|| async { "ok" }))
}
