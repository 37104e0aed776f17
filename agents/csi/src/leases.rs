//! Dynamic secrets (database credentials, PKI certificates with a lease) kept per pod while
//! their lease lives, so the driver's rotation polls get the same credentials instead of new
//! ones each time.
//!
//! - **Renewed in the background** at 2/3 of the lease's duration (`sys/leases/renew`), while
//!   the pod keeps mounting (served within `RENEW_IDLE`), not only when a poll comes.
//! - **Never served once dead.** Before a kept lease is served, OpenBao confirms it still lives
//!   (`sys/leases/lookup`, one small request); a lease OpenBao no longer knows (revoked, or its
//!   token revoked) is dropped and the Mount reads fresh credentials. A renewal that fails drops
//!   the lease at once, as does reaching the end of its life (the last tenth, at least 10 s, at
//!   most a quarter: below the third left when a renewal is due).
//! - **Bounded:** at most `MAX_LEASES` entries holding `MAX_LEASE_BYTES` of data; an evicted
//!   entry's renewal stops with it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;
use kubebao_openbao::{Error as BaoError, OpenBao, Secret, SecretString};
use serde_json::{Map, Value, json};

use crate::bounded::BoundedMap;
use crate::identity::IdentityKey;
use crate::metrics::Metrics;
use crate::params::RequestKey;

/// Most leases kept.
pub const MAX_LEASES: usize = 4096;
/// Most bytes of secret data kept for leases.
pub const MAX_LEASE_BYTES: usize = 16 * 1024 * 1024;
/// A lease not served for this long is no longer renewed (its pod is likely gone).
pub const RENEW_IDLE: Duration = Duration::from_secs(600);

/// One pod's dynamic secret: pods never share credentials.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct LeaseKey {
    /// The pod.
    pub pod_uid: String,
    /// Who read it.
    pub identity: IdentityKey,
    /// What was read.
    pub request: RequestKey,
}

#[derive(Clone)]
struct Entry {
    data: Arc<Map<String, Value>>,
    lease_id: String,
    /// The duration the lease was first granted: what renewals ask for.
    duration: Duration,
    /// Served no longer once this close to its end.
    floor: Duration,
    renewed_at: Instant,
    expires_at: Instant,
    served_at: Instant,
    _renewal: Option<Arc<Renewal>>,
}

/// Stops the background renewal when the last copy of its entry goes (evicted, dropped).
struct Renewal(tokio::task::AbortHandle);

impl Drop for Renewal {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The leases kept for pods.
pub struct Leases {
    map: Arc<BoundedMap<LeaseKey, Entry>>,
    metrics: Arc<Metrics>,
}

impl Leases {
    /// An empty cache.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            map: Arc::new(BoundedMap::new(MAX_LEASES, MAX_LEASE_BYTES)),
            metrics,
        }
    }

    /// Leases kept.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when none is kept.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The data kept for `key` once OpenBao confirmed its lease lives; Ok(None) when there is
    /// none (or it was just dropped): read fresh. Err when OpenBao cannot say (unavailable).
    pub async fn serve(
        &self,
        client: &OpenBao,
        token: &SecretString,
        key: &LeaseKey,
    ) -> Result<Option<Map<String, Value>>, BaoError> {
        let Some(entry) = self.map.get(key) else {
            return Ok(None);
        };
        let now = Instant::now();
        if entry.expires_at.saturating_duration_since(now) <= entry.floor {
            self.drop_lease(key, &entry.lease_id);
            return Ok(None);
        }
        self.metrics.openbao("lookup_lease");
        let body = json!({ "lease_id": entry.lease_id });
        let ttl = match client
            .call(Method::PUT, "sys/leases/lookup", Some(token), Some(&body))
            .await
        {
            Ok(s) => remaining(&s),
            Err(e) if e.is_unavailable() => return Err(e),
            // 400 "invalid lease" (revoked, expired), or no longer allowed to look it up.
            Err(_) => Duration::ZERO,
        };
        if ttl <= entry.floor {
            self.drop_lease(key, &entry.lease_id);
            return Ok(None);
        }
        self.map.update(key, |e| {
            if e.lease_id == entry.lease_id {
                e.expires_at = now + ttl;
                e.served_at = now;
            }
        });
        Metrics::count(&self.metrics.lease_cache, "hit");
        Ok(Some(entry.data.as_ref().clone()))
    }

    /// Keeps a dynamic secret just read with `token`, and renews it in the background.
    pub fn keep(
        &self,
        key: LeaseKey,
        client: &OpenBao,
        token: &SecretString,
        secret: &Secret,
        data: &Map<String, Value>,
    ) {
        if secret.lease_id.is_empty() || secret.lease_duration == 0 {
            return;
        }
        Metrics::count(&self.metrics.lease_cache, "miss");
        let now = Instant::now();
        let duration = Duration::from_secs(secret.lease_duration);
        let renewal = secret.renewable.then(|| {
            let task = tokio::spawn(renew_loop(
                self.map.clone(),
                self.metrics.clone(),
                key.clone(),
                secret.lease_id.clone(),
                client.clone(),
                token.clone(),
            ));
            Arc::new(Renewal(task.abort_handle()))
        });
        let weight = 256 + secret.lease_id.len() + Value::Object(data.clone()).to_string().len();
        let entry = Entry {
            data: Arc::new(data.clone()),
            lease_id: secret.lease_id.clone(),
            duration,
            // Below the 1/3 left at a renewal, so a renewing lease is always served.
            floor: (duration / 10)
                .max(Duration::from_secs(10))
                .min(duration / 4),
            renewed_at: now,
            expires_at: now + duration,
            served_at: now,
            _renewal: renewal,
        };
        self.map.insert(key, entry, weight);
    }

    fn drop_lease(&self, key: &LeaseKey, lease_id: &str) {
        if self
            .map
            .remove_if(key, |e| e.lease_id == lease_id)
            .is_some()
        {
            Metrics::count(&self.metrics.lease_cache, "dropped");
        }
    }
}

