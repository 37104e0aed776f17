//! A long-lived OpenBao token session: logs in, renews in the background, logs in afresh when
//! renewal fails, the token expires or is revoked (403), and re-reads credential files.
//!
//! Used by the KMS plugin and the operator; it knows nothing about what the token is used for.
//!
//! Why these rules:
//! - Renewal at 2/3 of the TTL leaves a third of the TTL to retry through a short outage.
//! - When renewal stops extending the token (max TTL reached) a fresh login replaces it before
//!   it expires, so callers never see an expired token in normal operation.
//! - A 403 may mean "expired/revoked" or "policy too small". `refresh_after_denied` asks
//!   OpenBao (lookup-self) which one it is and logs in again only for a dead token, so a real
//!   policy gap costs one cheap lookup per denied request, never a login per request.
//! - Failed logins are remembered for `login_backoff`: during an outage callers get the last
//!   error at once instead of each hammering the auth endpoint.
//! - Credential files are read on every login, so a rotated secret_id, JWT or token file is
//!   picked up by the next login; for token files the background task also checks the file for
//!   changes and switches to the new token.

use std::collections::hash_map::DefaultHasher;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{Auth, Credentials, Error, OpenBao, Result, SecretString};

/// Where the session's credentials come from. File variants are re-read on every login.
#[derive(Clone, Debug)]
pub enum CredentialSource {
    /// Credentials held in memory.
    Static(Credentials),
    /// A file holding an OpenBao token.
    TokenFile(PathBuf),
    /// AppRole with role_id and secret_id read from files.
    AppRoleFiles {
        /// Auth mount, usually `approle`.
        mount: String,
        /// File holding the role_id.
        role_id_file: PathBuf,
        /// File holding the secret_id.
        secret_id_file: PathBuf,
    },
    /// OpenBao `kubernetes` auth with a ServiceAccount token read from a file.
    KubernetesJwtFile {
        /// Auth mount, usually `kubernetes`.
        mount: String,
        /// OpenBao role.
        role: String,
        /// File holding the JWT.
        jwt_file: PathBuf,
    },
    /// OpenBao `jwt` auth with a JWT read from a file.
    JwtFile {
        /// Auth mount, usually `jwt`.
        mount: String,
        /// OpenBao role.
        role: String,
        /// File holding the JWT.
        jwt_file: PathBuf,
    },
}

fn read_secret_file(what: &str, path: &Path) -> Result<SecretString> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::Config(format!(
            "cannot read the {what} file {}: {e}; check the path and that this process may read it",
            path.display()
        ))
    })?;
    let value = text.trim();
    if value.is_empty() {
        return Err(Error::Config(format!(
            "the {what} file {} is empty",
            path.display()
        )));
    }
    Ok(SecretString::new(value))
}

impl CredentialSource {
    /// Loads the credentials (reads the files now).
    pub fn load(&self) -> Result<Credentials> {
        Ok(match self {
            CredentialSource::Static(c) => c.clone(),
            CredentialSource::TokenFile(p) => Credentials::Token(read_secret_file("token", p)?),
            CredentialSource::AppRoleFiles {
                mount,
                role_id_file,
                secret_id_file,
            } => Credentials::AppRole {
                mount: mount.clone(),
                role_id: read_secret_file("AppRole role_id", role_id_file)?,
                secret_id: read_secret_file("AppRole secret_id", secret_id_file)?,
            },
            CredentialSource::KubernetesJwtFile {
                mount,
                role,
                jwt_file,
            } => Credentials::Kubernetes {
                mount: mount.clone(),
                role: role.clone(),
                jwt: read_secret_file("ServiceAccount token (JWT)", jwt_file)?,
            },
            CredentialSource::JwtFile {
                mount,
                role,
                jwt_file,
            } => Credentials::Jwt {
                mount: mount.clone(),
                role: role.clone(),
                jwt: read_secret_file("JWT", jwt_file)?,
            },
        })
    }

    /// A short description for logs (never secret values).
    pub fn describe(&self) -> String {
        match self {
            CredentialSource::Static(c) => c.describe(),
            CredentialSource::TokenFile(p) => format!("token from {}", p.display()),
            CredentialSource::AppRoleFiles {
                mount,
                secret_id_file,
                ..
            } => format!(
                "approle login at auth/{mount} (secret_id from {})",
                secret_id_file.display()
            ),
            CredentialSource::KubernetesJwtFile {
                mount,
                role,
                jwt_file,
            } => format!(
                "kubernetes login at auth/{mount} as role {role:?} (JWT from {})",
                jwt_file.display()
            ),
            CredentialSource::JwtFile {
                mount,
                role,
                jwt_file,
            } => format!(
                "jwt login at auth/{mount} as role {role:?} (JWT from {})",
                jwt_file.display()
            ),
        }
    }

