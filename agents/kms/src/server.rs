//! Serving: the unix socket (mode 0600, stale-socket handling, removal on shutdown), the
//! request size limit, the metrics/health HTTP endpoint, the background probe and token upkeep.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use futures::TryFutureExt as _;
use kubebao_openbao::{OpenBao, Session};
use kubebao_proto::kms::StatusRequest;
use kubebao_proto::kms::key_management_service_client::KeyManagementServiceClient;
use kubebao_proto::kms::key_management_service_server::KeyManagementServiceServer;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;
use tonic::transport::Channel;

use crate::config::Config;
use crate::envelope::MAX_REQUEST;
use crate::plugin::{Health, KmsService, Plugin, PluginSettings, SELF_CHECK};

/// How long in-flight requests may take to finish after SIGTERM.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(2);
/// How long /healthz and /readyz wait for the plugin's own socket to answer Status.
const SELF_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The KMS v2 gRPC service as the socket serves it: a request over [`MAX_REQUEST`] bytes is
/// refused with ResourceExhausted before it is read.
pub fn kms_service(plugin: Arc<Plugin>) -> RefuseOversized<KeyManagementServiceServer<KmsService>> {
    RefuseOversized(
        KeyManagementServiceServer::new(KmsService(plugin)).max_decoding_message_size(MAX_REQUEST),
    )
}

/// Turns tonic's answer to a request over its decoding limit (OutOfRange) into
/// ResourceExhausted, the code gRPC uses for a message over the receiver's limit. The KMS
/// service itself never answers OutOfRange, so that code can only come from the limit.
#[derive(Clone)]
pub struct RefuseOversized<S>(S);

impl<S: NamedService> NamedService for RefuseOversized<S> {
    const NAME: &'static str = S::NAME;
}

type GrpcResponse = http::Response<tonic::body::Body>;

impl<S, B> Service<http::Request<B>> for RefuseOversized<S>
where
    S: Service<http::Request<B>, Response = GrpcResponse>,
{
    type Response = GrpcResponse;
    type Error = S::Error;
    type Future = futures::future::MapOk<S::Future, fn(GrpcResponse) -> GrpcResponse>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        self.0
            .call(request)
            .map_ok(oversized_as_resource_exhausted as fn(_) -> _)
    }
}

fn oversized_as_resource_exhausted(response: GrpcResponse) -> GrpcResponse {
    // "11" is OutOfRange on the wire (a header compare: nothing allocated per request).
    let out_of_range = response
        .headers()
        .get("grpc-status")
        .is_some_and(|code| code.as_bytes() == b"11");
    if !out_of_range {
        return response;
    }
    tracing::warn!(limit = MAX_REQUEST, "refused a request over the size limit");
    tonic::Status::resource_exhausted(format!(
        "request over the {} KiB limit: a KMS v2 request holds at most a 1 KiB ciphertext, a 1 KiB key_id and 32 KiB of annotations",
        MAX_REQUEST / 1024
    ))
    .into_http()
}

/// A gRPC channel to the KMS socket at `socket`.
pub async fn connect(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = socket.to_path_buf();
    // The URI is required by the API but unused: the connector dials the socket.
    tonic::transport::Endpoint::from_static("http://[::1]:1")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
}

/// The error and its causes, on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Whether the gRPC socket is served: a Status call over it (left out of the metrics) answers
/// within [`SELF_CHECK_TIMEOUT`]. Proves the socket file is in place and the serving loop
/// accepts and answers, not just that the process runs.
pub async fn socket_served(socket: &Path) -> Result<(), String> {
    let call = async {
        let channel = connect(socket).await.map_err(|e| error_chain(&e))?;
        let mut request = tonic::Request::new(StatusRequest {});
        request
            .metadata_mut()
            .insert(SELF_CHECK, tonic::metadata::MetadataValue::from_static("1"));
        KeyManagementServiceClient::new(channel)
            .status(request)
            .await
            .map(|_| ())
            .map_err(|s| s.message().to_string())
    };
    match tokio::time::timeout(SELF_CHECK_TIMEOUT, call).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!(
            "the gRPC socket {} is not served: {e}",
            socket.display()
        )),
        Err(_) => Err(format!(
            "the gRPC socket {} did not answer Status within {SELF_CHECK_TIMEOUT:?}",
            socket.display()
        )),
    }
}

