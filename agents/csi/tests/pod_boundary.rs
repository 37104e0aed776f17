//! Pod → another pod's secrets, tried as an attacker who controls a pod (or its
//! SecretProviderClass) would: every crossing goes through the real `kubebao-csi` binary, called
//! exactly as the Secrets Store CSI driver calls it, against a real OpenBao that verifies real
//! ServiceAccount tokens. Each is refused with an error that says why, returns no file, leaks no
//! token, and reads nothing in OpenBao (its audit log shows no read of the victim's path).
//!
//! Crossings: a role bound to another ServiceAccount; another pod's identity claimed with the
//! attacker's own token, a sibling pod's token, a forged token, or no token for a pod that does
//! not exist; a token minted for another audience (the API server's); another namespace's role;
//! another tenant's secret path under the attacker's own role.

mod support;

use std::time::Duration;

use kubebao_testbed::{Testbed, wait_for};
use reqwest::Method;
use serde_json::json;
use support::*;

const WAIT: Duration = Duration::from_secs(30);

/// Asserts a refused Mount: gRPC `code`, message prefix `[reason]` containing `says`, no file,
/// no secret in the message.
fn refused(
    result: Result<kubebao_proto::csi::MountResponse, tonic::Status>,
    code: tonic::Code,
    reason: &str,
    says: &str,
    never: &[&str],
) {
    let err = match result {
        Ok(resp) => panic!(
            "a crossing was served {} file(s): {:?}",
            resp.files.len(),
            resp.files.iter().map(|f| &f.path).collect::<Vec<_>>()
        ),
        Err(e) => e,
    };
    assert_eq!(err.code(), code, "{}", err.message());
    assert!(
        err.message().starts_with(&format!("[{reason}]")),
        "{}",
        err.message()
    );
    assert!(err.message().contains(says), "{}", err.message());
    for secret in never {
        assert!(
            !err.message().contains(secret),
            "a secret leaked: {}",
            err.message()
        );
    }
}

/// Tenant `team` in namespace `ns`: its own policy (`secret/data/<team>/*`) and Kubernetes-auth
/// role `<team>`, bound to ServiceAccount `app` in `ns` only.
async fn tenant(bed: &Testbed, team: &str, ns: &str) {
    let bao = bed.openbao();
    bao.root(
        Method::PUT,
        &format!("sys/policies/acl/{team}"),
        Some(json!({"policy": format!("path \"secret/data/{team}/*\" {{ capabilities = [\"read\"] }}")})),
    )
    .await;
    bao.root(
        Method::POST,
        &format!("auth/kubernetes/role/{team}"),
        Some(json!({
            "bound_service_account_names": ["app"],
            "bound_service_account_namespaces": [ns],
            "audience": "openbao",
            "token_policies": [team],
            "token_ttl": "1h",
        })),
    )
    .await;
    kv2_put(
        bed,
        &format!("{team}/db"),
        json!({"password": format!("{team}-pw")}),
    )
    .await;
}

fn objects(team: &str) -> String {
    format!("- {{objectName: db-password, secretPath: secret/data/{team}/db, secretKey: password}}")
}

