//! OpenBao preparation for the KMS plugin, idempotent: the Transit mount and key, the rotation
//! schedule, the plugin's policy and its AppRole. Every step reads first and writes only what
//! differs, so a steady-state reconcile makes no writes.

use reqwest::Method;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use kubebao_openbao::{OpenBao, PolicyWrite, SecretString, TransitKey};

use crate::installation::types::KmsSpec;

/// Why preparation failed.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// An OpenBao call failed.
    #[error(transparent)]
    OpenBao(#[from] kubebao_openbao::Error),
    /// OpenBao holds something that conflicts with the spec and that KubeBao will not change.
    #[error("{0}")]
    Refused(String),
}

impl PrepareError {
    /// True when retrying may succeed without a change to the spec or to OpenBao.
    pub fn is_transient(&self) -> bool {
        matches!(self, PrepareError::OpenBao(e) if e.is_unavailable())
    }
}

/// Result of preparation.
pub type Result<T, E = PrepareError> = std::result::Result<T, E>;

/// Name of the plugin's policy and AppRole role: the key's name, so clusters that share one
/// OpenBao with different keys get different policies and roles.
pub fn plugin_role_name(kms: &KmsSpec) -> String {
    kms.key_name.clone()
}

/// The key_id the KMS plugin reports for `version` (same derivation as
/// `agents/kms/src/envelope.rs`: `kb1-` + 128 bits of SHA-256 over the length-prefixed format
/// tag, mount, key name, version and that version's creation time as OpenBao reports it).
pub fn key_id(mount: &str, name: &str, version: u64, created: &str) -> String {
    let mut h = Sha256::new();
    for part in [
        "kubebao-kms/key-id/v1",
        mount,
        name,
        &version.to_string(),
        created,
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    format!("kb1-{}", hex::encode(&h.finalize()[..16]))
}

/// The key_id of the key's latest version.
pub fn current_key_id(mount: &str, key: &TransitKey) -> Option<String> {
    let latest = key
        .versions
        .iter()
        .find(|v| v.version == key.latest_version)?;
    Some(key_id(mount, &key.name, latest.version, &latest.created))
}

/// The plugin's policy: encrypt, decrypt and read metadata of its one key; nothing else.
pub fn policy_hcl(kms: &KmsSpec) -> String {
    let (m, k) = (&kms.transit_mount, &kms.key_name);
    format!(
        "# Managed by kubebao-operator: the KMS plugin's access to Transit key {m}/{k}.\n\
         path \"{m}/encrypt/{k}\" {{\n  capabilities = [\"update\"]\n}}\n\
         path \"{m}/decrypt/{k}\" {{\n  capabilities = [\"update\"]\n}}\n\
         path \"{m}/keys/{k}\" {{\n  capabilities = [\"read\"]\n}}\n"
    )
}

/// Parses an OpenBao duration (`720h`, `30m`, `3600s`, `7d`, `3600`, `0`) into seconds.
pub fn duration_seconds(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mul = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return None,
    };
    n.checked_mul(mul)
}

/// Checks names that go into OpenBao paths (no injection through `..`, spaces or quotes).
fn check_name(what: &str, v: &str) -> Result<()> {
    let ok = !v.is_empty()
        && !v.starts_with('/')
        && !v.ends_with('/')
        && v.split('/').all(|s| !s.is_empty() && s != "." && s != "..")
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    if ok {
        Ok(())
    } else {
        Err(PrepareError::Refused(format!(
            "{what} {v:?} is not a valid OpenBao path name (letters, digits, - _ . and / between parts)"
        )))
    }
}

/// Validates the spec's OpenBao names and durations.
pub fn validate(kms: &KmsSpec) -> Result<()> {
    check_name("kms.transitMount", &kms.transit_mount)?;
    check_name("kms.approleMount", &kms.approle_mount)?;
    check_name("kms.keyName", &kms.key_name)?;
    if kms.key_name.contains('/') {
        return Err(PrepareError::Refused(format!(
            "kms.keyName {:?} must not contain '/'",
            kms.key_name
        )));
    }
    match duration_seconds(&kms.rotation_period) {
        Some(0) => {}
        Some(s) if s >= 3600 => {}
        _ => {
            return Err(PrepareError::Refused(format!(
                "kms.rotationPeriod {:?} must be 0 (off) or a duration of at least 1h, e.g. 720h",
                kms.rotation_period
            )));
        }
    }
    if kms.secret_id_ttl_seconds < 600 {
        return Err(PrepareError::Refused(
            "kms.secretIdTtlSeconds must be at least 600".into(),
        ));
    }
    Ok(())
}

