//! The KMS v2 service: Status from the cached key snapshot, Encrypt and Decrypt through Transit.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use kubebao_openbao::{Error as BaoError, SecretString, Session, TransitKey};
use kubebao_proto::kms::key_management_service_server::KeyManagementService;
use kubebao_proto::kms::{
    DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, StatusRequest, StatusResponse,
};
use tonic::{Code, Request, Response, Status};

use crate::envelope::{self, MAX_PLAINTEXT, Refusal};
pub use crate::health::Health;
use crate::health::{credentials_problem, token_refused};
use crate::metrics::Metrics;

/// What the plugin knows about the Transit key, refreshed by the probe.
#[derive(Clone, Debug)]
pub struct KeySnapshot {
    /// Version Encrypt uses.
    pub latest_version: u64,
    /// key_id of `latest_version`.
    pub current_key_id: String,
    /// key_id → version for every version Decrypt still allows.
    pub decryptable: BTreeMap<String, u64>,
}

impl KeySnapshot {
    /// Builds a snapshot from key metadata; fails when the key cannot serve KMS.
    pub fn from_key(mount: &str, key: &TransitKey) -> Result<Self, Health> {
        if !key.supports_encryption {
            return Err(Health::KeyUnusable(format!(
                "Transit key {mount}/{} (type {}) does not support encryption; use aes256-gcm96",
                key.name, key.key_type
            )));
        }
        if key.latest_version == 0 || key.latest_version < key.min_encryption_version {
            return Err(Health::KeyUnusable(format!(
                "Transit key {mount}/{} has no version usable for encryption",
                key.name
            )));
        }
        // OpenBao lists exactly the versions that can still decrypt, with creation times.
        let decryptable: BTreeMap<String, u64> = key
            .versions
            .iter()
            .filter(|v| v.version >= key.min_decryption_version)
            .map(|v| {
                (
                    envelope::key_id(mount, &key.name, v.version, &v.created),
                    v.version,
                )
            })
            .collect();
        let current_key_id = decryptable
            .iter()
            .find(|(_, v)| **v == key.latest_version)
            .map(|(id, _)| id.clone())
            .ok_or_else(|| {
                Health::KeyUnusable(format!(
                    "Transit key {mount}/{} does not list its latest version {}",
                    key.name, key.latest_version
                ))
            })?;
        Ok(Self {
            current_key_id,
            latest_version: key.latest_version,
            decryptable,
        })
    }
}

/// Settings the service needs.
#[derive(Clone, Debug)]
pub struct PluginSettings {
    /// Transit mount.
    pub mount: String,
    /// Transit key.
    pub key: String,
    /// Associated-data context.
    pub aad_context: String,
}

struct Cache {
    snapshot: Option<Arc<KeySnapshot>>,
    health: Health,
}

/// While unhealthy, the probe re-checks OpenBao after this pause, doubling up to
/// [`RECHECK_MAX`]: a recovery shows within about a second, whatever the probe interval.
const RECHECK_FIRST: Duration = Duration::from_millis(250);
/// Longest pause between two probes while unhealthy.
const RECHECK_MAX: Duration = Duration::from_secs(1);
/// Shortest time between two key reads caused by Decrypt requests with an unknown key_id: a
/// stream of made-up key_ids costs OpenBao at most one key read per interval.
pub const UNKNOWN_KEY_REFRESH: Duration = Duration::from_secs(1);
/// gRPC metadata key marking the plugin's own liveness check (a Status call over its socket),
/// which the request metrics leave out.
pub const SELF_CHECK: &str = "x-kubebao-self-check";

/// The KMS plugin state shared by the gRPC service, the probe and the HTTP endpoints.
pub struct Plugin {
    session: Session,
    settings: PluginSettings,
    cache: RwLock<Cache>,
    /// Wakes the probe when the plugin stops being healthy, so it re-checks on the short
    /// backoff instead of sleeping out the probe interval.
    wake: tokio::sync::Notify,
    /// When the last key read for an unknown key_id started. Held while one runs, so
    /// concurrent requests share it.
    refresh: tokio::sync::Mutex<Option<Instant>>,
    /// Metrics.
    pub metrics: Metrics,
}

impl Plugin {
    /// A plugin with no snapshot yet (Status reports "starting" until the first probe).
    pub fn new(session: Session, settings: PluginSettings) -> Arc<Self> {
        Arc::new(Self {
            session,
            settings,
            cache: RwLock::new(Cache {
                snapshot: None,
                health: Health::Starting,
            }),
            wake: tokio::sync::Notify::new(),
            refresh: tokio::sync::Mutex::new(None),
            metrics: Metrics::new(),
        })
    }

