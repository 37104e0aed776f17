//! KubeBao's CSI provider through the real kubelet: the provider runs as the operator's
//! DaemonSet from KubeBao's own image, the real Secrets Store CSI driver calls it, and pods
//! mount the original plan's SecretProviderClass as written. Proven: the pod runs and its file
//! holds the secret; a change in OpenBao reaches the running pod's file (driver rotation) and
//! the Secret synced by `secretObjects`; a pod whose ServiceAccount the role does not bind does
//! not start, and its events carry KubeBao's message. Needs root (the node does).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, Pod, Secret};
use kube::api::{Api, ListParams, PostParams};
use kubebao_testbed::node_image::{
    CsiDriver, CsiDriverOptions, chart_csi_driver_object, kubebao_image_on, pod_volume_dir,
};
use kubebao_testbed::{Node, NodeOptions, Testbed, free_port, wait_for};
use reqwest::Method;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(120);
/// The kubelet republishes a CSI volume on each pod resync (`syncFrequency`, 1 min by default,
/// plus up to 50 % jitter): a rotation shows within about 90 s.
const ROTATION_WAIT: Duration = Duration::from_secs(240);
/// The driver's rotation poll: short, so a change shows within the kubelet's republish period.
const ROTATION_POLL: Duration = Duration::from_secs(2);
const POLICY: &str = r#"path "secret/data/myapp/*" { capabilities = ["read"] }"#;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

/// The YAML documents of a file in the repository, as JSON.
fn documents(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(repo().join(path)).expect(path);
    text.split("\n---\n")
        .map(|doc| serde_saphyr::from_str::<Value>(doc).expect("YAML document"))
        .filter(|v| !v.is_null())
        .collect()
}

/// OpenBao as the installation prepares it for the original plan's SecretProviderClass: KV v2
/// at `secret/`, role `my-app` bound to ServiceAccount `my-app` in `default`, audience `openbao`.
async fn prepare_openbao(bed: &Testbed) {
    bed.enable_kubernetes_auth().await;
    let bao = bed.openbao();
    bao.enable_engine("secret", "kv", Some(2)).await;
    bao.root(
        Method::PUT,
        "sys/policies/acl/my-app",
        Some(json!({ "policy": POLICY })),
    )
    .await;
    bao.root(
        Method::POST,
        "auth/kubernetes/role/my-app",
        Some(json!({
            "bound_service_account_names": ["my-app"],
            "bound_service_account_namespaces": ["default"],
            "audience": "openbao",
            "token_policies": ["my-app"],
            "token_ttl": "1h",
        })),
    )
    .await;
    set_password(bed, "first-pw").await;
}

async fn set_password(bed: &Testbed, password: &str) {
    bed.openbao()
        .root(
            Method::POST,
            "secret/data/myapp/db",
            Some(json!({"data": {"password": password, "user": "app"}})),
        )
        .await;
}

/// The CSI provider's objects exactly as the operator renders them (its snapshot, checked by
/// `csi_objects_match_the_snapshot`), changed only where this node needs it: the provider
/// directory the driver uses, OpenBao's loopback address (plain HTTP, allowed, so no CA), a free health
/// port, the image imported into containerd, and `hostNetwork` (pods here have no route to
/// 127.0.0.1, where OpenBao listens).
fn provider_objects(bed: &Testbed, image: &str, provider_dir: &Path, port: u16) -> Vec<Value> {
    let dir = provider_dir.display().to_string();
    let mut docs = documents("operator/src/installation/render/snapshots/csi.yaml");
    let ds = docs
        .iter_mut()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("the snapshot has the DaemonSet");
    let spec = &mut ds["spec"]["template"]["spec"];
    spec["hostNetwork"] = json!(true);
    for volume in spec["volumes"].as_array_mut().expect("volumes") {
        if volume["name"] == "providers" {
            volume["hostPath"]["path"] = json!(dir);
        }
    }
    let c = &mut spec["containers"][0];
    c["image"] = json!(image);
    c["imagePullPolicy"] = json!("Never");
    let mut args: Vec<Value> = c["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(|a| {
            let a = a.as_str().expect("arg");
            let (flag, _) = a.split_once('=').unwrap_or((a, ""));
            match flag {
                "--provider-dir" => Some(format!("{flag}={dir}")),
                "--openbao-addr" => Some(format!("{flag}={}", bed.openbao().addr())),
                "--listen" => Some(format!("{flag}=0.0.0.0:{port}")),
                "--openbao-ca-cert" => None,
                _ => Some(a.to_string()),
            }
        })
        .map(Value::from)
        .collect();
    // The bed's OpenBao address is plain http on loopback.
    args.push(Value::from("--openbao-allow-plain-http"));
    c["args"] = json!(args);
    c["ports"][0]["containerPort"] = json!(port);
    c["livenessProbe"]["httpGet"]["port"] = json!(port);
    c["readinessProbe"]["httpGet"]["port"] = json!(port);
    for mount in c["volumeMounts"].as_array_mut().expect("volumeMounts") {
        if mount["name"] == "providers" {
            mount["mountPath"] = json!(dir);
        }
    }
    docs
}

