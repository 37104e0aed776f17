//! Proof that the test bed is the real thing: Secrets land in etcd, OpenBao serves KV and
//! Transit, OpenBao's Kubernetes auth verifies real ServiceAccount tokens, and OpenBao's audit
//! log records every request (secret values HMAC'd) for tests to count.

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use kubebao_openbao::{Credentials, SecretString};
use kubebao_testbed::Testbed;
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn secret_reads_back_and_is_stored_in_etcd() {
    let bed = Testbed::shared().await;
    let ns = bed.namespace("proof").await;
    let secrets: Api<Secret> = Api::namespaced(bed.client().await, &ns);
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("db".into()),
            ..Default::default()
        },
        string_data: Some([("password".to_string(), "s3cr3t-value".to_string())].into()),
        ..Default::default()
    };
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .expect("create secret");

    let read = secrets.get("db").await.expect("read secret");
    assert_eq!(read.data.unwrap()["password"].0, b"s3cr3t-value");

    let raw = bed
        .etcd()
        .get(&format!("/registry/secrets/{ns}/db"))
        .await
        .expect("key in etcd");
    // No EncryptionConfiguration: the API server stores its protobuf encoding, value visible.
    assert!(
        raw.starts_with(b"k8s\x00"),
        "stored value is the API server's protobuf encoding"
    );
    assert!(raw.windows(12).any(|w| w == b"s3cr3t-value"));
}

#[tokio::test]
async fn openbao_serves_kv_v2_and_transit() {
    let bed = Testbed::shared().await;
    let bao = bed.openbao();
    let client = bao.client();
    let root = bao.root_token();
    bao.enable_engine("proof-kv", "kv", Some(2)).await;
    let data = json!({"password": "hunter2"}).as_object().unwrap().clone();
    let version = client
        .kv2_write(root, "proof-kv", "app/db", &data)
        .await
        .expect("kv write");
    assert_eq!(version, 1);
    let read = client
        .kv2_read(root, "proof-kv", "app/db", None)
        .await
        .expect("kv read");
    assert_eq!(read.data["password"], "hunter2");
    assert_eq!(read.version, 1);

    bao.enable_engine("proof-transit", "transit", None).await;
    bao.root(
        Method::POST,
        "proof-transit/keys/k",
        Some(json!({"type": "aes256-gcm96"})),
    )
    .await;
    let ct = client
        .transit_encrypt(root, "proof-transit", "k", b"plain", None, Some(b"ctx"))
        .await
        .expect("encrypt");
    assert!(ct.starts_with("vault:v1:"));
    let pt = client
        .transit_decrypt(root, "proof-transit", "k", &ct, Some(b"ctx"))
        .await
        .expect("decrypt");
    assert_eq!(pt, b"plain");
    let wrong_context = client
        .transit_decrypt(root, "proof-transit", "k", &ct, Some(b"other"))
        .await;
    assert!(
        wrong_context.is_err(),
        "associated data must bind the ciphertext"
    );
}

#[tokio::test]
async fn kubernetes_auth_accepts_the_bound_service_account_only() {
    let bed = Testbed::shared().await;
    bed.enable_kubernetes_auth().await;
    let bao = bed.openbao();
    let ns = bed.namespace("auth").await;
    bed.service_account(&ns, "app").await;
    bed.service_account(&ns, "intruder").await;

    bao.enable_engine("proof-auth-kv", "kv", Some(2)).await;
    let data = json!({"token": "abc"}).as_object().unwrap().clone();
    bao.client()
        .kv2_write(bao.root_token(), "proof-auth-kv", "app", &data)
        .await
        .expect("seed");
    bao.root(
        Method::POST,
        "sys/policies/acl/proof-app",
        Some(json!({"policy": "path \"proof-auth-kv/data/app\" { capabilities = [\"read\"] }"})),
    )
    .await;
    let role = format!("proof-{ns}");
    bao.root(
        Method::POST,
        &format!("auth/kubernetes/role/{role}"),
        Some(json!({
            "bound_service_account_names": ["app"],
            "bound_service_account_namespaces": [ns],
            "audience": "openbao",
            "token_policies": ["proof-app"],
            "token_ttl": "10m",
        })),
    )
    .await;

    let client = bao.client();
    let jwt = bed.service_account_token(&ns, "app", "openbao", 600).await;
    let auth = client
        .login(&Credentials::Kubernetes {
            mount: "kubernetes".into(),
            role: role.clone(),
            jwt: SecretString::new(jwt),
        })
        .await
        .expect("the bound ServiceAccount logs in");
    assert!(auth.policies.contains(&"proof-app".to_string()));
    let secret = client
        .kv2_read(&auth.client_token, "proof-auth-kv", "app", None)
        .await
        .expect("allowed read");
    assert_eq!(secret.data["token"], "abc");

    let other = bed
        .service_account_token(&ns, "intruder", "openbao", 600)
        .await;
    let refused = client
        .login(&Credentials::Kubernetes {
            mount: "kubernetes".into(),
            role,
            jwt: SecretString::new(other),
        })
        .await
        .expect_err("another ServiceAccount is refused");
    assert!(refused.is_permission_denied(), "{refused}");
}

