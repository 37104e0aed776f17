//! kube-apiserver encrypting Secrets through the plugin: at rest in etcd, across a key
//! rotation and API server restarts, and through OpenBao outages. A private test bed, because
//! the API server and OpenBao are restarted, stopped and sealed.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Agent, encrypt, status};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kubebao_testbed::{Testbed, TestbedOptions, wait_for};
use reqwest::Method;
use tonic::Code;

const PREFIX: &[u8] = b"k8s:enc:kms:v2:kubebao:";

fn encryption_config(dir: &Path, socket: &Path) -> std::path::PathBuf {
    let path = dir.join("encryption-config.yaml");
    std::fs::write(
        &path,
        format!(
            r#"apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources: [secrets]
    providers:
      - kms:
          apiVersion: v2
          name: kubebao
          endpoint: unix://{}
          timeout: 3s
      - identity: {{}}
"#,
            socket.display()
        ),
    )
    .expect("write encryption config");
    path
}

async fn put_secret(api: &Api<Secret>, name: &str, value: &str) {
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "password".to_string(),
            ByteString(value.as_bytes().to_vec()),
        )])),
        ..Default::default()
    };
    api.patch(
        name,
        &PatchParams::apply("kubebao-test").force(),
        &Patch::Apply(&secret),
    )
    .await
    .unwrap_or_else(|e| panic!("write Secret {name}: {e}"));
}