/// The object-version key Secret the operator generates once per installation.
fn version_key_secret() -> Value {
    let key: Vec<u8> = (0..32u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "kubebao-csi-object-version-key", "namespace": "kube-system"},
        "type": "Opaque",
        "data": {"key": base64_encode(&key)},
    })
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Waits until the provider's DaemonSet pod is Ready and its socket is in place.
async fn wait_provider_ready(bed: &Testbed, provider_dir: &Path, csi: &mut CsiDriver) {
    let pods: Api<Pod> = Api::namespaced(bed.client().await, "kube-system");
    let socket = provider_dir.join("kubebao.sock");
    wait_for(
        "the kubebao-csi DaemonSet pod to be Ready with its socket",
        WAIT,
        || {
            csi.assert_running();
            let (pods, socket) = (pods.clone(), socket.clone());
            async move {
                let list = pods
                    .list(&ListParams::default().labels("app.kubernetes.io/name=kubebao-csi"))
                    .await
                    .map_err(|e| e.to_string())?;
                let pod = list.items.first().ok_or("no provider pod yet")?;
                let ready = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                if !ready {
                    return Err(format!("provider pod not Ready: {:?}", pod.status));
                }
                if !socket.exists() {
                    return Err(format!("no socket at {}", socket.display()));
                }
                Ok(())
            }
        },
    )
    .await;
}

/// The example's pod, runnable here: the pause image (imported into containerd), a short
/// grace period; `name`, `service_account` and the SecretProviderClass as given.
fn app_pod(example_pod: &Value, image: &str, name: &str, sa: &str, spc: &str) -> Pod {
    let mut pod = example_pod.clone();
    pod["metadata"]["name"] = json!(name);
    let spec = &mut pod["spec"];
    spec["serviceAccountName"] = json!(sa);
    spec["terminationGracePeriodSeconds"] = json!(1);
    spec["containers"][0]["image"] = json!(image);
    spec["containers"][0]["imagePullPolicy"] = json!("Never");
    spec["volumes"][0]["csi"]["volumeAttributes"]["secretProviderClass"] = json!(spc);
    serde_json::from_value(pod).expect("pod")
}

/// The mounted file's content as the container sees it, read on the host from the volume the
/// driver mounted for the pod (`<kubelet root>/pods/<uid>/volumes/kubernetes.io~csi/…`).
fn mounted_file(node: &Node, pod: &Pod, file: &str) -> Result<String, String> {
    let path = mounted_path(node, pod, file);
    std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))
}

fn mounted_path(node: &Node, pod: &Pod, file: &str) -> PathBuf {
    let uid = pod.metadata.uid.as_deref().expect("pod uid");
    pod_volume_dir(node, uid, "kubernetes.io~csi", "secrets")
        .join("mount")
        .join(file)
}

