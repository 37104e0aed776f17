//! A BaoSecret consumed by real pods through the kubelet: the operator (a host process, as in
//! operator/tests/e2e.rs) syncs a BaoSecret into a Secret; a Deployment's pod reads it as an
//! environment variable and as a volume; a change in OpenBao makes the operator restart the
//! Deployment (`rolloutRestartTargets`) and the new pod sees the new value. The pod's
//! environment is read from `/proc/<pid>/environ` of its container's process on the host, its
//! volume from the kubelet's pod directory. Needs root (the node does).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, PostParams};
use kubebao_testbed::node_image::{container_pid, kubebao_binaries, pod_volume_dir, process_env};
use kubebao_testbed::{Component, Node, Testbed, free_port, wait_for};
use reqwest::Method;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(120);
const OPERATOR_POLICY: &str = r#"
path "sys/policies/acl/*" { capabilities = ["create", "read", "update", "delete", "list"] }
path "auth/kubernetes/role/*" { capabilities = ["create", "read", "update", "delete", "list"] }
"#;
/// The environment variable and the volume the app reads the Secret through.
const ENV_NAME: &str = "DB_PASSWORD";
const VOLUME: &str = "db";

/// The operator as a host process with its own OpenBao token (policies and roles only, no KV).
async fn start_operator(bed: &Testbed, bin: &std::path::Path) -> Component {
    let bao = bed.openbao();
    bao.root(
        Method::POST,
        "sys/policies/acl/kubebao-operator",
        Some(json!({"policy": OPERATOR_POLICY})),
    )
    .await;
    let token = bao
        .root(
            Method::POST,
            "auth/token/create",
            Some(json!({"policies": ["kubebao-operator"], "ttl": "1h"})),
        )
        .await
        .expect("token response")["auth"]["client_token"]
        .as_str()
        .expect("token")
        .to_string();
    let token_file = bed.dir().join("operator-token");
    std::fs::write(&token_file, token).expect("write the operator's token");
    bed.install_crds();
    let _ = bed.try_kubectl(&["create", "namespace", "kubebao-system"], "");
    let port = free_port();
    let kubeconfig = bed
        .operator_kubeconfig("kubebao-system")
        .display()
        .to_string();
    let mut operator = Component::start_with_env(
        "kubebao-operator",
        bed.dir(),
        bin,
        &[
            format!("--openbao-addr={}", bao.addr()),
            "--openbao-allow-plain-http".into(),
            format!("--openbao-token-file={}", token_file.display()),
            "--namespace=kubebao-system".into(),
            "--pod-name=operator-0".into(),
            format!("--metrics-addr=127.0.0.1:{port}"),
            "--leader-elect=false".into(),
        ],
        &[("KUBECONFIG", &kubeconfig)],
    );
    let ready = format!("http://127.0.0.1:{port}/readyz");
    wait_for("the operator to be ready", WAIT, || {
        operator.assert_running();
        let ready = ready.clone();
        async move {
            match reqwest::get(&ready).await {
                Ok(r) if r.status().is_success() => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    operator
}

/// A namespace whose `default` ServiceAccount may read `secret/data/<ns>/app` through the
/// OpenBao role named after the namespace (the BaoSecret defaults).
async fn tenant(bed: &Testbed) -> String {
    let ns = bed.namespace("shop").await;
    let bao = bed.openbao();
    let policy = format!(
        "path \"secret/data/{ns}/*\" {{ capabilities = [\"read\"] }}\npath \"secret/metadata/{ns}/*\" {{ capabilities = [\"read\"] }}\n"
    );
    bao.root(
        Method::POST,
        &format!("sys/policies/acl/tenant-{ns}"),
        Some(json!({"policy": policy})),
    )
    .await;
    bao.root(
        Method::POST,
        &format!("auth/kubernetes/role/{ns}"),
        Some(json!({"bound_service_account_names": ["default"], "bound_service_account_namespaces": [ns], "token_policies": [format!("tenant-{ns}")], "token_ttl": "1h"})),
    )
    .await;
    wait_for("the default ServiceAccount", WAIT, || async {
        bed.try_kubectl(&["-n", &ns, "get", "serviceaccount", "default"], "")
            .map(|_| ())
    })
    .await;
    ns
}

async fn set_password(bed: &Testbed, ns: &str, password: &str) {
    bed.openbao()
        .root(
            Method::POST,
            &format!("secret/data/{ns}/app"),
            Some(json!({"data": {"password": password}})),
        )
        .await;
}

/// The app: one pause container reading Secret `app-secret` as `$DB_PASSWORD` and as files.
fn deployment(image: &str) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": "app"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "app"}},
            "template": {
                "metadata": {"labels": {"app": "app"}},
                "spec": {
                    "automountServiceAccountToken": false,
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "app",
                        "image": image,
                        "imagePullPolicy": "Never",
                        "env": [{"name": ENV_NAME, "valueFrom": {"secretKeyRef": {"name": "app-secret", "key": "password"}}}],
                        "volumeMounts": [{"name": VOLUME, "mountPath": "/etc/db", "readOnly": true}],
                    }],
                    "volumes": [{"name": VOLUME, "secret": {"secretName": "app-secret"}}],
                },
            },
        },
    }))
    .expect("deployment")
}