    /// Current health.
    pub fn health(&self) -> Health {
        self.cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .health
            .clone()
    }

    /// Current snapshot.
    pub fn snapshot(&self) -> Option<Arc<KeySnapshot>> {
        self.cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .snapshot
            .clone()
    }

    fn set(&self, snapshot: Option<KeySnapshot>, health: Health) {
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = snapshot {
            if cache
                .snapshot
                .as_ref()
                .is_none_or(|old| old.current_key_id != s.current_key_id)
            {
                tracing::info!(key_id = %s.current_key_id, key_version = s.latest_version, "key snapshot updated");
            }
            self.metrics.key_version.set(s.latest_version as i64);
            cache.snapshot = Some(Arc::new(s));
        }
        if cache.health != health {
            if health == Health::Ok {
                tracing::info!("healthy");
            } else {
                tracing::warn!(reason = %health.healthz(), "unhealthy");
                if cache.health == Health::Ok {
                    self.wake.notify_one();
                }
            }
        }
        self.metrics.healthy.set(i64::from(health == Health::Ok));
        cache.health = health;
    }

    /// The reason an OpenBao error gives (a refused token worded for our credential source).
    fn health_for(&self, e: &BaoError) -> Health {
        Health::from_error(e, self.session.source(), self.logged_in_before())
    }

    fn logged_in_before(&self) -> bool {
        self.session.status().logins > 0
    }

    /// Maps an OpenBao error to the gRPC status the API server acts on.
    fn status_for(&self, e: &BaoError, what: &str) -> Status {
        if token_refused(e) {
            let problem = credentials_problem(e, self.session.source(), self.logged_in_before());
            return Status::failed_precondition(format!("{what}: {problem}"));
        }
        let msg = format!("{what}: {e}");
        match e {
            BaoError::Unreachable { .. } | BaoError::Sealed { .. } | BaoError::Server { .. } => {
                Status::unavailable(msg)
            }
            BaoError::PermissionDenied { .. } => {
                Status::permission_denied(format!("{what}: permission denied by policy: {e}"))
            }
            BaoError::Invalid { .. } => Status::invalid_argument(msg),
            BaoError::NotFound { .. } => Status::failed_precondition(msg),
            BaoError::BadResponse { .. } | BaoError::Config(_) => Status::internal(msg),
        }
    }

