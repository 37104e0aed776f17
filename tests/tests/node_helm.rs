//! `helm install` of the chart, run by Kubernetes itself on a real node: the operator
//! Deployment's two pods (KubeBao's own image) start, pass their probes, log in to OpenBao as
//! their ServiceAccount (a projected token for OpenBao's audience), elect one leader that
//! reconciles; deleting the leader's pod hands over to the other; with `rbac.tokenNamespaces`
//! BaoSecrets are served only in the namespaces that opted in. Needs root (the kubelet does).

use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams};
use kubebao_testbed::node_image::{KUBEBAO_IMAGE, kubebao_image_on};
use kubebao_testbed::{Node, Testbed, wait_for};
use reqwest::Method;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(180);
const NS: &str = "kubebao-system";
/// The release name; the chart names the ServiceAccount after it.
const RELEASE: &str = "kubebao";
/// A tenant namespace listed in rbac.tokenNamespaces, and one that is not.
const ENABLED_NS: &str = "helm-team";
const OTHER_NS: &str = "helm-other";
/// What the operator's own identity may do in OpenBao: policies and Kubernetes-auth roles.
const OPERATOR_POLICY: &str = r#"
path "sys/policies/acl/*" { capabilities = ["create", "read", "update", "delete", "list"] }
path "auth/kubernetes/role/*" { capabilities = ["create", "read", "update", "delete", "list"] }
"#;

/// OpenBao's Kubernetes-auth role `kubebao` for the chart's ServiceAccount, OpenBao audience.
async fn prepare_openbao(bed: &Testbed) {
    bed.enable_kubernetes_auth().await;
    let bao = bed.openbao();
    bao.enable_engine("secret", "kv", Some(2)).await;
    bao.root(
        Method::POST,
        "sys/policies/acl/kubebao-operator",
        Some(json!({"policy": OPERATOR_POLICY})),
    )
    .await;
    bao.root(
        Method::POST,
        "auth/kubernetes/role/kubebao",
        Some(json!({
            "bound_service_account_names": [RELEASE],
            "bound_service_account_namespaces": [NS],
            "audience": "openbao",
            "token_policies": ["kubebao-operator"],
            "token_ttl": "1h",
        })),
    )
    .await;
}