    /// A change detector over the credential files' contents (not a secret-preserving hash;
    /// kept in memory only).
    fn fingerprint(&self) -> Option<u64> {
        let files: Vec<&Path> = match self {
            CredentialSource::Static(_) => return None,
            CredentialSource::TokenFile(p) => vec![p],
            CredentialSource::AppRoleFiles {
                role_id_file,
                secret_id_file,
                ..
            } => vec![role_id_file, secret_id_file],
            CredentialSource::KubernetesJwtFile { jwt_file, .. }
            | CredentialSource::JwtFile { jwt_file, .. } => vec![jwt_file],
        };
        let mut h = DefaultHasher::new();
        for f in files {
            std::fs::read(f).ok()?.hash(&mut h);
        }
        Some(h.finish())
    }
}

/// Tuning knobs; the defaults suit production.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    /// Renew when this fraction of the TTL has passed.
    pub renew_fraction: f64,
    /// After a failed login, return the remembered error for this long.
    pub login_backoff: Duration,
    /// How often the background task checks a token file (and no-TTL tokens) for changes.
    pub file_check_interval: Duration,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            renew_fraction: 2.0 / 3.0,
            login_backoff: Duration::from_secs(1),
            file_check_interval: Duration::from_secs(30),
        }
    }
}

/// What the session holds now (for metrics and health; no token value).
#[derive(Clone, Debug, Default)]
pub struct SessionStatus {
    /// A token is held.
    pub has_token: bool,
    /// Time left before the token expires (None: no token, or a token without expiry).
    pub ttl_remaining: Option<Duration>,
    /// The last login or renewal error, if the last attempt failed.
    pub last_error: Option<String>,
    /// Successful logins since start.
    pub logins: u64,
    /// Successful renewals since start.
    pub renewals: u64,
}

struct Current {
    token: SecretString,
    /// Last time the TTL was set (login or renewal).
    refreshed: Instant,
    ttl: Duration,
    /// The TTL granted at login; a renewal granting much less means max TTL is near.
    login_ttl: Duration,
    renewable: bool,
    fingerprint: Option<u64>,
}

impl Current {
    fn expires_at(&self) -> Option<Instant> {
        (!self.ttl.is_zero()).then(|| self.refreshed + self.ttl)
    }
    fn expired(&self) -> bool {
        self.expires_at().is_some_and(|t| Instant::now() >= t)
    }
}

#[derive(Default)]
struct State {
    current: Option<Current>,
    failure: Option<(Instant, Error)>,
    logins: u64,
    renewals: u64,
}

struct Inner {
    client: OpenBao,
    source: CredentialSource,
    options: SessionOptions,
    state: Mutex<State>,
    /// Serialises logins so concurrent callers share one.
    login_lock: tokio::sync::Mutex<()>,
}

/// A shared, self-renewing OpenBao token. Cheap to clone.
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("source", &self.inner.source.describe())
            .field("status", &self.status())
            .finish()
    }
}

/// Copies an error (the client's `Error` is not `Clone` on purpose; all fields are plain text).
fn copy_error(e: &Error) -> Error {
    match e {
        Error::Unreachable { addr, reason } => Error::Unreachable {
            addr: addr.clone(),
            reason: reason.clone(),
        },
        Error::Sealed { addr } => Error::Sealed { addr: addr.clone() },
        Error::PermissionDenied { path, message } => Error::PermissionDenied {
            path: path.clone(),
            message: message.clone(),
        },
        Error::NotFound { path } => Error::NotFound { path: path.clone() },
        Error::Invalid {
            path,
            status,
            message,
        } => Error::Invalid {
            path: path.clone(),
            status: *status,
            message: message.clone(),
        },
        Error::Server {
            path,
            status,
            message,
        } => Error::Server {
            path: path.clone(),
            status: *status,
            message: message.clone(),
        },
        Error::BadResponse { path, reason } => Error::BadResponse {
            path: path.clone(),
            reason: reason.clone(),
        },
        Error::Config(m) => Error::Config(m.clone()),
    }
}

impl Session {
    /// A session with default options. Does not log in yet (see `token` and `spawn_renewal`).
    pub fn new(client: OpenBao, source: CredentialSource) -> Self {
        Self::with_options(client, source, SessionOptions::default())
    }

