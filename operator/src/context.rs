//! What every controller shares: Kubernetes and OpenBao clients, the operator's identity, the
//! tenant token cache, metrics, the event recorder and per-object backoff.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};
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

    /// Publishes an event about `obj` (failures to publish are logged, not fatal).
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        warning: bool,
        reason: &str,
        note: String,
    ) {
        let ev = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::warn!(object = %obj.name_any(), error = %e, "cannot publish event");
        }
    }
}

/// Parses a Go-style duration (`90s`, `5m`, `1h30m`, `500ms`, `1.5h`).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let (unit, len) = if rest.starts_with("ms") {
            (0.001, 2)
        } else if rest.starts_with('s') {
            (1.0, 1)
        } else if rest.starts_with('m') {
            (60.0, 1)
        } else if rest.starts_with('h') {
            (3600.0, 1)
        } else {
            return None;
        };
        total += number * unit;
        rest = &rest[len..];
    }
    Some(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn parses_go_durations() {
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1d"), None);
        assert_eq!(parse_duration(""), None);
    }
}
