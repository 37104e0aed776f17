//! Node agent → cluster, tried as an attacker who took over a node agent: what each of KubeBao's
//! node components can do with the Kubernetes API is exactly what it needs, no more.
//!
//! - The installer DaemonSet's pods and the KMS static pod get no ServiceAccount token at all
//!   (`automountServiceAccountToken: false`): they cannot call the API.
//! - The CSI provider's ServiceAccount, bound by the ClusterRole the operator renders, may ask
//!   the API server whether a token is valid (TokenReview) and nothing else: every other call an
//!   attacker would try is refused (403) and nothing is written.
//!
//! The objects are the operator's rendered ones (its snapshots, checked against the renderer by
//! `csi_objects_match_the_snapshot` and friends).

use std::path::{Path, PathBuf};

use kube::config::{KubeConfigOptions, Kubeconfig};
use kubebao_testbed::Testbed;
use serde_json::{Value, json};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

fn snapshot(name: &str) -> Vec<Value> {
    let path = repo()
        .join("operator/src/installation/render/snapshots")
        .join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .split("\n---\n")
        .map(|doc| serde_saphyr::from_str::<Value>(doc).expect("YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

/// A client that authenticates with `token` only (no admin certificate).
async fn client_with_token(bed: &Testbed, token: &str) -> kube::Client {
    let kubeconfig = json!({
        "apiVersion": "v1", "kind": "Config", "current-context": "agent",
        "clusters": [{"name": "bed", "cluster": {
            "server": bed.apiserver_url(),
            "certificate-authority": bed.pki().ca_cert,
        }}],
        "users": [{"name": "agent", "user": {"token": token}}],
        "contexts": [{"name": "agent", "context": {"cluster": "bed", "user": "agent"}}],
    });
    let kubeconfig: Kubeconfig = serde_json::from_value(kubeconfig).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config");
    kube::Client::try_from(config).expect("client")
}

#[test]
fn the_installer_and_the_kms_plugin_get_no_api_token() {
    let installer = snapshot("installer-daemonset.yaml");
    let ds = installer
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("the installer DaemonSet");
    assert_eq!(
        ds["spec"]["template"]["spec"]["automountServiceAccountToken"],
        false
    );
    let kms = snapshot("kubebao-kms.yaml");
    assert_eq!(kms[0]["spec"]["automountServiceAccountToken"], false);
}

#[tokio::test]
async fn the_csi_provider_may_review_tokens_and_nothing_else() {
    let bed = Testbed::shared().await;
    // The crossings below are refused on purpose: kubebao-rbac-audit counts them as such.
    bed.record_attacks();
    let objects = snapshot("csi.yaml");
    for kind in ["ServiceAccount", "ClusterRole", "ClusterRoleBinding"] {
        let doc = objects
            .iter()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("the CSI snapshot has a {kind}"));
        bed.apply(&doc.to_string());
    }
    let ns = "kube-system";
    let token = bed
        .service_account_token(ns, "kubebao-csi", "https://kubernetes.default.svc", 600)
        .await;
    let agent = client_with_token(bed, &token).await;
    let victim_ns = bed.namespace("victim").await;
    bed.service_account(&victim_ns, "app").await;

    // What the provider needs: a TokenReview.
    let review = json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
        "spec": {"token": token},
    });
    let reviewed: Value = agent
        .request(
            http::Request::post("/apis/authentication.k8s.io/v1/tokenreviews")
                .header("content-type", "application/json")
                .body(serde_json::to_vec(&review).expect("json"))
                .expect("request"),
        )
        .await
        .expect("a TokenReview is allowed");
    assert_eq!(reviewed["status"]["authenticated"], true);

    // What an attacker holding that token would try next.
    let tries: Vec<(&str, http::Request<Vec<u8>>)> = vec![
        (
            "mint a token for another ServiceAccount",
            http::Request::post(format!(
                "/api/v1/namespaces/{victim_ns}/serviceaccounts/app/token"
            ))
            .header("content-type", "application/json")
            .body(
                serde_json::to_vec(&json!({
                    "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                    "spec": {"audiences": ["openbao"]},
                }))
                .expect("json"),
            )
            .expect("request"),
        ),
        (
            "list Secrets in every namespace",
            http::Request::get("/api/v1/secrets")
                .body(Vec::new())
                .expect("request"),
        ),
        (
            "read a Secret in kube-system",
            http::Request::get("/api/v1/namespaces/kube-system/secrets/kubebao-csi-object-version-key")
                .body(Vec::new())
                .expect("request"),
        ),
        (
            "create a Secret",
            http::Request::post(format!("/api/v1/namespaces/{victim_ns}/secrets"))
                .header("content-type", "application/json")
                .body(
                    serde_json::to_vec(&json!({"metadata": {"name": "planted"}}))
                        .expect("json"),
                )
                .expect("request"),
        ),
        (
            "list pods",
            http::Request::get("/api/v1/pods")
                .body(Vec::new())
                .expect("request"),
        ),
        (
            "create a pod",
            http::Request::post(format!("/api/v1/namespaces/{victim_ns}/pods"))
                .header("content-type", "application/json")
                .body(
                    serde_json::to_vec(&json!({
                        "metadata": {"name": "planted"},
                        "spec": {"containers": [{"name": "c", "image": "x"}]},
                    }))
                    .expect("json"),
                )
                .expect("request"),
        ),
        (
            "list nodes",
            http::Request::get("/api/v1/nodes")
                .body(Vec::new())
                .expect("request"),
        ),
        (
            "read KubeBaoInstallations",
            http::Request::get("/apis/kubebao.io/v1alpha1/kubebaoinstallations")
                .body(Vec::new())
                .expect("request"),
        ),
        (
            "bind itself to cluster-admin",
            http::Request::post("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings")
                .header("content-type", "application/json")
                .body(
                    serde_json::to_vec(&json!({
                        "metadata": {"name": "planted"},
                        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
                        "subjects": [{"kind": "ServiceAccount", "name": "kubebao-csi", "namespace": ns}],
                    }))
                    .expect("json"),
                )
                .expect("request"),
        ),
        (
            "create a SubjectAccessReview",
            http::Request::post("/apis/authorization.k8s.io/v1/subjectaccessreviews")
                .header("content-type", "application/json")
                .body(
                    serde_json::to_vec(&json!({
                        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                        "spec": {"user": "x", "resourceAttributes": {"verb": "get", "resource": "secrets"}},
                    }))
                    .expect("json"),
                )
                .expect("request"),
        ),
    ];
    let count = tries.len();
    for (what, request) in tries {
        match agent.request::<Value>(request).await {
            Err(kube::Error::Api(e)) if e.code == 403 => {}
            other => panic!("the CSI provider's token could {what}: {other:?}"),
        }
    }
    // Nothing was written.
    for path in [
        format!("/api/v1/namespaces/{victim_ns}/secrets/planted"),
        format!("/api/v1/namespaces/{victim_ns}/pods/planted"),
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/planted".to_string(),
    ] {
        let found = bed.try_kubectl(&["get", "--raw", &path], "");
        assert!(found.is_err(), "{path} exists: {found:?}");
    }
    eprintln!(
        "FIGURE node agent → cluster: {count} crossings tried with the CSI provider's token, {count} refused (403), nothing written"
    );
}