    /// A session with explicit options.
    pub fn with_options(
        client: OpenBao,
        source: CredentialSource,
        options: SessionOptions,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                client,
                source,
                options,
                state: Mutex::new(State::default()),
                login_lock: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// The OpenBao client the session logs in with.
    pub fn client(&self) -> &OpenBao {
        &self.inner.client
    }

    /// Where the credentials come from.
    pub fn source(&self) -> &CredentialSource {
        &self.inner.source
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state inconsistent (plain fields).
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn usable_token(&self) -> Option<SecretString> {
        let state = self.lock();
        state
            .current
            .as_ref()
            .filter(|c| !c.expired())
            .map(|c| c.token.clone())
    }

    /// The current token, logging in first when there is none or it has expired.
    pub async fn token(&self) -> Result<SecretString> {
        if let Some(t) = self.usable_token() {
            return Ok(t);
        }
        self.login_if(|_| false).await
    }

    /// Logs in unless another caller already did; `stale` says whether the current token (if
    /// any) must be replaced.
    async fn login_if(&self, stale: impl Fn(&Current) -> bool) -> Result<SecretString> {
        let _guard = self.inner.login_lock.lock().await;
        {
            let state = self.lock();
            if let Some(c) = state.current.as_ref()
                && !c.expired()
                && !stale(c)
            {
                return Ok(c.token.clone());
            }
            if let Some((at, e)) = &state.failure
                && at.elapsed() < self.inner.options.login_backoff
            {
                return Err(copy_error(e));
            }
        }
        self.login_now().await
    }

    async fn login_now(&self) -> Result<SecretString> {
        let fingerprint = self.inner.source.fingerprint();
        let result = match self.inner.source.load() {
            Ok(creds) => self.inner.client.login(&creds).await,
            Err(e) => Err(e),
        };
        let mut state = self.lock();
        match result {
            Ok(auth) => {
                let token = auth.client_token.clone();
                state.current = Some(Self::current_from(&auth, fingerprint));
                state.failure = None;
                state.logins += 1;
                tracing::info!(
                    source = %self.inner.source.describe(),
                    ttl_seconds = auth.lease_duration,
                    renewable = auth.renewable,
                    "logged in to OpenBao"
                );
                Ok(token)
            }
            Err(e) => {
                tracing::warn!(source = %self.inner.source.describe(), error = %e, "OpenBao login failed");
                state.failure = Some((Instant::now(), copy_error(&e)));
                Err(e)
            }
        }
    }

    fn current_from(auth: &Auth, fingerprint: Option<u64>) -> Current {
        let now = Instant::now();
        Current {
            token: auth.client_token.clone(),
            refreshed: now,
            ttl: auth.ttl(),
            login_ttl: auth.ttl(),
            renewable: auth.renewable,
            fingerprint,
        }
    }

    /// Reports that OpenBao answered 403 to `rejected`; returns a token to retry with. Logs in
    /// again when `rejected` is dead (expired or revoked: lookup-self fails); for a live token
    /// the 403 is a policy denial and `denied` is returned unchanged.
    pub async fn refresh_after_denied(
        &self,
        rejected: &SecretString,
        denied: Error,
    ) -> Result<SecretString> {
        {
            let state = self.lock();
            if let Some(c) = state.current.as_ref()
                && &c.token != rejected
                && !c.expired()
            {
                return Ok(c.token.clone());
            }
        }
        // Is the token itself dead (expired, revoked) or is this a policy denial? A live token
        // means the policy is missing a capability: logging in again would not help.
        match self.inner.client.lookup_self(rejected).await {
            Ok(_) => Err(denied),
            Err(e) if e.is_permission_denied() => {
                let rejected = rejected.clone();
                self.login_if(move |c| c.token == rejected).await
            }
            Err(e) => Err(e),
        }
    }

    /// Runs `op` with the current token; on a 403, reports it and retries once with a fresh one.
    pub async fn with_token<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: Fn(SecretString) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let token = self.token().await?;
        match op(token.clone()).await {
            Err(e) if e.is_permission_denied() => {
                let original = copy_error(&e);
                let fresh = self.refresh_after_denied(&token, e).await?;
                if fresh == token {
                    // A token credential re-read from an unchanged file: retrying cannot help.
                    return Err(original);
                }
                op(fresh).await
            }
            other => other,
        }
    }

    /// Current state, for metrics and health (no token value).
    pub fn status(&self) -> SessionStatus {
        let state = self.lock();
        SessionStatus {
            has_token: state.current.as_ref().is_some_and(|c| !c.expired()),
            ttl_remaining: state
                .current
                .as_ref()
                .and_then(Current::expires_at)
                .map(|t| t.saturating_duration_since(Instant::now())),
            last_error: state.failure.as_ref().map(|(_, e)| e.to_string()),
            logins: state.logins,
            renewals: state.renewals,
        }
    }

    /// One step of upkeep: renew or log in as due. Returns how long to wait before the next.
    pub async fn maintain(&self) -> Duration {
        let opts = &self.inner.options;
        enum Due {
            Login,
            Renew(SecretString, Duration),
            Check(Option<u64>),
            Wait(Duration),
        }
        let due = {
            let state = self.lock();
            match state.current.as_ref() {
                None => Due::Login,
                Some(c) if c.expired() => Due::Login,
                Some(c) if c.ttl.is_zero() => {
                    let since = c.refreshed.elapsed();
                    if since >= opts.file_check_interval {
                        Due::Check(c.fingerprint)
                    } else {
                        Due::Wait(opts.file_check_interval - since)
                    }
                }
                Some(c) => {
                    let renew_at = c.ttl.mul_f64(opts.renew_fraction);
                    let since = c.refreshed.elapsed();
                    if since < renew_at {
                        let wait = renew_at - since;
                        if matches!(self.inner.source, CredentialSource::TokenFile(_))
                            && wait > opts.file_check_interval
                        {
                            Due::Wait(opts.file_check_interval)
                        } else {
                            Due::Wait(wait)
                        }
                    } else if c.renewable {
                        Due::Renew(c.token.clone(), c.login_ttl)
                    } else {
                        Due::Login
                    }
                }
            }
        };
        let backoff = |this: &Self| {
            // Retry soon, but never later than a third of what is left of the token.
            let left = this
                .status()
                .ttl_remaining
                .unwrap_or(Duration::from_secs(5));
            (left / 3).clamp(Duration::from_millis(200), Duration::from_secs(5))
        };
        match due {
            Due::Wait(d) => {
                // A token file that changed means someone rotated the token: switch now.
                if let CredentialSource::TokenFile(_) = self.inner.source {
                    let known = self.lock().current.as_ref().and_then(|c| c.fingerprint);
                    if self.inner.source.fingerprint() != known {
                        let _ = self.login_if(|_| true).await;
                        return Duration::ZERO;
                    }
                }
                d.max(Duration::from_millis(50))
            }
            Due::Check(known) => {
                if self.inner.source.fingerprint() != known {
                    let _ = self.login_if(|_| true).await;
                } else if let Some(c) = self.lock().current.as_mut() {
                    c.refreshed = Instant::now();
                }
                Duration::ZERO
            }
            // Only when still needed: a caller may have logged in meanwhile.
            Due::Login => match self.login_if(|_| false).await {
                Ok(_) => Duration::ZERO,
                Err(_) => backoff(self),
            },
            Due::Renew(token, increment) => {
                match self.inner.client.renew_self(&token, increment).await {
                    Ok(auth) => {
                        let granted = auth.ttl();
                        {
                            let mut state = self.lock();
                            if let Some(c) = state.current.as_mut().filter(|c| c.token == token) {
                                c.ttl = granted;
                                c.refreshed = Instant::now();
                            }
                            state.renewals += 1;
                        }
                        tracing::debug!(ttl_seconds = granted.as_secs(), "renewed OpenBao token");
                        // Max TTL near: the next renewal would not help; log in before expiry.
                        if granted < increment.mul_f64(1.0 - opts.renew_fraction) {
                            let _ = self.login_if(|c| c.token == token).await;
                        }
                        Duration::ZERO
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "OpenBao token renewal failed; logging in afresh");
                        match self.login_if(|c| c.token == token).await {
                            Ok(_) => Duration::ZERO,
                            Err(_) => backoff(self),
                        }
                    }
                }
            }
        }
    }

