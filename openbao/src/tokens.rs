//! OpenBao tokens per identity: one set of rules for every token KubeBao holds.
//!
//! [`Session`](crate::Session) holds one long-lived identity (the KMS plugin, the operator's
//! own); [`TokenCache`] holds one per key (a pod's ServiceAccount in the CSI provider, a
//! BaoSecret's in the operator). Both are made of the same per-identity state machine, so the
//! same rules hold everywhere:
//!
//! - **One login per identity at a time.** Concurrent callers for one identity wait on that
//!   identity's async lock and share the login (or renewal) the first one makes.
//! - **Renew at `renew_fraction` (2/3) of the TTL.** Until then the token is used as is. Past
//!   it, a renewable token is renewed (`renew-self`, asking for the TTL of its login); a renewal
//!   that fails, or grants less than `1 - renew_fraction` of that (the max TTL is near), is
//!   followed by a fresh login. A token that cannot be renewed is replaced by a login, and an
//!   expired one is dropped. While a replacement fails, a token that has not expired is still
//!   served. Sessions also do this in the background (`Session::spawn_renewal`); cache entries
//!   (thousands of pods or tenants) do it on demand, at their next use.
//! - **Credentials are fetched for every login** from a source the caller passes (a fresh JWT
//!   each time: a pod's `serviceAccount.tokens` or a TokenRequest, a re-read credential file),
//!   and the source's own error type comes back unchanged in [`TokenError::Credentials`].
//! - **A 403 is checked, not guessed.** The caller reports a 403 it got with a token
//!   ([`TokenCache::denied`]); the cache asks OpenBao (`lookup-self`) whether that token is
//!   dead (revoked or expired: it is dropped, a fresh login follows, the caller retries once)
//!   or alive (the policy lacks a capability: no login, the caller reports its 403). To keep a
//!   policy gap cheap, `lookup-self` runs at most once per `denied_recheck` (30 s) per
//!   identity; within that window a 403 counts as a policy denial.
//! - **Failed logins are remembered for `login_backoff` (1 s).** Meanwhile callers get the
//!   remembered error at once (or the still-valid token), so an outage does not hammer the
//!   auth endpoint.
//! - **Forgetting revokes what KubeBao logged in for.** An entry forgotten (object deleted,
//!   cache pruned, size cap) has its token revoked (`revoke-self`, best effort) when KubeBao
//!   obtained it by logging in; a token the user supplied ([`Credentials::Token`]) is never
//!   revoked. Revoking a token also revokes the leases it created, which would end with the
//!   token anyway.
//! - **Observable.** [`Token::cached`] says whether a call logged in; a [`TokenEvent`]
//!   observer sees every hit, miss, login, renewal, lookup and revocation (for metrics).
//! - Tokens never appear in `Debug` output, logs or errors.

use std::fmt::Display;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::{Auth, Credentials, Error, OpenBao, SecretString};

mod cache;
pub use cache::TokenCache;

/// The rules' knobs; the defaults suit production.
#[derive(Clone, Debug)]
pub struct TokenOptions {
    /// Renew (or log in again) when this fraction of the TTL has passed (0 to 1).
    pub renew_fraction: f64,
    /// After a failed login, hand out the remembered error for this long.
    pub login_backoff: Duration,
    /// After a 403, ask OpenBao whether the token is dead at most this often per identity.
    pub denied_recheck: Duration,
    /// Most identities a [`TokenCache`] holds; past it, dead entries go first, then the least
    /// recently used.
    pub max_entries: usize,
}

impl Default for TokenOptions {
    fn default() -> Self {
        Self {
            renew_fraction: 2.0 / 3.0,
            login_backoff: Duration::from_secs(1),
            denied_recheck: Duration::from_secs(30),
            max_entries: 4096,
        }
    }
}

impl TokenOptions {
    /// How long after a login or renewal the token is due for upkeep.
    fn renew_after(&self, ttl: Duration) -> Duration {
        let fraction = if (0.0..=1.0).contains(&self.renew_fraction) {
            self.renew_fraction
        } else {
            2.0 / 3.0
        };
        // fraction is within 0..=1, so the product is at most `ttl`: the conversion cannot
        // fail; the fallback only keeps this total.
        Duration::try_from_secs_f64(ttl.as_secs_f64() * fraction).unwrap_or(ttl)
    }

