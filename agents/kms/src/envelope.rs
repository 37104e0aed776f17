//! What the plugin hands the API server and checks when it comes back: the key_id, the
//! annotations, the associated data and the shape of a Transit ciphertext.
//!
//! The key_id is derived in one place, shared with the operator:
//! [`kubebao_openbao::transit::key_id`] (its module doc explains the inputs). Decrypt cannot
//! invert the hash; it looks the key_id up among the versions the key snapshot says are still
//! decryptable, so an unknown key_id is refused before OpenBao is called.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
pub use kubebao_openbao::transit::{KEY_ID_PREFIX, is_well_formed_key_id, key_id};

/// Annotation holding the Transit key version (not secret).
pub const ANNOTATION_KEY_VERSION: &str = "key-version.kubebao.io";
/// Annotation holding the envelope format (not secret).
pub const ANNOTATION_FORMAT: &str = "format.kubebao.io";
/// The envelope format this plugin writes.
pub const FORMAT: &str = "transit-v1";
/// Largest plaintext accepted. The API server sends a 32-byte DEK seed; 512 bytes leaves room
/// while the Transit ciphertext (`vault:vN:` + base64 of nonce‖data‖tag) stays under the
/// API server's 1 KiB ciphertext limit.
pub const MAX_PLAINTEXT: usize = 512;
/// The API server's limit for ciphertext and key_id.
pub const MAX_CIPHERTEXT: usize = 1024;
/// The API server's limit for key_id.
pub const MAX_KEY_ID: usize = 1024;
/// The API server's limit for the annotations of one ciphertext (keys and values together).
pub const MAX_ANNOTATIONS: usize = 32 * 1024;
/// Largest gRPC request the service decodes. The API server's own limits (k8s.io/apiserver
/// kmsv2: encrypted DEK source 1 KiB, key_id 1 KiB, annotations 32 KiB; Encrypt carries a
/// 32-byte seed, not the object) make the largest KMS v2 request a Decrypt of about 34 KiB;
/// 64 KiB leaves room for the uid and the protobuf framing. A larger request is refused from
/// its length prefix, before its bytes are read into memory.
pub const MAX_REQUEST: usize = 64 * 1024;
const _: () = assert!(MAX_REQUEST >= MAX_CIPHERTEXT + MAX_KEY_ID + MAX_ANNOTATIONS + 8 * 1024);
/// AES-GCM nonce + tag: a shorter Transit ciphertext is certainly truncated.
const MIN_RAW_CIPHERTEXT: usize = 12 + 16 + 1;

/// Associated data for Transit: binds a ciphertext to its key_id and the configured context.
/// The API server does not tell the plugin which object a DEK belongs to, so the object
/// itself cannot be bound here (the API server binds DEK-encrypted data to the object path).
pub fn associated_data(key_id: &str, context: &str) -> Vec<u8> {
    let mut ad = Vec::with_capacity(64 + context.len());
    ad.extend_from_slice(b"kubebao-kms/aad/v1\0");
    ad.extend_from_slice(key_id.as_bytes());
    ad.push(0);
    ad.extend_from_slice(context.as_bytes());
    ad
}

/// The annotations stored next to a ciphertext (non-secret metadata only).
pub fn annotations(version: u64) -> BTreeMap<String, Vec<u8>> {
    BTreeMap::from([
        (
            ANNOTATION_KEY_VERSION.to_string(),
            version.to_string().into_bytes(),
        ),
        (ANNOTATION_FORMAT.to_string(), FORMAT.as_bytes().to_vec()),
    ])
}

/// Why a Decrypt request was refused before calling OpenBao.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Empty ciphertext.
    #[error("ciphertext is empty")]
    EmptyCiphertext,
    /// Ciphertext over the limit.
    #[error("ciphertext is {0} bytes, over the {MAX_CIPHERTEXT}-byte limit")]
    CiphertextTooLong(usize),
    /// key_id empty, too long, or not a KubeBao key_id.
    #[error("key_id is not a KubeBao key_id ({KEY_ID_PREFIX} + 32 hex digits)")]
    MalformedKeyId,
    /// Annotations missing, unknown or inconsistent.
    #[error("annotations: {0}")]
    Annotations(String),
    /// Ciphertext not in Transit's format or not for the expected version.
    #[error("ciphertext: {0}")]
    Ciphertext(String),
}

/// Checks annotations against the version the key_id resolved to.
pub fn check_annotations(
    annotations: &std::collections::HashMap<String, Vec<u8>>,
    version: u64,
) -> Result<(), Refusal> {
    for key in annotations.keys() {
        if key != ANNOTATION_KEY_VERSION && key != ANNOTATION_FORMAT {
            return Err(Refusal::Annotations(format!(
                "unexpected annotation {key:?}; this plugin writes only {ANNOTATION_KEY_VERSION} and {ANNOTATION_FORMAT}"
            )));
        }
    }
    let get = |k: &str| {
        annotations
            .get(k)
            .ok_or_else(|| Refusal::Annotations(format!("{k} is missing")))
    };
    if get(ANNOTATION_FORMAT)?.as_slice() != FORMAT.as_bytes() {
        return Err(Refusal::Annotations(format!(
            "{ANNOTATION_FORMAT} is not {FORMAT:?}"
        )));
    }
    let v = get(ANNOTATION_KEY_VERSION)?;
    if v.as_slice() != version.to_string().as_bytes() {
        return Err(Refusal::Annotations(format!(
            "{ANNOTATION_KEY_VERSION} does not match the key version of the key_id"
        )));
    }
    Ok(())
}

