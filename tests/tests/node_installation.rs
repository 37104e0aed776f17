//! One KubeBaoInstallation, run by Kubernetes itself on a real node: the installer DaemonSet's
//! pod (KubeBao's own image) writes the KMS static pod manifest into the kubelet's static pod
//! directory, the kubelet runs the plugin as a static pod (mirror pod Running, probes passing),
//! kube-apiserver — pointed once at the EncryptionConfiguration the installer wrote — stores
//! Secrets through the socket that pod serves, a rotation rewrites every Secret, a spec change
//! rolls the static pod, and deletion (after the declared migration off KMS) removes it.
//!
//! The operator runs as a host process (its own pods are the Helm test's subject); everything
//! on the node runs as pods. Needs root (the kubelet does).

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use kubebao_testbed::conditions::condition;
use kubebao_testbed::node_image::kubebao_image_on;
use kubebao_testbed::{Component, NODE_NAME, Node, Testbed, free_port, wait_for};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(120);
/// The operator's namespace, where the installation's DaemonSets run.
const NS: &str = "kubebao-system";
const KMS_PREFIX: &[u8] = b"k8s:enc:kms:v2:kubebao:";

fn installations(client: kube::Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("kubebao.io", "v1alpha1", "KubeBaoInstallation");
    Api::all_with(client, &ApiResource::from_gvk(&gvk))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn status(api: &Api<DynamicObject>) -> Result<Value, String> {
    Ok(api.get("kubebao").await.map_err(|e| e.to_string())?.data["status"].clone())
}

/// The operator as a host process, with OpenBao's root token as its own identity.
fn start_operator(bed: &Testbed, bin: &Path) -> Component {
    let token_file = bed.dir().join("node-installation-operator-token");
    std::fs::write(&token_file, bed.openbao().root_token().expose()).expect("token file");
    let kubeconfig = bed.operator_kubeconfig(NS).display().to_string();
    Component::start_with_env(
        "kubebao-operator-node-installation",
        bed.dir(),
        bin,
        &[
            format!("--openbao-addr={}", bed.openbao().addr()),
            "--openbao-allow-plain-http".into(),
            format!("--openbao-token-file={}", token_file.display()),
            format!("--namespace={NS}"),
            "--leader-elect=false".into(),
            format!("--metrics-addr=127.0.0.1:{}", free_port()),
        ],
        &[("KUBECONFIG", &kubeconfig)],
    )
}

/// The static pod's mirror, probed on `health_port`, once it runs with every container ready
/// (its probes pass).
async fn ready_mirror_pod(pods: &Api<Pod>, name: &str, health_port: u16) -> Pod {
    wait_for(
        &format!("the static pod {name} to run and be ready (probes on port {health_port})"),
        WAIT,
        || {
            let pods = pods.clone();
            async move {
                let pod = pods.get(name).await.map_err(|e| e.to_string())?;
                let probe = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.containers[0].readiness_probe.clone())
                    .and_then(|p| p.http_get)
                    .map(|g| g.port);
                if probe != Some(IntOrString::Int(health_port.into())) {
                    return Err(format!("probed on {probe:?}"));
                }
                let st = pod.status.clone().unwrap_or_default();
                let ready = st
                    .conditions
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                if st.phase.as_deref() == Some("Running") && ready {
                    Ok(pod)
                } else {
                    Err(format!("phase {:?}, ready {ready}", st.phase))
                }
            }
        },
    )
    .await
}

