//! Serving: the unix socket (mode 0600, stale-socket handling, removal on shutdown), the
//! metrics/health HTTP endpoint, the background probe and token upkeep.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use kubebao_openbao::{OpenBao, Session};
use kubebao_proto::kms::key_management_service_server::KeyManagementServiceServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::config::Config;
use crate::plugin::{Health, KmsService, Plugin, PluginSettings};

/// How long in-flight requests may take to finish after SIGTERM.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Prepares the socket path: creates the directory, and removes an old socket only when
/// nothing accepts connections on it (another plugin may be serving there).
pub fn clear_stale_socket(path: &Path) -> Result<(), String> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create socket directory {}: {e}", dir.display()))?;
    }
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot inspect {}: {e}", path.display())),
    };
    if !meta.file_type().is_socket() {
        return Err(format!(
            "{} exists and is not a socket; refusing to remove it (choose another --socket or remove it yourself)",
            path.display()
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(format!(
            "another process is serving on {}; stop it first or choose another --socket",
            path.display()
        )),
        Err(_) => {
            tracing::info!(socket = %path.display(), "removing stale socket (nothing listens on it)");
            std::fs::remove_file(path)
                .map_err(|e| format!("cannot remove stale socket {}: {e}", path.display()))
        }
    }
}

/// Binds the socket with mode 0600 without a window where it is reachable with a wider mode:
/// bind under a temporary name, chmod, then rename into place (atomic on one file system).
pub fn bind_socket(path: &Path) -> Result<UnixListener, String> {
    clear_stale_socket(path)?;
    let file_name = path
        .file_name()
        .ok_or_else(|| format!("--socket {} has no file name", path.display()))?;
    let tmp: PathBuf = path.with_file_name(format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    let done = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = done {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("cannot set up socket {}: {e}", path.display()));
    }
    Ok(listener)
}

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
    let listener = bind_socket(&config.socket)?;
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
