//! What every controller shares: Kubernetes and OpenBao clients, the operator's identity, the
//! tenant token cache, metrics, the event recorder and per-object backoff.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use kube::Resource;
use kube::runtime::events::Recorder;
use kubebao_openbao::OpenBao;

use crate::baosecret::Check;
use crate::identity::Identity;
use crate::metrics::Metrics;
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
    pub metrics: std::sync::Arc<Metrics>,
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

    /// Clears the failure count after a success.
    pub fn succeeded(&self, key: &str) {
        self.failures.lock().expect("failures lock").remove(key);
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
