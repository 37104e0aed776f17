//! What this process issued for BaoSecrets and still needs: each source's data (to build the
//! Secret again without issuing anew, e.g. when a KV source or the template changes), the
//! record it was issued under, and the token that created each lease (a lease dies with its
//! token, so whether the tenant token cache still keeps that token alive matters).
//!
//! Memory only: the data is in the target Secret, and the records are in the status. A
//! restarted operator has none of it; it resumes from the status (renewals, revocations, due
//! times) and issues new credentials, with overlap, only when it must build the Secret again.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use kubebao_openbao::SecretString;
use serde_json::{Map, Value};

use crate::api::baosecret::{CertificateStatus, LeaseStatus};
use crate::tenant::TenantIdentity;

/// The record a source's credentials were issued under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// An engine answer with a lease.
    Lease(LeaseStatus),
    /// A certificate.
    Certificate(CertificateStatus),
}

impl Record {
    /// What identifies these credentials: the lease id, or the certificate's serial number.
    pub fn id(&self) -> &str {
        match self {
            Record::Lease(l) => &l.lease_id,
            Record::Certificate(c) => &c.serial_number,
        }
    }
}

/// One source's issued credentials.
#[derive(Clone)]
pub struct HeldSource {
    /// Who issued them.
    pub who: TenantIdentity,
    /// The source's data (secret values: never log them).
    pub data: Arc<Map<String, Value>>,
    /// The token that created the lease (None for a certificate).
    pub creator: Option<SecretString>,
    /// The record they were issued under.
    pub record: Record,
}

impl std::fmt::Debug for HeldSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldSource")
            .field("who", &self.who)
            .field("keys", &self.data.keys().collect::<Vec<_>>())
            .field("record", &self.record)
            .finish()
    }
}

/// One BaoSecret's held sources.
struct Entry {
    uid: String,
    sources: HashMap<String, HeldSource>,
}

/// Issued credentials per BaoSecret (`namespace/name`).
#[derive(Default)]
pub struct Held(Mutex<HashMap<String, Entry>>);

impl Held {
    fn map(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The sources held for the BaoSecret at `key` with `uid` (a re-created one has none).
    pub fn sources(&self, key: &str, uid: &str) -> HashMap<String, HeldSource> {
        self.map()
            .get(key)
            .filter(|e| e.uid == uid)
            .map(|e| e.sources.clone())
            .unwrap_or_default()
    }

    /// Keeps `held` as source `name` of the BaoSecret at `key` with `uid`.
    pub fn keep(&self, key: &str, uid: &str, name: &str, held: HeldSource) {
        let mut map = self.map();
        let entry = map.entry(key.to_string()).or_insert_with(|| Entry {
            uid: uid.to_string(),
            sources: HashMap::new(),
        });
        if entry.uid != uid {
            *entry = Entry {
                uid: uid.to_string(),
                sources: HashMap::new(),
            };
        }
        entry.sources.insert(name.to_string(), held);
    }

    /// Keeps only the sources of `key` that `keep` accepts.
    pub fn retain_sources(&self, key: &str, keep: impl Fn(&str, &HeldSource) -> bool) {
        if let Some(e) = self.map().get_mut(key) {
            e.sources.retain(|name, held| keep(name, held));
        }
    }

    /// Forgets what is held for `key`.
    pub fn forget(&self, key: &str) {
        self.map().remove(key);
    }

    /// Forgets what is held for BaoSecrets that are gone (`live` is false for their key).
    pub fn retain(&self, live: impl Fn(&str) -> bool) {
        self.map().retain(|key, _| live(key));
    }

    /// The identities whose tokens created held leases: their tokens must not be revoked
    /// while the leases live.
    pub fn identities(&self) -> HashSet<TenantIdentity> {
        self.map()
            .values()
            .flat_map(|e| e.sources.values())
            .filter(|h| h.creator.is_some())
            .map(|h| h.who.clone())
            .collect()
    }
}
