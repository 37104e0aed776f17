//! The operator's own OpenBao identity in a cluster: Kubernetes auth as its ServiceAccount
//! (the projected token file the chart mounts), a token renewed and replaced by a fresh login
//! past its max TTL, and reconciling all along.

use std::path::Path;
use std::time::Duration;

use kubebao_testbed::{Component, Testbed, free_port, wait_for};
use reqwest::Method;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

/// Logins OpenBao has seen for the operator's role (one token accessor per login).
async fn operator_logins(bed: &Testbed, role: &str) -> Result<usize, String> {
    let bao = bed.openbao();
    let list = bao
        .root(Method::GET, "auth/token/accessors?list=true", None)
        .await
        .ok_or("no accessors")?;
    let mut logins = 0;
    for accessor in list["data"]["keys"].as_array().ok_or("no keys")? {
        let info = bao
            .client()
            .request(
                Method::POST,
                "auth/token/lookup-accessor",
                Some(bao.root_token()),
                Some(&json!({"accessor": accessor})),
            )
            .await;
        if let Ok(Some(info)) = info
            && info["data"]["meta"]["role"] == role
        {
            logins += 1;
        }
    }
    Ok(logins)
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

    let kubeconfig = bed.kubeconfig().display().to_string();
    let mut operator = Component::start_with_env(
        "kubebao-operator-identity",
        bed.dir(),
        Path::new(env!("CARGO_BIN_EXE_kubebao-operator")),
        &[
            format!("--openbao-addr={}", bao.addr()),
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
    assert!(
        operator_logins(bed, "kubebao-operator")
            .await
            .expect("accessors")
            >= 1,
        "logged in through Kubernetes auth"
    );

    // Past the 8 s max TTL the token cannot be renewed: a second login must happen.
    wait_for("a fresh login past the token's max TTL", WAIT, || {
        operator.assert_running();
        async {
            match operator_logins(bed, "kubebao-operator").await? {
                n if n >= 2 => Ok(()),
                n => Err(format!("{n} logins")),
            }
        }
    })
    .await;
    bed.apply(
        "apiVersion: kubebao.io/v1alpha1\nkind: BaoPolicy\nmetadata: {name: identity-second}\nspec:\n  rules:\n    - path: \"secret/data/second/*\"\n      capabilities: [read]\n",
    );
    wait_policy(bed, &mut operator, "identity-second").await;
    let log = std::fs::read_to_string(operator.log_path()).expect("operator log");
    assert!(
        !log.contains(&std::fs::read_to_string(&jwt).expect("jwt")),
        "the ServiceAccount token never appears in logs"
    );
}
