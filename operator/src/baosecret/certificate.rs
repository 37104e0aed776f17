//! Certificates from OpenBao's PKI engine: the issue request, and the answer turned into the
//! Secret's data (`tls.crt`, `tls.key`, `ca.crt`: the layout of a `kubernetes.io/tls` Secret)
//! and the status record. The validity is read from the certificate itself, and the renewal
//! time is decided from that record (persisted), never from memory.

use serde_json::{Map, Value, json};
use x509_parser::pem::parse_x509_pem;

use super::leases::{Secs, certificate_renewal, format};
use super::sources::CertificateRequest;
use crate::api::baosecret::CertificateStatus;

/// The Secret keys a certificate source provides.
pub const TLS_CRT: &str = "tls.crt";
/// The private key.
pub const TLS_KEY: &str = "tls.key";
/// The CA that verifies the certificate.
pub const CA_CRT: &str = "ca.crt";

/// The body of `<mount>/issue/<role>` for `req`.
pub fn request_body(req: &CertificateRequest) -> Map<String, Value> {
    let mut body = Map::new();
    body.insert("common_name".into(), json!(req.common_name));
    if !req.alt_names.is_empty() {
        body.insert("alt_names".into(), json!(req.alt_names.join(",")));
    }
    if let Some(ttl) = &req.ttl {
        body.insert("ttl".into(), json!(ttl));
    }
    body
}

/// A certificate OpenBao issued: the source's data (secret: never log it) and its record.
pub struct Issued {
    /// `tls.crt`, `tls.key`, `ca.crt`.
    pub data: Map<String, Value>,
    /// What the status records.
    pub status: CertificateStatus,
}

/// One PEM certificate's facts.
struct Facts {
    not_before: Secs,
    not_after: Secs,
    self_signed: bool,
}

/// Reads one PEM certificate; the error says what is wrong, never the content.
fn facts(pem: &str) -> Result<Facts, String> {
    let (_, pem) = parse_x509_pem(pem.as_bytes()).map_err(|e| format!("not PEM ({e})"))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| format!("not an X.509 certificate ({e})"))?;
    let validity = cert.validity();
    Ok(Facts {
        not_before: validity.not_before.timestamp(),
        not_after: validity.not_after.timestamp(),
        self_signed: cert.subject().as_raw() == cert.issuer().as_raw(),
    })
}

/// A PEM text ending with one newline.
fn pem_line(pem: &str) -> String {
    format!("{}\n", pem.trim_end())
}

/// The answer of `<mount>/issue/<role>` for source `source`, issued at `now`: `tls.crt` is
/// the certificate followed by the intermediates of `ca_chain` (not the self-signed root),
/// `ca.crt` the root of the chain when OpenBao knows it, else the issuing CA. The renewal
/// time is at `percent` of the certificate's own validity.
pub fn from_answer(
    source: &str,
    answer: &Map<String, Value>,
    percent: u8,
    now: Secs,
    request_hash: String,
) -> Result<Issued, String> {
    let text = |key: &str| {
        answer
            .get(key)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| format!("the answer has no {key}"))
    };
    let certificate = text("certificate")?;
    let key = text("private_key")?;
    let leaf = facts(certificate).map_err(|e| format!("the certificate is {e}"))?;
    let chain: Vec<&str> = answer
        .get("ca_chain")
        .and_then(Value::as_array)
        .map(|c| c.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut tls_crt = pem_line(certificate);
    let mut root = None;
    for pem in &chain {
        match facts(pem) {
            Ok(f) if f.self_signed => root = Some(*pem),
            Ok(_) => tls_crt.push_str(&pem_line(pem)),
            Err(e) => return Err(format!("a certificate of ca_chain is {e}")),
        }
    }
    let ca = match root {
        Some(r) => r,
        None => text("issuing_ca")?,
    };
    let serial = answer
        .get("serial_number")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let renew = certificate_renewal(leaf.not_before, leaf.not_after, percent, now);
    let mut data = Map::new();
    data.insert(TLS_CRT.into(), Value::String(tls_crt));
    data.insert(TLS_KEY.into(), Value::String(pem_line(key)));
    data.insert(CA_CRT.into(), Value::String(pem_line(ca)));
    Ok(Issued {
        data,
        status: CertificateStatus {
            source: source.to_string(),
            serial_number: serial,
            not_before: format(leaf.not_before),
            not_after: format(leaf.not_after),
            renew_time: format(renew),
            request_hash,
        },
    })
}