    /// A renewal granting less than this (for `asked`) means the max TTL is near.
    fn enough(&self, asked: Duration) -> Duration {
        asked.saturating_sub(self.renew_after(asked))
    }
}

/// A token to use now.
#[derive(Clone, Debug)]
pub struct Token {
    /// The OpenBao token (redacted in `Debug`).
    pub secret: SecretString,
    /// True when this call did not log in (the held token, possibly renewed).
    pub cached: bool,
}

/// Why no token could be had.
#[derive(Debug, thiserror::Error)]
pub enum TokenError<E> {
    /// The caller's credential source failed (e.g. its ServiceAccount does not exist).
    #[error("{0}")]
    Credentials(E),
    /// OpenBao refused the login or could not be asked (also a failed login remembered during
    /// `login_backoff`, or a failed `lookup-self` after a 403).
    #[error("{0}")]
    Login(Error),
}

impl TokenError<Error> {
    /// The OpenBao error, whichever step failed (for sources whose errors are OpenBao's).
    pub fn into_error(self) -> Error {
        match self {
            TokenError::Credentials(e) | TokenError::Login(e) => e,
        }
    }
}

/// Something the token rules did, for metrics. Never holds a token.
#[derive(Debug)]
#[non_exhaustive]
pub enum TokenEvent<'a> {
    /// A token was asked for and the held one served (possibly after a renewal).
    Hit,
    /// A token was asked for and a login was needed (whether or not it succeeded).
    Miss,
    /// A login succeeded.
    LoggedIn,
    /// A login failed (refused: `PermissionDenied`/`NotFound`; else OpenBao failed).
    LoginFailed(&'a Error),
    /// `renew-self` extended the token.
    Renewed,
    /// `renew-self` failed.
    RenewalFailed(&'a Error),
    /// `lookup-self` after a 403: Ok(true) alive (policy denial), Ok(false) dead.
    Checked(Result<bool, &'a Error>),
    /// `revoke-self` of a forgotten token.
    Revoked(Result<(), &'a Error>),
}

/// Called with every [`TokenEvent`]; must be quick (it runs inline).
pub type TokenObserver = Arc<dyn Fn(&TokenEvent<'_>) + Send + Sync>;

/// The token held for one identity.
struct Held {
    token: SecretString,
    /// Last time the TTL was set (login or renewal).
    refreshed: Instant,
    /// Zero: no expiry (e.g. a root token).
    ttl: Duration,
    /// The TTL granted at login: what renewals ask for.
    login_ttl: Duration,
    renewable: bool,
    /// KubeBao logged in for it (revoke when forgotten); false for a user's token.
    owned: bool,
}

impl Held {
    fn new(auth: &Auth, owned: bool, now: Instant) -> Self {
        Self {
            token: auth.client_token.clone(),
            refreshed: now,
            ttl: auth.ttl(),
            login_ttl: auth.ttl(),
            renewable: auth.renewable,
            owned,
        }
    }
    fn expires_at(&self) -> Option<Instant> {
        if self.ttl.is_zero() {
            return None;
        }
        // A TTL too large for `Instant` never expires in practice.
        self.refreshed.checked_add(self.ttl)
    }
    fn expired(&self, now: Instant) -> bool {
        self.expires_at().is_some_and(|t| now >= t)
    }
    /// When upkeep is due; None for a token without expiry.
    fn due_at(&self, options: &TokenOptions) -> Option<Instant> {
        if self.ttl.is_zero() {
            return None;
        }
        self.refreshed.checked_add(options.renew_after(self.ttl))
    }
    fn due(&self, now: Instant, options: &TokenOptions) -> bool {
        self.due_at(options).is_some_and(|t| now >= t)
    }
}

struct State {
    held: Option<Held>,
    /// The last failed login, handed out again during `login_backoff`.
    failure: Option<(Instant, Error)>,
    /// The last `lookup-self` after a 403.
    checked: Option<Instant>,
    last_used: Instant,
    last_error: Option<String>,
    logins: u64,
    renewals: u64,
}

/// What a slot holds now, without the token.
pub(crate) struct SlotStatus {
    pub has_token: bool,
    pub ttl_remaining: Option<Duration>,
    pub last_error: Option<String>,
    pub logins: u64,
    pub renewals: u64,
}

/// The per-identity state machine behind both `Session` and `TokenCache`.
pub(crate) struct Slot {
    client: OpenBao,
    options: TokenOptions,
    observer: Option<TokenObserver>,
    /// Set for a long-lived session: its logins are logged at info with this source.
    label: Option<String>,
    state: Mutex<State>,
    /// Serialises logins, renewals and lookups of this identity.
    busy: tokio::sync::Mutex<()>,
}

impl Slot {
    pub(crate) fn new(
        client: OpenBao,
        options: TokenOptions,
        observer: Option<TokenObserver>,
        label: Option<String>,
    ) -> Self {
        Self {
            client,
            options,
            observer,
            label,
            state: Mutex::new(State {
                held: None,
                failure: None,
                checked: None,
                last_used: Instant::now(),
                last_error: None,
                logins: 0,
                renewals: 0,
            }),
            busy: tokio::sync::Mutex::new(()),
        }
    }

    pub(crate) fn client(&self) -> &OpenBao {
        &self.client
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state inconsistent (plain fields).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn emit(&self, event: TokenEvent<'_>) {
        if let Some(observer) = &self.observer {
            observer(&event);
        }
    }

    /// The held token when it needs no upkeep now (or upkeep failed moments ago).
    fn served(&self) -> Option<SecretString> {
        let now = Instant::now();
        let mut st = self.state();
        st.last_used = now;
        let backing_off = st
            .failure
            .as_ref()
            .is_some_and(|(at, _)| now.duration_since(*at) < self.options.login_backoff);
        st.held
            .as_ref()
            .filter(|h| !h.expired(now) && (!h.due(now, &self.options) || backing_off))
            .map(|h| h.token.clone())
    }

    /// The held token while it has not expired.
    fn usable(&self) -> Option<SecretString> {
        let now = Instant::now();
        let st = self.state();
        st.held
            .as_ref()
            .filter(|h| !h.expired(now))
            .map(|h| h.token.clone())
    }

    /// A token: the held one, renewed or replaced by a login when due (see the module doc).
    pub(crate) async fn token<E, F, Fut>(&self, credentials: F) -> Result<Token, TokenError<E>>
    where
        E: Display,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Credentials, E>>,
    {
        let result = self.token_inner(credentials).await;
        self.emit(match &result {
            Ok(t) if t.cached => TokenEvent::Hit,
            _ => TokenEvent::Miss,
        });
        result
    }

    async fn token_inner<E, F, Fut>(&self, credentials: F) -> Result<Token, TokenError<E>>
    where
        E: Display,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Credentials, E>>,
    {
        let cached = |secret| Token {
            secret,
            cached: true,
        };
        if let Some(secret) = self.served() {
            return Ok(cached(secret));
        }
        let _busy = self.busy.lock().await;
        // Another caller may have renewed or logged in while this one waited.
        if let Some(secret) = self.served() {
            return Ok(cached(secret));
        }
        match self.upkeep_locked(credentials).await {
            Ok(token) => Ok(token),
            // The replacement failed, but the held token is still good for a while.
            Err(e) => self.usable().map(cached).ok_or(e),
        }
    }

    /// Renews or logs in when due; Err when that failed (even if the held token is still valid).
    pub(crate) async fn upkeep<E, F, Fut>(&self, credentials: F) -> Result<Token, TokenError<E>>
    where
        E: Display,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Credentials, E>>,
    {
        let _busy = self.busy.lock().await;
        self.upkeep_locked(credentials).await
    }

    async fn upkeep_locked<E, F, Fut>(&self, credentials: F) -> Result<Token, TokenError<E>>
    where
        E: Display,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Credentials, E>>,
    {
        let now = Instant::now();
        let renew = {
            let mut st = self.state();
            if st.held.as_ref().is_some_and(|h| h.expired(now)) {
                st.held = None;
            }
            if let Some(h) = st.held.as_ref().filter(|h| !h.due(now, &self.options)) {
                return Ok(Token {
                    secret: h.token.clone(),
                    cached: true,
                });
            }
            if let Some((at, e)) = &st.failure
                && now.duration_since(*at) < self.options.login_backoff
            {
                return Err(TokenError::Login(e.duplicate()));
            }
            st.held
                .as_ref()
                .filter(|h| h.renewable)
                .map(|h| (h.token.clone(), h.login_ttl))
        };
        if let Some((token, asked)) = renew
            && let Ok(true) = self.renew(&token, asked).await
        {
            return Ok(Token {
                secret: token,
                cached: true,
            });
        }
        self.login(credentials).await
    }

    /// `renew-self`; Ok(true) when it granted enough that no login is needed.
    async fn renew(&self, token: &SecretString, asked: Duration) -> Result<bool, Error> {
        match self.client.renew_self(token, asked).await {
            Ok(auth) => {
                let granted = auth.ttl();
                if granted.is_zero() {
                    return Ok(false);
                }
                {
                    let mut st = self.state();
                    if let Some(h) = st.held.as_mut().filter(|h| &h.token == token) {
                        h.ttl = granted;
                        h.refreshed = Instant::now();
                    }
                    st.renewals += 1;
                }
                self.emit(TokenEvent::Renewed);
                tracing::debug!(ttl_seconds = granted.as_secs(), "renewed OpenBao token");
                Ok(granted >= self.options.enough(asked))
            }
            Err(e) => {
                self.emit(TokenEvent::RenewalFailed(&e));
                match &self.label {
                    Some(source) => {
                        tracing::warn!(%source, error = %e, "OpenBao token renewal failed; logging in afresh")
                    }
                    None => {
                        tracing::debug!(error = %e, "OpenBao token renewal failed; logging in afresh")
                    }
                }
                Err(e)
            }
        }
    }

    /// Logs in now with freshly fetched credentials (the caller holds `busy`).
    async fn login<E, F, Fut>(&self, credentials: F) -> Result<Token, TokenError<E>>
    where
        E: Display,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Credentials, E>>,
    {
        let credentials = match credentials().await {
            Ok(c) => c,
            Err(e) => {
                self.state().last_error = Some(e.to_string());
                return Err(TokenError::Credentials(e));
            }
        };
        let owned = !matches!(credentials, Credentials::Token(_));
        let result = self.client.login(&credentials).await;
        let now = Instant::now();
        match result {
            Ok(auth) => {
                {
                    let mut st = self.state();
                    st.held = Some(Held::new(&auth, owned, now));
                    st.failure = None;
                    st.last_error = None;
                    st.logins += 1;
                }
                self.emit(TokenEvent::LoggedIn);
                self.log_login(&auth);
                Ok(Token {
                    secret: auth.client_token,
                    cached: false,
                })
            }
            Err(e) => {
                {
                    let mut st = self.state();
                    st.failure = Some((now, e.duplicate()));
                    st.last_error = Some(e.to_string());
                }
                self.emit(TokenEvent::LoginFailed(&e));
                match &self.label {
                    Some(source) => tracing::warn!(%source, error = %e, "OpenBao login failed"),
                    None => tracing::debug!(error = %e, "OpenBao login failed"),
                }
                Err(TokenError::Login(e))
            }
        }
    }

    fn log_login(&self, auth: &Auth) {
        let (ttl_seconds, renewable) = (auth.lease_duration, auth.renewable);
        match &self.label {
            Some(source) => {
                tracing::info!(%source, ttl_seconds, renewable, "logged in to OpenBao")
            }
            None => tracing::debug!(ttl_seconds, renewable, "logged in to OpenBao"),
        }
    }

    /// Logs in now whatever the held token's state (credentials known to have changed).
    pub(crate) async fn relogin<E, F, Fut>(&self, credentials: F) -> Result<Token, TokenError<E>>
    where
        E: Display,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Credentials, E>>,
    {
        let _busy = self.busy.lock().await;
        self.login(credentials).await
    }

    /// The held token when it is not `rejected` and still valid (someone replaced it already).
    fn replaced(&self, rejected: &SecretString) -> Option<Token> {
        let now = Instant::now();
        let st = self.state();
        st.held
            .as_ref()
            .filter(|h| &h.token != rejected && !h.expired(now))
            .map(|h| Token {
                secret: h.token.clone(),
                cached: true,
            })
    }

    /// After OpenBao answered 403 to a request made with `rejected`: Some(token) to retry with
    /// once (the token was dead and a login replaced it, or it was already replaced), None for
    /// a policy denial (report the 403).
    pub(crate) async fn denied<E, F, Fut>(
        &self,
        rejected: &SecretString,
        credentials: F,
    ) -> Result<Option<Token>, TokenError<E>>
    where
        E: Display,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Credentials, E>>,
    {
        if let Some(t) = self.replaced(rejected) {
            return Ok(Some(t));
        }
        let _busy = self.busy.lock().await;
        if let Some(t) = self.replaced(rejected) {
            return Ok(Some(t));
        }
        let now = Instant::now();
        let (holds_rejected, checked_recently) = {
            let st = self.state();
            (
                st.held.as_ref().is_some_and(|h| &h.token == rejected),
                st.checked
                    .is_some_and(|t| now.duration_since(t) < self.options.denied_recheck),
            )
        };
        if !holds_rejected {
            // Nothing valid is held (expired or forgotten): a token is needed anyway.
            return self.upkeep_locked(credentials).await.map(Some);
        }
        if checked_recently {
            return Ok(None);
        }
        self.state().checked = Some(now);
        match self.client.lookup_self(rejected).await {
            Ok(_) => {
                self.emit(TokenEvent::Checked(Ok(true)));
                Ok(None)
            }
            Err(e) if e.is_permission_denied() => {
                self.emit(TokenEvent::Checked(Ok(false)));
                tracing::debug!("the OpenBao token was revoked or expired; logging in again");
                {
                    let mut st = self.state();
                    if st.held.as_ref().is_some_and(|h| &h.token == rejected) {
                        st.held = None;
                    }
                }
                self.upkeep_locked(credentials).await.map(Some)
            }
            Err(e) => {
                self.emit(TokenEvent::Checked(Err(&e)));
                Err(TokenError::Login(e))
            }
        }
    }

    /// Takes the held token out for revocation: only one KubeBao logged in for, while it may
    /// still be valid.
    fn take_owned(&self) -> Option<SecretString> {
        let held = self.state().held.take()?;
        (held.owned && !held.expired(Instant::now())).then_some(held.token)
    }

    /// Best-effort `revoke-self` of a forgotten token (logged without the token).
    async fn revoke(&self, token: SecretString) {
        let result = self.client.revoke_self(&token).await;
        match &result {
            Ok(()) => tracing::debug!("revoked a forgotten OpenBao token"),
            Err(e) => tracing::warn!(
                error = %e,
                "could not revoke a forgotten OpenBao token; it expires at the end of its TTL"
            ),
        }
        self.emit(TokenEvent::Revoked(result.as_ref().map(|_| ())));
    }

    /// How long until upkeep is due: zero now (no token, expired, due), None for a token
    /// without expiry.
    pub(crate) fn upkeep_in(&self) -> Option<Duration> {
        let now = Instant::now();
        let st = self.state();
        match st.held.as_ref() {
            Some(h) if !h.expired(now) => h
                .due_at(&self.options)
                .map(|t| t.saturating_duration_since(now)),
            _ => Some(Duration::ZERO),
        }
    }

    /// How long `token` lives on while it is the one held (`Duration::MAX` without expiry);
    /// None once another token (or none) is held.
    pub(crate) fn remaining(&self, token: &SecretString) -> Option<Duration> {
        let now = Instant::now();
        let st = self.state();
        let held = st
            .held
            .as_ref()
            .filter(|h| &h.token == token && !h.expired(now))?;
        Some(
            held.expires_at()
                .map_or(Duration::MAX, |t| t.saturating_duration_since(now)),
        )
    }

    /// True while a valid token without expiry is held.
    pub(crate) fn holds_unexpiring_token(&self) -> bool {
        self.state().held.as_ref().is_some_and(|h| h.ttl.is_zero())
    }

    /// Whether the entry can go without loss: nothing valid held, no failure to remember.
    fn dead(&self, now: Instant) -> bool {
        let st = self.state();
        let remembering = st
            .failure
            .as_ref()
            .is_some_and(|(at, _)| now.duration_since(*at) < self.options.login_backoff);
        // An entry idle longer than its TTL has expired: renewals happen only on use.
        st.held.as_ref().is_none_or(|h| h.expired(now)) && !remembering
    }

    fn last_used(&self) -> Instant {
        self.state().last_used
    }

    pub(crate) fn status(&self) -> SlotStatus {
        let now = Instant::now();
        let st = self.state();
        let valid = st.held.as_ref().filter(|h| !h.expired(now));
        SlotStatus {
            has_token: valid.is_some(),
            ttl_remaining: valid
                .and_then(Held::expires_at)
                .map(|t| t.saturating_duration_since(now)),
            last_error: st.last_error.clone(),
            logins: st.logins,
            renewals: st.renewals,
        }
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.status();
        f.debug_struct("Slot")
            .field("has_token", &st.has_token)
            .field("ttl_remaining", &st.ttl_remaining)
            .field("last_error", &st.last_error)
            .finish()
    }
}

#[cfg(test)]
mod tests;