    /// One Transit call with the session's token: records its latency and result, and lets a
    /// failure that says OpenBao is down, sealed or refusing us show in Status at once (the
    /// next successful probe clears it).
    async fn transit<T, F, Fut>(&self, op: &'static str, call: F) -> Result<T, BaoError>
    where
        F: Fn(SecretString) -> Fut,
        Fut: std::future::Future<Output = Result<T, BaoError>>,
    {
        let started = Instant::now();
        let result = self.session.with_token(call).await;
        self.metrics.openbao(
            op,
            result.as_ref().map_or_else(|e| e.kind(), |_| "ok"),
            started.elapsed(),
        );
        if let Err(e) = &result
            && (e.is_unavailable() || e.is_permission_denied())
        {
            self.set(None, self.health_for(e));
        }
        result
    }

    /// Reads the key once and updates snapshot and health.
    pub async fn probe(&self) {
        if let Err(e) = self.session.token().await {
            return self.set(None, self.health_for(&e));
        }
        let (mount, key) = (&self.settings.mount, &self.settings.key);
        let client = self.session.client();
        let started = Instant::now();
        // A 403 is checked by the session: a dead token is replaced (or named), a live one
        // comes back as the policy's 403.
        let result = self
            .session
            .with_token(|t| async move { client.transit_key(&t, mount, key).await })
            .await;
        self.metrics.openbao(
            "read_key",
            result.as_ref().map_or_else(|e| e.kind(), |_| "ok"),
            started.elapsed(),
        );
        match result {
            Ok(k) => match KeySnapshot::from_key(mount, &k) {
                Ok(s) => self.set(Some(s), Health::Ok),
                Err(h) => self.set(None, h),
            },
            Err(e) => self.set(None, self.health_for(&e)),
        }
    }

    /// Probes forever: every `interval` while healthy; while not, on a short backoff (at
    /// most [`RECHECK_MAX`]), so recovery shows within about a second without waiting for a
    /// Status call. A request that sees OpenBao fail wakes it at once.
    pub async fn run_probe(self: Arc<Self>, interval: Duration) {
        let mut recheck = RECHECK_FIRST;
        loop {
            self.probe().await;
            self.update_token_metrics();
            let wait = if self.health() == Health::Ok {
                recheck = RECHECK_FIRST;
                interval
            } else {
                let wait = recheck.min(interval);
                recheck = (recheck * 2).min(RECHECK_MAX);
                wait
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.wake.notified() => {}
            }
        }
    }

    /// Refreshes the token gauges.
    pub fn update_token_metrics(&self) {
        let st = self.session.status();
        let ttl = match (st.has_token, st.ttl_remaining) {
            (false, _) => -1,
            (true, None) => 0,
            (true, Some(d)) => d.as_secs() as i64,
        };
        self.metrics.token_ttl_seconds.set(ttl);
        self.metrics.logins.set(st.logins as i64);
    }

    fn status_now(&self) -> StatusResponse {
        let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
        StatusResponse {
            version: "v2".into(),
            healthz: cache.health.healthz(),
            key_id: cache
                .snapshot
                .as_ref()
                .map(|s| s.current_key_id.clone())
                .unwrap_or_default(),
        }
    }

    fn no_snapshot(&self) -> Status {
        Status::unavailable(format!("no key snapshot yet ({})", self.health().healthz()))
    }

    async fn encrypt_inner(&self, plaintext: &[u8]) -> Result<EncryptResponse, Status> {
        if plaintext.is_empty() {
            return Err(Status::invalid_argument("plaintext is empty"));
        }
        if plaintext.len() > MAX_PLAINTEXT {
            return Err(Status::invalid_argument(format!(
                "plaintext is {} bytes, over the {MAX_PLAINTEXT}-byte limit (the API server sends a 32-byte seed)",
                plaintext.len()
            )));
        }
        let snapshot = self.snapshot().ok_or_else(|| self.no_snapshot())?;
        let version = snapshot.latest_version;
        let key_id = snapshot.current_key_id.clone();
        let ad = envelope::associated_data(&key_id, &self.settings.aad_context);
        let (mount, key) = (&self.settings.mount, &self.settings.key);
        let ciphertext = self
            .transit("encrypt", |t| {
                let ad = ad.clone();
                async move {
                    self.session
                        .client()
                        .transit_encrypt(&t, mount, key, plaintext, Some(version), Some(&ad))
                        .await
                }
            })
            .await
            .map_err(|e| self.status_for(&e, "Transit encrypt failed"))?;
        if ciphertext.len() > envelope::MAX_CIPHERTEXT {
            return Err(Status::internal(
                "Transit returned a ciphertext over the API server's 1 KiB limit",
            ));
        }
        Ok(EncryptResponse {
            ciphertext: ciphertext.into_bytes(),
            key_id,
            annotations: envelope::annotations(version).into_iter().collect(),
        })
    }

    async fn decrypt_inner(&self, req: &DecryptRequest) -> Result<DecryptResponse, Status> {
        let refuse = |r: Refusal| Status::invalid_argument(r.to_string());
        envelope::check_request(&req.ciphertext, &req.key_id).map_err(refuse)?;
        let snapshot = self.snapshot().ok_or_else(|| self.no_snapshot())?;
        let version = match snapshot.decryptable.get(&req.key_id) {
            Some(v) => *v,
            None => self.version_after_refresh(&snapshot, &req.key_id).await?,
        };
        envelope::check_annotations(&req.annotations, version).map_err(refuse)?;
        let ciphertext = envelope::check_ciphertext(&req.ciphertext, version).map_err(refuse)?;
        let ad = envelope::associated_data(&req.key_id, &self.settings.aad_context);
        let (mount, key) = (&self.settings.mount, &self.settings.key);
        let plaintext = self
            .transit("decrypt", |t| {
                let ad = ad.clone();
                async move {
                    self.session
                        .client()
                        .transit_decrypt(&t, mount, key, ciphertext, Some(&ad))
                        .await
                }
            })
            .await
            .map_err(|e| match e {
                // Transit says 400 for a failed authentication tag or a bad version.
                BaoError::Invalid { .. } => Status::invalid_argument(
                    "Transit refused the ciphertext: tampered, truncated, bound to another context, or its key version is no longer allowed",
                ),
                e => self.status_for(&e, "Transit decrypt failed"),
            })?;
        Ok(DecryptResponse { plaintext })
    }

    /// The version of a key_id `seen` does not know. Control-plane nodes see a rotation at
    /// different moments: another node's plugin may already encrypt with a version this one
    /// has not read yet, so the key is read once more before the key_id is refused.
    async fn version_after_refresh(
        &self,
        seen: &Arc<KeySnapshot>,
        key_id: &str,
    ) -> Result<u64, Status> {
        let fresh = self.refreshed_since(seen).await;
        if let Some(v) = fresh.as_ref().and_then(|s| s.decryptable.get(key_id)) {
            return Ok(*v);
        }
        if fresh.is_none_or(|s| Arc::ptr_eq(&s, seen)) {
            return Err(Status::unavailable(format!(
                "unknown key_id, and the key could not be read again to look for a newer version: {}",
                self.health().healthz()
            )));
        }
        Err(Status::invalid_argument(format!(
            "unknown key_id: not a version of Transit key {}/{} that OpenBao still allows to decrypt",
            self.settings.mount, self.settings.key
        )))
    }

    /// A snapshot newer than `seen`: one read meanwhile (by another request's refresh or the
    /// probe), else one read now, at most one per [`UNKNOWN_KEY_REFRESH`] (waiting for it).
    /// The lock makes concurrent requests share one read.
    async fn refreshed_since(&self, seen: &Arc<KeySnapshot>) -> Option<Arc<KeySnapshot>> {
        let newer = || self.snapshot().filter(|s| !Arc::ptr_eq(s, seen));
        let mut last = self.refresh.lock().await;
        if let Some(s) = newer() {
            return Some(s);
        }
        if let Some(at) = *last {
            tokio::time::sleep_until((at + UNKNOWN_KEY_REFRESH).into()).await;
            if let Some(s) = newer() {
                return Some(s);
            }
        }
        *last = Some(Instant::now());
        self.probe().await;
        self.snapshot()
    }

    fn record<T>(&self, method: &'static str, started: Instant, r: &Result<T, Status>, uid: &str) {
        let code = r.as_ref().map_or_else(Status::code, |_| Code::Ok);
        self.metrics.request(method, code, started.elapsed());
        if let Err(s) = r {
            let uid: String = uid.chars().take(64).collect();
            tracing::warn!(method, uid, code = crate::metrics::code_name(code), error = %s.message(), "request failed");
        } else if method != "Status" {
            tracing::debug!(method, uid, "request served");
        }
    }
}

/// The tonic service (a thin wrapper so the plugin can be shared with the probe).
#[derive(Clone)]
pub struct KmsService(pub Arc<Plugin>);

#[tonic::async_trait]
impl KeyManagementService for KmsService {
    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let started = Instant::now();
        let r = Ok(self.0.status_now());
        if !request.metadata().contains_key(SELF_CHECK) {
            self.0.record("Status", started, &r, "");
        }
        r.map(Response::new)
    }