#[tokio::test]
async fn another_namespace_cannot_reach_a_tenants_role_or_secrets() {
    let bed = bed().await;
    let _gate = OPENBAO_GATE.read().await;
    let ns_a = bed.namespace("tenant-a").await;
    let ns_b = bed.namespace("tenant-b").await;
    let (team_a, team_b) = (format!("a-{ns_a}"), format!("b-{ns_b}"));
    tenant(bed, &team_a, &ns_a).await;
    tenant(bed, &team_b, &ns_b).await;
    let victim = pod(bed, &ns_a, "web", "app").await;
    let attacker = pod(bed, &ns_b, "web", "app").await;
    let agent = agent(bed).await;
    let victim_token = kubelet_token(bed, &victim, "openbao").await;
    let victim_objects = objects(&team_a);
    agent
        .mount(&driver_attributes(
            &[("roleName", &team_a), ("objects", &victim_objects)],
            &victim,
            Some(&victim_token),
        ))
        .await
        .expect("the tenant's own pod mounts its secret");
    let mark = bed.openbao().audit().len();
    let token = kubelet_token(bed, &attacker, "openbao").await;
    let never = [token.as_str(), victim_token.as_str()];

    // Same ServiceAccount name, other namespace: tenant A's role does not bind it.
    refused(
        agent
            .mount(&driver_attributes(
                &[("roleName", &team_a), ("objects", &victim_objects)],
                &attacker,
                Some(&token),
            ))
            .await,
        tonic::Code::Unauthenticated,
        "login_refused",
        &format!("login refused for role \"{team_a}\" as {ns_b}/app"),
        &never,
    );
    // Its own role, tenant A's path: OpenBao's policy refuses the read.
    refused(
        agent
            .mount(&driver_attributes(
                &[("roleName", &team_b), ("objects", &victim_objects)],
                &attacker,
                Some(&token),
            ))
            .await,
        tonic::Code::PermissionDenied,
        "permission_denied",
        &format!("secret/data/{team_a}/db"),
        &never,
    );
    // The pod's token for the API server's audience (what its default token volume holds).
    let api_token = kubelet_token(bed, &attacker, "https://kubernetes.default.svc").await;
    let own_objects = objects(&team_b);
    refused(
        agent
            .mount(&driver_attributes(
                &[("roleName", &team_b), ("objects", &own_objects)],
                &attacker,
                Some(&api_token),
            ))
            .await,
        tonic::Code::Unauthenticated,
        "bad_token",
        "openbao",
        &[api_token.as_str()],
    );
    // OpenBao saw one read of tenant A's path since (the one its policy refused), and served
    // none. (The audit log is read as it grows: wait until that refusal is in it.)
    let victim_path = format!("secret/data/{team_a}/db");
    let reads = wait_for("OpenBao's audit of the refused read", WAIT, || {
        let victim_path = victim_path.clone();
        async move {
            let audit = bed.openbao().audit().since(mark);
            let reads = audit.filter(|r| r.path == victim_path && r.operation == "read");
            if reads.is_empty() {
                Err("not audited yet".to_string())
            } else {
                Ok(reads)
            }
        }
    })
    .await;
    assert_eq!(reads.len(), 1, "{:?}", reads.requests);
    assert!(
        reads.requests.iter().all(|r| r
            .error
            .as_deref()
            .is_some_and(|e| e.contains("permission denied"))),
        "a crossing read tenant A's secret: {:?}",
        reads.requests
    );
    // The attacker, with its own token, role and path, is served: the refusals were the crossings.
    let resp = agent
        .mount(&driver_attributes(
            &[("roleName", &team_b), ("objects", &own_objects)],
            &attacker,
            Some(&token),
        ))
        .await
        .expect("the attacker's own secret");
    assert_eq!(
        file(&resp, "db-password").contents,
        format!("{team_b}-pw").as_bytes()
    );
}

#[tokio::test]
async fn a_service_account_the_role_does_not_bind_is_refused_clearly() {
    let bed = bed().await;
    let _gate = OPENBAO_GATE.read().await;
    kv2_put(bed, "myapp/shared", json!({"password": "pw"})).await;
    let ns = bed.namespace("intruder").await;
    let intruder = pod(bed, &ns, "sneaky", "intruder").await;
    let token = kubelet_token(bed, &intruder, "openbao").await;
    let agent = agent(bed).await;
    let attrs = driver_attributes(
        &[("roleName", "my-app"), ("objects", SHARED_OBJECTS)],
        &intruder,
        Some(&token),
    );
    let err = agent
        .mount(&attrs)
        .await
        .expect_err("intruder must be refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let expected = format!("login refused for role \"my-app\" as {ns}/intruder");
    assert!(err.message().contains(&expected), "{}", err.message());
    assert!(
        err.message().starts_with("[login_refused]"),
        "{}",
        err.message()
    );
    assert!(
        !err.message().contains(&token),
        "the token leaked into the error"
    );
    assert_eq!(
        agent
            .metric("kubebao_csi_logins_total{result=\"refused\"}")
            .await,
        1.0
    );

    // The agent keeps serving: the right pod in the same namespace mounts.
    let app = pod(bed, &ns, "web", "app").await;
    let token = kubelet_token(bed, &app, "openbao").await;
    let attrs = driver_attributes(
        &[("roleName", "my-app"), ("objects", SHARED_OBJECTS)],
        &app,
        Some(&token),
    );
    agent
        .mount(&attrs)
        .await
        .expect("bound ServiceAccount mounts");
}

