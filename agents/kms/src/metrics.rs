//! Prometheus metrics (prometheus-client), served on `/metrics`.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of a gRPC request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Status, Encrypt or Decrypt.
    pub method: &'static str,
    /// gRPC code name, e.g. OK, InvalidArgument.
    pub code: &'static str,
}

/// Labels of a latency histogram for a gRPC method.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    /// Status, Encrypt or Decrypt.
    pub method: &'static str,
}

/// Labels of an OpenBao call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpenBaoLabels {
    /// encrypt, decrypt or read_key.
    pub operation: &'static str,
    /// ok or the error kind (unreachable, sealed, permission_denied, …).
    pub outcome: &'static str,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0,
    ]
    .into_iter()
}

/// All metrics of the plugin.
pub struct Metrics {
    /// gRPC requests by method and code.
    pub requests: Family<RequestLabels, Counter>,
    /// gRPC request latency by method.
    pub request_seconds: Family<MethodLabels, Histogram>,
    /// OpenBao call latency by operation and outcome.
    pub openbao_seconds: Family<OpenBaoLabels, Histogram>,
    /// Seconds left on the OpenBao token (-1 without a token, 0 for a token without expiry).
    pub token_ttl_seconds: Gauge,
    /// Latest Transit key version in the snapshot.
    pub key_version: Gauge,
    /// 1 when Status reports ok.
    pub healthy: Gauge,
    /// OpenBao logins since start.
    pub logins: Gauge,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        let request_seconds = Family::<MethodLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(latency_buckets())
        });
        let openbao_seconds = Family::<OpenBaoLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(latency_buckets())
        });
        let token_ttl_seconds = Gauge::default();
        let key_version = Gauge::default();
        let healthy = Gauge::default();
        let logins = Gauge::default();
        let mut registry = Registry::with_prefix("kubebao_kms");
        registry.register(
            "requests",
            "KMS gRPC requests by method and gRPC code",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "KMS gRPC request latency by method",
            request_seconds.clone(),
        );
        registry.register(
            "openbao_request_duration_seconds",
            "OpenBao call latency by operation and outcome",
            openbao_seconds.clone(),
        );
        registry.register(
            "token_ttl_seconds",
            "Seconds left on the OpenBao token (-1: no token, 0: no expiry)",
            token_ttl_seconds.clone(),
        );
        registry.register(
            "key_version",
            "Latest Transit key version in the key snapshot (0: none yet)",
            key_version.clone(),
        );
        registry.register(
            "healthy",
            "1 when Status reports ok, else 0",
            healthy.clone(),
        );
        registry.register(
            "openbao_logins",
            "OpenBao logins since start",
            logins.clone(),
        );
        Self {
            requests,
            request_seconds,
            openbao_seconds,
            token_ttl_seconds,
            key_version,
            healthy,
            logins,
            registry,
        }
    }

    /// Records one gRPC request.
    pub fn request(&self, method: &'static str, code: tonic::Code, elapsed: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                method,
                code: code_name(code),
            })
            .inc();
        self.request_seconds
            .get_or_create(&MethodLabels { method })
            .observe(elapsed.as_secs_f64());
    }

    /// Records one OpenBao call.
    pub fn openbao(&self, operation: &'static str, outcome: &'static str, elapsed: Duration) {
        self.openbao_seconds
            .get_or_create(&OpenBaoLabels { operation, outcome })
            .observe(elapsed.as_secs_f64());
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The gRPC code's canonical name.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}
