//! Values that must never be printed: tokens, secret_ids, plaintext.

use std::fmt;

/// A string that never shows itself in `Debug` or `Display` (tokens, secret_ids, JWTs).
#[derive(Clone, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(transparent)]
pub struct SecretString(String);

impl SecretString {
    /// Wraps a sensitive string.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The sensitive value; only call where it is sent to OpenBao or written to its destination.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretString(<redacted>)")
    }
}

impl From<String> for SecretString {
    fn from(s: String) -> Self {
        Self(s)
    }
}

/// A generic OpenBao response (`data`, lease and auth fields), as returned by any engine.
#[derive(Clone, serde::Deserialize, Default)]
pub struct Secret {
    /// The engine's data; may hold secret values, so `Secret` does not implement `Debug` with it.
    #[serde(default)]
    pub data: Option<serde_json::Map<String, serde_json::Value>>,
    /// The lease of a dynamic secret ("" for static ones).
    #[serde(default)]
    pub lease_id: String,
    /// Lease duration in seconds.
    #[serde(default)]
    pub lease_duration: u64,
    /// Whether the lease can be renewed.
    #[serde(default)]
    pub renewable: bool,
    /// Present on logins.
    #[serde(default)]
    pub auth: Option<crate::Auth>,
    /// Warnings OpenBao attached to the response.
    #[serde(default)]
    pub warnings: Option<Vec<String>>,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secret")
            .field(
                "data",
                &self
                    .data
                    .as_ref()
                    .map(|d| d.keys().cloned().collect::<Vec<_>>()),
            )
            .field("lease_id", &self.lease_id)
            .field("lease_duration", &self.lease_duration)
            .field("renewable", &self.renewable)
            .finish()
    }
}
