//! Prometheus metrics, served on `/metrics`.

use kubebao_openbao::TokenEvent;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// One label named `result`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `ok` or an error code.
    pub result: String,
}

/// One label named `kind`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// What was asked.
    pub kind: String,
}

/// The agent's metrics.
pub struct Metrics {
    registry: Registry,
    /// Mounts by result (`ok` or the error code).
    pub mounts: Family<ResultLabel, Counter>,
    /// Mount latency.
    pub mount_seconds: Histogram,
    /// HTTP requests to OpenBao by kind (login, read, write, renew and lookup_lease for
    /// dynamic secrets' leases; renew_token, lookup_token, revoke_token for the pods' OpenBao
    /// tokens).
    pub openbao_requests: Family<KindLabel, Counter>,
    /// OpenBao token cache lookups by result (hit, miss).
    pub token_cache: Family<ResultLabel, Counter>,
    /// Kubernetes-auth logins by result (ok, refused, error).
    pub logins: Family<ResultLabel, Counter>,
    /// Dynamic-secret lease cache events by result (hit, miss, renewed; dropped: renewal
    /// failed, OpenBao no longer knows the lease, or it is near its end).
    pub lease_cache: Family<ResultLabel, Counter>,
    /// TokenRequests to the Kubernetes API by result.
    pub token_requests: Family<ResultLabel, Counter>,
    /// TokenReviews of the ServiceAccount tokens the driver sends, by result (ok, refused, error).
    pub token_reviews: Family<ResultLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric under the `kubebao_csi` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kubebao_csi");
        let mounts = Family::<ResultLabel, Counter>::default();
        registry.register("mounts", "Mount calls by result", mounts.clone());
        let mount_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "mount_duration_seconds",
            "Mount latency",
            mount_seconds.clone(),
        );
        let openbao_requests = Family::<KindLabel, Counter>::default();
        registry.register(
            "openbao_requests",
            "HTTP requests sent to OpenBao by kind",
            openbao_requests.clone(),
        );
        let token_cache = Family::<ResultLabel, Counter>::default();
        registry.register(
            "token_cache",
            "OpenBao token cache lookups by result",
            token_cache.clone(),
        );
        let logins = Family::<ResultLabel, Counter>::default();
        registry.register(
            "logins",
            "OpenBao Kubernetes-auth logins by result",
            logins.clone(),
        );
        let lease_cache = Family::<ResultLabel, Counter>::default();
        registry.register(
            "lease_cache",
            "Dynamic secret lease cache events by result",
            lease_cache.clone(),
        );
        let token_requests = Family::<ResultLabel, Counter>::default();
        registry.register(
            "token_requests",
            "Kubernetes TokenRequests for pods by result",
            token_requests.clone(),
        );
        let token_reviews = Family::<ResultLabel, Counter>::default();
        registry.register(
            "token_reviews",
            "TokenReviews of the ServiceAccount tokens sent by the driver, by result",
            token_reviews.clone(),
        );
        Self {
            registry,
            mounts,
            mount_seconds,
            openbao_requests,
            token_cache,
            logins,
            lease_cache,
            token_requests,
            token_reviews,
        }
    }

    /// Counts an OpenBao request of `kind`.
    pub fn openbao(&self, kind: &str) {
        self.openbao_requests
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc();
    }

    /// Counts what the token cache did: cache hits and misses, logins by result (`refused`:
    /// OpenBao said no or the auth mount does not exist), and every OpenBao request it sent.
    pub fn token_event(&self, event: &TokenEvent<'_>) {
        match event {
            TokenEvent::Hit => Self::count(&self.token_cache, "hit"),
            TokenEvent::Miss => Self::count(&self.token_cache, "miss"),
            TokenEvent::LoggedIn => {
                self.openbao("login");
                Self::count(&self.logins, "ok");
            }
            TokenEvent::LoginFailed(e) => {
                self.openbao("login");
                let refused = e.is_permission_denied() || e.is_not_found();
                Self::count(&self.logins, if refused { "refused" } else { "error" });
            }
            TokenEvent::Renewed | TokenEvent::RenewalFailed(_) => self.openbao("renew_token"),
            TokenEvent::Checked(_) => self.openbao("lookup_token"),
            TokenEvent::Revoked(_) => self.openbao("revoke_token"),
            _ => {}
        }
    }

    /// Increments `family{result}`.
    pub fn count(family: &Family<ResultLabel, Counter>, result: &str) {
        family
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
