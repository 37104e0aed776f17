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

/// Why the plugin is not healthy (Status `healthz` shows the message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// All good.
    Ok,
    /// No probe has finished yet.
    Starting,
    /// OpenBao cannot be reached.
    Unreachable(String),
    /// OpenBao is sealed.
    Sealed(String),
    /// The key does not exist.
    KeyMissing(String),
    /// The key exists but cannot serve KMS.
    KeyUnusable(String),
    /// The token lacks a capability.
    PermissionDenied(String),
    /// No token (login failed).
    NoToken(String),
    /// Anything else.
    Error(String),
}

impl Health {
    /// The text Status returns.
    pub fn healthz(&self) -> String {
        match self {
            Health::Ok => "ok".into(),
            Health::Starting => "starting: the first key probe has not finished".into(),
            Health::Unreachable(m) => format!("unreachable: {m}"),
            Health::Sealed(m) => format!("sealed: {m}"),
            Health::KeyMissing(m) => format!("key missing: {m}"),
            Health::KeyUnusable(m) => format!("key unusable: {m}"),
            Health::PermissionDenied(m) => format!("permission denied: {m}"),
            Health::NoToken(m) => format!("no token: {m}"),
            Health::Error(m) => format!("error: {m}"),
        }
    }

    fn from_error(e: &BaoError, during_login: bool) -> Health {
        let m = e.to_string();
        match e {
            BaoError::Unreachable { .. } => Health::Unreachable(m),
            BaoError::Sealed { .. } => Health::Sealed(m),
            _ if during_login => Health::NoToken(m),
            BaoError::PermissionDenied { .. } => Health::PermissionDenied(m),
            BaoError::NotFound { .. } => Health::KeyMissing(m),
            _ => Health::Error(m),
        }
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

/// The KMS plugin state shared by the gRPC service, the probe and the HTTP endpoints.
pub struct Plugin {
    session: Session,
    settings: PluginSettings,
    cache: RwLock<Cache>,
    /// Metrics.
    pub metrics: Metrics,
}

/// Maps an OpenBao error to the gRPC status the API server acts on.
fn status_for(e: &BaoError, what: &str) -> Status {
    let msg = format!("{what}: {e}");
    match e {
        BaoError::Unreachable { .. } | BaoError::Sealed { .. } | BaoError::Server { .. } => {
            Status::unavailable(msg)
        }
        BaoError::PermissionDenied { .. } => Status::permission_denied(msg),
        BaoError::Invalid { .. } => Status::invalid_argument(msg),
        BaoError::NotFound { .. } => Status::failed_precondition(msg),
        BaoError::BadResponse { .. } | BaoError::Config(_) => Status::internal(msg),
    }
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
            }
        }
        self.metrics.healthy.set(i64::from(health == Health::Ok));
        cache.health = health;
    }

    /// Marks the plugin unhealthy after a failed call, so Status reflects an outage before the
    /// next probe; the next successful probe clears it.
    /// One Transit call with the session's token: records its latency and result, and lets a
    /// failure that says OpenBao is down, sealed or refusing us show in Status at once.
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
        if let Err(e) = &result {
            self.note_failure(e);
        }
        result
    }

    fn note_failure(&self, e: &BaoError) {
        if e.is_unavailable() || e.is_permission_denied() {
            self.set(None, Health::from_error(e, false));
        }
    }

    /// Reads the key once and updates snapshot and health.
    pub async fn probe(&self) {
        let token = match self.session.token().await {
            Ok(t) => t,
            Err(e) => {
                self.set(None, Health::from_error(&e, true));
                return;
            }
        };
        let (mount, key) = (&self.settings.mount, &self.settings.key);
        let started = Instant::now();
        let client = self.session.client();
        let mut result = client.transit_key(&token, mount, key).await;
        if let Err(e) = &result
            && e.is_permission_denied()
        {
            let e = kubebao_openbao::Error::PermissionDenied {
                path: String::new(),
                message: e.to_string(),
            };
            if let Ok(fresh) = self.session.refresh_after_denied(&token, e).await
                && fresh != token
            {
                result = client.transit_key(&fresh, mount, key).await;
            }
        }
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
            Err(e) => self.set(None, Health::from_error(&e, false)),
        }
    }

    /// Probes forever every `interval` (sooner while unhealthy, so recovery shows quickly).
    pub async fn run_probe(self: Arc<Self>, interval: Duration) {
        loop {
            self.probe().await;
            self.update_token_metrics();
            let wait = if self.health() == Health::Ok {
                interval
            } else {
                interval.min(Duration::from_secs(2))
            };
            tokio::time::sleep(wait).await;
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
        let snapshot = self.snapshot().ok_or_else(|| {
            Status::unavailable(format!("no key snapshot yet ({})", self.health().healthz()))
        })?;
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
            .map_err(|e| status_for(&e, "Transit encrypt failed"))?;
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
        let snapshot = self.snapshot().ok_or_else(|| {
            Status::unavailable(format!("no key snapshot yet ({})", self.health().healthz()))
        })?;
        let version = *snapshot.decryptable.get(&req.key_id).ok_or_else(|| {
            Status::invalid_argument(format!(
                "unknown key_id: not a version of Transit key {}/{} that OpenBao still allows to decrypt",
                self.settings.mount, self.settings.key
            ))
        })?;
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
                e => status_for(&e, "Transit decrypt failed"),
            })?;
        Ok(DecryptResponse { plaintext })
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
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let started = Instant::now();
        let r = Ok(self.0.status_now());
        self.0.record("Status", started, &r, "");
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
