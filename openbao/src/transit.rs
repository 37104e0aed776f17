//! Transit secrets engine: keys, encrypt and decrypt with explicit versions and associated data,
//! and the key_id KubeBao derives from a key version.
//!
//! key_id = `kb1-` + the first 128 bits of SHA-256 over (format tag, Transit mount, key name,
//! key version, creation time of that version), hex; each input is length-prefixed, so no two
//! different inputs hash the same. The KMS plugin reports it to the API server, which stores it
//! next to every encrypted Secret; the operator computes the same value to show the current
//! key_id. Why these inputs:
//! - a version's creation time identifies the key *instance*: a key deleted and re-created
//!   under the same name gets new key_ids, so a key_id is never reused for other key material
//!   (OpenBao lists the creation time of every version that can still decrypt, which is
//!   exactly the set of key_ids Decrypt must recognise; versions below
//!   `min_decryption_version` are hidden, so an identity based on version 1 would not work);
//! - mount and name tell keys apart within one OpenBao; the OpenBao address is deliberately not
//!   included, so moving OpenBao behind another DNS name keeps every stored Secret readable
//!   (renaming the mount or key does change the ids: stored Secrets would then be unreadable);
//! - hashing hides the topology (mount, key name, version) from anyone reading etcd.
//!
//! Stored Secrets depend on this value: it must never change (see the golden test).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::{Error, OpenBao, Result, SecretString};

/// Prefix of every key_id KubeBao issues (format version 1).
pub const KEY_ID_PREFIX: &str = "kb1-";

/// The key_id of `version` of Transit key `mount`/`name`, created at `created` (exactly as
/// OpenBao reports it in the key's `keys` map: RFC 3339 text, or unix seconds for old keys).
pub fn key_id(mount: &str, name: &str, version: u64, created: &str) -> String {
    let mut h = Sha256::new();
    for part in [
        "kubebao-kms/key-id/v1",
        mount,
        name,
        &version.to_string(),
        created,
    ] {
        // Length-prefixed so no two different inputs hash the same.
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    let digest = h.finalize();
    let mut id = String::with_capacity(KEY_ID_PREFIX.len() + 32);
    id.push_str(KEY_ID_PREFIX);
    for b in &digest[..16] {
        id.push_str(&format!("{b:02x}"));
    }
    id
}

/// True when `key_id` has the shape of a key_id KubeBao issues (`kb1-` + 32 lowercase hex digits).
pub fn is_well_formed_key_id(key_id: &str) -> bool {
    key_id.len() == KEY_ID_PREFIX.len() + 32
        && key_id.starts_with(KEY_ID_PREFIX)
        && key_id[KEY_ID_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

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

impl TransitKey {
    /// The key_id of `version` of this key under `mount`; None when OpenBao does not list that
    /// version (it lists only versions that can still decrypt).
    pub fn key_id(&self, mount: &str, version: u64) -> Option<String> {
        let v = self.versions.iter().find(|v| v.version == version)?;
        Some(key_id(mount, &self.name, v.version, &v.created))
    }

    /// The key_id of the latest version (the one Encrypt uses).
    pub fn current_key_id(&self, mount: &str) -> Option<String> {
        self.key_id(mount, self.latest_version)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Golden values, computed once from the derivation as it shipped (the KMS plugin's
    /// `envelope.rs` before it moved here). Stored Secrets carry these ids: never update them.
    #[test]
    fn key_ids_never_change() {
        assert_eq!(
            key_id("transit", "kubebao-kms", 3, "1700000000"),
            "kb1-44e77cdb3fe492f3c49e37289869f79e"
        );
        assert_eq!(
            key_id("transit", "kms", 3, "1700000000"),
            "kb1-78e2a7c29d22832d58671a4dca0e5769"
        );
        assert_eq!(
            key_id(
                "kv/transit",
                "cluster-a",
                1,
                "2024-05-01T10:00:00.123456789Z"
            ),
            "kb1-c2e9f563ed115d0d38ce3f74e9cfb2f7"
        );
    }

    #[test]
    fn key_ids_are_well_formed_and_differ_per_input() {
        let id = key_id("transit", "kms", 1, "1");
        assert!(is_well_formed_key_id(&id), "{id}");
        assert_ne!(id, key_id("transit", "kms", 2, "1"));
        assert_ne!(id, key_id("transit", "kms", 1, "2"));
        assert_ne!(id, key_id("transit2", "kms", 1, "1"));
        // Length prefixes: moving a character between mount and name changes the id.
        assert_ne!(key_id("ab", "c", 1, "1"), key_id("a", "bc", 1, "1"));
        for bad in [
            "",
            "kb1-",
            "kb1-XYZ",
            "kb2-00000000000000000000000000000000",
            "kb1-0000000000000000000000000000000G",
            "kb1-0000000000000000000000000000000A",
            "kb1-000000000000000000000000000000000",
        ] {
            assert!(!is_well_formed_key_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_keys_current_key_id_is_its_latest_versions() {
        let key = TransitKey {
            name: "kubebao-kms".into(),
            key_type: "aes256-gcm96".into(),
            latest_version: 3,
            min_decryption_version: 2,
            min_encryption_version: 0,
            versions: vec![
                TransitKeyVersion {
                    version: 2,
                    created: "1690000000".into(),
                },
                TransitKeyVersion {
                    version: 3,
                    created: "1700000000".into(),
                },
            ],
            deletion_allowed: false,
            exportable: false,
            supports_encryption: true,
            auto_rotate_period: 0,
        };
        assert_eq!(
            key.current_key_id("transit").as_deref(),
            Some("kb1-44e77cdb3fe492f3c49e37289869f79e")
        );
        assert_eq!(key.key_id("transit", 1), None, "version 1 is not listed");
    }
}