async fn mounted(
    bao: &OpenBao,
    token: &SecretString,
    list: &str,
    mount: &str,
) -> Result<Option<String>> {
    let v = bao
        .request(Method::GET, list, Some(token), None)
        .await?
        .unwrap_or(Value::Null);
    let key = format!("{mount}/");
    let entry = v
        .get("data")
        .and_then(|d| d.get(&key))
        .or_else(|| v.get(&key));
    Ok(entry.map(|e| {
        e.get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    }))
}

/// Enables a secrets engine or auth method at `mount` if nothing is mounted there; refuses
/// a different type already mounted there.
async fn ensure_mounted(
    bao: &OpenBao,
    token: &SecretString,
    auth: bool,
    mount: &str,
    kind: &str,
) -> Result<bool> {
    let (list, base) = if auth {
        ("sys/auth", "sys/auth")
    } else {
        ("sys/mounts", "sys/mounts")
    };
    match mounted(bao, token, list, mount).await? {
        Some(t) if t == kind => Ok(false),
        Some(t) => Err(PrepareError::Refused(format!(
            "{base}/{mount} holds a {t:?} {}, not {kind:?}; choose another mount path",
            if auth {
                "auth method"
            } else {
                "secrets engine"
            }
        ))),
        None => {
            bao.request(
                Method::POST,
                &format!("{base}/{mount}"),
                Some(token),
                Some(&json!({"type": kind})),
            )
            .await?;
            Ok(true)
        }
    }
}

/// Enables Transit if needed, creates the key if missing (not exportable, deletion not
/// allowed), and sets the rotation schedule. Returns the key as OpenBao reports it.
pub async fn ensure_transit_key(
    bao: &OpenBao,
    token: &SecretString,
    kms: &KmsSpec,
) -> Result<TransitKey> {
    ensure_mounted(bao, token, false, &kms.transit_mount, "transit").await?;
    let (mount, name) = (&kms.transit_mount, &kms.key_name);
    let period = duration_seconds(&kms.rotation_period).unwrap_or(0);
    let key = match bao.transit_key(token, mount, name).await {
        Ok(k) => k,
        Err(kubebao_openbao::Error::NotFound { .. }) => {
            bao.write(
                &format!("{mount}/keys/{name}"),
                token,
                &json!({
                    "type": kms.key_type,
                    "exportable": false,
                    "allow_plaintext_backup": false,
                    "auto_rotate_period": format!("{period}s"),
                }),
            )
            .await?;
            bao.transit_key(token, mount, name).await?
        }
        Err(e) => return Err(e.into()),
    };
    if key.exportable {
        return Err(PrepareError::Refused(format!(
            "Transit key {mount}/{name} is exportable, so its key material can leave OpenBao; \
             KubeBao will not use it. Create a new key (kms.keyName) that is not exportable"
        )));
    }
    if !key.supports_encryption {
        return Err(PrepareError::Refused(format!(
            "Transit key {mount}/{name} (type {}) does not support encryption; use aes256-gcm96",
            key.key_type
        )));
    }
    if key.key_type != kms.key_type {
        return Err(PrepareError::Refused(format!(
            "Transit key {mount}/{name} exists with type {}, the spec asks for {}; \
             a key's type cannot change: set kms.keyType to {} or choose another kms.keyName",
            key.key_type, kms.key_type, key.key_type
        )));
    }
    if key.deletion_allowed || key.auto_rotate_period != period {
        bao.write(
            &format!("{mount}/keys/{name}/config"),
            token,
            &json!({"deletion_allowed": false, "auto_rotate_period": format!("{period}s")}),
        )
        .await?;
        return Ok(bao.transit_key(token, mount, name).await?);
    }
    Ok(key)
}

/// Writes the plugin's policy when it is missing or differs.
pub async fn ensure_policy(bao: &OpenBao, token: &SecretString, kms: &KmsSpec) -> Result<String> {
    let name = plugin_role_name(kms);
    let hcl = policy_hcl(kms);
    if bao.policy_read(token, &name).await?.as_deref() != Some(hcl.as_str()) {
        bao.policy_write(token, &name, &hcl, PolicyWrite::Overwrite)
            .await?;
    }
    Ok(name)
}