#[cfg(test)]
mod tests {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

    use super::*;

    /// 2027-01-01, when the test leaf certificates start.
    fn start() -> Secs {
        "2027-01-01T00:00:00Z"
            .parse::<k8s_openapi::jiff::Timestamp>()
            .unwrap()
            .as_second()
    }

    /// A root, an intermediate it signed, and a leaf the intermediate signed (valid from
    /// 2027-01-01 to January `last_day`), as PEM.
    fn chain(last_day: u8) -> (String, String, String, String) {
        let ca_params = |cn: &str| {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(rcgen::DnType::CommonName, cn);
            p
        };
        let root_key = KeyPair::generate().unwrap();
        let root = ca_params("root").self_signed(&root_key).unwrap();
        let root_issuer = Issuer::new(ca_params("root"), root_key);
        let mid_key = KeyPair::generate().unwrap();
        let mid = ca_params("mid").signed_by(&mid_key, &root_issuer).unwrap();
        let mid_issuer = Issuer::new(ca_params("mid"), mid_key);
        let leaf_key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(vec!["web.example.com".to_string()]).unwrap();
        leaf.not_before = rcgen::date_time_ymd(2027, 1, 1);
        leaf.not_after = rcgen::date_time_ymd(2027, 1, last_day);
        let leaf = leaf.signed_by(&leaf_key, &mid_issuer).unwrap();
        (leaf.pem(), leaf_key.serialize_pem(), mid.pem(), root.pem())
    }

    #[test]
    fn the_answer_becomes_a_tls_secret_with_the_intermediates_and_the_root_as_ca() {
        let start = start();
        let (leaf, key, mid, root) = chain(31);
        let answer = json!({
            "certificate": leaf.trim_end(), "private_key": key, "issuing_ca": mid,
            "ca_chain": [mid, root], "serial_number": "01:02",
        });
        let issued =
            from_answer("tls", answer.as_object().unwrap(), 50, start, "h".into()).unwrap();
        let text = |k: &str| issued.data[k].as_str().unwrap().to_string();
        assert_eq!(text(TLS_CRT), format!("{}\n{}", leaf.trim_end(), mid));
        assert_eq!(text(CA_CRT), root);
        assert_eq!(text(TLS_KEY), key);
        let s = &issued.status;
        assert_eq!(s.serial_number, "01:02");
        assert_eq!(s.not_before, format(start));
        assert_eq!(s.not_after, format(start + 30 * 86400));
        assert_eq!(s.renew_time, format(start + 15 * 86400), "half of 30 days");
    }

    #[test]
    fn without_a_root_in_the_chain_the_issuing_ca_verifies() {
        let (leaf, key, mid, _) = chain(2);
        let answer =
            json!({"certificate": leaf, "private_key": key, "issuing_ca": mid, "ca_chain": [mid]});
        let issued = from_answer("tls", answer.as_object().unwrap(), 67, 0, "h".into()).unwrap();
        assert_eq!(issued.data[CA_CRT].as_str().unwrap(), mid);
        assert!(issued.data[TLS_CRT].as_str().unwrap().ends_with(&mid));
    }

    #[test]
    fn a_broken_answer_is_refused_without_quoting_it() {
        let (_, key, _, _) = chain(2);
        for answer in [
            json!({"private_key": key}),
            json!({"certificate": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----", "private_key": key}),
            json!({"certificate": "garbage", "private_key": key}),
        ] {
            let e = from_answer("tls", answer.as_object().unwrap(), 67, 0, "h".into())
                .err()
                .unwrap();
            assert!(!e.contains("PRIVATE KEY") && !e.contains("AAAA"), "{e}");
        }
    }

    #[test]
    fn the_request_names_what_the_spec_names() {
        let req = CertificateRequest {
            path: "pki/issue/web".into(),
            common_name: "web.example.com".into(),
            alt_names: vec!["a.example.com".into(), "b.example.com".into()],
            ttl: Some("24h".into()),
        };
        assert_eq!(
            Value::Object(request_body(&req)),
            json!({"common_name": "web.example.com", "alt_names": "a.example.com,b.example.com", "ttl": "24h"})
        );
    }
}
