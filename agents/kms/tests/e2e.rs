//! The plugin over its real gRPC socket against real OpenBao (shared test bed; each test has
//! its own Transit mount, key, policy and plugin process, so they run in parallel).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Agent, encrypt, metric, status};
use kubebao_proto::kms::DecryptRequest;
use kubebao_testbed::{Testbed, wait_for};
use reqwest::Method;
use serde_json::json;
use tonic::Code;

fn decrypt_request(resp: &kubebao_proto::kms::EncryptResponse) -> DecryptRequest {
    DecryptRequest {
        ciphertext: resp.ciphertext.clone(),
        uid: "test".into(),
        key_id: resp.key_id.clone(),
        annotations: resp.annotations.clone(),
    }
}

/// Transit mount + key + least-privilege token file + plugin, for one test.
async fn plugin(bed: &Testbed, name: &str) -> Agent {
    let bao = bed.openbao();
    let mount = format!("t-{name}");
    let policy = format!("kms-{name}");
    common::transit_key(bao, &mount, "kms", &policy).await;
    let token = common::token_file(bao, bed.dir(), &format!("{name}.token"), &[&policy]).await;
    Agent::start(name, bed.dir(), &plugin_args(bao, &mount, &token)).await
}

/// The flags of a plugin for Transit key `<mount>/kms` with a token file, over plain http.
fn plugin_args(bao: &kubebao_testbed::OpenBaoServer, mount: &str, token: &Path) -> Vec<String> {
    vec![
        format!("--openbao-addr={}", bao.addr()),
        "--openbao-allow-plain-http".into(),
        format!("--transit-mount={mount}"),
        "--transit-key=kms".into(),
        "--auth-method=token".into(),
        format!("--token-file={}", token.display()),
    ]
}

