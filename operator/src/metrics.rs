//! Prometheus metrics, served on `/metrics`. The chart's alerts and dashboard use them by name
//! (`charts/kubebao/templates/prometheusrule.yaml`, `charts/kubebao/dashboards/kubebao.json`;
//! `tests/tests/monitoring.rs` checks every name they use is exported here).

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
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

/// Labels of a per-kind metric.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `BaoSecret`, `BaoPolicy` or `KubeBaoInstallation`.
    pub kind: String,
}

/// Labels of a per-object metric.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObjectLabels {
    /// The object's kind.
    pub kind: String,
    /// Its namespace (empty for cluster-scoped kinds).
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// What expires: the credentials a BaoSecret wrote.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Expiry {
    /// An OpenBao lease (dynamic credentials).
    Lease,
    /// A certificate's `notAfter`.
    Certificate,
}

impl Expiry {
    /// The `what` label.
    pub fn label(self) -> &'static str {
        match self {
            Expiry::Lease => "lease",
            Expiry::Certificate => "certificate",
        }
    }
}

/// Labels of an expiry.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExpiryLabels {
    /// The object's kind.
    pub kind: String,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// `lease` or `certificate` ([`Expiry::label`]).
    pub what: String,
}

/// Buckets of the sync duration, in seconds: 1 ms (a no-op) to 60 s (a slow OpenBao or API).
const SYNC_BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

fn sync_histogram() -> Histogram {
    Histogram::new(SYNC_BUCKETS)
}

/// Seconds since the Unix epoch (0 before it: a clock that far off shows as "long ago").
fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
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
    /// How long each reconcile took, by kind.
    sync_duration: Family<KindLabels, Histogram, fn() -> Histogram>,
    /// Unix time of each object's last successful sync.
    last_success: Family<ObjectLabels, Gauge>,
    /// Unix time when the credentials a BaoSecret wrote expire.
    expiry: Family<ExpiryLabels, Gauge>,
    /// The objects that have per-object series, so [`Metrics::forget_gone`] can find the
    /// ones whose object went (a metric family cannot list its label sets).
    objects: Mutex<HashSet<ObjectLabels>>,
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
        let sync_duration = Family::new_with_constructor(sync_histogram as fn() -> Histogram);
        let last_success = Family::<ObjectLabels, Gauge>::default();
        let expiry = Family::<ExpiryLabels, Gauge>::default();
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
        registry.register(
            "sync_duration_seconds",
            "Duration of reconciles by kind, successful or not",
            sync_duration.clone(),
        );
        registry.register(
            "last_success_timestamp_seconds",
            "Unix time of the last successful sync of each object (gone with the object)",
            last_success.clone(),
        );
        registry.register(
            "expiry_timestamp_seconds",
            "Unix time when the credentials a BaoSecret wrote expire (what: lease, certificate)",
            expiry.clone(),
        );
        Self {
            registry,
            reconciles,
            openbao_requests,
            secret_writes,
            rollout_restarts,
            leader,
            cached_objects,
            sync_duration,
            last_success,
            expiry,
            objects: Default::default(),
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

    /// Records one reconcile of `kind` `namespace/name` (namespace empty for cluster-scoped
    /// kinds) that took `elapsed`; `ok` (it ended Ready) also stamps its last success.
    pub fn observe_sync(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
        elapsed: Duration,
        ok: bool,
    ) {
        self.sync_duration
            .get_or_create(&KindLabels { kind: kind.into() })
            .observe(elapsed.as_secs_f64());
        if ok {
            let labels = self.track(kind, namespace, name);
            self.last_success
                .get_or_create(&labels)
                .set(unix_seconds(SystemTime::now()));
        }
    }

    /// Sets when `what` of `kind` `namespace/name` expires; `None` removes it (no such
    /// credentials any more).
    pub fn set_expiry(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
        what: Expiry,
        at: Option<SystemTime>,
    ) {
        let labels = ExpiryLabels {
            kind: kind.into(),
            namespace: namespace.into(),
            name: name.into(),
            what: what.label().into(),
        };
        match at {
            Some(at) => {
                self.track(kind, namespace, name);
                self.expiry.get_or_create(&labels).set(unix_seconds(at));
            }
            None => {
                self.expiry.remove(&labels);
            }
        }
    }

    /// Drops every series of `kind` `namespace/name`, once the object is gone (so no alert
    /// fires for an object that no longer exists).
    pub fn forget(&self, kind: &str, namespace: &str, name: &str) {
        let labels = object(kind, namespace, name);
        self.objects.lock().expect("objects lock").remove(&labels);
        self.last_success.remove(&labels);
        for what in [Expiry::Lease, Expiry::Certificate] {
            self.set_expiry(kind, namespace, name, what, None);
        }
    }

    /// Forgets every object of `kind` for which `live(namespace, name)` is false (for a
    /// controller that sweeps its watch cache rather than seeing each deletion).
    pub fn forget_gone(&self, kind: &str, live: impl Fn(&str, &str) -> bool) {
        let gone: Vec<ObjectLabels> = self
            .objects
            .lock()
            .expect("objects lock")
            .iter()
            .filter(|o| o.kind == kind && !live(&o.namespace, &o.name))
            .cloned()
            .collect();
        for o in gone {
            self.forget(&o.kind, &o.namespace, &o.name);
        }
    }

    /// Remembers that `kind` `namespace/name` has per-object series; returns its labels.
    fn track(&self, kind: &str, namespace: &str, name: &str) -> ObjectLabels {
        let labels = object(kind, namespace, name);
        let mut objects = self.objects.lock().expect("objects lock");
        objects.insert(labels.clone());
        labels
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("encode metrics");
        out
    }
}

