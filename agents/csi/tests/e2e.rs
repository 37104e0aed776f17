//! End-to-end: the real `kubebao-csi` binary, called over its unix socket exactly as the
//! Secrets Store CSI driver calls it, against a real OpenBao whose Kubernetes auth verifies
//! real ServiceAccount tokens with the test bed's API server.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use kubebao_proto::csi::VersionRequest;
use kubebao_testbed::{Component, Postgres, free_port, wait_for};
use reqwest::Method;
use serde_json::{Value, json};
use support::*;

#[tokio::test]
async fn the_original_plans_secret_provider_class_mounts_and_rotates() {
    let bed = bed().await;
    let _gate = OPENBAO_GATE.read().await;
    kv2_put(
        bed,
        "myapp/db",
        json!({"password": "first-pw", "user": "app"}),
    )
    .await;
    let ns = bed.namespace("seed").await;
    let pod = pod(bed, &ns, "web", "app").await;
    let token = kubelet_token(bed, &pod, "openbao").await;
    let agent = agent(bed).await;
    // The SecretProviderClass exactly as the original plan writes it.
    let attrs = driver_attributes(
        &[("roleName", "my-app"), ("objects", SEED_OBJECTS)],
        &pod,
        Some(&token),
    );

    let first = agent.mount(&attrs).await.expect("seed mount");
    assert_eq!(first.files.len(), 1);
    let f = file(&first, "db-password");
    assert_eq!(f.contents, b"first-pw");
    assert_eq!(f.mode, 0o644);
    let v1 = version(&first, "db-password");
    assert_eq!(
        agent
            .metric("kubebao_csi_logins_total{result=\"ok\"}")
            .await,
        1.0
    );

    // A rotation poll within the token's TTL: same version, no login, one KV read.
    let reads_before = agent
        .metric("kubebao_csi_openbao_requests_total{kind=\"read\"}")
        .await;
    let again = agent.mount(&attrs).await.expect("second mount");
    assert_eq!(
        version(&again, "db-password"),
        v1,
        "unchanged secret, unchanged version"
    );
    assert_eq!(
        agent
            .metric("kubebao_csi_logins_total{result=\"ok\"}")
            .await,
        1.0,
        "no new login"
    );
    assert_eq!(
        agent
            .metric("kubebao_csi_token_cache_total{result=\"hit\"}")
            .await,
        1.0
    );
    assert_eq!(
        agent
            .metric("kubebao_csi_openbao_requests_total{kind=\"read\"}")
            .await,
        reads_before + 1.0
    );
    assert!(!v1.is_empty() && !v1.contains("first-pw"));

    // The secret changes in OpenBao: new content, new version.
    kv2_put(
        bed,
        "myapp/db",
        json!({"password": "second-pw", "user": "app"}),
    )
    .await;
    let rotated = agent.mount(&attrs).await.expect("mount after update");
    assert_eq!(file(&rotated, "db-password").contents, b"second-pw");
    assert_ne!(version(&rotated, "db-password"), v1);
    assert_eq!(
        agent
            .metric("kubebao_csi_mounts_total{result=\"ok\"}")
            .await,
        3.0
    );
}

#[tokio::test]
async fn concurrent_mounts_of_one_identity_log_in_once() {
    let bed = bed().await;
    let _gate = OPENBAO_GATE.read().await;
    kv2_put(bed, "myapp/shared", json!({"password": "pw"})).await;
    let ns = bed.namespace("burst").await;
    let agent = agent(bed).await;
    // A Deployment scaling up: eight pods of one ServiceAccount mount at once.
    let mut attrs = Vec::new();
    for i in 0..8 {
        let p = pod(bed, &ns, &format!("web-{i}"), "app").await;
        let token = kubelet_token(bed, &p, "openbao").await;
        attrs.push(driver_attributes(
            &[("roleName", "my-app"), ("objects", SHARED_OBJECTS)],
            &p,
            Some(&token),
        ));
    }
    let results = futures::future::join_all(attrs.iter().map(|a| agent.mount(a))).await;
    for r in results {
        assert_eq!(file(&r.expect("mount"), "db-password").contents, b"pw");
    }
    assert_eq!(
        agent
            .metric("kubebao_csi_logins_total{result=\"ok\"}")
            .await,
        1.0,
        "one login for one identity, however many pods"
    );
}

