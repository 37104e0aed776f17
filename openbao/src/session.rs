//! A long-lived OpenBao token session: one identity whose credentials come from a
//! [`CredentialSource`] (re-read on every login), kept alive in the background.
//!
//! Used by the KMS plugin and the operator's own identity; it knows nothing about what the
//! token is used for. Login, renewal at 2/3 of the TTL, re-login when renewal stops helping,
//! the 403 check (`lookup-self`, at most once per 30 s) and the login backoff are the rules of
//! [`crate::tokens`], shared with the per-identity [`crate::TokenCache`]; this adds:
//! - background upkeep (`spawn_renewal`), so requests rarely wait for a renewal;
//! - credential files: read on every login, so a rotated secret_id, JWT or token file is
//!   picked up by the next login; a token file (or any source whose token never expires) is
//!   also watched, and a changed file is switched to at once;
//! - a token from the user (token file, `Credentials::Token`) is never revoked.

use std::collections::hash_map::DefaultHasher;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::tokens::Slot;
use crate::{Credentials, Error, OpenBao, Result, SecretString, TokenError, TokenOptions};

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
    /// The token rules' knobs (renewal point, login backoff, 403 recheck).
    pub tokens: TokenOptions,
    /// How often the background task checks a token file (and no-TTL tokens) for changes.
    pub file_check_interval: Duration,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            tokens: TokenOptions::default(),
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