fn object(kind: &str, namespace: &str, name: &str) -> ObjectLabels {
    ObjectLabels {
        kind: kind.into(),
        namespace: namespace.into(),
        name: name.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_objects_series_are_exported_after_a_sync_and_gone_after_forget() {
        let m = Metrics::default();
        m.observe_sync("BaoPolicy", "", "p", Duration::from_millis(3), true);
        m.observe_sync("BaoSecret", "team", "db", Duration::from_secs(2), false);
        let soon = SystemTime::now() + Duration::from_secs(600);
        m.set_expiry("BaoSecret", "team", "db", Expiry::Lease, Some(soon));
        m.set_expiry(
            "BaoSecret",
            "team",
            "db",
            Expiry::Certificate,
            Some(UNIX_EPOCH),
        );
        let text = m.encode();
        let at = unix_seconds(soon);
        for series in [
            "kubebao_operator_sync_duration_seconds_bucket{le=\"0.005\",kind=\"BaoPolicy\"} 1",
            "kubebao_operator_sync_duration_seconds_bucket{le=\"1.0\",kind=\"BaoSecret\"} 0",
            "kubebao_operator_sync_duration_seconds_bucket{le=\"2.5\",kind=\"BaoSecret\"} 1",
            "kubebao_operator_sync_duration_seconds_count{kind=\"BaoSecret\"} 1",
            "kubebao_operator_sync_duration_seconds_sum{kind=\"BaoSecret\"} 2.0",
            "kubebao_operator_last_success_timestamp_seconds{kind=\"BaoPolicy\",namespace=\"\",name=\"p\"} ",
            &format!(
                "kubebao_operator_expiry_timestamp_seconds{{kind=\"BaoSecret\",namespace=\"team\",name=\"db\",what=\"lease\"}} {at}"
            ),
            "kubebao_operator_expiry_timestamp_seconds{kind=\"BaoSecret\",namespace=\"team\",name=\"db\",what=\"certificate\"} 0",
        ] {
            assert!(text.contains(series), "{series} missing from:\n{text}");
        }
        // A failed sync stamps no success.
        assert!(!text.contains("name=\"db\"}"), "{text}");
        m.forget("BaoPolicy", "", "p");
        m.forget("BaoSecret", "team", "db");
        let text = m.encode();
        assert!(!text.contains("name=\"p\""), "{text}");
        assert!(!text.contains("name=\"db\""), "{text}");
        // The per-kind durations stay: they describe the controller, not one object.
        assert!(
            text.contains("kubebao_operator_sync_duration_seconds_count{kind=\"BaoPolicy\"} 1")
        );
    }

    #[test]
    fn a_sweep_forgets_only_the_objects_that_are_gone() {
        let m = Metrics::default();
        let now = Some(SystemTime::now());
        for name in ["kept", "gone"] {
            m.observe_sync("BaoSecret", "team", name, Duration::ZERO, true);
        }
        m.set_expiry("BaoSecret", "team", "gone", Expiry::Certificate, now);
        m.observe_sync("BaoPolicy", "", "gone", Duration::ZERO, true);
        m.forget_gone("BaoSecret", |ns, name| ns == "team" && name == "kept");
        let text = m.encode();
        assert!(text.contains("namespace=\"team\",name=\"kept\"}"), "{text}");
        assert!(!text.contains("namespace=\"team\",name=\"gone\""), "{text}");
        // Another kind's object of the same name is not this sweep's business.
        assert!(text.contains("namespace=\"\",name=\"gone\"}"), "{text}");
        assert_eq!(m.objects.lock().unwrap().len(), 2);
    }

    #[test]
    fn a_removed_expiry_is_no_longer_exported() {
        let m = Metrics::default();
        let labels = "{kind=\"BaoSecret\",namespace=\"team\",name=\"db\",what=\"lease\"}";
        m.set_expiry(
            "BaoSecret",
            "team",
            "db",
            Expiry::Lease,
            Some(SystemTime::now()),
        );
        assert!(m.encode().contains(labels));
        m.set_expiry("BaoSecret", "team", "db", Expiry::Lease, None);
        assert!(!m.encode().contains(labels));
    }
}
