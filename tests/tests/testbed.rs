//! Proof that the test bed is the real thing: Secrets land in etcd, OpenBao serves KV and
//! Transit, and OpenBao's Kubernetes auth verifies real ServiceAccount tokens.

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