/// What the HTTP endpoints look at.
struct Endpoints {
    plugin: Arc<Plugin>,
    socket: PathBuf,
}

async fn metrics(State(e): State<Arc<Endpoints>>) -> ([(&'static str, &'static str); 1], String) {
    e.plugin.update_token_metrics();
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        e.plugin.metrics.encode(),
    )
}

fn unavailable(reason: String) -> (StatusCode, String) {
    (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n"))
}

async fn healthz(State(e): State<Arc<Endpoints>>) -> (StatusCode, String) {
    match socket_served(&e.socket).await {
        Ok(()) => (StatusCode::OK, "ok\n".into()),
        Err(reason) => unavailable(reason),
    }
}

async fn readyz(State(e): State<Arc<Endpoints>>) -> (StatusCode, String) {
    if let Err(reason) = socket_served(&e.socket).await {
        return unavailable(reason);
    }
    match e.plugin.health() {
        Health::Ok => (StatusCode::OK, "ok\n".into()),
        h => unavailable(h.healthz()),
    }
}

/// The HTTP router for /metrics, /healthz and /readyz.
///
/// /healthz (liveness): the gRPC socket at `socket` is served. An OpenBao outage does not
/// fail it: the plugin recovers by itself and a restart would not help. /readyz (readiness):
/// the plugin can do its job: the socket is served, OpenBao is reachable and unsealed, the
/// key usable and the token valid (the health the probe keeps).
pub fn http_router(plugin: Arc<Plugin>, socket: PathBuf) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Arc::new(Endpoints { plugin, socket }))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            }
        }
        _ => {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            std::future::pending::<()>().await
        }
    }
}

