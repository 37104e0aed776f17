//! Transit secrets engine: keys, encrypt and decrypt with explicit versions and associated data.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

use crate::{Error, OpenBao, Result, SecretString};

/// A Transit key as `GET <mount>/keys/<name>` reports it (no key material).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransitKey {
    /// Key name.
    pub name: String,
    /// Key type, e.g. `aes256-gcm96`.
    pub key_type: String,
    /// Newest version (encrypt uses it unless told otherwise).
    pub latest_version: u64,
    /// Oldest version decrypt still allows.
    pub min_decryption_version: u64,
    /// Minimum version encrypt allows (0 = any).
    pub min_encryption_version: u64,
    /// Versions and their creation times.
    pub versions: Vec<TransitKeyVersion>,
    /// Whether the key may be deleted.
    pub deletion_allowed: bool,
    /// Whether the key may be exported.
    pub exportable: bool,
    /// Whether encrypt and decrypt are supported.
    pub supports_encryption: bool,
    /// Auto-rotation period in seconds (0 = off).
    pub auto_rotate_period: u64,
}

/// One version of a Transit key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransitKeyVersion {
    /// Version number.
    pub version: u64,
    /// Creation time as OpenBao reports it (RFC 3339, or unix seconds for old keys).
    pub created: String,
}

impl OpenBao {
    /// Reads key metadata.
    pub async fn transit_key(
        &self,
        token: &SecretString,
        mount: &str,
        name: &str,
    ) -> Result<TransitKey> {
        let path = format!("{mount}/keys/{name}");
        let secret = self.read(&path, token).await?;
        let bad = |r: &str| Error::BadResponse {
            path: path.clone(),
            reason: r.into(),
        };
        let d = secret.data.ok_or_else(|| bad("no data"))?;
        let num = |k: &str| d.get(k).and_then(Value::as_u64).unwrap_or(0);
        let flag = |k: &str| d.get(k).and_then(Value::as_bool).unwrap_or(false);
        let mut versions: Vec<TransitKeyVersion> = d
            .get("keys")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("no keys"))?
            .iter()
            .filter_map(|(v, created)| {
                Some(TransitKeyVersion {
                    version: v.parse().ok()?,
                    created: match created {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    },
                })
            })
            .collect();
        versions.sort_by_key(|v| v.version);
        Ok(TransitKey {
            name: d.get("name").and_then(Value::as_str).unwrap_or(name).into(),
            key_type: d
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .into(),
            latest_version: num("latest_version"),
            min_decryption_version: num("min_decryption_version"),
            min_encryption_version: num("min_encryption_version"),
            versions,
            deletion_allowed: flag("deletion_allowed"),
            exportable: flag("exportable"),
            supports_encryption: flag("supports_encryption"),
            auto_rotate_period: num("auto_rotate_period"),
        })
    }

    /// Encrypts with an explicit key version; `associated_data` binds the ciphertext to a
    /// context (AEAD key types only). Returns OpenBao's `vault:vN:…` ciphertext.
    pub async fn transit_encrypt(
        &self,
        token: &SecretString,
        mount: &str,
        name: &str,
        plaintext: &[u8],
        key_version: Option<u64>,
        associated_data: Option<&[u8]>,
    ) -> Result<String> {
        let path = format!("{mount}/encrypt/{name}");
        let mut body = json!({"plaintext": B64.encode(plaintext)});
        if let Some(v) = key_version {
            body["key_version"] = json!(v);
        }
        if let Some(ad) = associated_data {
            body["associated_data"] = json!(B64.encode(ad));
        }
        let secret = self.write(&path, token, &body).await?;
        secret
            .data
            .and_then(|d| {
                d.get("ciphertext")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .ok_or_else(|| Error::BadResponse {
                path,
                reason: "no ciphertext".into(),
            })
    }

    /// Decrypts a `vault:vN:…` ciphertext.
    pub async fn transit_decrypt(
        &self,
        token: &SecretString,
        mount: &str,
        name: &str,
        ciphertext: &str,
        associated_data: Option<&[u8]>,
    ) -> Result<Vec<u8>> {
        let path = format!("{mount}/decrypt/{name}");
        let mut body = json!({"ciphertext": ciphertext});
        if let Some(ad) = associated_data {
            body["associated_data"] = json!(B64.encode(ad));
        }
        let secret = self.write(&path, token, &body).await?;
        let b64 = secret
            .data
            .and_then(|d| {
                d.get("plaintext")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .ok_or_else(|| Error::BadResponse {
                path: path.clone(),
                reason: "no plaintext".into(),
            })?;
        B64.decode(b64).map_err(|_| Error::BadResponse {
            path,
            reason: "plaintext is not base64".into(),
        })
    }

    /// Rotates the key (new latest version).
    pub async fn transit_rotate(
        &self,
        token: &SecretString,
        mount: &str,
        name: &str,
    ) -> Result<()> {
        self.write(&format!("{mount}/keys/{name}/rotate"), token, &json!({}))
            .await
            .map(|_| ())
    }
}