/// Enables AppRole if needed and writes the plugin's role when it differs; returns the role_id.
pub async fn ensure_approle(
    bao: &OpenBao,
    token: &SecretString,
    kms: &KmsSpec,
    policy: &str,
) -> Result<String> {
    ensure_mounted(bao, token, true, &kms.approle_mount, "approle").await?;
    let role = plugin_role_name(kms);
    let path = format!("auth/{}/role/{role}", kms.approle_mount);
    let want = json!({
        "token_policies": [policy],
        "token_ttl": 3600,
        "token_max_ttl": 86400,
        "secret_id_ttl": kms.secret_id_ttl_seconds,
        "secret_id_num_uses": 0,
        "bind_secret_id": true,
    });
    let current = match bao.read(&path, token).await {
        Ok(s) => s.data,
        Err(kubebao_openbao::Error::NotFound { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let same = current.as_ref().is_some_and(|c| {
        want.as_object()
            .expect("object")
            .iter()
            .all(|(k, v)| c.get(k) == Some(v))
    });
    if !same {
        bao.write(&path, token, &want).await?;
    }
    let role_id = bao.read(&format!("{path}/role-id"), token).await?;
    role_id
        .data
        .and_then(|d| d.get("role_id").and_then(Value::as_str).map(str::to_string))
        .ok_or_else(|| {
            PrepareError::OpenBao(kubebao_openbao::Error::BadResponse {
                path: format!("{path}/role-id"),
                reason: "no role_id".into(),
            })
        })
}

/// A freshly issued secret_id.
pub struct IssuedSecretId {
    /// The secret_id (never printed).
    pub secret_id: SecretString,
    /// Its accessor (not secret), kept to revoke it later.
    pub accessor: String,
    /// Its TTL in seconds.
    pub ttl: u64,
}

/// Issues a new secret_id for the plugin's role.
pub async fn issue_secret_id(
    bao: &OpenBao,
    token: &SecretString,
    kms: &KmsSpec,
) -> Result<IssuedSecretId> {
    let path = format!(
        "auth/{}/role/{}/secret-id",
        kms.approle_mount,
        plugin_role_name(kms)
    );
    let s = bao
        .write(
            &path,
            token,
            &json!({"metadata": "{\"issued_by\":\"kubebao-operator\"}"}),
        )
        .await?;
    let d = s.data.unwrap_or_default();
    let secret_id = d.get("secret_id").and_then(Value::as_str).ok_or_else(|| {
        PrepareError::OpenBao(kubebao_openbao::Error::BadResponse {
            path: path.clone(),
            reason: "no secret_id".into(),
        })
    })?;
    Ok(IssuedSecretId {
        secret_id: SecretString::new(secret_id),
        accessor: d
            .get("secret_id_accessor")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        ttl: d
            .get("secret_id_ttl")
            .and_then(Value::as_u64)
            .unwrap_or(kms.secret_id_ttl_seconds),
    })
}

/// True when a secret_id issued with `ttl` seconds and expiring at `expires_unix` should be
/// replaced at `now_unix`: when less than a third of its life is left.
pub fn secret_id_needs_renewal(now_unix: i64, expires_unix: i64, ttl: u64) -> bool {
    expires_unix - now_unix < (ttl / 3) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_id_matches_the_kms_plugin_golden_derivation() {
        // The plugin's derivation (agents/kms/src/envelope.rs): same inputs, same id.
        let id = key_id("transit", "kubebao-kms", 3, "1700000000");
        assert!(id.starts_with("kb1-") && id.len() == 36, "{id}");
        assert_eq!(id, key_id("transit", "kubebao-kms", 3, "1700000000"));
        assert_ne!(id, key_id("transit", "kubebao-kms", 4, "1700000000"));
        assert_ne!(id, key_id("transit", "kubebao-kms", 3, "1700000001"));
    }

    #[test]
    fn the_policy_grants_only_encrypt_decrypt_and_read_on_the_one_key() {
        let kms = KmsSpec::default();
        let hcl = policy_hcl(&kms);
        assert_eq!(hcl.matches("path ").count(), 3);
        assert!(hcl.contains("path \"transit/encrypt/kubebao-kms\""));
        assert!(hcl.contains("path \"transit/decrypt/kubebao-kms\""));
        assert!(hcl.contains("path \"transit/keys/kubebao-kms\" {\n  capabilities = [\"read\"]"));
        assert!(!hcl.contains("delete") && !hcl.contains("export") && !hcl.contains('*'));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(duration_seconds("720h"), Some(720 * 3600));
        assert_eq!(duration_seconds("0"), Some(0));
        assert_eq!(duration_seconds("7d"), Some(7 * 86400));
        assert_eq!(duration_seconds("5 parsecs"), None);
    }

    #[test]
    fn names_that_could_escape_their_path_are_refused() {
        let bad = [
            KmsSpec {
                key_name: "../sys".into(),
                ..KmsSpec::default()
            },
            KmsSpec {
                transit_mount: "transit\" {".into(),
                ..KmsSpec::default()
            },
            KmsSpec {
                rotation_period: "10m".into(),
                ..KmsSpec::default()
            },
        ];
        for kms in bad {
            assert!(validate(&kms).is_err(), "{kms:?}");
        }
        assert!(validate(&KmsSpec::default()).is_ok());
    }

    #[test]
    fn a_secret_id_is_renewed_when_a_third_of_its_life_is_left() {
        assert!(!secret_id_needs_renewal(0, 3000, 3000));
        assert!(!secret_id_needs_renewal(1999, 3000, 3000));
        assert!(secret_id_needs_renewal(2001, 3000, 3000));
    }
}