#[tokio::test]
async fn rotation_shows_in_status_and_old_versions_decrypt_until_openbao_forbids_them() {
    let bed = Testbed::shared().await;
    let agent = plugin(bed, "rotation").await;
    let mut kms = agent.client().await;

    let before = status(&mut kms).await;
    assert_eq!(before.version, "v2");
    assert_eq!(before.healthz, "ok");
    assert!(before.key_id.starts_with("kb1-"), "{}", before.key_id);
    let old = encrypt(&mut kms, b"0123456789abcdef0123456789abcdef")
        .await
        .expect("encrypt");
    assert_eq!(
        old.key_id, before.key_id,
        "Encrypt and Status agree on key_id"
    );
    assert_eq!(old.annotations["key-version.kubebao.io"], b"1");
    assert!(
        !old.ciphertext.windows(8).any(|w| w == b"01234567"),
        "ciphertext holds no plaintext"
    );

    let bao = bed.openbao();
    bao.root(Method::POST, "t-rotation/keys/kms/rotate", None)
        .await;
    let rotated = wait_for(
        "Status to report the new key_id",
        Duration::from_secs(10),
        || {
            let mut kms = kms.clone();
            let old_id = before.key_id.clone();
            async move {
                let s = status(&mut kms).await;
                if s.key_id != old_id && s.healthz == "ok" {
                    Ok(s.key_id)
                } else {
                    Err(format!("{s:?}"))
                }
            }
        },
    )
    .await;
    let new = encrypt(&mut kms, b"fresh seed").await.expect("encrypt v2");
    assert_eq!(new.key_id, rotated);
    assert_eq!(new.annotations["key-version.kubebao.io"], b"2");
    let plain = kms
        .decrypt(decrypt_request(&old))
        .await
        .expect("old version still decrypts")
        .into_inner()
        .plaintext;
    assert_eq!(plain, b"0123456789abcdef0123456789abcdef");

    // Once OpenBao no longer allows version 1, its key_id is unknown to the plugin.
    bao.root(
        Method::POST,
        "t-rotation/keys/kms/config",
        Some(json!({"min_decryption_version": 2})),
    )
    .await;
    wait_for(
        "the old key_id to be refused",
        Duration::from_secs(10),
        || {
            let mut kms = kms.clone();
            let req = decrypt_request(&old);
            async move {
                match kms.decrypt(req).await {
                    Err(s)
                        if s.code() == Code::InvalidArgument
                            && s.message().contains("unknown key_id") =>
                    {
                        Ok(())
                    }
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await;
    let metrics = agent.metrics().await;
    assert_eq!(
        metric(&metrics, "kubebao_kms_key_version "),
        Some(2.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn bad_input_gets_the_right_code_and_the_plugin_keeps_serving() {
    let bed = Testbed::shared().await;
    let agent = plugin(bed, "badinput").await;
    let mut kms = agent.client().await;
    let good = encrypt(&mut kms, b"seed").await.expect("encrypt");

    let code = |r: Result<_, tonic::Status>| r.map(|_| ()).expect_err("must fail").code();
    assert_eq!(
        code(encrypt(&mut kms, b"").await),
        Code::InvalidArgument,
        "empty"
    );
    assert_eq!(
        code(encrypt(&mut kms, &[7u8; 513]).await),
        Code::InvalidArgument,
        "oversized plaintext"
    );
    let cases: Vec<(&str, DecryptRequest)> = vec![
        (
            "garbage ciphertext",
            DecryptRequest {
                ciphertext: b"\x00\xffgarbage".to_vec(),
                ..decrypt_request(&good)
            },
        ),
        (
            "truncated ciphertext",
            DecryptRequest {
                ciphertext: good.ciphertext[..good.ciphertext.len() - 5].to_vec(),
                ..decrypt_request(&good)
            },
        ),
        ("tampered ciphertext", {
            let mut c = good.ciphertext.clone();
            let i = c.len() - 10;
            c[i] = if c[i] == b'A' { b'B' } else { b'A' };
            DecryptRequest {
                ciphertext: c,
                ..decrypt_request(&good)
            }
        }),
        (
            "empty ciphertext",
            DecryptRequest {
                ciphertext: vec![],
                ..decrypt_request(&good)
            },
        ),
        (
            "oversized ciphertext",
            DecryptRequest {
                ciphertext: vec![b'a'; 1025],
                ..decrypt_request(&good)
            },
        ),
        (
            "unknown key_id",
            DecryptRequest {
                key_id: "kb1-00000000000000000000000000000000".into(),
                ..decrypt_request(&good)
            },
        ),
        (
            "malformed key_id",
            DecryptRequest {
                key_id: "vault-key-1".into(),
                ..decrypt_request(&good)
            },
        ),
        (
            "oversized key_id",
            DecryptRequest {
                key_id: "k".repeat(1025),
                ..decrypt_request(&good)
            },
        ),
        ("foreign annotation", {
            let mut r = decrypt_request(&good);
            r.annotations
                .insert("evil.example.com".into(), b"1".to_vec());
            r
        }),
        ("annotation of another version", {
            let mut r = decrypt_request(&good);
            r.annotations
                .insert("key-version.kubebao.io".into(), b"9".to_vec());
            r
        }),
    ];
    for (what, req) in cases {
        let err = kms.decrypt(req).await.expect_err(what);
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
    }
    // Over the size limit: refused from the length prefix, without reading 3 MiB.
    let err = kms
        .decrypt(DecryptRequest {
            ciphertext: vec![b'a'; 3 << 20],
            ..decrypt_request(&good)
        })
        .await
        .expect_err("oversized request");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let s = status(&mut kms).await;
    assert_eq!(
        s.healthz, "ok",
        "bad input does not make the plugin unhealthy"
    );
    let plain = kms
        .decrypt(decrypt_request(&good))
        .await
        .expect("still serving")
        .into_inner()
        .plaintext;
    assert_eq!(plain, b"seed");
    let metrics = agent.metrics().await;
    assert!(
        metrics
            .contains(r#"kubebao_kms_requests_total{method="Decrypt",code="InvalidArgument"} 10"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_short_lived_approle_token_is_renewed_and_replaced_past_its_max_ttl() {
    let bed = Testbed::shared().await;
    let bao = bed.openbao();
    common::transit_key(bao, "t-expiry", "kms", "kms-expiry").await;
    let (role_id, secret_id) =
        common::approle_files(bao, bed.dir(), "approle-expiry", "kms-expiry", "4s", "8s").await;
    let agent = Agent::start(
        "expiry",
        bed.dir(),
        &[
            format!("--openbao-addr={}", bao.addr()),
            "--openbao-allow-plain-http".into(),
            "--transit-mount=t-expiry".into(),
            "--transit-key=kms".into(),
            "--auth-method=approle".into(),
            "--auth-mount=approle-expiry".into(),
            format!("--role-id-file={}", role_id.display()),
            format!("--secret-id-file={}", secret_id.display()),
        ],
    )
    .await;
    let mut kms = agent.client().await;
    let start = Instant::now();
    // Keep using the plugin for well past the token's max TTL (8 s); every call must succeed.
    wait_for(
        "18 s of successful calls across token replacements",
        Duration::from_secs(40),
        || {
            let mut kms = kms.clone();
            let metrics_url = format!("http://{}/metrics", agent.http);
            async move {
                let enc = encrypt(&mut kms, b"seed")
                    .await
                    .map_err(|e| format!("encrypt failed: {e:?}"))
                    .unwrap();
                let plain = kms
                    .decrypt(decrypt_request(&enc))
                    .await
                    .expect("decrypt failed")
                    .into_inner()
                    .plaintext;
                assert_eq!(plain, b"seed");
                let text = reqwest::get(metrics_url)
                    .await
                    .map_err(|e| e.to_string())?
                    .text()
                    .await
                    .map_err(|e| e.to_string())?;
                let logins = metric(&text, "kubebao_kms_openbao_logins ").unwrap_or(0.0);
                if start.elapsed() > Duration::from_secs(18) && logins >= 3.0 {
                    Ok(())
                } else {
                    Err(format!("{:?} elapsed, {logins} logins", start.elapsed()))
                }
            }
        },
    )
    .await;
    assert_eq!(status(&mut kms).await.healthz, "ok");
    let metrics = agent.metrics().await;
    assert!(
        !metrics.contains(r#"method="Encrypt",code="PermissionDenied""#),
        "no request saw an expired token: {metrics}"
    );
    // What OpenBao saw of this plugin (its mount and policy are this test's alone): tokens
    // renewed themselves, and not one Transit request, the plugin's own probes included, was
    // refused (a 403 retried behind the gRPC answer would not show in the metrics above).
    let audit = bao.audit();
    let renewals = audit.filter(|r| {
        r.path == "auth/token/renew-self"
            && r.error.is_none()
            && r.token_policies.contains(&"kms-expiry".to_string())
    });
    assert!(!renewals.is_empty(), "no token renewal");
    let refused: Vec<_> = audit
        .requests
        .iter()
        .filter(|r| r.path.starts_with("t-expiry/") && r.error.is_some())
        .map(|r| format!("{} {}: {:?}", r.operation, r.path, r.error))
        .collect();
    assert!(refused.is_empty(), "refused Transit requests: {refused:?}");

    // The secret_id is rotated (the old one destroyed) and every token of the mount revoked:
    // the next request meets a 403, logs in again with the re-read file, and succeeds.
    let mark = bao.audit().len();
    let old_secret_id = std::fs::read_to_string(&secret_id).unwrap();
    let fresh = bao
        .root(Method::POST, "auth/approle-expiry/role/kms/secret-id", None)
        .await
        .expect("secret-id");
    std::fs::write(&secret_id, fresh["data"]["secret_id"].as_str().unwrap()).unwrap();
    bao.root(
        Method::POST,
        "auth/approle-expiry/role/kms/secret-id/destroy",
        Some(json!({"secret_id": old_secret_id.trim()})),
    )
    .await;
    bao.root(
        Method::PUT,
        "sys/leases/revoke-prefix/auth/approle-expiry",
        None,
    )
    .await;
    let enc = encrypt(&mut kms, b"after revocation")
        .await
        .expect("a revoked token leads to a fresh login, not a failed request");
    let plain = kms
        .decrypt(decrypt_request(&enc))
        .await
        .expect("decrypt")
        .into_inner()
        .plaintext;
    assert_eq!(plain, b"after revocation");
    let fresh_id = bao
        .audit_hash(fresh["data"]["secret_id"].as_str().unwrap())
        .await;
    let relogins = bao
        .audit()
        .since(mark)
        .logins("approle-expiry", "secret_id", &fresh_id)
        .filter(|r| r.error.is_none());
    assert!(
        !relogins.is_empty(),
        "the plugin logged in with the re-read secret_id"
    );
}

#[tokio::test]
async fn socket_is_private_stale_sockets_are_replaced_live_ones_kept_and_sigterm_removes_it() {
    let bed = Testbed::shared().await;
    let dir = bed.dir().join("socket-test");
    std::fs::create_dir_all(&dir).unwrap();
    let bao = bed.openbao();
    common::transit_key(bao, "t-socket", "kms", "kms-socket").await;
    let token = common::token_file(bao, &dir, "token", &["kms-socket"]).await;
    let args = vec![
        format!("--openbao-addr={}", bao.addr()),
        "--openbao-allow-plain-http".into(),
        "--transit-mount=t-socket".into(),
        "--transit-key=kms".into(),
        format!("--token-file={}", token.display()),
    ];
    // A stale socket (its listener is gone) is replaced.
    let socket = dir.join("plugin.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let mut agent = Agent::start("plugin", &dir, &args).await;
    let mode = std::fs::metadata(&agent.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    assert_eq!(status(&mut agent.client().await).await.healthz, "ok");

    // A second plugin on the same socket refuses to steal it and exits.
    let mut second = Agent::launch_at("second", &dir, &socket, &args);
    wait_for("the second plugin to exit", Duration::from_secs(20), || {
        let running = second.process.is_running();
        async move {
            if running {
                Err("still running".to_string())
            } else {
                Ok(())
            }
        }
    })
    .await;
    let log = std::fs::read_to_string(second.process.log_path()).unwrap();
    assert!(log.contains("another process is serving"), "{log}");
    assert_eq!(
        status(&mut agent.client().await).await.healthz,
        "ok",
        "the first plugin still serves"
    );

    // SIGTERM: graceful stop, socket removed.
    agent.process.stop();
    let log = std::fs::read_to_string(agent.process.log_path()).unwrap();
    assert!(!agent.socket.exists(), "socket removed on SIGTERM: {log}");
    assert!(log.contains("socket removed"), "{log}");
    // Nothing secret in the logs.
    let token_value = std::fs::read_to_string(&token).unwrap();
    assert!(!log.contains(token_value.trim()), "token in the log");
}

#[tokio::test]
async fn doctor_passes_on_a_good_setup_and_says_what_is_wrong_otherwise() {
    let bed = Testbed::shared().await;
    let bao = bed.openbao();
    common::transit_key(bao, "t-doctor", "kms", "kms-doctor").await;
    let dir = bed.dir();
    let ca = dir.join("doctor-ca.pem");
    std::fs::write(&ca, bao.ca_pem()).unwrap();
    let token = common::token_file(bao, dir, "doctor.token", &["kms-doctor"]).await;
    let doctor = |key: &str, token: &std::path::Path| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kubebao-kms"))
            .arg("doctor")
            .arg(format!("--openbao-addr={}", bao.tls_addr()))
            .arg(format!("--openbao-ca-file={}", ca.display()))
            .arg("--transit-mount=t-doctor")
            .arg(format!("--transit-key={key}"))
            .arg(format!("--token-file={}", token.display()))
            .output()
            .expect("run doctor");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = doctor("kms", &token);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("token may update t-doctor/encrypt/kms"),
        "{out}"
    );
    assert!(out.contains("0 failure(s)"), "{out}");

    // The policy allows a key that does not exist.
    bao.root(
        Method::PUT,
        "sys/policies/acl/kms-doctor-missing",
        Some(json!({"policy": common::policy_hcl("t-doctor", "missing")})),
    )
    .await;
    let for_missing =
        common::token_file(bao, dir, "doctor-missing.token", &["kms-doctor-missing"]).await;
    let (code, out) = doctor("missing", &for_missing);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("t-doctor/missing does not exist"), "{out}");
    assert!(
        out.contains("bao write -f t-doctor/keys/missing type=aes256-gcm96"),
        "{out}"
    );

    // A token without decrypt: doctor names the missing capability, and the plugin answers
    // PermissionDenied.
    bao.root(
        Method::PUT,
        "sys/policies/acl/kms-doctor-nodecrypt",
        Some(
            json!({"policy": r#"path "t-doctor/encrypt/kms" { capabilities = ["update"] }
path "t-doctor/keys/kms" { capabilities = ["read"] }"#}),
        ),
    )
    .await;
    let weak = common::token_file(bao, dir, "doctor-weak.token", &["kms-doctor-nodecrypt"]).await;
    let (code, out) = doctor("kms", &weak);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("token may not update t-doctor/decrypt/kms"),
        "{out}"
    );

    let agent = Agent::start(
        "doctor-weak",
        dir,
        &[
            format!("--openbao-addr={}", bao.tls_addr()),
            format!("--openbao-ca-file={}", ca.display()),
            "--transit-mount=t-doctor".into(),
            "--transit-key=kms".into(),
            format!("--token-file={}", weak.display()),
        ],
    )
    .await;
    let mut kms = agent.client().await;
    let enc = encrypt(&mut kms, b"seed")
        .await
        .expect("encrypt is allowed");
    let err = kms
        .decrypt(decrypt_request(&enc))
        .await
        .expect_err("decrypt is not");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
}

#[tokio::test]
async fn kubernetes_auth_with_a_service_account_token_file_works() {
    let bed = Testbed::shared().await;
    let bao = bed.openbao();
    common::transit_key(bao, "t-k8s", "kms", "kms-k8s").await;
    bed.enable_kubernetes_auth().await;
    let ns = bed.namespace("kms-auth").await;
    bed.service_account(&ns, "kubebao-kms").await;
    bao.root(
        Method::POST,
        "auth/kubernetes/role/kubebao-kms-e2e",
        Some(json!({
            "bound_service_account_names": ["kubebao-kms"],
            "bound_service_account_namespaces": [ns],
            "token_policies": ["kms-k8s"],
            "audience": "openbao",
            "ttl": "1h",
        })),
    )
    .await;
    let jwt = bed
        .service_account_token(&ns, "kubebao-kms", "openbao", 3600)
        .await;
    let jwt_file = bed.dir().join("k8s-auth.jwt");
    std::fs::write(&jwt_file, jwt).unwrap();
    let agent = Agent::start(
        "k8s-auth",
        bed.dir(),
        &[
            format!("--openbao-addr={}", bao.addr()),
            "--openbao-allow-plain-http".into(),
            "--transit-mount=t-k8s".into(),
            "--transit-key=kms".into(),
            "--auth-method=kubernetes".into(),
            "--auth-role=kubebao-kms-e2e".into(),
            format!("--jwt-file={}", jwt_file.display()),
            "--log-format=json".into(),
        ],
    )
    .await;
    let mut kms = agent.client().await;
    let enc = encrypt(&mut kms, b"seed").await.expect("encrypt");
    let plain = kms
        .decrypt(decrypt_request(&enc))
        .await
        .expect("decrypt")
        .into_inner()
        .plaintext;
    assert_eq!(plain, b"seed");
    let log = std::fs::read_to_string(agent.process.log_path()).unwrap();
    let first = log
        .lines()
        .find(|l| l.contains("logged in"))
        .expect("login logged");
    let parsed: serde_json::Value = serde_json::from_str(first).expect("JSON log line");
    assert!(
        parsed["fields"]["source"]
            .as_str()
            .unwrap()
            .contains("kubernetes login")
    );
    let jwt_value = std::fs::read_to_string(&jwt_file).unwrap();
    assert!(!log.contains(jwt_value.trim()), "JWT in the log");
}

#[tokio::test]
async fn a_ciphertext_moved_to_another_cluster_context_does_not_decrypt() {
    let bed = Testbed::shared().await;
    let bao = bed.openbao();
    common::transit_key(bao, "t-aad", "kms", "kms-aad").await;
    let token = common::token_file(bao, bed.dir(), "aad.token", &["kms-aad"]).await;
    let start = |name: &'static str, context: &'static str| {
        let args = vec![
            format!("--openbao-addr={}", bao.addr()),
            "--openbao-allow-plain-http".into(),
            "--transit-mount=t-aad".into(),
            "--transit-key=kms".into(),
            format!("--token-file={}", token.display()),
            format!("--aad-context={context}"),
        ];
        async move { Agent::start(name, bed.dir(), &args).await }
    };
    let cluster_a = start("aad-a", "cluster-a").await;
    let cluster_b = start("aad-b", "cluster-b").await;
    let mut a = cluster_a.client().await;
    let mut b = cluster_b.client().await;
    let enc = encrypt(&mut a, b"seed of cluster a")
        .await
        .expect("encrypt");
    assert_eq!(
        status(&mut b).await.key_id,
        enc.key_id,
        "same Transit key, same key_id"
    );
    let err = b
        .decrypt(decrypt_request(&enc))
        .await
        .expect_err("another context must not decrypt it");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let plain = a
        .decrypt(decrypt_request(&enc))
        .await
        .expect("its own context decrypts it")
        .into_inner()
        .plaintext;
    assert_eq!(plain, b"seed of cluster a");
}

/// The read_key calls the plugin made that OpenBao answered.
fn key_reads(metrics: &str) -> f64 {
    metric(
        metrics,
        r#"kubebao_kms_openbao_request_duration_seconds_count{operation="read_key",outcome="ok"} "#,
    )
    .unwrap_or(0.0)
}

#[tokio::test]
async fn a_plugin_that_missed_a_rotation_reads_the_key_once_for_the_new_key_id() {
    let bed = Testbed::shared().await;
    let bao = bed.openbao();
    common::transit_key(bao, "t-lag", "kms", "kms-lag").await;
    let token = common::token_file(bao, bed.dir(), "lag.token", &["kms-lag"]).await;
    let args = plugin_args(bao, "t-lag", &token);
    // Two control-plane nodes: node 2 probes only hourly, so it cannot see the rotation itself.
    let node1 = Agent::start("lag-1", bed.dir(), &args).await;
    let mut hourly = args.clone();
    hourly.push("--probe-interval=1h".into());
    let node2 = Agent::start("lag-2", bed.dir(), &hourly).await;
    let (mut kms1, mut kms2) = (node1.client().await, node2.client().await);
    let v1 = status(&mut kms2).await.key_id;
    assert_eq!(key_reads(&node2.metrics().await), 1.0);

    bao.root(Method::POST, "t-lag/keys/kms/rotate", None).await;
    let v2 = wait_for(
        "node 1 to see the rotation",
        Duration::from_secs(10),
        || {
            let mut kms1 = kms1.clone();
            let v1 = v1.clone();
            async move {
                let s = status(&mut kms1).await;
                if s.key_id != v1 {
                    Ok(s.key_id)
                } else {
                    Err(format!("{s:?}"))
                }
            }
        },
    )
    .await;
    let enc = encrypt(&mut kms1, b"written through node 1")
        .await
        .expect("encrypt");
    assert_eq!(enc.key_id, v2);
    assert_eq!(status(&mut kms2).await.key_id, v1, "node 2 has not probed");
    let plain = kms2
        .decrypt(decrypt_request(&enc))
        .await
        .expect("node 2 decrypts the version it had not seen")
        .into_inner()
        .plaintext;
    assert_eq!(plain, b"written through node 1");
    assert_eq!(status(&mut kms2).await.key_id, v2, "and now uses it");
    assert_eq!(key_reads(&node2.metrics().await), 2.0, "one key read");

    // 20 made-up key_ids at once: refused, sharing one key read.
    let requests = (0..20).map(|i| DecryptRequest {
        key_id: format!("kb1-{i:032x}"),
        ..decrypt_request(&enc)
    });
    let results = futures::future::join_all(requests.map(|r| {
        let mut kms2 = kms2.clone();
        async move { kms2.decrypt(r).await }
    }))
    .await;
    for r in results {
        let err = r.expect_err("made-up key_id");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    }
    assert_eq!(key_reads(&node2.metrics().await), 3.0, "one more key read");
}

#[tokio::test]
async fn a_revoked_token_is_a_credentials_problem_until_a_valid_one_is_written() {
    let bed = Testbed::shared().await;
    let bao = bed.openbao();
    common::transit_key(bao, "t-revoked", "kms", "kms-revoked").await;
    let token = common::token_file(bao, bed.dir(), "revoked.token", &["kms-revoked"]).await;
    let args = plugin_args(bao, "t-revoked", &token);
    let agent = Agent::start("revoked", bed.dir(), &args).await;
    let mut kms = agent.client().await;
    assert_eq!(agent.http_get("/healthz").await, (200, "ok\n".into()));
    assert_eq!(agent.http_get("/readyz").await, (200, "ok\n".into()));

    let value = std::fs::read_to_string(&token).unwrap();
    bao.root(
        Method::POST,
        "auth/token/revoke",
        Some(json!({"token": value.trim()})),
    )
    .await;
    let err = encrypt(&mut kms, b"seed").await.expect_err("revoked token");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let expected = "the plugin's OpenBao token is no longer valid: ";
    assert!(err.message().contains(expected), "{err:?}");
    assert!(!err.message().contains("by policy"), "{err:?}");
    let healthz = status(&mut kms).await.healthz;
    assert!(
        healthz.starts_with(&format!("credentials: {expected}")),
        "{healthz}"
    );
    let (code, body) = agent.http_get("/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains(expected), "{body}");
    assert_eq!(
        agent.http_get("/healthz").await.0,
        200,
        "alive: a restart would not bring a valid token"
    );

    // A valid token written to the file: ready again by itself.
    common::token_file(bao, bed.dir(), "revoked.token", &["kms-revoked"]).await;
    let written = Instant::now();
    wait_for("ready with the new token", Duration::from_secs(10), || {
        let readyz = agent.http_get("/readyz");
        async move {
            match readyz.await {
                (200, _) => Ok(()),
                (_, body) => Err(body),
            }
        }
    })
    .await;
    eprintln!(
        "ready {:?} after a valid token was written",
        written.elapsed()
    );
    encrypt(&mut kms, b"seed").await.expect("encrypt again");

    // The socket file lost: the plugin is no longer alive for the API server.
    std::fs::remove_file(&agent.socket).unwrap();
    let (code, body) = agent.http_get("/healthz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("is not served"), "{body}");
    // stderr goes to a file here: no colour codes in it.
    let log = std::fs::read_to_string(agent.process.log_path()).unwrap();
    assert!(log.contains("unhealthy") && !log.contains('\x1b'), "{log}");
}

#[test]
fn text_logs_written_to_a_pipe_have_no_colour_codes() {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "not-a-real-token").unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kubebao-kms"))
        .arg("--openbao-addr=http://127.0.0.1:1")
        .arg("--openbao-allow-plain-http")
        .arg(format!("--token-file={}", token.display()))
        .arg(format!(
            "--socket={}",
            dir.path().join("kms.sock").display()
        ))
        .arg(format!("--http-addr=127.0.0.1:{}", common::free_port()))
        .arg("--log-format=text")
        .env_remove("NO_COLOR")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start kubebao-kms");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // An info line, then a warning (OpenBao is unreachable): both levels would be coloured.
    let mut seen = String::new();
    while !seen.contains("unhealthy") {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
            }
            Err(e) => {
                seen.push_str(&format!("<{e}>"));
                break;
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        seen.contains("serving KMS v2") && seen.contains("unhealthy"),
        "{seen}"
    );
    assert!(!seen.contains('\x1b'), "colour codes in {seen:?}");
}
