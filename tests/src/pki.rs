//! The test bed's certificates and keys, made fresh for every control plane.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Files of the test bed PKI, all PEM.
#[derive(Clone, Debug)]
pub struct Pki {
    /// CA certificate (signs serving and client certificates).
    pub ca_cert: PathBuf,
    /// Serving certificate for 127.0.0.1 / localhost (kube-apiserver, OpenBao's TLS listener).
    pub serving_cert: PathBuf,
    /// Its key.
    pub serving_key: PathBuf,
    /// Admin client certificate (`O=system:masters`).
    pub admin_cert: PathBuf,
    /// Its key.
    pub admin_key: PathBuf,
    /// ServiceAccount token signing key (private).
    pub sa_signing_key: PathBuf,
    /// ServiceAccount token verification key (public).
    pub sa_public_key: PathBuf,
}

fn write(dir: &Path, name: &str, pem: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem).expect("write PKI file");
    path
}

impl Pki {
    /// Generates everything into `dir`.
    pub fn generate(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("create pki dir");
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "kubebao-testbed-ca");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key).expect("self-sign CA");
        let issuer = Issuer::new(ca, ca_key);

        let serving_key = KeyPair::generate().expect("serving key");
        let mut serving = CertificateParams::default();
        serving
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        serving.subject_alt_names = vec![
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            // How pods on a node reach the API server and OpenBao (node/services.rs).
            SanType::IpAddress(IpAddr::V4(crate::node::SERVICE_IP)),
            SanType::DnsName("localhost".try_into().expect("dns name")),
            SanType::DnsName("kubernetes.default.svc".try_into().expect("dns name")),
        ];
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving_cert = serving
            .signed_by(&serving_key, &issuer)
            .expect("sign serving cert");

        let admin_key = KeyPair::generate().expect("admin key");
        let mut admin = CertificateParams::default();
        admin
            .distinguished_name
            .push(DnType::CommonName, "kubebao-testbed-admin");
        admin
            .distinguished_name
            .push(DnType::OrganizationName, "system:masters");
        admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let admin_cert = admin
            .signed_by(&admin_key, &issuer)
            .expect("sign admin cert");

        let sa_key = KeyPair::generate().expect("service account key");

        Self {
            ca_cert: write(dir, "ca.crt", &ca_cert.pem()),
            serving_cert: write(dir, "serving.crt", &serving_cert.pem()),
            serving_key: write(dir, "serving.key", &serving_key.serialize_pem()),
            admin_cert: write(dir, "admin.crt", &admin_cert.pem()),
            admin_key: write(dir, "admin.key", &admin_key.serialize_pem()),
            sa_signing_key: write(dir, "sa.key", &sa_key.serialize_pem()),
            sa_public_key: write(dir, "sa.pub", &sa_key.public_key_pem()),
        }
    }

    /// The CA certificate as PEM text.
    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(&self.ca_cert).expect("read CA")
    }
}
