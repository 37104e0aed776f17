//! The operator's own OpenBao identity in a cluster: Kubernetes auth as its ServiceAccount
//! (the projected token file the chart mounts), a token renewed and replaced by a fresh login
//! past its max TTL, and reconciling all along.

use std::path::Path;
use std::time::Duration;

use kubebao_testbed::{Audit, Component, Testbed, free_port, wait_for};
use reqwest::Method;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

/// Successful logins OpenBao audited for `role` at `auth/kubernetes`, oldest first (token
/// accessors would undercount: an expired token's accessor is gone).
async fn operator_logins(bed: &Testbed, role: &str) -> Audit {
    let bao = bed.openbao();
    let role = bao.audit_hash(role).await;
    bao.audit()
        .logins("kubernetes", "role", &role)
        .filter(|r| r.error.is_none())
}

async fn wait_policy(bed: &Testbed, operator: &mut Component, name: &str) {
    let client = bed.openbao().client();
    wait_for(&format!("policy {name} in OpenBao"), WAIT, || {
        operator.assert_running();
        let client = client.clone();
        async move {
            match client.policy_read(bed.openbao().root_token(), name).await {
                Ok(Some(_)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
}

#[tokio::test]
async fn the_operator_logs_in_as_its_service_account_and_keeps_working_past_its_token_max_ttl() {
    let bed = Testbed::shared().await;
    bed.enable_kubernetes_auth().await;
    let bao = bed.openbao();
    let ns = bed.namespace("kubebao-system").await;
    bed.service_account(&ns, "kubebao-operator").await;
    bao.root(
        Method::POST,
        "sys/policies/acl/kubebao-operator",
        Some(json!({"policy": "path \"sys/policies/acl/*\" { capabilities = [\"create\", \"read\", \"update\", \"delete\", \"list\"] }\npath \"auth/kubernetes/role/*\" { capabilities = [\"create\", \"read\", \"update\", \"delete\", \"list\"] }"})),
    )
    .await;
    // Short token lifetimes: the operator must renew, then log in afresh past the max TTL.
    bao.root(
        Method::POST,
        "auth/kubernetes/role/kubebao-operator",
        Some(json!({
            "bound_service_account_names": ["kubebao-operator"],
            "bound_service_account_namespaces": [ns],
            "audience": "openbao",
            "token_policies": ["kubebao-operator"],
            "token_ttl": "4s",
            "token_max_ttl": "8s",
        })),
    )
    .await;
    // What the chart's projected volume holds: the ServiceAccount's token for OpenBao.
    let jwt = bed.dir().join("operator-sa-token");
    std::fs::write(
        &jwt,
        bed.service_account_token(&ns, "kubebao-operator", "openbao", 3600)
            .await,
    )
    .expect("token file");
    bed.install_crds();

    let kubeconfig = bed.operator_kubeconfig(&ns).display().to_string();
    let mut operator = Component::start_with_env(
        "kubebao-operator-identity",
        bed.dir(),
        Path::new(env!("CARGO_BIN_EXE_kubebao-operator")),
        &[
            format!("--openbao-addr={}", bao.addr()),
            // The test bed's OpenBao listens on loopback over plain http.
            "--openbao-allow-plain-http".into(),
            "--operator-role=kubebao-operator".into(),
            format!("--operator-jwt-file={}", jwt.display()),
            format!("--namespace={ns}"),
            "--leader-elect=false".into(),
            format!("--metrics-addr=127.0.0.1:{}", free_port()),
        ],
        &[("KUBECONFIG", &kubeconfig)],
    );

    bed.apply(
        "apiVersion: kubebao.io/v1alpha1\nkind: BaoPolicy\nmetadata: {name: identity-first}\nspec:\n  rules:\n    - path: \"secret/data/first/*\"\n      capabilities: [read]\n",
    );
    wait_policy(bed, &mut operator, "identity-first").await;
    let first = operator_logins(bed, "kubebao-operator").await;
    assert!(!first.is_empty(), "logged in through Kubernetes auth");
    let first = first.requests[0].clone();
    let first_token = first
        .issued_token
        .clone()
        .expect("the login issued a token");

    // Past the 8 s max TTL the token cannot be renewed: a fresh login must happen. Wait for a
    // login at least 8 s after the first, so everything after it is past that token's life.
    wait_for("a login past the first token's max TTL", WAIT, || {
        operator.assert_running();
        let first = first.clone();
        async move {
            let logins = operator_logins(bed, "kubebao-operator").await;
            let late = logins
                .requests
                .iter()
                .any(|l| l.time.duration_since(first.time).as_secs_f64() >= 8.0);
            if late {
                Ok(())
            } else {
                Err(format!("{} logins", logins.len()))
            }
        }
    })
    .await;
    // Renewed before being replaced: OpenBao saw the first token renew itself.
    let renewals = bao.audit().filter(|r| {
        r.path == "auth/token/renew-self" && r.client_token.as_deref() == Some(&first_token)
    });
    assert!(
        !renewals.is_empty() && renewals.requests.iter().all(|r| r.error.is_none()),
        "the first token was renewed: {:?}",
        renewals.requests
    );
    bed.apply(
        "apiVersion: kubebao.io/v1alpha1\nkind: BaoPolicy\nmetadata: {name: identity-second}\nspec:\n  rules:\n    - path: \"secret/data/second/*\"\n      capabilities: [read]\n",
    );
    wait_policy(bed, &mut operator, "identity-second").await;
    // Written with a token from a later login, not the first (long expired by now).
    let writes = bao.audit().filter(|r| {
        r.path == "sys/policies/acl/identity-second"
            && ["create", "update"].contains(&r.operation.as_str())
            && r.error.is_none()
    });
    let logins = operator_logins(bed, "kubebao-operator").await;
    let later: Vec<&str> = logins.requests[1..]
        .iter()
        .filter_map(|l| l.issued_token.as_deref())
        .collect();
    assert!(
        !writes.is_empty()
            && writes.requests.iter().all(|w| w
                .client_token
                .as_deref()
                .is_some_and(|t| later.contains(&t))),
        "identity-second was written with a fresh login's token"
    );
    let log = std::fs::read_to_string(operator.log_path()).expect("operator log");
    assert!(
        !log.contains(&std::fs::read_to_string(&jwt).expect("jwt")),
        "the ServiceAccount token never appears in logs"
    );
}

#[tokio::test]
async fn a_token_for_the_api_server_never_reaches_openbao() {
    let bed = Testbed::shared().await;
    bed.enable_kubernetes_auth().await;
    let bao = bed.openbao();
    let ns = bed.namespace("kubebao-refused").await;
    bed.service_account(&ns, "kubebao-operator").await;
    bao.root(
        Method::POST,
        "auth/kubernetes/role/kubebao-refused",
        Some(json!({
            "bound_service_account_names": ["kubebao-operator"],
            "bound_service_account_namespaces": [ns],
            "token_policies": ["default"],
        })),
    )
    .await;
    // The token every pod gets by default: for the Kubernetes API server.
    let api_token = bed
        .service_account_token(
            &ns,
            "kubebao-operator",
            "https://kubernetes.default.svc",
            3600,
        )
        .await;
    let jwt = bed.dir().join("operator-api-server-token");
    std::fs::write(&jwt, &api_token).expect("token file");
    bed.install_crds();

    let kubeconfig = bed.operator_kubeconfig(&ns).display().to_string();
    let mut operator = Component::start_with_env(
        "kubebao-operator-refused",
        bed.dir(),
        Path::new(env!("CARGO_BIN_EXE_kubebao-operator")),
        &[
            format!("--openbao-addr={}", bao.addr()),
            // The test bed's OpenBao listens on loopback over plain http.
            "--openbao-allow-plain-http".into(),
            "--operator-role=kubebao-refused".into(),
            format!("--operator-jwt-file={}", jwt.display()),
            format!("--namespace={ns}"),
            "--leader-elect=false".into(),
            format!("--metrics-addr=127.0.0.1:{}", free_port()),
        ],
        &[("KUBECONFIG", &kubeconfig)],
    );
    // Writing a policy needs the operator's identity, so it tries to log in.
    bed.apply(
        "apiVersion: kubebao.io/v1alpha1\nkind: BaoPolicy\nmetadata: {name: identity-refused}\nspec:\n  rules:\n    - path: \"secret/data/refused/*\"\n      capabilities: [read]\n",
    );
    let log_path = operator.log_path().to_path_buf();
    let role = bao.audit_hash("kubebao-refused").await;
    let refusal = "Mount a projected ServiceAccount token with audience";
    // Until the operator refuses its token, or (the failure) OpenBao sees a login with it.
    wait_for("the operator to refuse its token", WAIT, || {
        operator.assert_running();
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let sent = !bao.audit().logins("kubernetes", "role", &role).is_empty();
        async move {
            if log.contains(refusal) || sent {
                Ok(())
            } else {
                Err("no refusal logged yet".to_string())
            }
        }
    })
    .await;
    // A marker request after the refusal: once it is audited, anything sent before it is too.
    let mark = bao.audit().len();
    bao.root(Method::GET, "sys/policies/acl/default", None)
        .await;
    wait_for("the marker in the audit log", WAIT, || async move {
        let after = bao.audit().since(mark);
        match after.count("sys/policies/acl/default", "read") {
            0 => Err("marker not audited yet".to_string()),
            _ => Ok(()),
        }
    })
    .await;
    let logins = bao.audit().logins("kubernetes", "role", &role);
    assert!(
        logins.is_empty(),
        "the API server's token was sent to OpenBao: {:?}",
        logins.requests
    );
    let log = std::fs::read_to_string(operator.log_path()).expect("operator log");
    assert!(log.contains(refusal), "the refusal says what to do");
    assert!(!log.contains(&api_token), "the token never appears in logs");
}
