//! What every controller shares: Kubernetes and OpenBao clients, the operator's identity, the
//! tenant token cache, metrics, the event recorder and per-object backoff.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::Resource;
use kube::runtime::events::Recorder;
use kubebao_openbao::OpenBao;

use crate::baosecret::Check;
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::server::ReadyCheck;
use crate::tenant::TenantTokens;

/// Operator-wide settings from the command line.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Default Kubernetes auth mount for BaoSecrets and BaoPolicy roles.
    pub auth_mount: String,
    /// Default audience of tenant ServiceAccount tokens.
    pub token_audience: String,
    /// How often BaoPolicies are compared with OpenBao (drift repair).
    pub policy_resync: Duration,
    /// Reconciles running at once per controller.
    pub concurrency: u16,
}

/// Shared state handed to every reconcile.
pub struct Context {
    /// Kubernetes client.
    pub client: kube::Client,
    /// OpenBao client (no token: callers choose the identity).
    pub bao: OpenBao,
    /// The operator's own OpenBao identity (policies and roles only).
    pub identity: Identity,
    /// Tenant tokens for BaoSecrets.
    pub tenants: TenantTokens,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Kubernetes event recorder.
    pub recorder: Recorder,
    /// Key of the status data hash (HMAC-SHA256).
    pub hash_key: Vec<u8>,
    /// Settings.
    pub settings: Settings,
    /// Consecutive failures per object (`kind/namespace/name`), for backoff.
    pub failures: Mutex<HashMap<String, u32>>,
    /// Last successful BaoSecret checks, by `namespace/name`.
    pub checks: Mutex<HashMap<String, Check>>,
}

impl Context {
    /// Records a failure and returns how long to wait before the next attempt:
    /// 5 s doubling to 5 min. Each attempt costs at most one OpenBao request.
    pub fn backoff(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().expect("failures lock");
        let n = failures.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        let secs = 5u64.saturating_mul(1 << (*n - 1).min(6));
        Duration::from_secs(secs.min(300))
    }

    /// Clears the failure count after a success (or once the object is gone).
    pub fn succeeded(&self, key: &str) {
        self.failures.lock().expect("failures lock").remove(key);
    }

    /// Forgets the failure counts of `kind`'s objects that are gone (`live` is false for the
    /// rest of the key after `kind/`).
    pub fn forget_failures(&self, kind: &str, live: impl Fn(&str) -> bool) {
        let prefix = format!("{kind}/");
        self.failures
            .lock()
            .expect("failures lock")
            .retain(|key, _| key.strip_prefix(&prefix).is_none_or(&live));
    }

    /// Publishes how many objects each per-object cache holds, so a leak shows on /metrics.
    pub fn count_cached(&self) {
        let checks = self.checks.lock().expect("checks lock").len();
        let failures = self.failures.lock().expect("failures lock").len();
        self.metrics.cached("last_checks", checks);
        self.metrics.cached("failure_counts", failures);
        self.metrics
            .cached("tenant_tokens", self.tenants.cached_identities());
    }

    /// Whether this replica can do its job in OpenBao: OpenBao answers `lookup-self` for the
    /// operator's own identity (a dead token is replaced at the next check). Ok says so, Err
    /// says what is wrong.
    async fn openbao_ready(&self) -> Result<String, String> {
        let token = self.identity.token().await.map_err(|e| e.to_string())?;
        let looked_up = self.bao.lookup_self(&token).await;
        match self.metrics.openbao("readiness_check", looked_up) {
            Ok(_) => Ok(format!(
                "OpenBao {} answers as the operator's identity",
                self.bao.address()
            )),
            Err(e) => {
                let why = format!(
                    "OpenBao {} does not answer as the operator's identity: {e}",
                    self.bao.address()
                );
                if e.is_permission_denied() {
                    self.identity.denied(&token, e).await;
                }
                Err(why)
            }
        }
    }

    /// `/readyz`'s check for this replica: [`Context::openbao_ready`].
    pub fn ready_check(self: &Arc<Self>) -> ReadyCheck {
        let ctx = self.clone();
        Arc::new(move || {
            let ctx = ctx.clone();
            Box::pin(async move { ctx.openbao_ready().await })
        })
    }

