//! OpenBao preparation for the KMS plugin, idempotent: the Transit mount and key, the rotation
//! schedule, the plugin's policy and its AppRole. Every step reads first and writes only what
//! differs, so a steady-state reconcile makes no writes.

use reqwest::Method;
use serde_json::{Value, json};

use std::time::Duration;

use kubebao_openbao::duration::{self, Bounds};
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

/// Longest `kms.rotationPeriod` (0 turns rotation off).
const ROTATION_PERIOD: Bounds = Bounds::new(Duration::ZERO, Duration::from_secs(10 * 8760 * 3600));

/// `kms.rotationPeriod` in seconds: 0 (off) or at least an hour.
fn rotation_period_seconds(kms: &KmsSpec) -> Result<u64> {
    let refused = |why: String| {
        PrepareError::Refused(format!(
            "kms.rotationPeriod {why}; use 0 (off) or a duration of at least 1h, e.g. 720h"
        ))
    };
    let period = duration::parse(&kms.rotation_period, ROTATION_PERIOD)
        .map_err(|e| refused(e.to_string()))?;
    if !period.is_zero() && period < Duration::from_secs(3600) {
        return Err(refused(format!(
            "{:?} is shorter than 1h",
            kms.rotation_period
        )));
    }
    Ok(period.as_secs())
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
    rotation_period_seconds(kms)?;
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
    let period = rotation_period_seconds(kms)?;
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
    fn rotation_period_is_off_or_at_least_an_hour() {
        let kms = |p: &str| KmsSpec {
            rotation_period: p.into(),
            ..Default::default()
        };
        assert_eq!(rotation_period_seconds(&kms("720h")).unwrap(), 720 * 3600);
        assert_eq!(rotation_period_seconds(&kms("0")).unwrap(), 0);
        assert_eq!(rotation_period_seconds(&kms("7d")).unwrap(), 7 * 86400);
        for bad in ["5 parsecs", "30m", "99999999999999999999h", ""] {
            let e = rotation_period_seconds(&kms(bad)).unwrap_err().to_string();
            assert!(
                e.contains("kms.rotationPeriod") && e.contains("720h"),
                "{e}"
            );
        }
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