#[tokio::test]
async fn kv1_kv2_every_key_encodings_and_readable_errors() {
    let bed = bed().await;
    let _gate = OPENBAO_GATE.read().await;
    let bao = bed.openbao();
    bao.root(
        Method::POST,
        "kv/legacy",
        Some(json!({"api-key": "k1", "cert": "AAEC/w=="})),
    )
    .await;
    kv2_put(
        bed,
        "myapp/config",
        json!({"host": "db.internal", "port": 5432, "tls": {"ca": "CA"}}),
    )
    .await;
    kv2_put(bed, "myapp/shared", json!({"password": "pw"})).await;
    let ns = bed.namespace("kv").await;
    let pod = pod(bed, &ns, "web", "app").await;
    let token = kubelet_token(bed, &pod, "openbao").await;
    let agent = agent(bed).await;
    let objects = r#"
- objectName: api-key
  secretPath: kv/legacy
  secretKey: api-key
- objectName: certs/raw.der
  secretPath: kv/legacy
  secretKey: cert
  encoding: base64
  filePermission: "0600"
- objectName: config.json
  secretPath: secret/data/myapp/config
- objectName: config
  secretPath: secret/data/myapp/config
  secretKey: "*"
- objectName: ca.pem
  secretPath: secret/data/myapp/config
  secretKey: tls.ca
"#;
    let attrs = driver_attributes(
        &[("roleName", "my-app"), ("objects", objects)],
        &pod,
        Some(&token),
    );
    let reads_before = agent
        .metric("kubebao_csi_openbao_requests_total{kind=\"read\"}")
        .await;
    let resp = agent.mount(&attrs).await.expect("mount");
    assert_eq!(file(&resp, "api-key").contents, b"k1");
    let der = file(&resp, "certs/raw.der");
    assert_eq!(der.contents, [0, 1, 2, 255]);
    assert_eq!(der.mode, 0o600);
    let whole: Value = serde_json::from_slice(&file(&resp, "config.json").contents).unwrap();
    assert_eq!(
        whole,
        json!({"host": "db.internal", "port": 5432, "tls": {"ca": "CA"}}),
        "KV v2 data only, no metadata"
    );
    assert_eq!(file(&resp, "config/host").contents, b"db.internal");
    assert_eq!(file(&resp, "config/port").contents, b"5432");
    assert_eq!(file(&resp, "ca.pem").contents, b"CA");
    assert_eq!(resp.object_version.len(), 5, "one version per object");
    assert_eq!(
        agent
            .metric("kubebao_csi_openbao_requests_total{kind=\"read\"}")
            .await,
        reads_before + 2.0,
        "two distinct paths, each read once"
    );

    let mount_one = |object: &str| {
        driver_attributes(
            &[("roleName", "my-app"), ("objects", object)],
            &pod,
            Some(&token),
        )
    };
    let missing_key = agent
        .mount(&mount_one(
            "- {objectName: a, secretPath: secret/data/myapp/config, secretKey: hots}",
        ))
        .await
        .unwrap_err();
    assert_eq!(missing_key.code(), tonic::Code::NotFound);
    assert!(
        missing_key.message().contains("key \"hots\" not found"),
        "{}",
        missing_key.message()
    );
    assert!(
        missing_key
            .message()
            .contains("[\"host\", \"port\", \"tls\"]"),
        "{}",
        missing_key.message()
    );
    assert!(
        !missing_key.message().contains("db.internal"),
        "a value leaked"
    );

    let no_path = agent
        .mount(&mount_one(
            "- {objectName: a, secretPath: secret/data/myapp/nothing-here, secretKey: x}",
        ))
        .await
        .unwrap_err();
    assert_eq!(no_path.code(), tonic::Code::NotFound);
    assert!(
        no_path
            .message()
            .contains("nothing at secret/data/myapp/nothing-here"),
        "{}",
        no_path.message()
    );

    let denied = agent
        .mount(&mount_one(
            "- {objectName: a, secretPath: secret/data/other-team/db, secretKey: x}",
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    let expected =
        format!("permission denied on secret/data/other-team/db for role \"my-app\" as {ns}/app");
    assert!(denied.message().contains(&expected), "{}", denied.message());
    // The denial was not blamed on a stale token more than once: one re-login at most.
    assert!(
        agent
            .metric("kubebao_csi_logins_total{result=\"ok\"}")
            .await
            <= 2.0
    );

    let bad_param = agent
        .mount(&mount_one(
            "- {objectName: a, secretPath: kv/legacy, encoding: rot13, secretKey: api-key}",
        ))
        .await
        .unwrap_err();
    assert_eq!(bad_param.code(), tonic::Code::InvalidArgument);
    assert!(
        bad_param.message().contains("objects[0].encoding"),
        "{}",
        bad_param.message()
    );

    // An OpenBao address nothing listens on (the SecretProviderClass may set its own).
    let closed = free_port();
    let address = format!("http://127.0.0.1:{closed}");
    let unreachable = agent
        .mount(&driver_attributes(
            &[
                ("roleName", "my-app"),
                ("objects", SHARED_OBJECTS),
                ("openbaoAddress", &address),
            ],
            &pod,
            Some(&token),
        ))
        .await
        .unwrap_err();
    assert_eq!(unreachable.code(), tonic::Code::Unavailable);
    assert!(
        unreachable.message().starts_with("[openbao_unavailable]")
            && unreachable
                .message()
                .contains(&format!("OpenBao at {address} is unreachable")),
        "{}",
        unreachable.message()
    );
    // Still serving after every failure above.
    agent
        .mount(&driver_attributes(
            &[("roleName", "my-app"), ("objects", SHARED_OBJECTS)],
            &pod,
            Some(&token),
        ))
        .await
        .expect("a good Mount after the failures");
}

#[tokio::test]
async fn pki_certificates_are_issued_by_post_and_kept_while_their_lease_is_valid() {
    let bed = bed().await;
    let _gate = OPENBAO_GATE.read().await;
    let ns = bed.namespace("pki").await;
    let web = pod(bed, &ns, "web", "app").await;
    let other = pod(bed, &ns, "web-2", "app").await;
    let agent = agent(bed).await;
    let objects = r#"
- objectName: tls.crt
  secretPath: pki/issue/web
  method: POST
  secretArgs:
    common_name: web.example.com
  secretKey: certificate
- objectName: tls.key
  secretPath: pki/issue/web
  method: POST
  secretArgs:
    common_name: web.example.com
  secretKey: private_key
  filePermission: "0400"
"#;
    let token = kubelet_token(bed, &web, "openbao").await;
    let attrs = driver_attributes(
        &[("roleName", "my-app"), ("objects", objects)],
        &web,
        Some(&token),
    );
    let first = agent.mount(&attrs).await.expect("issue");
    let cert = file(&first, "tls.crt").contents.clone();
    assert!(cert.starts_with(b"-----BEGIN CERTIFICATE-----"));
    assert!(file(&first, "tls.key").contents.starts_with(b"-----BEGIN"));
    assert_eq!(file(&first, "tls.key").mode, 0o400);
    assert_eq!(
        agent
            .metric("kubebao_csi_openbao_requests_total{kind=\"write\"}")
            .await,
        1.0,
        "both objects come from one issue call"
    );

    // The driver's rotation poll for the same pod: same certificate, same version, no new lease.
    let poll = agent.mount(&attrs).await.expect("poll");
    assert_eq!(file(&poll, "tls.crt").contents, cert);
    assert_eq!(version(&poll, "tls.crt"), version(&first, "tls.crt"));
    assert_eq!(
        agent
            .metric("kubebao_csi_openbao_requests_total{kind=\"write\"}")
            .await,
        1.0
    );
    assert_eq!(
        agent
            .metric("kubebao_csi_lease_cache_total{result=\"hit\"}")
            .await,
        1.0
    );

    // Another pod gets its own certificate.
    let token2 = kubelet_token(bed, &other, "openbao").await;
    let attrs2 = driver_attributes(
        &[("roleName", "my-app"), ("objects", objects)],
        &other,
        Some(&token2),
    );
    let second_pod = agent
        .mount(&attrs2)
        .await
        .expect("issue for the second pod");
    assert_ne!(file(&second_pod, "tls.crt").contents, cert);
}

#[tokio::test]
async fn unsafe_object_names_are_refused_and_the_agent_keeps_serving() {
    let bed = bed().await;
    let _gate = OPENBAO_GATE.read().await;
    kv2_put(bed, "myapp/shared", json!({"password": "pw"})).await;
    let ns = bed.namespace("names").await;
    let pod = pod(bed, &ns, "web", "app").await;
    let token = kubelet_token(bed, &pod, "openbao").await;
    let agent = agent(bed).await;
    let cases = [
        (
            "- {objectName: ../../etc/passwd, secretPath: secret/data/myapp/shared, secretKey: password}",
            "must stay inside the mount",
        ),
        (
            "- {objectName: /etc/passwd, secretPath: secret/data/myapp/shared, secretKey: password}",
            "absolute path",
        ),
        (
            "- {objectName: a//b, secretPath: secret/data/myapp/shared, secretKey: password}",
            "empty path segment",
        ),
        (
            "- {objectName: same, secretPath: secret/data/myapp/shared, secretKey: password}\n- {objectName: same, secretPath: kv/legacy, secretKey: api-key}",
            "more than one object",
        ),
    ];
    for (objects, why) in cases {
        let attrs = driver_attributes(
            &[("roleName", "my-app"), ("objects", objects)],
            &pod,
            Some(&token),
        );
        let err = agent.mount(&attrs).await.expect_err(objects);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{objects}");
        assert!(err.message().contains(why), "{objects}: {}", err.message());
    }
    assert_eq!(
        agent
            .metric("kubebao_csi_mounts_total{result=\"bad_parameter\"}")
            .await,
        4.0
    );
    assert_eq!(
        agent
            .metric("kubebao_csi_openbao_requests_total{kind=\"login\"}")
            .await,
        0.0,
        "refused before any OpenBao call"
    );
    let attrs = driver_attributes(
        &[("roleName", "my-app"), ("objects", SHARED_OBJECTS)],
        &pod,
        Some(&token),
    );
    agent.mount(&attrs).await.expect("still serving");
}

#[tokio::test]
async fn without_driver_tokens_the_agent_requests_one_bound_to_the_pod() {
    let bed = bed().await;
    let _gate = OPENBAO_GATE.read().await;
    kv2_put(bed, "myapp/shared", json!({"password": "pw"})).await;
    let ns = bed.namespace("tokenrequest").await;
    let pod = pod(bed, &ns, "web", "app").await;
    let agent = agent(bed).await;
    let attrs = driver_attributes(
        &[("roleName", "my-app"), ("objects", SHARED_OBJECTS)],
        &pod,
        None,
    );
    let resp = agent
        .mount(&attrs)
        .await
        .expect("mount with a TokenRequest");
    assert_eq!(file(&resp, "db-password").contents, b"pw");
    assert_eq!(
        agent
            .metric("kubebao_csi_token_requests_total{result=\"ok\"}")
            .await,
        1.0
    );

    // A pod that does not exist (wrong uid) cannot get a token bound to it.
    let ghost = TestPod {
        uid: "00000000-0000-0000-0000-000000000000".into(),
        ..pod
    };
    let attrs = driver_attributes(
        &[("roleName", "my-app"), ("objects", SHARED_OBJECTS)],
        &ghost,
        None,
    );
    let other_agent_err = {
        let fresh = self::agent(bed).await;
        fresh
            .mount(&attrs)
            .await
            .expect_err("token bound to a missing pod")
    };
    assert_eq!(other_agent_err.code(), tonic::Code::FailedPrecondition);
    assert!(
        other_agent_err
            .message()
            .contains("TokenRequest bound to pod"),
        "{}",
        other_agent_err.message()
    );
}

#[tokio::test]
async fn socket_is_private_stale_sockets_are_replaced_and_version_answers() {
    let bed = bed().await;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("version.key");
    std::fs::write(&key, [1u8; 32]).unwrap();
    let first = start_agent(bed, dir, &key).await;
    let mode = std::fs::metadata(&first.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let mut client = connect(&first.socket).await.unwrap();
    let v = client
        .version(VersionRequest {
            version: "v1alpha1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.runtime_name, "kubebao");
    assert_eq!(v.runtime_version, env!("CARGO_PKG_VERSION"));

    // A second agent on the same directory refuses to steal a live socket.
    let providers = first.socket.parent().unwrap().to_path_buf();
    let second_dir = tempfile::tempdir().unwrap();
    let mut second = Component::start(
        "kubebao-csi-second",
        second_dir.path(),
        Path::new(env!("CARGO_BIN_EXE_kubebao-csi")),
        &[
            format!("--provider-dir={}", providers.display()),
            "--listen=127.0.0.1:0".into(),
        ],
    );
    wait_for("the second agent to exit", Duration::from_secs(20), || {
        let running = second.is_running();
        async move {
            if running {
                Err("still running".to_string())
            } else {
                Ok(())
            }
        }
    })
    .await;
    assert!(
        std::fs::read_to_string(second.log_path())
            .unwrap()
            .contains("another process is serving")
    );

    // Killed without cleanup, the socket stays behind; the next agent replaces it.
    let Agent {
        mut process,
        socket,
        _dir: dir,
        ..
    } = first;
    process.kill();
    assert!(socket.exists(), "a killed agent leaves its socket");
    let dir2 = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut third = Component::start(
        "kubebao-csi-third",
        dir2.path(),
        Path::new(env!("CARGO_BIN_EXE_kubebao-csi")),
        &[
            format!("--provider-dir={}", providers.display()),
            format!("--listen=127.0.0.1:{port}"),
        ],
    );
    let s = socket.clone();
    wait_for(
        "the next agent to serve on the stale socket's path",
        Duration::from_secs(30),
        || {
            third.assert_running();
            let s = s.clone();
            async move {
                let mut c = connect(&s).await.map_err(|e| e.to_string())?;
                c.version(VersionRequest::default())
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        },
    )
    .await;
    // Graceful shutdown removes the socket.
    third.stop();
    assert!(!socket.exists(), "socket removed on shutdown");
    drop(dir);
}

#[tokio::test]
async fn sealed_openbao_is_a_clear_error_and_mounts_resume_after_unseal() {
    let bed = bed().await;
    // Shared until the seal: another test may have OpenBao sealed or its tokens revoked.
    let gate = OPENBAO_GATE.read().await;
    kv2_put(bed, "myapp/shared", json!({"password": "pw"})).await;
    let ns = bed.namespace("sealed").await;
    let pod = pod(bed, &ns, "web", "app").await;
    let token = kubelet_token(bed, &pod, "openbao").await;
    let agent = agent(bed).await;
    let attrs = driver_attributes(
        &[("roleName", "my-app"), ("objects", SHARED_OBJECTS)],
        &pod,
        Some(&token),
    );
    agent.mount(&attrs).await.expect("mount while unsealed");
    assert_eq!(agent.probe("/healthz").await, (200, "ok".to_string()));
    let (code, ready) = agent.probe("/readyz").await;
    assert_eq!(code, 200, "{ready}");
    drop(gate);

    let _exclusive = OPENBAO_GATE.write().await;
    bed.openbao().seal().await;
    let err = agent.mount(&attrs).await.expect_err("sealed");
    // Not ready while OpenBao is sealed (the answer is reused for a second), still alive.
    let not_ready = wait_for("/readyz to fail", Duration::from_secs(10), || async {
        match agent.probe("/readyz").await {
            (503, why) => Ok(why),
            (code, text) => Err(format!("{code} {text}")),
        }
    })
    .await;
    assert!(not_ready.contains("sealed"), "{not_ready}");
    assert_eq!(agent.probe("/healthz").await.0, 200);
    bed.openbao().unseal().await;
    wait_for("/readyz to pass again", Duration::from_secs(10), || async {
        match agent.probe("/readyz").await {
            (200, _) => Ok(()),
            (code, text) => Err(format!("{code} {text}")),
        }
    })
    .await;
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(
        err.message().starts_with("[openbao_sealed]"),
        "{}",
        err.message()
    );
    assert!(err.message().contains("is sealed"), "{}", err.message());
    assert_eq!(
        agent
            .metric("kubebao_csi_mounts_total{result=\"openbao_sealed\"}")
            .await,
        1.0
    );
    let resp = agent.mount(&attrs).await.expect("mount after unseal");
    assert_eq!(file(&resp, "db-password").contents, b"pw");
}

#[tokio::test]
async fn database_credentials_are_kept_and_renewed_while_their_lease_is_valid() {
    let bed = bed().await;
    let pg = Postgres::start(bed.dir(), "postgres").await;
    let _gate = OPENBAO_GATE.read().await;
    pg.database_engine(bed, &["app"]).await;
    pg.database_role(bed, "app", "30s", "10m").await;
    let ns = bed.namespace("database").await;
    let pod = pod(bed, &ns, "web", "app").await;
    let token = kubelet_token(bed, &pod, "openbao").await;
    let agent = agent(bed).await;
    let objects = r#"
- {objectName: db/username, secretPath: database/creds/app, secretKey: username}
- {objectName: db/password, secretPath: database/creds/app, secretKey: password}
"#;
    let attrs = driver_attributes(
        &[("roleName", "my-app"), ("objects", objects)],
        &pod,
        Some(&token),
    );
    let first = agent.mount(&attrs).await.expect("database credentials");
    let user = file(&first, "db/username").contents.clone();
    let first_version = version(&first, "db/username");
    assert!(user.starts_with(b"v-"), "a generated user name");
    assert_eq!(
        agent
            .metric("kubebao_csi_openbao_requests_total{kind=\"read\"}")
            .await,
        1.0,
        "one read for both objects"
    );

    // Rotation polls within the lease: the same user, no new credentials; past half of the
    // 30 s lease the agent renews it instead of minting new ones.
    wait_for(
        "the agent to renew the lease",
        Duration::from_secs(60),
        || {
            let agent = &agent;
            let attrs = &attrs;
            let user = &user;
            let first_version = &first_version;
            async move {
                let poll = agent.mount(attrs).await.map_err(|e| e.to_string())?;
                assert_eq!(
                    &file(&poll, "db/username").contents,
                    user,
                    "new credentials minted within the lease"
                );
                assert_eq!(version(&poll, "db/username"), *first_version);
                if agent
                    .metric("kubebao_csi_lease_cache_total{result=\"renewed\"}")
                    .await
                    >= 1.0
                {
                    Ok(())
                } else {
                    Err("not renewed yet".to_string())
                }
            }
        },
    )
    .await;
    assert_eq!(
        agent
            .metric("kubebao_csi_openbao_requests_total{kind=\"read\"}")
            .await,
        1.0,
        "credentials read once"
    );
    assert!(
        agent
            .metric("kubebao_csi_openbao_requests_total{kind=\"renew\"}")
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn a_revoked_cached_token_is_replaced_by_one_new_login() {
    let bed = bed().await;
    // Shared until the revocation: another test may have OpenBao sealed.
    let gate = OPENBAO_GATE.read().await;
    kv2_put(bed, "myapp/shared", json!({"password": "pw"})).await;
    let ns = bed.namespace("revoked").await;
    let pod = pod(bed, &ns, "web", "app").await;
    let token = kubelet_token(bed, &pod, "openbao").await;
    let agent = agent(bed).await;
    let attrs = driver_attributes(
        &[("roleName", "my-app"), ("objects", SHARED_OBJECTS)],
        &pod,
        Some(&token),
    );
    agent.mount(&attrs).await.expect("first mount");
    assert_eq!(
        agent
            .metric("kubebao_csi_logins_total{result=\"ok\"}")
            .await,
        1.0
    );
    drop(gate);

    // Revoking every Kubernetes-auth token would disturb the other tests' login counts.
    let _exclusive = OPENBAO_GATE.write().await;
    bed.openbao()
        .root(
            Method::PUT,
            "sys/leases/revoke-prefix/auth/kubernetes/login",
            None,
        )
        .await;
    let resp = agent
        .mount(&attrs)
        .await
        .expect("mount with a revoked cached token");
    assert_eq!(file(&resp, "db-password").contents, b"pw");
    assert_eq!(
        agent
            .metric("kubebao_csi_logins_total{result=\"ok\"}")
            .await,
        2.0,
        "exactly one new login after the 403"
    );
}

#[tokio::test]
async fn names_and_parameters_the_driver_would_refuse_reach_no_openbao() {
    let bed = bed().await;
    let _gate = OPENBAO_GATE.read().await;
    let ns = bed.namespace("refused").await;
    let path = format!("secret/data/myapp/refused-{ns}");
    kv2_put(
        bed,
        &format!("myapp/refused-{ns}"),
        json!({"password": "pw"}),
    )
    .await;
    let pod = pod(bed, &ns, "web", "app").await;
    let token = kubelet_token(bed, &pod, "openbao").await;
    let agent = agent(bed).await;
    let mark = bed.openbao().audit().len();
    let one = |name: &str| {
        format!("- {{objectName: {name:?}, secretPath: {path}, secretKey: password}}\n")
    };
    // The driver's fileutil.Validate rules, then conflicting parameters.
    let mut cases: Vec<(String, Vec<(&str, &str)>)> = [
        "",
        "/etc/passwd",
        "../x",
        "a/../../x",
        "..data",
        "a/./b",
        "a//b",
        "a/",
    ]
    .iter()
    .map(|n| (one(n), vec![]))
    .collect();
    cases.push((one(&"x".repeat(256)), vec![]));
    cases.push((format!("{}{}", one("a"), one("a")), vec![]));
    cases.push((
        format!(
            "- {{objectName: d, secretPath: {path}, secretKey: \"*\"}}\n{}",
            one("d/password")
        ),
        vec![],
    ));
    cases.push((
        format!("- {{objectName: a, secretPath: {path}, encoding: base64}}"),
        vec![],
    ));
    cases.push((
        one("a"),
        vec![
            ("openbaoAddress", "https://a:8200"),
            ("vaultAddress", "https://b:8200"),
        ],
    ));
    cases.push((
        one("a"),
        vec![
            ("openbaoAuthMountPath", "kubernetes"),
            ("vaultKubernetesMountPath", "k8s"),
        ],
    ));
    for (objects, extra) in &cases {
        let mut params = vec![("roleName", "my-app"), ("objects", objects.as_str())];
        params.extend(extra.iter().copied());
        let err = agent
            .mount(&driver_attributes(&params, &pod, Some(&token)))
            .await
            .expect_err(objects);
        assert_eq!(
            err.code(),
            tonic::Code::InvalidArgument,
            "{objects} {extra:?}"
        );
        assert!(
            err.message().starts_with("[bad_parameter]"),
            "{objects}: {}",
            err.message()
        );
    }
    let jwt_hash = bed.openbao().audit_hash(&token).await;
    let audit = bed.openbao().audit().since(mark);
    assert_eq!(audit.count(&path, "read"), 0);
    assert_eq!(audit.logins("kubernetes", "jwt", &jwt_hash).len(), 0);
    assert_eq!(
        agent
            .metric("kubebao_csi_token_reviews_total{result=\"ok\"}")
            .await,
        0.0,
        "refused before the token was even reviewed"
    );
    let objects = one("db-password");
    agent
        .mount(&driver_attributes(
            &[("roleName", "my-app"), ("objects", &objects)],
            &pod,
            Some(&token),
        ))
        .await
        .expect("a valid Mount afterwards");
    let audit = bed.openbao().audit().since(mark);
    assert_eq!(audit.count(&path, "read"), 1);
}

/// Peak memory of the agent process while it serves 1,000 different SecretProviderClasses
/// (each ~18 KB of `objects`, 200 objects). The old parse cache kept up to 512 texts with no
/// byte budget (measured with its limits: peak 51 MiB over the first Mount's RSS); now it keeps
/// at most 8 MiB by its estimate, and what a Mount holds is freed when it ends.
#[tokio::test]
async fn memory_stays_bounded_under_a_thousand_distinct_secret_provider_classes() {
    let bed = bed().await;
    let _gate = OPENBAO_GATE.read().await;
    let ns = bed.namespace("memory").await;
    kv2_put(bed, "myapp/memory", json!({"password": "pw"})).await;
    let pod = pod(bed, &ns, "web", "app").await;
    let token = kubelet_token(bed, &pod, "openbao").await;
    let agent = agent(bed).await;
    let text = |i: usize| -> String {
        (0..200)
            .map(|j| {
                format!(
                    "- {{objectName: spc-{i}-object-{j}, secretPath: secret/data/myapp/memory, secretKey: password}}\n"
                )
            })
            .collect()
    };
    let attrs = |i: usize| {
        let objects = text(i);
        driver_attributes(
            &[("roleName", "my-app"), ("objects", &objects)],
            &pod,
            Some(&token),
        )
    };
    agent.mount(&attrs(0)).await.expect("first Mount");
    let before = agent.memory_kib("VmRSS");
    let start = std::time::Instant::now();
    let mounts = futures::stream::iter(1..=1000)
        .map(|i| {
            let a = attrs(i);
            let agent = &agent;
            async move { agent.mount(&a).await.map(|r| r.files.len()) }
        })
        .buffer_unordered(8);
    let files: Vec<_> = mounts.collect().await;
    for f in files {
        assert_eq!(f.expect("mount"), 200);
    }
    let peak = agent.memory_kib("VmHWM");
    let after = agent.memory_kib("VmRSS");
    println!(
        "kubebao-csi memory, 1,000 distinct SecretProviderClasses ({} bytes of objects each, 8 \
         Mounts at a time, {:.1} s): RSS after the first Mount {} KiB, peak {} KiB, after {} KiB",
        text(1).len(),
        start.elapsed().as_secs_f64(),
        before,
        peak,
        after
    );
    // Allowed over the RSS after the first Mount: the parse cache's 8 MiB (its estimate; up to
    // ~12 MiB of real heap), 8 Mounts in flight (each its text, 200 parsed objects, 200 files
    // and the response: under 1 MiB) and allocator slack (per-thread arenas): 32 MiB.
    assert!(
        peak < before + 32 * 1024,
        "peak RSS {peak} KiB, {before} KiB after the first Mount"
    );
}