async fn read_secret(api: &Api<Secret>, name: &str) -> String {
    let s = api
        .get(name)
        .await
        .unwrap_or_else(|e| panic!("read Secret {name}: {e}"));
    String::from_utf8(s.data.expect("data")["password"].0.clone()).expect("utf8")
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn stored(bed: &Testbed, ns: &str, name: &str) -> Vec<u8> {
    bed.etcd()
        .get(&format!("/registry/secrets/{ns}/{name}"))
        .await
        .unwrap_or_else(|| panic!("Secret {ns}/{name} not in etcd"))
}

/// The plugin's flags: OpenBao over TLS, AppRole from files.
fn agent_args(
    bao: &kubebao_testbed::OpenBaoServer,
    ca: &Path,
    role_id: &Path,
    secret_id: &Path,
) -> Vec<String> {
    vec![
        format!("--openbao-addr={}", bao.tls_addr()),
        format!("--openbao-ca-file={}", ca.display()),
        "--auth-method=approle".into(),
        format!("--role-id-file={}", role_id.display()),
        format!("--secret-id-file={}", secret_id.display()),
        "--aad-context=testbed".into(),
    ]
}

#[tokio::test]
async fn apiserver_keeps_secrets_encrypted_through_rotation_restarts_and_openbao_outages() {
    let bed = Testbed::start(TestbedOptions {
        controller_manager: false,
        openbao: true,
    })
    .await;
    let bao = bed.openbao();
    let dir = bed.dir();
    common::transit_key(bao, "transit", "kubebao-kms", "kubebao-kms").await;
    let (role_id, secret_id) =
        common::approle_files(bao, dir, "approle", "kubebao-kms", "1h", "24h").await;
    let ca = dir.join("openbao-ca.pem");
    std::fs::write(&ca, bao.ca_pem()).unwrap();
    let mut agent = Agent::start(
        "kubebao-kms",
        dir,
        &agent_args(bao, &ca, &role_id, &secret_id),
    )
    .await;
    let pid = agent.process.pid();
    let mut kms = agent.client().await;
    let key1 = status(&mut kms).await.key_id;

    // 1. At rest: the stored value is a KMS v2 envelope without the plaintext.
    let config = encryption_config(dir, &agent.socket);
    bed.restart_apiserver(Some(&config)).await;
    let ns = bed.namespace("kms").await;
    let api: Api<Secret> = Api::namespaced(bed.client().await, &ns);
    let plaintext = "correct-horse-battery-staple";
    put_secret(&api, "before", plaintext).await;
    assert_eq!(read_secret(&api, "before").await, plaintext);
    let raw = stored(&bed, &ns, "before").await;
    assert!(
        raw.starts_with(PREFIX),
        "etcd value starts with {:?}",
        String::from_utf8_lossy(&raw[..raw.len().min(40)])
    );
    assert!(!contains(&raw, plaintext.as_bytes()), "plaintext in etcd");
    assert!(
        contains(&raw, key1.as_bytes()),
        "the envelope names key_id {key1}"
    );

    // 2. Rotation: Status reports the new key_id within the probe interval, and the API
    // server uses it for new writes once it polls Status (every minute while healthy).
    bao.root(Method::POST, "transit/keys/kubebao-kms/rotate", None)
        .await;
    let key2 = wait_for(
        "Status to report the rotated key",
        Duration::from_secs(5),
        || {
            let mut kms = kms.clone();
            let key1 = key1.clone();
            async move {
                let s = status(&mut kms).await;
                if s.key_id != key1 {
                    Ok(s.key_id)
                } else {
                    Err(format!("{s:?}"))
                }
            }
        },
    )
    .await;
    let mut n = 0;
    wait_for(
        "a Secret written after rotation to carry the new key_id",
        Duration::from_secs(90),
        || {
            n += 1;
            let (api, bed, ns, key2, value) = (
                api.clone(),
                &bed,
                ns.clone(),
                key2.clone(),
                format!("after-{n}"),
            );
            async move {
                put_secret(&api, "after", &value).await;
                let raw = stored(bed, &ns, "after").await;
                if raw.starts_with(PREFIX) && contains(&raw, key2.as_bytes()) {
                    Ok(())
                } else {
                    Err("still the old key_id".to_string())
                }
            }
        },
    )
    .await;
    let after_value = read_secret(&api, "after").await;
    assert!(contains(
        &stored(&bed, &ns, "before").await,
        key1.as_bytes()
    ));
    assert_eq!(read_secret(&api, "before").await, plaintext);

    // 3. A restarted API server (empty DEK cache) reads Secrets of both key versions.
    bed.restart_apiserver(Some(&config)).await;
    let api: Api<Secret> = Api::namespaced(bed.client().await, &ns);
    assert_eq!(read_secret(&api, "before").await, plaintext);
    assert_eq!(read_secret(&api, "after").await, after_value);

    // 4. Outage: OpenBao stopped → Status says why, Encrypt is Unavailable. A second plugin
    // probes only hourly: its recovery comes from the re-check backoff, not from a probe.
    let plugin_args = agent_args(bao, &ca, &role_id, &secret_id);
    let hourly_args: Vec<String> = plugin_args
        .iter()
        .cloned()
        .chain(["--probe-interval=1h".to_string()])
        .collect();
    let hourly = Agent::start("kubebao-kms-hourly", dir, &hourly_args).await;
    let mut hourly_kms = hourly.client().await;
    bao.stop().await;
    let err = encrypt(&mut hourly_kms, b"seed")
        .await
        .expect_err("OpenBao is down");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let reason = wait_for(
        "Status to report the outage",
        Duration::from_secs(10),
        || {
            let mut kms = kms.clone();
            async move {
                let s = status(&mut kms).await;
                if s.healthz != "ok" {
                    Ok(s.healthz)
                } else {
                    Err("still ok".to_string())
                }
            }
        },
    )
    .await;
    assert!(reason.starts_with("unreachable"), "{reason}");
    let err = encrypt(&mut kms, b"seed")
        .await
        .expect_err("OpenBao is down");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(hourly.http_get("/readyz").await.0, 503);
    // Back: ready again within 2 s without a Status call or a restart, whatever the probe
    // interval, and the API server writes again.
    bao.restart().await;
    let back = Instant::now();
    for plugin in [&agent, &hourly] {
        wait_for("the plugin to recover", Duration::from_secs(15), || {
            let readyz = plugin.http_get("/readyz");
            async move {
                match readyz.await {
                    (200, _) => Ok(()),
                    (_, body) => Err(body),
                }
            }
        })
        .await;
    }
    let took = back.elapsed();
    eprintln!("both plugins ready {took:?} after OpenBao came back");
    assert!(
        took < Duration::from_secs(2),
        "ready {took:?} after OpenBao came back"
    );
    assert_eq!(status(&mut kms).await.healthz, "ok");
    assert_eq!(status(&mut hourly_kms).await.healthz, "ok");
    agent.process.assert_running();
    assert_eq!(agent.process.pid(), pid, "the plugin was not restarted");
    put_secret(&api, "after-outage", "still-encrypted").await;
    assert_eq!(read_secret(&api, "after-outage").await, "still-encrypted");
    assert!(stored(&bed, &ns, "after-outage").await.starts_with(PREFIX));

    // 5. Sealed: the reason says so, Encrypt is Unavailable; unsealed: ok again.
    bao.seal().await;
    let reason = wait_for("Status to report the seal", Duration::from_secs(10), || {
        let mut kms = kms.clone();
        async move {
            let s = status(&mut kms).await;
            if s.healthz.starts_with("sealed") {
                Ok(s.healthz)
            } else {
                Err(s.healthz)
            }
        }
    })
    .await;
    assert!(
        reason.contains("unseal"),
        "the reason says what to do: {reason}"
    );
    let err = encrypt(&mut kms, b"seed")
        .await
        .expect_err("OpenBao is sealed");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    bao.unseal().await;
    wait_for(
        "the plugin to recover from the seal",
        Duration::from_secs(15),
        || {
            let mut kms = kms.clone();
            async move {
                let s = status(&mut kms).await;
                if s.healthz == "ok" {
                    Ok(())
                } else {
                    Err(s.healthz)
                }
            }
        },
    )
    .await;
    let roundtrip = encrypt(&mut kms, b"seed")
        .await
        .expect("encrypt after unseal");
    assert_eq!(roundtrip.key_id, key2);

    // Logs hold no plaintext and no secret_id.
    agent.process.stop();
    let log = std::fs::read_to_string(agent.process.log_path()).unwrap();
    assert!(!log.contains(plaintext));
    let secret_id_value = std::fs::read_to_string(&secret_id).unwrap();
    assert!(
        !log.contains(secret_id_value.trim()),
        "secret_id in the log"
    );
}
