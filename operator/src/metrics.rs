//! Prometheus metrics, served on `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of a reconcile result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    /// `BaoSecret`, `BaoPolicy`, …
    pub kind: String,
    /// `ok` or the failure reason.
    pub result: String,
}

/// Labels of an OpenBao request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpenBaoLabels {
    /// `login`, `kv_metadata`, `kv_read`, `policy_read`, …
    pub op: String,
    /// `ok` or the error kind.
    pub result: String,
}

/// Labels of a per-object cache.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    /// `last_checks`, `failure_counts`, `tenant_tokens`.
    pub cache: String,
}

/// The operator's metrics.
pub struct Metrics {
    registry: Registry,
    /// Reconciles by kind and result.
    pub reconciles: Family<ReconcileLabels, Counter>,
    /// OpenBao requests by operation and result.
    pub openbao_requests: Family<OpenBaoLabels, Counter>,
    /// Secret writes (create/apply) by BaoSecrets.
    pub secret_writes: Counter,
    /// Workload restarts triggered by data changes.
    pub rollout_restarts: Counter,
    /// 1 while this replica holds the leader Lease.
    pub leader: Gauge,
    /// Entries in each per-object cache (they shrink when objects go).
    pub cached_objects: Family<CacheLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kubebao_operator");
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        let openbao_requests = Family::<OpenBaoLabels, Counter>::default();
        let secret_writes = Counter::default();
        let rollout_restarts = Counter::default();
        let leader = Gauge::default();
        let cached_objects = Family::<CacheLabels, Gauge>::default();
        registry.register(
            "reconciles",
            "Reconciles by kind and result",
            reconciles.clone(),
        );
        registry.register(
            "openbao_requests",
            "OpenBao requests by operation and result",
            openbao_requests.clone(),
        );
        registry.register(
            "secret_writes",
            "Kubernetes Secret writes",
            secret_writes.clone(),
        );
        registry.register(
            "rollout_restarts",
            "Workload restarts after a data change",
            rollout_restarts.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica is the leader",
            leader.clone(),
        );
        registry.register(
            "cached_objects",
            "Entries in each per-object cache (pruned when objects are deleted)",
            cached_objects.clone(),
        );
        Self {
            registry,
            reconciles,
            openbao_requests,
            secret_writes,
            rollout_restarts,
            leader,
            cached_objects,
        }
    }
}

impl Metrics {
    /// Counts one reconcile.
    pub fn reconciled(&self, kind: &str, result: &str) {
        self.reconciles
            .get_or_create(&ReconcileLabels {
                kind: kind.into(),
                result: result.into(),
            })
            .inc();
    }

    /// Sets the size of the per-object cache `cache`.
    pub fn cached(&self, cache: &str, entries: usize) {
        self.cached_objects
            .get_or_create(&CacheLabels {
                cache: cache.into(),
            })
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
    }

    /// Counts one OpenBao request that ended with `result` (`ok` or an error kind).
    pub fn openbao_request(&self, op: &str, result: &str) {
        self.openbao_requests
            .get_or_create(&OpenBaoLabels {
                op: op.into(),
                result: result.into(),
            })
            .inc();
    }

    /// Counts one OpenBao request and passes its result through.
    pub fn openbao<T>(
        &self,
        op: &str,
        r: kubebao_openbao::Result<T>,
    ) -> kubebao_openbao::Result<T> {
        self.openbao_request(
            op,
            match &r {
                Ok(_) => "ok",
                Err(e) => e.kind(),
            },
        );
        r
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("encode metrics");
        out
    }
}
