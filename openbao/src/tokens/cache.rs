//! [`TokenCache`]: many identities, one [`Slot`](super::Slot) each, under the module's rules.

use std::collections::HashMap;
use std::fmt::Display;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use super::*;

/// OpenBao tokens for many identities (one per key), under the rules of the module doc.
///
/// The client passed when a key is first seen is used for all of that identity's OpenBao
/// calls (login, renewal, lookup, revocation): put whatever selects the server (address,
/// namespace) into the key.
pub struct TokenCache<K> {
    options: TokenOptions,
    observer: Option<TokenObserver>,
    entries: Mutex<HashMap<K, Arc<Slot>>>,
}

impl<K> std::fmt::Debug for TokenCache<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("options", &self.options)
            .field("entries", &self.entries().len())
            .finish()
    }
}

impl<K> TokenCache<K> {
    fn entries(&self) -> MutexGuard<'_, HashMap<K, Arc<Slot>>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<K: Clone + Eq + Hash> TokenCache<K> {
    /// An empty cache.
    pub fn new(options: TokenOptions) -> Self {
        Self {
            options,
            observer: None,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Reports every [`TokenEvent`] to `observer` (e.g. to count hits and logins).
    pub fn with_observer(
        mut self,
        observer: impl Fn(&TokenEvent<'_>) + Send + Sync + 'static,
    ) -> Self {
        self.observer = Some(Arc::new(observer));
        self
    }

    /// Identities held.
    pub fn len(&self) -> usize {
        self.entries().len()
    }

    /// True when no identity is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(super) fn slot(&self, key: &K, client: &OpenBao) -> Arc<Slot> {
        let mut entries = self.entries();
        if let Some(slot) = entries.get(key) {
            return slot.clone();
        }
        if entries.len() >= self.options.max_entries {
            for evicted in self.make_room(&mut entries) {
                if let Some(token) = evicted.take_owned() {
                    tokio::spawn(async move { evicted.revoke(token).await });
                }
            }
        }
        let slot = Arc::new(Slot::new(
            client.clone(),
            self.options.clone(),
            self.observer.clone(),
            None,
        ));
        entries.insert(key.clone(), slot.clone());
        slot
    }

    /// Removes dead entries, then the least recently used ones not in use, until one more fits.
    fn make_room(&self, entries: &mut HashMap<K, Arc<Slot>>) -> Vec<Arc<Slot>> {
        let now = Instant::now();
        let idle = |s: &Arc<Slot>| Arc::strong_count(s) == 1;
        let mut removed = Vec::new();
        entries.retain(|_, s| {
            let keep = !(idle(s) && s.dead(now));
            if !keep {
                removed.push(s.clone());
            }
            keep
        });
        if entries.len() >= self.options.max_entries {
            let mut by_age: Vec<(Instant, K)> = entries
                .iter()
                .filter(|(_, s)| idle(s))
                .map(|(k, s)| (s.last_used(), k.clone()))
                .collect();
            by_age.sort_by_key(|(at, _)| *at);
            let excess = entries.len() + 1 - self.options.max_entries.max(1);
            for (_, key) in by_age.into_iter().take(excess) {
                removed.extend(entries.remove(&key));
            }
        }
        removed
    }

    /// A token for `key`: the held one while fresh, else a renewal or a login with the
    /// credentials `credentials` fetches (called only when a login happens).
    pub async fn token<E, F, Fut>(
        &self,
        key: &K,
        client: &OpenBao,
        credentials: F,
    ) -> Result<Token, TokenError<E>>
    where
        E: Display,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Credentials, E>>,
    {
        self.slot(key, client).token(credentials).await
    }

    /// After OpenBao answered 403 to a request made with `rejected` for `key`: Some(token) to
    /// retry the request with, once (the token was dead and a fresh login replaced it, or it
    /// had been replaced already); None when the 403 is a policy denial (report it; no login).
    pub async fn denied<E, F, Fut>(
        &self,
        key: &K,
        client: &OpenBao,
        rejected: &SecretString,
        credentials: F,
    ) -> Result<Option<Token>, TokenError<E>>
    where
        E: Display,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Credentials, E>>,
    {
        let result = self.slot(key, client).denied(rejected, credentials).await;
        if let Some(observer) = &self.observer {
            match &result {
                Ok(Some(t)) if t.cached => observer(&TokenEvent::Hit),
                Ok(None) => {}
                _ => observer(&TokenEvent::Miss),
            }
        }
        result
    }

    /// How long `token` lives on while it is the one held for `key` (renewed by this cache as
    /// it is used; `Duration::MAX` without expiry); None once another token (or none) is held.
    /// Leases die with the token that created them: this tells whether that token is still
    /// kept alive.
    pub fn remaining(&self, key: &K, token: &SecretString) -> Option<Duration> {
        let slot = self.entries().get(key).cloned()?;
        slot.remaining(token)
    }

    /// How long until the token held for `key` is due for renewal (zero: due now, or none
    /// held); None when `key` has no entry or its token does not expire. Renewal happens on
    /// use: a caller that needs the token kept alive calls [`TokenCache::token`] by then.
    pub fn upkeep_in(&self, key: &K) -> Option<Duration> {
        let slot = self.entries().get(key).cloned()?;
        slot.upkeep_in()
    }

    /// Forgets `key` (its object is gone): revokes the token if KubeBao logged in for it.
    pub async fn forget(&self, key: &K) {
        let slot = self.entries().remove(key);
        if let Some(slot) = slot
            && let Some(token) = slot.take_owned()
        {
            slot.revoke(token).await;
        }
    }

    /// Forgets every entry whose token expired (idle longer than its TTL) or that holds none.
    pub async fn prune(&self) {
        let now = Instant::now();
        let removed: Vec<Arc<Slot>> = {
            let mut entries = self.entries();
            let dead: Vec<K> = entries
                .iter()
                .filter(|(_, s)| Arc::strong_count(s) == 1 && s.dead(now))
                .map(|(k, _)| k.clone())
                .collect();
            dead.iter().filter_map(|k| entries.remove(k)).collect()
        };
        for slot in removed {
            if let Some(token) = slot.take_owned() {
                slot.revoke(token).await;
            }
        }
    }
}