    /// Publishes an event about `obj` (see `events::publish`).
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        warning: bool,
        reason: &str,
        note: String,
    ) {
        crate::events::publish(&self.recorder, obj, warning, reason, note).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use axum::Router;
    use axum::routing::get;
    use kube::runtime::events::Reporter;
    use kubebao_openbao::ClientConfig;

    use crate::identity::IdentitySource;

    /// A fake OpenBao that answers `lookup-self` for any token; stopped by aborting the task.
    async fn fake_openbao() -> (String, tokio::task::JoinHandle<()>) {
        let app = Router::new().route(
            "/v1/auth/token/lookup-self",
            get(|| async {
                let body = serde_json::json!({"data": {
                    "accessor": "a", "policies": ["kubebao-operator"], "ttl": 3600, "renewable": false
                }});
                ([("content-type", "application/json")], body.to_string())
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (addr, task)
    }

    /// A context with no API server behind it and OpenBao at `openbao`, identity a token file.
    fn context(openbao: &str, dir: &std::path::Path) -> Arc<Context> {
        kubebao_openbao::install_crypto_provider();
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        let bao = OpenBao::new(&ClientConfig {
            address: openbao.into(),
            allow_plain_http: true,
            timeout: Some(Duration::from_secs(2)),
            ..Default::default()
        })
        .unwrap();
        let token = dir.join("token");
        std::fs::write(&token, "operator-token").unwrap();
        let metrics = Arc::new(Metrics::default());
        let reporter = Reporter {
            controller: "test".into(),
            instance: None,
        };
        Arc::new(Context {
            identity: Identity::new(
                bao.clone(),
                client.clone(),
                IdentitySource::TokenFile(token),
            ),
            recorder: Recorder::new(client.clone(), reporter),
            client,
            bao,
            tenants: TenantTokens::new(metrics.clone()),
            metrics,
            hash_key: vec![0; 32],
            settings: Settings {
                auth_mount: "kubernetes".into(),
                token_audience: "openbao".into(),
                policy_resync: Duration::from_secs(300),
                concurrency: 1,
            },
            failures: Default::default(),
            checks: Default::default(),
        })
    }

    #[tokio::test]
    async fn failure_counts_of_deleted_objects_are_forgotten_and_the_caches_counted() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context("http://127.0.0.1:9", dir.path());
        for key in ["BaoSecret/team/a", "BaoSecret/team/b", "BaoPolicy/p"] {
            ctx.backoff(key);
        }
        ctx.count_cached();
        let gauge = |cache: &str| format!("kubebao_operator_cached_objects{{cache=\"{cache}\"}} ");
        assert!(
            ctx.metrics
                .encode()
                .contains(&format!("{}3", gauge("failure_counts")))
        );
        // Only BaoSecret team/a is left: team/b's count goes, the BaoPolicy's stays.
        ctx.forget_failures("BaoSecret", |key| key == "team/a");
        let mut left: Vec<String> = ctx.failures.lock().unwrap().keys().cloned().collect();
        left.sort();
        assert_eq!(left, ["BaoPolicy/p", "BaoSecret/team/a"]);
        ctx.count_cached();
        let text = ctx.metrics.encode();
        for (cache, n) in [
            ("failure_counts", 2),
            ("last_checks", 0),
            ("tenant_tokens", 0),
        ] {
            assert!(
                text.contains(&format!("{}{n}", gauge(cache))),
                "{cache}: {text}"
            );
        }
    }

    #[tokio::test]
    async fn ready_only_while_openbao_answers_as_the_operator() {
        let dir = tempfile::tempdir().unwrap();
        let (addr, server) = fake_openbao().await;
        let ctx = context(&addr, dir.path());
        let check = ctx.ready_check();
        let ok = check().await.unwrap();
        assert_eq!(
            ok,
            format!("OpenBao {addr} answers as the operator's identity")
        );
        server.abort();
        let _ = server.await;
        let why = check().await.unwrap_err();
        assert!(
            why.starts_with(&format!(
                "OpenBao {addr} does not answer as the operator's identity: "
            )),
            "{why}"
        );
        assert!(!why.contains("operator-token"), "{why}");
    }
}