#[tokio::test]
async fn openbao_audits_each_request_by_path_and_operation_with_secrets_hashed() {
    let bed = Testbed::shared().await;
    bed.enable_kubernetes_auth().await;
    let bao = bed.openbao();
    let ns = bed.namespace("audit").await;
    bed.service_account(&ns, "app").await;
    bao.enable_engine("proof-audit-kv", "kv", Some(2)).await;
    bao.root(
        Method::POST,
        "sys/policies/acl/proof-audit",
        Some(json!({"policy": "path \"proof-audit-kv/data/app\" { capabilities = [\"read\"] }"})),
    )
    .await;
    let role = format!("proof-audit-{ns}");
    bao.root(
        Method::POST,
        &format!("auth/kubernetes/role/{role}"),
        Some(json!({
            "bound_service_account_names": ["app"],
            "bound_service_account_namespaces": [ns],
            "audience": "openbao",
            "token_policies": ["proof-audit"],
        })),
    )
    .await;
    let mark = bao.audit().len();
    let client = bao.client();
    let value = format!("audited-secret-{ns}");
    let data = json!({"password": value}).as_object().unwrap().clone();
    client
        .kv2_write(bao.root_token(), "proof-audit-kv", "app", &data)
        .await
        .expect("write");
    let jwt = bed.service_account_token(&ns, "app", "openbao", 600).await;
    let auth = client
        .login(&Credentials::Kubernetes {
            mount: "kubernetes".into(),
            role: role.clone(),
            jwt: SecretString::new(jwt),
        })
        .await
        .expect("login");
    for _ in 0..2 {
        client
            .kv2_read(&auth.client_token, "proof-audit-kv", "app", None)
            .await
            .expect("allowed read");
    }
    client
        .kv2_read(&auth.client_token, "proof-audit-kv", "other", None)
        .await
        .expect_err("a path the policy does not grant");

    let audit = bao.audit().since(mark);
    assert_eq!(audit.count("proof-audit-kv/data/app", "create"), 1);
    assert_eq!(audit.count("proof-audit-kv/data/app", "read"), 2);
    let denied = audit.filter(|r| r.path == "proof-audit-kv/data/other");
    assert_eq!(denied.len(), 1);
    assert!(
        denied.requests[0]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("permission denied")),
        "{:?}",
        denied.requests[0]
    );
    // Logins are found by their role's HMAC; requests carry the token's metadata and an HMAC
    // of the token, equal to the one the login issued.
    let logins = audit.logins("kubernetes", "role", &bao.audit_hash(&role).await);
    assert_eq!(logins.len(), 1);
    let issued = logins.requests[0]
        .issued_token
        .clone()
        .expect("issued token");
    let reads = audit.filter(|r| r.path == "proof-audit-kv/data/app" && r.operation == "read");
    for r in &reads.requests {
        assert_eq!(r.client_token.as_deref(), Some(issued.as_str()));
        assert_eq!(r.token_metadata["service_account_namespace"], ns);
        assert!(r.token_policies.contains(&"proof-audit".to_string()));
    }
    let log = std::fs::read_to_string(bao.audit_log()).expect("audit log");
    assert!(
        !log.contains(&value),
        "a secret value in plaintext in the audit log"
    );
    assert!(
        !log.contains(auth.client_token.expose()),
        "a token in plaintext in the audit log"
    );
}