/// Checks the request sizes and the key_id shape.
pub fn check_request(ciphertext: &[u8], key_id: &str) -> Result<(), Refusal> {
    if ciphertext.is_empty() {
        return Err(Refusal::EmptyCiphertext);
    }
    if ciphertext.len() > MAX_CIPHERTEXT {
        return Err(Refusal::CiphertextTooLong(ciphertext.len()));
    }
    if key_id.len() > MAX_KEY_ID || !is_well_formed_key_id(key_id) {
        return Err(Refusal::MalformedKeyId);
    }
    Ok(())
}

/// Checks that `ciphertext` is a whole Transit ciphertext of `version` and returns it as text.
pub fn check_ciphertext(ciphertext: &[u8], version: u64) -> Result<&str, Refusal> {
    let text = std::str::from_utf8(ciphertext)
        .map_err(|_| Refusal::Ciphertext("not a Transit ciphertext".into()))?;
    let prefix = format!("vault:v{version}:");
    let body = text.strip_prefix(&prefix).ok_or_else(|| {
        Refusal::Ciphertext("not a Transit ciphertext for the key version of the key_id".into())
    })?;
    let raw = B64
        .decode(body)
        .map_err(|_| Refusal::Ciphertext("truncated or corrupted (not base64)".into()))?;
    if raw.len() < MIN_RAW_CIPHERTEXT {
        return Err(Refusal::Ciphertext("truncated".into()));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// The key_id of `version` of the test key `transit/kms`.
    fn kid(version: u64, created: &str) -> String {
        key_id("transit", "kms", version, created)
    }

    #[test]
    fn requests_with_a_malformed_key_id_or_ciphertext_are_refused() {
        let long = "a".repeat(2000);
        assert_eq!(check_request(b"x", &long), Err(Refusal::MalformedKeyId));
        assert_eq!(check_request(b"x", "kb1-XYZ"), Err(Refusal::MalformedKeyId));
        assert_eq!(
            check_request(&[0; 1025], &kid(1, "1")),
            Err(Refusal::CiphertextTooLong(1025))
        );
        assert_eq!(
            check_request(b"", &kid(1, "1")),
            Err(Refusal::EmptyCiphertext)
        );
    }

    #[test]
    fn key_ids_are_stable_well_formed_and_differ_per_version_and_key_instance() {
        let t = "1700000000";
        assert_eq!(kid(1, t), kid(1, t));
        assert_ne!(kid(1, t), kid(2, t));
        assert!(is_well_formed_key_id(&kid(7, t)));
        assert_ne!(
            kid(1, t),
            kid(1, "1700000001"),
            "a re-created key must get new ids"
        );
        assert_ne!(kid(1, t), key_id("transit2", "kms", 1, t));
        // No raw topology in the id.
        let id = kid(3, t);
        assert!(!id.contains("transit") && !id.contains("kms") && !id.ends_with('3'));
        // Golden value: the id must never change across releases (stored Secrets depend on it).
        assert_eq!(id, "kb1-78e2a7c29d22832d58671a4dca0e5769");
        assert_eq!(id.len(), 36);
    }

    #[test]
    fn annotations_must_be_exactly_ours_and_match_the_version() {
        let ours: HashMap<String, Vec<u8>> = annotations(4).into_iter().collect();
        assert_eq!(check_annotations(&ours, 4), Ok(()));
        assert!(check_annotations(&ours, 5).is_err());
        let mut extra = ours.clone();
        extra.insert("evil.example.com".into(), b"1".to_vec());
        assert!(check_annotations(&extra, 4).is_err());
        let mut missing = ours.clone();
        missing.remove(ANNOTATION_FORMAT);
        assert!(check_annotations(&missing, 4).is_err());
        assert!(check_annotations(&HashMap::new(), 4).is_err());
        // Every key is a fully qualified domain name, as the API server requires
        // (validation.IsFullyQualifiedDomainName: lowercase labels, at least two, no '/').
        for k in ours.keys() {
            let labels: Vec<&str> = k.split('.').collect();
            assert!(labels.len() >= 2, "{k}");
            assert!(
                labels.iter().all(|l| !l.is_empty()
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')),
                "{k} is not a fully qualified domain name"
            );
        }
    }

    #[test]
    fn ciphertexts_are_checked_for_version_and_truncation() {
        let whole = format!("vault:v2:{}", B64.encode([7u8; 60]));
        assert!(check_ciphertext(whole.as_bytes(), 2).is_ok());
        assert!(check_ciphertext(whole.as_bytes(), 3).is_err());
        let cut = &whole[..whole.len() - 3];
        assert!(check_ciphertext(cut.as_bytes(), 2).is_err());
        let short = format!("vault:v2:{}", B64.encode([7u8; 20]));
        assert!(check_ciphertext(short.as_bytes(), 2).is_err());
        assert!(check_ciphertext(&[0xff, 0xfe], 2).is_err());
    }

    #[test]
    fn associated_data_differs_by_key_id_and_context() {
        assert_ne!(
            associated_data(&kid(1, "1"), ""),
            associated_data(&kid(2, "1"), "")
        );
        assert_ne!(
            associated_data(&kid(1, "1"), "a"),
            associated_data(&kid(1, "1"), "b")
        );
    }
}