/// Runs the plugin until SIGTERM/SIGINT; removes the socket on the way out.
pub async fn serve(config: Config) -> Result<(), String> {
    let client = OpenBao::new(&config.client_config()?).map_err(|e| e.to_string())?;
    let session = Session::new(client, config.credentials.clone());
    let plugin = Plugin::new(
        session.clone(),
        PluginSettings {
            mount: config.transit_mount.clone(),
            key: config.transit_key.clone(),
            aad_context: config.aad_context.clone(),
        },
    );
    let http = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .map_err(|e| format!("cannot listen on --http-addr {}: {e}", config.http_addr))?;
    let listener =
        kubebao_proto::socket::bind_private(&config.socket).map_err(|e| e.to_string())?;
    tracing::info!(
        socket = %config.socket.display(),
        http = %config.http_addr,
        openbao = %config.openbao_addr,
        key = %format!("{}/{}", config.transit_mount, config.transit_key),
        auth = %config.credentials.describe(),
        "serving KMS v2"
    );
    let renewal = session.spawn_renewal();
    let probe = tokio::spawn(plugin.clone().run_probe(config.probe_interval));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut http_stop = stop_rx.clone();
    let http_task = tokio::spawn(
        axum::serve(http, http_router(plugin.clone(), config.socket.clone()))
            .with_graceful_shutdown(async move {
                let _ = http_stop.wait_for(|s| *s).await;
            })
            .into_future(),
    );
    // On a signal: remove the socket at once (no new clients), then let in-flight requests
    // finish for up to DRAIN. The API server keeps its connection open, so waiting for every
    // connection to close would never end.
    let socket = config.socket.clone();
    let (signalled_tx, mut signalled) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown_signal().await;
        let _ = std::fs::remove_file(&socket);
        let _ = signalled_tx.send(true);
    };
    let server = tonic::transport::Server::builder()
        .add_service(kms_service(plugin.clone()))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown);
    let drained = async move {
        let _ = signalled.wait_for(|s| *s).await;
        tokio::time::sleep(DRAIN).await;
    };
    let grpc = tokio::select! {
        r = server => r,
        _ = drained => {
            tracing::info!("connections still open after {DRAIN:?}; closing them");
            Ok(())
        }
    };
    let _ = std::fs::remove_file(&config.socket);
    let _ = stop_tx.send(true);
    renewal.abort();
    probe.abort();
    let _ = http_task.await;
    tracing::info!(socket = %config.socket.display(), "stopped; socket removed");
    grpc.map_err(|e| format!("gRPC server failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_openbao::FakeBao;
    use kubebao_proto::kms::{DecryptRequest, EncryptRequest};
    use tower::ServiceExt as _;

    /// Serves the KMS service on `socket` as `serve` does.
    fn serve_grpc(socket: &Path, plugin: Arc<Plugin>) -> tokio::task::JoinHandle<()> {
        let listener = kubebao_proto::socket::bind_private(socket).unwrap();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(kms_service(plugin))
                .serve_with_incoming(UnixListenerStream::new(listener))
                .await
                .unwrap();
        })
    }

    async fn get(router: &Router, path: &str) -> (StatusCode, String) {
        let request = axum::http::Request::get(path)
            .body(axum::body::Body::empty())
            .unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn oversized_requests_get_resource_exhausted_and_the_plugin_keeps_serving() {
        let fake = FakeBao::start().await;
        let plugin = fake.plugin();
        plugin.probe().await;
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("kms.sock");
        let _server = serve_grpc(&socket, plugin.clone());
        let mut kms = KeyManagementServiceClient::new(connect(&socket).await.unwrap());

        let huge = EncryptRequest {
            plaintext: vec![7; 3 << 20],
            uid: "huge".into(),
        };
        let e = kms.encrypt(huge).await.expect_err("3 MiB");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
        assert!(e.message().contains("64 KiB limit"), "{e:?}");
        let just_over = DecryptRequest {
            ciphertext: vec![b'a'; MAX_REQUEST],
            ..Default::default()
        };
        let e = kms.decrypt(just_over).await.expect_err("over the limit");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");

        // The largest request the API server's own limits allow is read and judged.
        let at_contract_limits = DecryptRequest {
            ciphertext: vec![b'a'; 1024],
            uid: "u".repeat(64),
            key_id: "k".repeat(1024),
            annotations: [("a.example.com".to_string(), vec![b'v'; 32 * 1024 - 13])].into(),
        };
        let e = kms
            .decrypt(at_contract_limits)
            .await
            .expect_err("bad key_id");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");

        let ok = kms
            .encrypt(EncryptRequest {
                plaintext: b"seed".to_vec(),
                uid: "after".into(),
            })
            .await
            .expect("still serving");
        assert!(!ok.into_inner().ciphertext.is_empty());
    }

    #[tokio::test]
    async fn healthz_says_the_socket_is_served_and_readyz_that_the_plugin_can_work() {
        let fake = FakeBao::start().await;
        let plugin = fake.plugin();
        plugin.probe().await;
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("kms.sock");
        let server = serve_grpc(&socket, plugin.clone());
        let router = http_router(plugin.clone(), socket.clone());
        assert_eq!(
            get(&router, "/healthz").await,
            (StatusCode::OK, "ok\n".into())
        );
        assert_eq!(
            get(&router, "/readyz").await,
            (StatusCode::OK, "ok\n".into())
        );

        // The token is revoked: not ready (and why), but alive: a restart would not help.
        fake.state().live.clear();
        plugin.probe().await;
        let (status, body) = get(&router, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("token is no longer valid"), "{body}");
        assert_eq!(get(&router, "/healthz").await.0, StatusCode::OK);

        // The socket file is gone (the API server cannot reach the plugin): not alive.
        std::fs::remove_file(&socket).unwrap();
        for path in ["/healthz", "/readyz"] {
            let (status, body) = get(&router, path).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{path}");
            assert!(body.contains("is not served"), "{path}: {body}");
        }
        // Nothing accepts on the socket any more: not alive either.
        server.abort();
        let _ = server.await;
        let _ = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        assert_eq!(
            get(&router, "/healthz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        // The self-checks are not counted as Status requests.
        let metrics = plugin.metrics.encode();
        assert!(!metrics.contains(r#"method="Status""#), "{metrics}");
    }
}