fn helm(bed: &Testbed, args: &[&str]) -> String {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root");
    let out = Command::new(&bed.binaries().helm)
        .current_dir(repo)
        .env("KUBECONFIG", bed.kubeconfig())
        .args(args)
        .output()
        .expect("run helm");
    assert!(
        out.status.success(),
        "helm {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The Lease holder once it is a running operator pod other than `not`.
async fn leader(leases: &Api<Lease>, pods: &Api<Pod>, not: Option<&str>) -> String {
    wait_for("a leader among the operator pods", WAIT, || {
        let (leases, pods) = (leases.clone(), pods.clone());
        async move {
            let lease = leases
                .get("kubebao-operator")
                .await
                .map_err(|e| e.to_string())?;
            let holder = lease
                .spec
                .and_then(|s| s.holder_identity)
                .unwrap_or_default();
            let running = pods
                .get_opt(&holder)
                .await
                .map_err(|e| e.to_string())?
                .is_some_and(|p| p.metadata.deletion_timestamp.is_none());
            if running && Some(holder.as_str()) != not {
                Ok(holder)
            } else {
                Err(format!("holder {holder:?} (a running pod: {running})"))
            }
        }
    })
    .await
}

/// The operator pods that are Running and Ready (both probes pass).
async fn ready_operator_pods(pods: &Api<Pod>, count: usize) -> Vec<String> {
    wait_for(&format!("{count} operator pods to be ready"), WAIT, || {
        let pods = pods.clone();
        async move {
            let list = pods
                .list(&ListParams::default().labels("app.kubernetes.io/name=kubebao"))
                .await
                .map_err(|e| e.to_string())?;
            let ready: Vec<String> = list
                .items
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .filter(|p| {
                    p.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
                })
                .filter_map(|p| p.metadata.name.clone())
                .collect();
            if ready.len() == count {
                Ok(ready)
            } else {
                Err(format!("{} of {} ready", ready.len(), list.items.len()))
            }
        }
    })
    .await
}

/// A BaoPolicy, and the wait until the leader has written it to OpenBao and reports Ready.
async fn reconciled(bed: &Testbed, name: &str) {
    bed.apply(
        &json!({
            "apiVersion": "kubebao.io/v1alpha1",
            "kind": "BaoPolicy",
            "metadata": {"name": name},
            "spec": {"rules": [{"path": format!("secret/data/{name}/*"), "capabilities": ["read"]}]},
        })
        .to_string(),
    );
    let gvk = GroupVersionKind::gvk("kubebao.io", "v1alpha1", "BaoPolicy");
    let api: Api<DynamicObject> = Api::all_with(bed.client().await, &ApiResource::from_gvk(&gvk));
    wait_for(&format!("BaoPolicy {name} to be Ready"), WAIT, || {
        let api = api.clone();
        async move {
            let o = api.get(name).await.map_err(|e| e.to_string())?;
            let ready = o.data["status"]["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            });
            if ready {
                Ok(())
            } else {
                Err(o.data["status"].to_string())
            }
        }
    })
    .await;
    let policy = bed
        .openbao()
        .root(Method::GET, &format!("sys/policies/acl/{name}"), None)
        .await
        .expect("the policy in OpenBao");
    assert!(
        policy["data"]["policy"]
            .as_str()
            .is_some_and(|p| p.contains(&format!("secret/data/{name}/*"))),
        "{policy}"
    );
}

/// Namespace `ns` as a tenant: OpenBao role `ns` for its `default` ServiceAccount (the
/// BaoSecret defaults), reading `secret/data/<ns>/*`, and a secret there.
async fn tenant(bed: &Testbed, ns: &str) {
    bed.kubectl(&["create", "namespace", ns]);
    let bao = bed.openbao();
    let policy = format!("path \"secret/data/{ns}/*\" {{ capabilities = [\"read\"] }}\n");
    bao.root(
        Method::POST,
        &format!("sys/policies/acl/tenant-{ns}"),
        Some(json!({"policy": policy})),
    )
    .await;
    bao.root(
        Method::POST,
        &format!("auth/kubernetes/role/{ns}"),
        Some(json!({
            "bound_service_account_names": ["default"],
            "bound_service_account_namespaces": [ns],
            "audience": "openbao",
            "token_policies": [format!("tenant-{ns}")],
            "token_ttl": "1h",
        })),
    )
    .await;
    bao.root(
        Method::POST,
        &format!("secret/data/{ns}/app"),
        Some(json!({"data": {"password": "pw"}})),
    )
    .await;
}

/// A BaoSecret in `ns` for its tenant secret; waits until `condition` is True with `reason`.
async fn baosecret(bed: &Testbed, ns: &str, condition: &str, reason: &str) -> String {
    bed.apply(
        &json!({
            "apiVersion": "kubebao.io/v1alpha1",
            "kind": "BaoSecret",
            "metadata": {"name": "app", "namespace": ns},
            "spec": {"secretPath": format!("secret/data/{ns}/app"), "target": {"name": "app"}},
        })
        .to_string(),
    );
    let gvk = GroupVersionKind::gvk("kubebao.io", "v1alpha1", "BaoSecret");
    let api: Api<DynamicObject> =
        Api::namespaced_with(bed.client().await, ns, &ApiResource::from_gvk(&gvk));
    wait_for(
        &format!("BaoSecret {ns}/app {condition} {reason}"),
        WAIT,
        || {
            let api = api.clone();
            async move {
                let o = api.get("app").await.map_err(|e| e.to_string())?;
                o.data["status"]["conditions"]
                    .as_array()
                    .and_then(|cs| {
                        cs.iter().find(|c| {
                            c["type"] == condition && c["status"] == "True" && c["reason"] == reason
                        })
                    })
                    .map(|c| c["message"].as_str().unwrap_or_default().to_string())
                    .ok_or_else(|| o.data["status"].to_string())
            }
        },
    )
    .await
}

/// On a failing test, the cluster's view.
struct PrintCluster<'a>(&'a Testbed);

impl Drop for PrintCluster<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for args in [
            &["get", "pods,deployments,leases", "-n", NS, "-o", "wide"][..],
            &["get", "events", "-n", NS, "--sort-by=.lastTimestamp"],
            &[
                "logs",
                "-n",
                NS,
                "-l",
                "app.kubernetes.io/name=kubebao",
                "--tail=40",
                "--prefix",
            ],
        ] {
            let out = self.0.try_kubectl(args, "").unwrap_or_else(|e| e);
            eprintln!("\n$ kubectl {}\n{out}", args.join(" "));
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn helm_install_runs_the_operator_pods_which_elect_a_leader_and_hand_over() {
    let bed = Testbed::shared().await;
    let mut node = Node::start(bed).await;
    let before = node.host_before().clone();
    let _print = PrintCluster(bed);
    let images = tempfile::tempdir().expect("temp dir");
    kubebao_image_on(&node, images.path());
    prepare_openbao(bed).await;
    // OpenBao's TLS listener, reached by pods at the service address.
    let bao = bed.openbao();
    let tls = bao.tls_addr();
    let bao_for_pods = node.expose_to_pods(
        8200,
        tls.trim_start_matches("https://")
            .parse()
            .expect("OpenBao's address"),
    );
    let ca = bed.dir().join("openbao-ca.pem");
    std::fs::write(&ca, bao.ca_pem()).expect("write the CA");
    let (repository, tag) = KUBEBAO_IMAGE.rsplit_once(':').expect("image:tag");

    // Token requests only where a namespace opts in (rbac.tokenNamespaces).
    tenant(bed, ENABLED_NS).await;
    tenant(bed, OTHER_NS).await;
    // The chart's operator pods, for kubebao-rbac-audit (least privilege, measured).
    bed.record_operator_identity(&format!("system:serviceaccount:{NS}:{RELEASE}"));
    let started = Instant::now();
    helm(
        bed,
        &[
            "install",
            RELEASE,
            "charts/kubebao",
            "--namespace",
            NS,
            "--create-namespace",
            "--set",
            &format!("image.repository={repository},image.tag={tag},image.pullPolicy=Never"),
            "--set",
            &format!("global.openbao.address=https://{bao_for_pods}"),
            "--set-file",
            &format!("global.openbao.caBundle={}", ca.display()),
            "--set",
            &format!("rbac.tokenNamespaces={{{ENABLED_NS}}}"),
            "--wait",
            "--timeout=4m",
        ],
    );
    let client = bed.client().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    ready_operator_pods(&pods, 2).await;
    let first = leader(&leases, &pods, None).await;
    eprintln!(
        "FIGURE node: helm install → 2 operator pods ready, leader elected in {:.1?}",
        started.elapsed()
    );
    reconciled(bed, "helm-before-handover").await;

    // Kill the leader's pod: another pod (the standby, or the Deployment's replacement if it is
    // quicker) takes over and reconciles.
    let handover = Instant::now();
    pods.delete(&first, &DeleteParams::default().grace_period(0))
        .await
        .expect("delete the leader's pod");
    let second = leader(&leases, &pods, Some(&first)).await;
    assert_ne!(first, second);
    reconciled(bed, "helm-after-handover").await;
    eprintln!(
        "FIGURE node: leader pod deleted → the standby leads and reconciled in {:.1?}",
        handover.elapsed()
    );
    // BaoSecrets: served where the namespace opted in, refused with a clear reason elsewhere
    // (the operator has no right to act as that namespace's ServiceAccounts).
    baosecret(bed, ENABLED_NS, "Ready", "Synced").await;
    let refused = baosecret(bed, OTHER_NS, "Stalled", "NamespaceNotEnabled").await;
    assert!(refused.contains("rbac.tokenNamespaces"), "{refused}");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), OTHER_NS);
    assert!(
        secrets.get_opt("app").await.expect("read").is_none(),
        "nothing written"
    );

    // The Deployment replaces the deleted pod; one of the two waits as the standby.
    ready_operator_pods(&pods, 2).await;

    // helm deletes the Deployment and the RBAC together: a stopping pod's last Lease calls
    // may be refused, which kubebao-rbac-audit must not count as missing RBAC.
    bed.record_uninstall(&format!("system:serviceaccount:{NS}:{RELEASE}"));
    helm(bed, &["uninstall", RELEASE, "--namespace", NS, "--wait"]);
    drop(_print);
    let after = node.stop();
    let differences = after.differences(&before);
    assert!(
        differences.is_empty(),
        "the host changed after the node stopped:\n{}",
        differences.join("\n")
    );
}