/// What a running app pod sees: its uid, `$DB_PASSWORD` and the `password` file.
#[derive(Debug)]
struct Seen {
    uid: String,
    env: Option<String>,
    file: Option<String>,
}

/// The running app pods (not terminating), as their containers see the Secret.
async fn running_apps(node: &Node, pods: &Api<Pod>) -> Result<Vec<Seen>, String> {
    let list = pods
        .list(&ListParams::default().labels("app=app"))
        .await
        .map_err(|e| e.to_string())?;
    let mut seen = Vec::new();
    for pod in list.items {
        let status = pod.status.unwrap_or_default();
        if pod.metadata.deletion_timestamp.is_some() || status.phase.as_deref() != Some("Running") {
            continue;
        }
        let Some(id) = status
            .container_statuses
            .iter()
            .flatten()
            .find(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
            .and_then(|c| c.container_id.clone())
        else {
            continue;
        };
        let uid = pod.metadata.uid.unwrap_or_default();
        let env: BTreeMap<String, String> = process_env(container_pid(node, &id)?)?;
        let file = pod_volume_dir(node, &uid, "kubernetes.io~secret", VOLUME).join("password");
        seen.push(Seen {
            env: env.get(ENV_NAME).cloned(),
            file: std::fs::read_to_string(file).ok(),
            uid,
        });
    }
    Ok(seen)
}

/// Waits until exactly one app pod runs, other than `not`, and it sees `password` in its
/// environment and its volume; returns its uid.
async fn wait_app_sees(
    node: &Node,
    pods: &Api<Pod>,
    not: Option<&str>,
    password: &str,
    operator: &mut Component,
) -> String {
    wait_for(
        &format!("one app pod that sees {password:?} as env and file"),
        WAIT,
        || {
            operator.assert_running();
            async move {
                let seen = running_apps(node, pods).await?;
                match &seen[..] {
                    [one]
                        if Some(one.uid.as_str()) != not
                            && one.env.as_deref() == Some(password)
                            && one.file.as_deref() == Some(password) =>
                    {
                        Ok(one.uid.clone())
                    }
                    _ => Err(format!(
                        "running app pods: {:?}",
                        seen.iter()
                            .map(|s| (
                                &s.uid,
                                s.env.as_deref() == Some(password),
                                s.file.as_deref() == Some(password)
                            ))
                            .collect::<Vec<_>>()
                    )),
                }
            }
        },
    )
    .await
}

/// The app Deployment's pod template annotation `kubebao.io/restartedAt`, set by the operator.
async fn restarted_at(deployments: &Api<Deployment>) -> Option<String> {
    deployments
        .get("app")
        .await
        .expect("Deployment app")
        .spec?
        .template
        .metadata?
        .annotations?
        .remove("kubebao.io/restartedAt")
}

/// On a failing test, the cluster's view (the operator prints its own log tail).
struct PrintCluster<'a>(&'a Testbed, String);