/// The seconds OpenBao says a lease has left (`ttl` of `sys/leases/lookup`).
fn remaining(s: &Secret) -> Duration {
    let ttl = s.data.as_ref().and_then(|d| d.get("ttl")).and_then(|t| {
        t.as_u64().or_else(|| {
            t.as_str()
                .and_then(|s| s.trim_end_matches('s').parse().ok())
        })
    });
    Duration::from_secs(ttl.unwrap_or(0))
}

/// Renews `lease_id` at 2/3 of its duration for as long as its entry is kept and served;
/// drops the entry when a renewal fails or grants too little to serve it.
async fn renew_loop(
    map: Arc<BoundedMap<LeaseKey, Entry>>,
    metrics: Arc<Metrics>,
    key: LeaseKey,
    lease_id: String,
    client: OpenBao,
    token: SecretString,
) {
    // Only copies of the entry's fields are held across a sleep: the task must not keep its
    // own entry (and so its abort handle) alive once the cache let it go.
    let field = |f: fn(&Entry) -> (Instant, Duration, Duration)| {
        map.peek(&key)
            .filter(|e| e.lease_id == lease_id)
            .map(|e| f(&e))
    };
    loop {
        let Some((renewed_at, granted, _)) =
            field(|e| (e.renewed_at, e.expires_at - e.renewed_at, e.floor))
        else {
            return;
        };
        tokio::time::sleep_until((renewed_at + granted * 2 / 3).into()).await;
        let Some((served_at, duration, floor)) = field(|e| (e.served_at, e.duration, e.floor))
        else {
            return;
        };
        if served_at.elapsed() > RENEW_IDLE {
            return;
        }
        metrics.openbao("renew");
        let renewed = client
            .renew_lease(&token, &lease_id, duration)
            .await
            .map(|s| Duration::from_secs(s.lease_duration));
        match renewed {
            Ok(granted) if granted > floor => {
                Metrics::count(&metrics.lease_cache, "renewed");
                let now = Instant::now();
                map.update(&key, |e| {
                    if e.lease_id == lease_id {
                        e.renewed_at = now;
                        e.expires_at = now + granted;
                    }
                });
            }
            other => {
                if let Err(e) = &other {
                    tracing::debug!(error = %e, "lease renewal failed; the next Mount reads fresh credentials");
                }
                if map.remove_if(&key, |e| e.lease_id == lease_id).is_some() {
                    Metrics::count(&metrics.lease_cache, "dropped");
                }
                return;
            }
        }
    }
}