#[tokio::test]
async fn a_request_claiming_a_pods_identity_without_its_token_gets_nothing() {
    let bed = bed().await;
    let _gate = OPENBAO_GATE.read().await;
    let ns = bed.namespace("claims").await;
    let path = format!("myapp/claims-{ns}");
    kv2_put(bed, &path, json!({"password": "pw"})).await;
    let objects = format!(
        "- {{objectName: db-password, secretPath: secret/data/{path}, secretKey: password}}"
    );
    let params = [("roleName", "my-app"), ("objects", objects.as_str())];
    let web = pod(bed, &ns, "web", "app").await;
    let sibling = pod(bed, &ns, "web-2", "app").await;
    let intruder = pod(bed, &ns, "sneaky", "intruder").await;
    let agent = agent(bed).await;
    let token = kubelet_token(bed, &web, "openbao").await;
    agent
        .mount(&driver_attributes(&params, &web, Some(&token)))
        .await
        .expect("the pod with its own token");
    let mark = bed.openbao().audit().len();

    // Pod web's namespace, name, uid and ServiceAccount, with someone else's token: the cache
    // holds the identity's OpenBao token, and none of these may have it.
    let forged = "eyJhbGciOiJSUzI1NiIsImtpZCI6IngifQ.eyJzdWIiOiJ4In0.c2lnbmF0dXJl".to_string();
    let impostors = [
        (
            kubelet_token(bed, &intruder, "openbao").await,
            format!("system:serviceaccount:{ns}:intruder"),
        ),
        (
            kubelet_token(bed, &sibling, "openbao").await,
            "bound to another pod".to_string(),
        ),
        (forged.clone(), "does not accept it".to_string()),
    ];
    for (jwt, why) in &impostors {
        let err = agent
            .mount(&driver_attributes(&params, &web, Some(jwt)))
            .await
            .expect_err("someone else's token");
        assert_eq!(
            err.code(),
            tonic::Code::Unauthenticated,
            "{}",
            err.message()
        );
        assert!(
            err.message().starts_with("[bad_token]"),
            "{}",
            err.message()
        );
        assert!(err.message().contains(why.as_str()), "{}", err.message());
        assert!(!err.message().contains(jwt.as_str()), "the token leaked");
    }
    // No token, and the uid of no pod: the agent's TokenRequest bound to it fails.
    let ghost = TestPod {
        namespace: web.namespace.clone(),
        name: web.name.clone(),
        uid: "00000000-0000-0000-0000-000000000000".into(),
        service_account: web.service_account.clone(),
    };
    let err = agent
        .mount(&driver_attributes(&params, &ghost, None))
        .await
        .expect_err("no token for a pod that does not exist");
    assert!(err.message().starts_with("[no_token]"), "{}", err.message());

    let audit = bed.openbao().audit().since(mark);
    assert_eq!(
        audit.count(&format!("secret/data/{path}"), "read"),
        0,
        "an impostor's Mount read the secret"
    );
    assert_eq!(
        agent
            .metric("kubebao_csi_logins_total{result=\"ok\"}")
            .await,
        1.0
    );
    // The sibling with its own token shares the identity's token: no second login.
    let sibling_token = &impostors[1].0;
    agent
        .mount(&driver_attributes(&params, &sibling, Some(sibling_token)))
        .await
        .expect("another pod of the ServiceAccount, with its own token");
    assert_eq!(
        agent
            .metric("kubebao_csi_logins_total{result=\"ok\"}")
            .await,
        1.0
    );
}