impl Drop for PrintCluster<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for args in [
            &["get", "events", "-n", &self.1, "--sort-by=.lastTimestamp"][..],
            &[
                "get",
                "pods,deployments,replicasets,secrets,baosecrets",
                "-n",
                &self.1,
                "-o",
                "wide",
            ],
            &["get", "baosecrets", "-n", &self.1, "-o", "yaml"],
        ] {
            let out = self.0.try_kubectl(args, "").unwrap_or_else(|e| e);
            eprintln!("\n$ kubectl {}\n{out}", args.join(" "));
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_baosecret_reaches_real_pods_and_a_change_restarts_them() {
    let bed = Testbed::shared().await;
    let node = Node::start(bed).await;
    let before = node.host_before().clone();
    let bins = tempfile::tempdir().expect("temp dir");
    let bins = kubebao_binaries(bins.path());
    bed.enable_kubernetes_auth().await;
    bed.openbao().enable_engine("secret", "kv", Some(2)).await;
    let mut operator = start_operator(bed, &bins.join("kubebao-operator")).await;
    let ns = tenant(bed).await;
    let _print = PrintCluster(bed, ns.clone());
    set_password(bed, &ns, "first-pw").await;

    let started = Instant::now();
    let baosecret = json!({
        "apiVersion": "kubebao.io/v1alpha1",
        "kind": "BaoSecret",
        "metadata": {"name": "app", "namespace": ns},
        "spec": {
            "secretPath": format!("secret/data/{ns}/app"),
            "target": {"name": "app-secret"},
            "refreshInterval": "2s",
            "rolloutRestartTargets": [{"kind": "Deployment", "name": "app"}],
        },
    });
    bed.apply(&baosecret.to_string());
    let baosecrets: Api<DynamicObject> = Api::namespaced_with(
        bed.client().await,
        &ns,
        &ApiResource::from_gvk(&GroupVersionKind::gvk(
            "kubebao.io",
            "v1alpha1",
            "BaoSecret",
        )),
    );
    wait_for("BaoSecret app to be Ready", WAIT, || async {
        let bs = baosecrets.get("app").await.map_err(|e| e.to_string())?;
        let conditions = bs.data["status"]["conditions"].as_array().cloned();
        let ready = conditions
            .iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        if ready {
            Ok(())
        } else {
            Err(format!("status: {}", bs.data["status"]))
        }
    })
    .await;
    eprintln!(
        "measured: BaoSecret applied -> Ready {} ms",
        started.elapsed().as_millis()
    );

    let client = bed.client().await;
    let started = Instant::now();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    deployments
        .create(&PostParams::default(), &deployment(node.pause_image()))
        .await
        .expect("create the app Deployment");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let first = wait_app_sees(&node, &pods, None, "first-pw", &mut operator).await;
    eprintln!(
        "measured: Deployment created -> pod running with the Secret as env and file {} ms",
        started.elapsed().as_millis()
    );

    assert!(
        restarted_at(&deployments).await.is_none(),
        "no restart while the data has not changed"
    );

    // A change in OpenBao: the operator's refresh finds the new KV version, writes the Secret
    // and restarts the Deployment; the new pod starts with the new value in its environment.
    let started = Instant::now();
    set_password(bed, &ns, "second-pw").await;
    let second = wait_app_sees(&node, &pods, Some(&first), "second-pw", &mut operator).await;
    eprintln!(
        "measured: OpenBao change -> restarted pod running with the new env and file {} ms",
        started.elapsed().as_millis()
    );
    assert_ne!(first, second, "a new pod");
    assert!(
        restarted_at(&deployments).await.is_some(),
        "the operator restarted the Deployment (kubebao.io/restartedAt)"
    );
    let events: Api<Event> = Api::namespaced(client, &ns);
    wait_for(
        "a RolloutRestarted event about BaoSecret app",
        WAIT,
        || async {
            let list = events
                .list(&Default::default())
                .await
                .map_err(|e| e.to_string())?;
            list.items
                .iter()
                .any(|e| {
                    e.reason.as_deref() == Some("RolloutRestarted")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("app")
                })
                .then_some(())
                .ok_or(format!("{} events, none matching", list.items.len()))
        },
    )
    .await;

    drop(operator);
    let after = node.stop();
    let differences = after.differences(&before);
    assert!(
        differences.is_empty(),
        "the host changed after the node stopped:\n{}",
        differences.join("\n")
    );
}
