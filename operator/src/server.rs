//! `/metrics`, `/healthz` and `/readyz` over HTTP (axum).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::metrics::Metrics;

/// What the probes report.
#[derive(Clone)]
pub struct Probes {
    /// Metrics to serve.
    pub metrics: Arc<Metrics>,
    /// Set once start-up (clients, hash key) is done.
    pub ready: Arc<AtomicBool>,
    /// Whether every controller still runs.
    pub health: Health,
}

/// Whether the process still does its work: once a controller has stopped, `/healthz` fails
/// (and the process exits, so Kubernetes restarts it).
#[derive(Clone, Default)]
pub struct Health(Arc<Mutex<Option<String>>>);

impl Health {
    /// Marks the process unhealthy, saying why.
    pub fn fail(&self, why: &str) {
        *self.0.lock().expect("health lock") = Some(why.to_string());
    }

    /// The `/healthz` answer: `ok`, or 503 and why not.
    pub fn answer(&self) -> (StatusCode, String) {
        match self.0.lock().expect("health lock").as_ref() {
            None => (StatusCode::OK, "ok".into()),
            Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why.clone()),
        }
    }
}

async fn metrics(
    State(p): State<Probes>,
) -> (StatusCode, [(&'static str, &'static str); 1], String) {
    (
        StatusCode::OK,
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        p.metrics.encode(),
    )
}

async fn readyz(State(p): State<Probes>) -> (StatusCode, &'static str) {
    if p.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}

/// Serves the endpoints until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    probes: Probes,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route(
            "/healthz",
            get(|State(p): State<Probes>| async move { p.health.answer() }),
        )
        .route("/readyz", get(readyz))
        .with_state(probes);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthz_fails_once_a_controller_stopped() {
        let health = Health::default();
        assert_eq!(health.answer(), (StatusCode::OK, "ok".into()));
        health.clone().fail("controller BaoSecret panicked: bug");
        assert_eq!(
            health.answer(),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "controller BaoSecret panicked: bug".into()
            )
        );
    }
}