    async fn encrypt(
        &self,
        request: Request<EncryptRequest>,
    ) -> Result<Response<EncryptResponse>, Status> {
        let started = Instant::now();
        let req = request.into_inner();
        let r = self.0.encrypt_inner(&req.plaintext).await;
        self.0.record("Encrypt", started, &r, &req.uid);
        r.map(Response::new)
    }

    async fn decrypt(
        &self,
        request: Request<DecryptRequest>,
    ) -> Result<Response<DecryptResponse>, Status> {
        let started = Instant::now();
        let req = request.into_inner();
        let r = self.0.decrypt_inner(&req).await;
        self.0.record("Decrypt", started, &r, &req.uid);
        r.map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_openbao::{FakeBao, ciphertext};

    fn decrypt_request(key_id: &str, version: u64) -> DecryptRequest {
        DecryptRequest {
            ciphertext: ciphertext(version, b"seed").into_bytes(),
            uid: "test".into(),
            key_id: key_id.into(),
            annotations: envelope::annotations(version).into_iter().collect(),
        }
    }

    #[tokio::test]
    async fn an_unknown_key_id_is_looked_up_once_shared_and_rate_limited_before_refusal() {
        let mut fake = FakeBao::start().await;
        let plugin = fake.plugin();
        plugin.probe().await;
        assert_eq!(plugin.health(), Health::Ok);
        let reads = |fake: &FakeBao| fake.state().key_reads;
        assert_eq!(reads(&fake), 1);

        // Another node's plugin already encrypts with version 2; this one has not probed.
        let v2 = fake.rotate();
        let plain = plugin
            .decrypt_inner(&decrypt_request(&v2, 2))
            .await
            .expect("a version rotated in elsewhere decrypts after one key read")
            .plaintext;
        assert_eq!(plain, b"seed");
        assert_eq!(reads(&fake), 2);

        // Concurrent requests for a newer version share one read.
        let v3 = fake.rotate();
        let requests: Vec<_> = (0..20).map(|_| decrypt_request(&v3, 3)).collect();
        let results =
            futures::future::join_all(requests.iter().map(|r| plugin.decrypt_inner(r))).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert_eq!(reads(&fake), 3, "one read shared by 20 requests");

        // Made-up key_ids: refused, costing at most one read per UNKNOWN_KEY_REFRESH.
        let before = reads(&fake);
        let started = Instant::now();
        let made_up: Vec<_> = (0..20)
            .map(|i| decrypt_request(&format!("kb1-{i:032x}"), 1))
            .collect();
        let mut results =
            futures::future::join_all(made_up.iter().map(|r| plugin.decrypt_inner(r))).await;
        while started.elapsed() < Duration::from_millis(2500) {
            results.push(plugin.decrypt_inner(&made_up[0]).await);
        }
        for r in &results {
            let e = r.as_ref().expect_err("made-up key_id");
            assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
            assert!(e.message().contains("unknown key_id"), "{e:?}");
        }
        let extra = f64::from(reads(&fake) - before);
        let allowed = started.elapsed().as_secs_f64() / UNKNOWN_KEY_REFRESH.as_secs_f64() + 1.0;
        assert!(
            extra >= 1.0 && extra <= allowed,
            "{extra} key reads for {} requests in {:?}",
            results.len(),
            started.elapsed()
        );

        // While OpenBao is down, whether a key_id is real cannot be told: Unavailable.
        fake.stop().await;
        let e = plugin
            .decrypt_inner(&decrypt_request("kb1-ffffffffffffffffffffffffffffffff", 1))
            .await
            .expect_err("OpenBao is down");
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    }

    #[tokio::test]
    async fn health_recovers_within_two_seconds_of_openbao_whatever_the_probe_interval() {
        let mut fake = FakeBao::start().await;
        let plugin = fake.plugin();
        let probe = tokio::spawn(plugin.clone().run_probe(Duration::from_secs(3600)));
        let healthy = |plugin: &Plugin| plugin.health() == Health::Ok;
        while !healthy(&plugin) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        fake.stop().await;
        // A request meets the outage: unhealthy at once, though no probe is due for an hour.
        let e = plugin
            .encrypt_inner(b"seed")
            .await
            .expect_err("OpenBao down");
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(matches!(plugin.health(), Health::Unreachable(_)));
        // The outage itself (what the test is about, not a wait for a condition): long enough
        // for the re-check backoff (250 ms, 500 ms, then RECHECK_MAX) to reach its longest pause.
        let outage = RECHECK_FIRST + RECHECK_FIRST * 2 + RECHECK_MAX * 2;
        tokio::time::sleep(outage).await;
        assert!(matches!(plugin.health(), Health::Unreachable(_)));

        fake.resume().await;
        let back = Instant::now();
        while !healthy(&plugin) && back.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let took = back.elapsed();
        assert!(
            healthy(&plugin) && took < Duration::from_secs(2),
            "healthy again after {took:?} ({:?})",
            plugin.health()
        );
        eprintln!("recovered {took:?} after OpenBao came back");
        probe.abort();
    }

    #[tokio::test]
    async fn a_revoked_token_is_a_credentials_problem_and_a_missing_capability_a_policy_one() {
        let fake = FakeBao::start().await;
        let plugin = fake.plugin();
        plugin.probe().await;
        let enc = plugin.encrypt_inner(b"seed").await.expect("encrypt");
        let request = DecryptRequest {
            ciphertext: enc.ciphertext,
            uid: "test".into(),
            key_id: enc.key_id,
            annotations: enc.annotations,
        };
        fake.state().deny_decrypt = true;
        let e = plugin.decrypt_inner(&request).await.expect_err("denied");
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("permission denied by policy"), "{e:?}");
        let healthz = plugin.health().healthz();
        assert!(
            healthz.starts_with("permission denied by policy"),
            "{healthz}"
        );

        // A fresh plugin (the session asks lookup-self at most every 30 s), its token revoked.
        fake.state().deny_decrypt = false;
        let plugin = fake.plugin();
        plugin.probe().await;
        assert_eq!(plugin.health(), Health::Ok);
        fake.state().live.clear();
        let e = plugin.encrypt_inner(b"seed").await.expect_err("revoked");
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        let expected = "the plugin's OpenBao token is no longer valid: ";
        assert!(e.message().contains(expected), "{e:?}");
        assert!(!e.message().contains("by policy"), "{e:?}");
        for healthz in [plugin.health().healthz(), {
            plugin.probe().await;
            plugin.health().healthz()
        }] {
            assert!(
                healthz.starts_with(&format!("credentials: {expected}")),
                "{healthz}"
            );
        }
    }
}