    /// Starts the background upkeep (renewal, re-login, file checks). Abort the handle to stop.
    pub fn spawn_renewal(&self) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let wait = this.maintain().await;
                tokio::time::sleep(wait).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_sources_read_trimmed_values_and_name_missing_files() {
        let dir = std::env::temp_dir().join(format!("kubebao-session-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let token = dir.join("token");
        std::fs::write(&token, "s.abc\n").unwrap();
        let src = CredentialSource::TokenFile(token.clone());
        match src.load().unwrap() {
            Credentials::Token(t) => assert_eq!(t.expose(), "s.abc"),
            other => panic!("unexpected {other:?}"),
        }
        let before = src.fingerprint();
        std::fs::write(&token, "s.def\n").unwrap();
        assert_ne!(before, src.fingerprint(), "a changed file must be noticed");
        let missing = CredentialSource::AppRoleFiles {
            mount: "approle".into(),
            role_id_file: dir.join("nope"),
            secret_id_file: dir.join("nope2"),
        };
        let err = missing.load().unwrap_err().to_string();
        assert!(err.contains("role_id") && err.contains("nope"), "{err}");
        std::fs::write(dir.join("empty"), "  \n").unwrap();
        let empty = CredentialSource::JwtFile {
            mount: "jwt".into(),
            role: "r".into(),
            jwt_file: dir.join("empty"),
        };
        assert!(empty.load().unwrap_err().to_string().contains("empty"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