struct Inner {
    slot: Slot,
    source: CredentialSource,
    file_check_interval: Duration,
    /// Fingerprint of the credential files at the last login attempt.
    loaded: Mutex<Option<u64>>,
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

/// Shortest pause of the background task between two upkeep steps.
const MIN_WAIT: Duration = Duration::from_millis(50);

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
        let label = Some(source.describe());
        Self {
            inner: Arc::new(Inner {
                slot: Slot::new(client, options.tokens, None, label),
                source,
                file_check_interval: options.file_check_interval,
                loaded: Mutex::new(None),
            }),
        }
    }

    /// The OpenBao client the session logs in with.
    pub fn client(&self) -> &OpenBao {
        self.inner.slot.client()
    }

    /// Where the credentials come from.
    pub fn source(&self) -> &CredentialSource {
        &self.inner.source
    }

    fn loaded(&self) -> std::sync::MutexGuard<'_, Option<u64>> {
        self.inner.loaded.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the credentials for a login, remembering the files' fingerprint.
    async fn credentials(&self) -> Result<Credentials> {
        *self.loaded() = self.inner.source.fingerprint();
        self.inner.source.load()
    }

    /// The current token; renews or logs in first when it is due, missing or expired.
    pub async fn token(&self) -> Result<SecretString> {
        self.inner
            .slot
            .token(|| self.credentials())
            .await
            .map(|t| t.secret)
            .map_err(TokenError::into_error)
    }

    /// Reports that OpenBao answered 403 to `rejected`; returns a token to retry with. Logs in
    /// again when `rejected` is dead (expired or revoked: lookup-self fails); for a live token
    /// the 403 is a policy denial and `denied` is returned unchanged (also for 30 s after a
    /// lookup, without asking again).
    pub async fn refresh_after_denied(
        &self,
        rejected: &SecretString,
        denied: Error,
    ) -> Result<SecretString> {
        match self
            .inner
            .slot
            .denied(rejected, || self.credentials())
            .await
        {
            Ok(Some(t)) => Ok(t.secret),
            Ok(None) => Err(denied),
            Err(e) => Err(e.into_error()),
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
                let original = e.duplicate();
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
        let st = self.inner.slot.status();
        SessionStatus {
            has_token: st.has_token,
            ttl_remaining: st.ttl_remaining,
            last_error: st.last_error,
            logins: st.logins,
            renewals: st.renewals,
        }
    }

    /// True when the files behind the current token changed since it was loaded.
    fn credentials_changed(&self) -> bool {
        let known = *self.loaded();
        known.is_some() && self.inner.source.fingerprint() != known
    }

    /// After a failed upkeep step: retry soon, but never later than a third of what is left.
    fn retry_delay(&self) -> Duration {
        let left = self
            .status()
            .ttl_remaining
            .unwrap_or(Duration::from_secs(5));
        (left / 3).clamp(Duration::from_millis(200), Duration::from_secs(5))
    }

    /// One step of upkeep: switch to changed credentials, renew or log in as due. Returns how
    /// long to wait before the next step.
    pub async fn maintain(&self) -> Duration {
        let slot = &self.inner.slot;
        let watch_files = matches!(self.inner.source, CredentialSource::TokenFile(_))
            || slot.holds_unexpiring_token();
        if watch_files && self.credentials_changed() {
            // Someone rotated the token file: switch now (its old token is the user's to revoke).
            return match slot.relogin(|| self.credentials()).await {
                Ok(_) => Duration::ZERO,
                Err(_) => self.retry_delay(),
            };
        }
        match slot.upkeep_in() {
            Some(wait) if wait.is_zero() => match slot.upkeep(|| self.credentials()).await {
                Ok(_) => Duration::ZERO,
                Err(_) => self.retry_delay(),
            },
            Some(wait) if watch_files => wait.min(self.inner.file_check_interval).max(MIN_WAIT),
            Some(wait) => wait.max(MIN_WAIT),
            // A token without expiry: only its files can change it.
            None => self.inner.file_check_interval,
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
    use crate::fake::{Fake, start};

    fn approle() -> CredentialSource {
        CredentialSource::Static(Credentials::AppRole {
            mount: "approle".into(),
            role_id: SecretString::new("r"),
            secret_id: SecretString::new("s"),
        })
    }

    #[tokio::test]
    async fn maintain_waits_until_two_thirds_then_renews_in_the_background() {
        let (shared, client) = start(Fake {
            ttl: 3,
            renewable: true,
            ..Default::default()
        })
        .await;
        let session = Session::new(client, approle());
        assert_eq!(session.maintain().await, Duration::ZERO, "logged in");
        let wait = session.maintain().await;
        assert!(
            wait > Duration::from_secs(1) && wait <= Duration::from_secs(2),
            "{wait:?}"
        );
        tokio::time::sleep(wait).await;
        assert_eq!(session.maintain().await, Duration::ZERO);
        let f = shared.lock().unwrap();
        assert_eq!((f.logins, f.renewals), (1, 1));
        assert_eq!(session.status().renewals, 1);
    }

    #[tokio::test]
    async fn with_token_retries_once_after_a_403_on_a_revoked_token() {
        let (shared, client) = start(Fake {
            ttl: 60,
            renewable: true,
            ..Default::default()
        })
        .await;
        let session = Session::new(client, approle());
        let first = session.token().await.unwrap();
        shared.lock().unwrap().live.clear();
        let live = shared.clone();
        let used = session
            .with_token(|t| {
                let live = live.clone();
                async move {
                    if live.lock().unwrap().live.contains(t.expose()) {
                        Ok(t)
                    } else {
                        Err(Error::PermissionDenied {
                            path: "transit/encrypt/k".into(),
                            message: "permission denied".into(),
                        })
                    }
                }
            })
            .await
            .unwrap();
        assert_ne!(used, first);
        assert_eq!(shared.lock().unwrap().logins, 2);
    }

    #[tokio::test]
    async fn a_changed_token_file_is_switched_to_and_never_revoked() {
        let (shared, client) = start(Fake {
            ttl: 3600,
            ..Default::default()
        })
        .await;
        shared
            .lock()
            .unwrap()
            .live
            .extend(["user-1".into(), "user-2".into()]);
        let dir = std::env::temp_dir().join(format!("kubebao-switch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "user-1").unwrap();
        let session = Session::new(client, CredentialSource::TokenFile(file.clone()));
        assert_eq!(session.token().await.unwrap().expose(), "user-1");
        std::fs::write(&file, "user-2\n").unwrap();
        assert_eq!(session.maintain().await, Duration::ZERO);
        assert_eq!(session.token().await.unwrap().expose(), "user-2");
        assert!(shared.lock().unwrap().revoked.is_empty());
        assert!(!format!("{session:?}").contains("user-"), "{session:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

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