/// Every DaemonSet pod of `app` (label `app.kubernetes.io/component`) Running and Ready.
async fn ready_daemon_pod(pods: &Api<Pod>, component: &str) -> Pod {
    wait_for(
        &format!("the {component} DaemonSet pod to run and be ready"),
        WAIT,
        || {
            let pods = pods.clone();
            async move {
                let list = pods
                    .list(
                        &ListParams::default()
                            .labels(&format!("app.kubernetes.io/component={component}")),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                let pod = list.items.into_iter().next().ok_or("no pod yet")?;
                let st = pod.status.clone().unwrap_or_default();
                let ready = st
                    .conditions
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                if ready {
                    Ok(pod)
                } else {
                    Err(format!("phase {:?}, not ready", st.phase))
                }
            }
        },
    )
    .await
}

async fn put_secret(api: &Api<Secret>, name: &str, value: &str) {
    let s: Secret = serde_json::from_value(json!({
        "metadata": {"name": name},
        "stringData": {"value": value},
    }))
    .expect("secret");
    api.create(&PostParams::default(), &s)
        .await
        .expect("create Secret");
}

/// On a failing test, the cluster's and the installation's view.
struct PrintCluster<'a>(&'a Testbed);

impl Drop for PrintCluster<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for args in [
            &["get", "pods,daemonsets", "-A", "-o", "wide"][..],
            &["get", "events", "-A", "--sort-by=.lastTimestamp"],
            &["get", "kubebaoinstallations", "-o", "yaml"],
        ] {
            let out = self.0.try_kubectl(args, "").unwrap_or_else(|e| e);
            eprintln!("\n$ kubectl {}\n{out}", args.join(" "));
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kubebao_installation_runs_the_kms_plugin_as_a_static_pod_through_the_kubelet() {
    let bed = Testbed::shared().await;
    let mut node = Node::start(bed).await;
    let before = node.host_before().clone();
    let _print = PrintCluster(bed);
    let images = tempfile::tempdir().expect("temp dir");
    let image = kubebao_image_on(&node, images.path());
    let client = bed.client().await;
    bed.install_crds();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": NS}})).expect("namespace"),
        )
        .await
        .expect("create the operator's namespace");
    // The KMS plugin goes on control-plane nodes: this node is one.
    bed.kubectl(&[
        "label",
        "node",
        NODE_NAME,
        "node-role.kubernetes.io/control-plane=",
    ]);
    let mut operator = start_operator(bed, &images.path().join("bin/kubebao-operator"));
    // (killed and restarted below)

    // The host paths the installation writes (the manifest dir is the kubelet's own).
    let host = tempfile::Builder::new()
        .prefix("kb-node-host-")
        .tempdir_in("/tmp")
        .expect("host dir");
    let config = host.path().join("etc-kubebao");
    let socket = host.path().join("run/kms.sock");
    let manifest = node.static_pod_dir().join("kubebao-kms.yaml");
    let bao = bed.openbao();
    // One address for the KMS static pod (host network) and the CSI provider's pod (pod network).
    let bao_for_pods = node.expose_to_pods(
        8200,
        bao.tls_addr()
            .trim_start_matches("https://")
            .parse()
            .expect("OpenBao's address"),
    );
    let health_port = free_port();
    let started = Instant::now();
    let cr = json!({
        "apiVersion": "kubebao.io/v1alpha1",
        "kind": "KubeBaoInstallation",
        "metadata": {"name": "kubebao"},
        "spec": {
            "namespace": NS,
            "openbao": {
                "address": format!("https://{bao_for_pods}"),
                "caBundle": String::from_utf8(bao.ca_pem().to_vec()).expect("PEM"),
            },
            "kms": {
                "image": image, "imagePullPolicy": "Never",
                "manifestDir": node.static_pod_dir(), "configDir": config, "socketPath": socket,
                "healthPort": health_port, "rewriteAfterRotation": true, "rewritePerSecond": 4,
                "apiServerReloadSeconds": 70, "secretIdTtlSeconds": 3600,
            },
            "csi": {
                "image": image, "imagePullPolicy": "Never",
                "providerDir": host.path().join("providers"),
            },
        }
    });
    let api = installations(client.clone());
    api.create(
        &PostParams::default(),
        &serde_json::from_value(cr).expect("installation"),
    )
    .await
    .expect("create the KubeBaoInstallation");

    // ── The installer pod writes the static pod; the kubelet runs the plugin ──
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let installer = ready_daemon_pod(&pods, "installer").await;
    let installer_image = &installer.spec.as_ref().expect("spec").containers[0].image;
    assert_eq!(installer_image.as_deref(), Some(image.as_str()));
    let mode = |p: &Path| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777);
    assert_eq!(mode(&manifest).ok(), Some(0o600), "{}", manifest.display());
    let system_pods = pods.clone();
    let mirror_name = format!("kubebao-kms-{NODE_NAME}");
    let mirror = ready_mirror_pod(&system_pods, &mirror_name, health_port).await;
    eprintln!(
        "FIGURE node: KubeBaoInstallation applied → KMS static pod ready in {:.1?}",
        started.elapsed()
    );
    assert!(
        mirror
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key("kubernetes.io/config.mirror"),
        "the plugin runs as a static pod (its API object is a mirror)"
    );
    assert_eq!(
        mode(&socket).ok(),
        Some(0o600),
        "the plugin's socket is 0600"
    );
    ready_daemon_pod(&pods, "csi").await;

    // ── kube-apiserver, pointed once at the installed EncryptionConfiguration ──
    let test_ns = bed.namespace("node-kms").await;
    let secrets = Api::<Secret>::namespaced(client.clone(), &test_ns);
    put_secret(&secrets, "before", "plain-before-value").await;
    bed.restart_apiserver(Some(&config.join("encryption-config.yaml")))
        .await;
    let client = bed.client().await;
    let secrets = Api::<Secret>::namespaced(client.clone(), &test_ns);
    put_secret(&secrets, "after", "plain-after-value").await;
    eprintln!(
        "FIGURE node: KubeBaoInstallation applied → first Secret stored encrypted in {:.1?} (API server restart included)",
        started.elapsed()
    );
    let raw = bed
        .etcd()
        .get(&format!("/registry/secrets/{test_ns}/after"))
        .await
        .expect("in etcd");
    assert!(
        raw.starts_with(KMS_PREFIX),
        "stored through the static pod's socket"
    );
    assert!(
        !contains(&raw, b"plain-after-value"),
        "no plaintext in etcd"
    );

    // ── Rotation rewrites every Secret under the new key_id, with the operator killed
    // (SIGKILL) right after it recorded the rotation request, and again mid-rewrite ──
    for i in 0..40 {
        put_secret(&secrets, &format!("s-{i:02}"), "plain-value").await;
    }
    let api = installations(client.clone());
    let key_id_v1 = status(&api).await.expect("status")["keyId"]
        .as_str()
        .expect("keyId")
        .to_string();
    api.patch(
        "kubebao",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"kubebao.io/rotate": "node-1"}}})),
    )
    .await
    .expect("ask for a rotation");
    wait_for("the rotation request to be recorded", WAIT, || {
        operator.assert_running();
        let api = api.clone();
        async move {
            let st = status(&api).await?;
            if st["rotateAttempt"]["request"] == "node-1" {
                Ok(())
            } else {
                Err(st["rotateAttempt"].to_string())
            }
        }
    })
    .await;
    operator.kill();
    let mut operator = start_operator(bed, &images.path().join("bin/kubebao-operator"));
    wait_for(
        "the rewrite to be under way",
        Duration::from_secs(300),
        || {
            operator.assert_running();
            let api = api.clone();
            async move {
                let r = status(&api).await?["rewrite"].clone();
                if r["done"].as_u64().unwrap_or(0) > 0 && r["complete"] != true {
                    Ok(())
                } else {
                    Err(r.to_string())
                }
            }
        },
    )
    .await;
    operator.kill();
    let mut operator = start_operator(bed, &images.path().join("bin/kubebao-operator"));
    let key_id_v2 = wait_for(
        "the rewrite after the rotation",
        Duration::from_secs(300),
        || {
            operator.assert_running();
            let api = api.clone();
            async move {
                let st = status(&api).await?;
                let r = &st["rewrite"];
                let key_id = st["keyId"].as_str().unwrap_or_default().to_string();
                if st["keyVersion"] == 2 && r["complete"] == true && r["keyId"] == key_id.as_str() {
                    Ok(key_id)
                } else {
                    Err(r.to_string())
                }
            }
        },
    )
    .await;
    assert_ne!(key_id_v1, key_id_v2);
    let key = bao
        .client()
        .transit_key(bao.root_token(), "transit", "kubebao-kms")
        .await
        .expect("the Transit key");
    assert_eq!(
        key.latest_version, 2,
        "one request, one rotation, kills included"
    );
    let rewrite = status(&api).await.expect("status")["rewrite"].clone();
    assert_eq!(rewrite["failed"], 0, "{rewrite}");
    let stored = bed
        .etcd()
        .range(&format!("/registry/secrets/{test_ns}/"))
        .await;
    assert!(stored.len() >= 42, "{} Secrets", stored.len());
    for (key, raw) in &stored {
        assert!(
            raw.starts_with(KMS_PREFIX) && contains(raw, key_id_v2.as_bytes()),
            "{key} is stored under the new key_id"
        );
    }

    // ── A spec change rolls the static pod ──
    let new_port = free_port();
    let old_uid = system_pods
        .get(&mirror_name)
        .await
        .expect("mirror pod")
        .metadata
        .uid;
    let rolled = Instant::now();
    api.patch(
        "kubebao",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"kms": {"healthPort": new_port}}})),
    )
    .await
    .expect("change the spec");
    let mirror = ready_mirror_pod(&system_pods, &mirror_name, new_port).await;
    assert_ne!(mirror.metadata.uid, old_uid, "a new static pod");
    eprintln!(
        "FIGURE node: spec change → new KMS static pod ready in {:.1?}",
        rolled.elapsed()
    );
    put_secret(&secrets, "rolled", "plain-rolled-value").await;
    let raw = bed
        .etcd()
        .get(&format!("/registry/secrets/{test_ns}/rolled"))
        .await
        .expect("in etcd");
    assert!(raw.starts_with(KMS_PREFIX), "the new pod serves the socket");

    // ── Deletion: refused while the API server reads through the plugin, then the declared
    // migration off KMS, then the static pod goes ──
    api.delete("kubebao", &Default::default())
        .await
        .expect("delete");
    wait_for("Stalled KMSInUse", WAIT, || {
        let api = api.clone();
        async move {
            let o = api.get("kubebao").await.map_err(|e| e.to_string())?;
            match condition(&o, "Stalled") {
                Some((s, r, _)) if s == "True" && r == "KMSInUse" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    assert!(manifest.exists(), "the plugin stays while KMS is in use");
    api.patch(
        "kubebao",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"kms": {"migrateOff": true}}})),
    )
    .await
    .expect("migrate off KMS");
    wait_for(
        "the KubeBaoInstallation to be gone after migrating off KMS",
        Duration::from_secs(420),
        || {
            operator.assert_running();
            let api = api.clone();
            async move {
                match api.get_opt("kubebao").await.map_err(|e| e.to_string())? {
                    None => Ok(()),
                    Some(o) => Err(o.data["status"]["conditions"].to_string()),
                }
            }
        },
    )
    .await;
    assert!(!manifest.exists(), "the static pod manifest is removed");
    wait_for("the kubelet to remove the static pod", WAIT, || {
        let pods = system_pods.clone();
        let name = mirror_name.clone();
        async move {
            match pods.get_opt(&name).await.map_err(|e| e.to_string())? {
                None => Ok(()),
                Some(p) => Err(format!("{:?}", p.status.and_then(|s| s.phase))),
            }
        }
    })
    .await;
    for name in ["before", "after", "rolled"] {
        let s = secrets
            .get(name)
            .await
            .expect("every Secret reads without the plugin");
        assert!(s.data.is_some_and(|d| d.contains_key("value")));
        let raw = bed
            .etcd()
            .get(&format!("/registry/secrets/{test_ns}/{name}"))
            .await
            .expect("in etcd");
        assert!(!raw.starts_with(KMS_PREFIX), "{name} migrated off KMS");
    }
    operator.stop();
    let after = node.stop();
    let differences = after.differences(&before);
    assert!(
        differences.is_empty(),
        "the host changed after the node stopped:\n{}",
        differences.join("\n")
    );
}
