//! Serving: the unix socket (mode 0600, stale-socket handling, removal on shutdown), the
//! metrics/health HTTP endpoint, the background probe and token upkeep.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use kubebao_openbao::{OpenBao, Session};
use kubebao_proto::kms::key_management_service_server::KeyManagementServiceServer;
use tokio_stream::wrappers::UnixListenerStream;

use crate::config::Config;
use crate::plugin::{Health, KmsService, Plugin, PluginSettings};

/// How long in-flight requests may take to finish after SIGTERM.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

async fn metrics(State(plugin): State<Arc<Plugin>>) -> ([(&'static str, &'static str); 1], String) {
    plugin.update_token_metrics();
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        plugin.metrics.encode(),
    )
}

async fn readyz(State(plugin): State<Arc<Plugin>>) -> (StatusCode, String) {
    match plugin.health() {
        Health::Ok => (StatusCode::OK, "ok\n".into()),
        h => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}\n", h.healthz()),
        ),
    }
}

/// The HTTP router for /metrics, /healthz and /readyz.
pub fn http_router(plugin: Arc<Plugin>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        // Alive as long as the process serves HTTP: an OpenBao outage must not get the
        // plugin restarted (it recovers by itself); /readyz tells whether it can serve.
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(plugin)
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
        axum::serve(http, http_router(plugin.clone()))
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
        .add_service(KeyManagementServiceServer::new(KmsService(plugin.clone())))
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