/// Polls every 10 ms (the figures are measured with it) until `file` of `pod` holds `expected`.
async fn wait_file(
    node: &Node,
    pod: &Pod,
    file: &str,
    expected: &str,
    timeout: Duration,
    csi: &mut CsiDriver,
) {
    let mut last = String::new();
    let start = Instant::now();
    while start.elapsed() < timeout {
        csi.assert_running();
        match mounted_file(node, pod, file) {
            Ok(content) if content == expected => return,
            Ok(_) => last = format!("{file} holds an older value"),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out after {timeout:?} waiting for {file} to hold {expected:?}: {last}");
}

async fn wait_running(pods: &Api<Pod>, name: &str) -> Pod {
    wait_for(&format!("pod {name} to run"), WAIT, || async {
        let pod = pods.get(name).await.map_err(|e| e.to_string())?;
        let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
        if phase.as_deref() == Some("Running") {
            Ok(pod)
        } else {
            Err(format!("phase {phase:?}: {:?}", pod.status))
        }
    })
    .await
}

/// Waits until the driver's synced Secret `db-secret` holds `password`.
async fn wait_synced(secrets: &Api<Secret>, password: &str, timeout: Duration) {
    wait_for(
        &format!("the driver to sync Secret db-secret with {password:?}"),
        timeout,
        || async {
            match synced_password(secrets, "db-secret").await? {
                p if p == password => Ok(()),
                _ => Err("db-secret holds another value".to_string()),
            }
        },
    )
    .await;
}

async fn synced_password(secrets: &Api<Secret>, name: &str) -> Result<String, String> {
    let secret = secrets.get(name).await.map_err(|e| e.to_string())?;
    let value = secret
        .data
        .unwrap_or_default()
        .remove("password")
        .ok_or("no key password")?;
    Ok(String::from_utf8_lossy(&value.0).into_owned())
}

/// On a failing test, what the components in pods said (the host processes' logs are printed
/// by their own guards).
struct PrintPodLogs<'a>(&'a Testbed);

impl Drop for PrintPodLogs<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for args in [
            &[
                "logs",
                "-n",
                "kube-system",
                "daemonset/kubebao-csi",
                "--tail=40",
            ][..],
            &["get", "events", "-A", "--sort-by=.lastTimestamp"],
            &["get", "pods", "-A", "-o", "wide"],
        ] {
            let out = self.0.try_kubectl(args, "").unwrap_or_else(|e| e);
            eprintln!("\n$ kubectl {}\n{out}", args.join(" "));
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_csi_provider_serves_the_real_driver_through_the_kubelet() {
    let bed = Testbed::shared().await;
    let node = Node::start_with(bed, NodeOptions::default()).await;
    let before = node.host_before().clone();
    let _logs = PrintPodLogs(bed);
    let dir = tempfile::tempdir().expect("temp dir");
    let image = kubebao_image_on(&node, dir.path());
    let provider_dir = node.dir().join("providers");
    let mut csi = CsiDriver::start(
        bed,
        &node,
        CsiDriverOptions {
            provider_dir: provider_dir.clone(),
            rotation_poll_interval: Some(ROTATION_POLL),
            csi_driver_object: Some(chart_csi_driver_object(bed)),
        },
    )
    .await;
    prepare_openbao(bed).await;

    // The provider, as the operator's DaemonSet, from KubeBao's image.
    bed.apply(&version_key_secret().to_string());
    for doc in provider_objects(bed, &image, &provider_dir, free_port()) {
        bed.apply(&doc.to_string());
    }
    let started = Instant::now();
    wait_provider_ready(bed, &provider_dir, &mut csi).await;
    eprintln!(
        "measured: provider DaemonSet pod Ready in {} ms",
        started.elapsed().as_millis()
    );

    // The original plan's SecretProviderClass and pod, as written (examples/), in `default`.
    let example = documents("examples/secretproviderclass.yaml");
    let by_kind = |kind: &str| {
        example
            .iter()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("examples/secretproviderclass.yaml has a {kind}"))
            .clone()
    };
    let spc = by_kind("SecretProviderClass");
    bed.apply(&spc.to_string());
    bed.apply(&by_kind("ServiceAccount").to_string());
    let example_pod = by_kind("Pod");
    let client = bed.client().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pause = node.pause_image().to_string();
    let pod = app_pod(&example_pod, &pause, "my-app", "my-app", "kubebao-secrets");
    let started = Instant::now();
    let pod = pods
        .create(&PostParams::default(), &pod)
        .await
        .expect("create the app pod");
    wait_file(&node, &pod, "db-password", "first-pw", WAIT, &mut csi).await;
    let file_ms = started.elapsed().as_millis();
    let mode = std::fs::metadata(mounted_path(&node, &pod, "db-password"))
        .expect("the mounted file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644, "the driver's default file mode");
    wait_running(&pods, "my-app").await;
    eprintln!(
        "measured: pod creation -> secret file present {file_ms} ms, -> Running {} ms",
        started.elapsed().as_millis()
    );

    // secretObjects: the driver syncs the mounted object into a Kubernetes Secret.
    let mut synced = spc.clone();
    synced["metadata"]["name"] = json!("kubebao-secrets-synced");
    synced["spec"]["secretObjects"] = json!([{
        "secretName": "db-secret", "type": "Opaque",
        "data": [{"objectName": "db-password", "key": "password"}],
    }]);
    bed.apply(&synced.to_string());
    let sync_pod = app_pod(
        &example_pod,
        &pause,
        "my-app-synced",
        "my-app",
        "kubebao-secrets-synced",
    );
    let sync_pod = pods
        .create(&PostParams::default(), &sync_pod)
        .await
        .expect("create the syncing pod");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    wait_synced(&secrets, "first-pw", WAIT).await;
    wait_running(&pods, "my-app-synced").await;

    // A ServiceAccount the role does not bind (checked below, while rotation runs).
    bed.service_account("default", "intruder").await;
    let intruder = app_pod(
        &example_pod,
        &pause,
        "intruder",
        "intruder",
        "kubebao-secrets",
    );
    pods.create(&PostParams::default(), &intruder)
        .await
        .expect("create the intruder pod");

    // Rotation: on the kubelet's republish (every pod resync) the driver asks the provider
    // again and rewrites changed files and synced Secrets in running pods.
    let started = Instant::now();
    set_password(bed, "second-pw").await;
    wait_file(
        &node,
        &pod,
        "db-password",
        "second-pw",
        ROTATION_WAIT,
        &mut csi,
    )
    .await;
    eprintln!(
        "measured: OpenBao change -> running pod's file updated {} ms",
        started.elapsed().as_millis()
    );
    wait_file(
        &node,
        &sync_pod,
        "db-password",
        "second-pw",
        ROTATION_WAIT,
        &mut csi,
    )
    .await;
    wait_synced(&secrets, "second-pw", ROTATION_WAIT).await;
    eprintln!(
        "measured: OpenBao change -> both pods' files and the synced Secret updated {} ms",
        started.elapsed().as_millis()
    );

    // The intruder's pod does not start, and the kubelet's FailedMount event carries KubeBao's
    // message naming role, namespace and ServiceAccount.
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let message = wait_for("a FailedMount event for pod intruder", WAIT, || async {
        let list = events
            .list(&ListParams::default().fields("involvedObject.name=intruder"))
            .await
            .map_err(|e| e.to_string())?;
        list.items
            .iter()
            .find(|e| e.reason.as_deref() == Some("FailedMount"))
            .and_then(|e| e.message.clone())
            .ok_or(format!(
                "events: {:?}",
                list.items.iter().map(|e| &e.reason).collect::<Vec<_>>()
            ))
    })
    .await;
    eprintln!("the intruder's event: {message}");
    for expected in ["[login_refused]", "role \"my-app\" as default/intruder"] {
        assert!(
            message.contains(expected),
            "FailedMount says {expected}: {message}"
        );
    }
    for secret in ["first-pw", "second-pw", "third-pw"] {
        assert!(!message.contains(secret), "a secret leaked into the event");
    }
    let intruder = pods.get("intruder").await.expect("intruder pod");
    let status = intruder.status.expect("status");
    assert_eq!(status.phase.as_deref(), Some("Pending"), "{status:?}");
    let running = status
        .container_statuses
        .iter()
        .flatten()
        .any(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()));
    assert!(!running, "the intruder's container must not start");

    drop(csi);
    let after = node.stop();
    let differences = after.differences(&before);
    assert!(
        differences.is_empty(),
        "the host changed after the node stopped:\n{}",
        differences.join("\n")
    );
}
