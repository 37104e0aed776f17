//! A small, strict OpenBao client shared by the KubeBao operator and agents.
//!
//! Why our own client instead of `vaultrs`: every caller needs errors that say *what* failed
//! (sealed, unreachable, permission denied on which path, not found) to turn them into gRPC
//! codes, conditions and readable messages; Transit needs explicit key versions and associated
//! data; policies need check-and-set writes; the CSI provider needs arbitrary engine calls
//! (`method` + `secretArgs`). One typed layer over one `reqwest` client covers all of it with
//! a single HTTP/TLS stack (rustls, no OpenSSL). See docs/architecture.md.

mod auth;
mod client;
pub mod duration;
mod error;
#[cfg(test)]
mod fake;
mod kv;
mod lease;
mod policy;
mod secret;
mod session;
pub mod tokens;
pub mod transit;

pub use auth::{Auth, Credentials};
pub use client::{ClientConfig, Health, OpenBao};
pub use error::{Error, Result};
pub use kv::{KvMetadata, KvSecret};
pub use lease::with_query;
pub use policy::{PolicyWrite, PolicyWriteOutcome};
pub use secret::{Secret, SecretString};
pub use session::{CredentialSource, Session, SessionOptions, SessionStatus};
pub use tokens::{Token, TokenCache, TokenError, TokenEvent, TokenObserver, TokenOptions};
pub use transit::{TransitKey, TransitKeyVersion};

/// Installs ring as the process-wide rustls crypto provider. Call first in every `main`
/// (and in tests before building a client); calling it again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
