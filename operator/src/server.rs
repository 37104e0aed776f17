//! `/metrics`, `/healthz` and `/readyz` over HTTP (axum).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use futures::future::BoxFuture;

use crate::metrics::Metrics;

/// What the probes report.
#[derive(Clone)]
pub struct Probes {
    /// Metrics to serve.
    pub metrics: Arc<Metrics>,
    /// Set once start-up (clients, hash key) is done.
    pub ready: Arc<AtomicBool>,
    /// Whether every controller still runs, and whether this replica can do its job.
    pub health: Health,
}

/// A readiness check: `Ok` says what works, `Err` what does not and what to do.
pub type ReadyCheck = Arc<dyn Fn() -> BoxFuture<'static, Result<String, String>> + Send + Sync>;

/// How long one readiness verdict is reused: OpenBao is asked at most this often, however
/// often the probe comes.
const RECHECK: Duration = Duration::from_secs(5);

/// Longest a readiness check may take; a slower one counts as a failure.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// The process's health as the probes tell it. `/healthz` (liveness): fails once a controller
/// has stopped (the process then exits, so Kubernetes restarts it). `/readyz`: whether this
/// replica can do its job now (see [`Health::readiness`]).
#[derive(Clone, Default)]
pub struct Health {
    failed: Arc<Mutex<Option<String>>>,
    ready: Arc<Readiness>,
}

/// The readiness check and its last verdict.
#[derive(Default)]
struct Readiness {
    check: OnceLock<ReadyCheck>,
    verdict: Mutex<Option<Verdict>>,
    checking: AtomicBool,
}

/// One readiness check's result and when it finished.
type Verdict = (Instant, Result<String, String>);

impl Health {
    /// Marks the process unhealthy, saying why.
    pub fn fail(&self, why: &str) {
        *self.failed.lock().expect("health lock") = Some(why.to_string());
    }

    /// The `/healthz` answer: `ok`, or 503 and why not.
    pub fn answer(&self) -> (StatusCode, String) {
        match self.failed.lock().expect("health lock").as_ref() {
            None => (StatusCode::OK, "ok".into()),
            Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why.clone()),
        }
    }

    /// From now on `/readyz` also asks `check` (at most every [`RECHECK`]); set once start-up
    /// is done (the first call wins).
    pub fn ready_with(&self, check: ReadyCheck) {
        let _ = self.ready.check.set(check);
    }

    /// The `/readyz` answer: 503 and why while starting (`started` false), once unhealthy, or
    /// while the readiness check fails; else 200 with what this replica is (`leading`: it runs
    /// the controllers; else a standby ready to take over). The check's verdict is reused for
    /// [`RECHECK`]; a stale one is answered at once while a new check runs in the background,
    /// so a slow OpenBao never makes the probe itself time out.
    pub async fn readiness(&self, started: bool, leading: bool) -> (StatusCode, String) {
        let unavailable = StatusCode::SERVICE_UNAVAILABLE;
        if let Some(why) = self.failed.lock().expect("health lock").clone() {
            return (unavailable, why);
        }
        if !started {
            return (unavailable, "starting: connecting to Kubernetes".into());
        }
        let role = if leading {
            "leading"
        } else {
            "standby, ready to take over"
        };
        let Some(check) = self.ready.check.get().cloned() else {
            return (StatusCode::OK, format!("ok: {role}"));
        };
        let mut verdict = self.verdict();
        let fresh = verdict
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < RECHECK);
        if !fresh && !self.ready.checking.swap(true, Ordering::SeqCst) {
            let ready = self.ready.clone();
            let task = tokio::spawn(async move {
                let result = tokio::time::timeout(CHECK_TIMEOUT, check())
                    .await
                    .unwrap_or_else(|_| {
                        Err(format!(
                            "the readiness check did not finish within {}s",
                            CHECK_TIMEOUT.as_secs()
                        ))
                    });
                *ready.verdict.lock().expect("readiness lock") = Some((Instant::now(), result));
                ready.checking.store(false, Ordering::SeqCst);
            });
            if verdict.is_none() {
                let _ = task.await;
                verdict = self.verdict();
            }
        }
        match verdict {
            None => (unavailable, "checking whether OpenBao answers".into()),
            Some((_, Ok(what))) => (StatusCode::OK, format!("ok: {role}; {what}")),
            Some((_, Err(why))) => (unavailable, format!("not ready ({role}): {why}")),
        }
    }

    fn verdict(&self) -> Option<Verdict> {
        self.ready.verdict.lock().expect("readiness lock").clone()
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

async fn readyz(State(p): State<Probes>) -> (StatusCode, String) {
    let started = p.ready.load(Ordering::SeqCst);
    let leading = p.metrics.leader.get() == 1;
    p.health.readiness(started, leading).await
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

    /// What a test's check answers next.
    type Answer = Arc<Mutex<Result<String, String>>>;

    /// A check whose answer the test sets, counting how often it runs.
    fn switchable() -> (ReadyCheck, Answer, Arc<Mutex<u32>>) {
        let answer = Arc::new(Mutex::new(Ok("OpenBao answers".to_string())));
        let runs = Arc::new(Mutex::new(0));
        let (a, r) = (answer.clone(), runs.clone());
        let check: ReadyCheck = Arc::new(move || {
            *r.lock().unwrap() += 1;
            let answer = a.lock().unwrap().clone();
            Box::pin(async move { answer })
        });
        (check, answer, runs)
    }

    #[tokio::test]
    async fn readyz_says_starting_then_the_role_and_fails_with_the_check() {
        let health = Health::default();
        let (status, body) = health.readiness(false, false).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.starts_with("starting"), "{body}");
        // No check wired: ready once started.
        assert_eq!(
            health.readiness(true, true).await,
            (StatusCode::OK, "ok: leading".into())
        );
        let (check, answer, runs) = switchable();
        health.ready_with(check);
        assert_eq!(
            health.readiness(true, false).await,
            (
                StatusCode::OK,
                "ok: standby, ready to take over; OpenBao answers".into()
            )
        );
        // Within RECHECK the verdict is reused: OpenBao is not asked per probe.
        for _ in 0..5 {
            assert_eq!(health.readiness(true, true).await.0, StatusCode::OK);
        }
        assert_eq!(*runs.lock().unwrap(), 1);
        *answer.lock().unwrap() = Err("OpenBao unreachable".into());
        // Stale: answered from the last verdict while the new check runs, then the new one.
        health.ready.verdict.lock().unwrap().as_mut().unwrap().0 -= RECHECK;
        assert_eq!(health.readiness(true, true).await.0, StatusCode::OK);
        for _ in 0..100 {
            if !health.ready.checking.load(Ordering::SeqCst) {
                break;
            }
            tokio::task::yield_now().await;
        }
        let (status, body) = health.readiness(true, true).await;
        assert_eq!(
            (status, body.as_str()),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready (leading): OpenBao unreachable"
            )
        );
        assert_eq!(*runs.lock().unwrap(), 2);
        // A stopped controller: not ready either, whatever OpenBao says.
        *answer.lock().unwrap() = Ok("OpenBao answers".into());
        health.fail("controller BaoPolicy stopped on its own");
        assert_eq!(
            health.readiness(true, true).await,
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "controller BaoPolicy stopped on its own".into()
            )
        );
    }
}
