//! `make demo`: KubeBao end to end on a local test bed and a real node, told in plain words.
//!
//! Brings up etcd, kube-apiserver, kube-controller-manager and OpenBao, then a node (containerd,
//! the kubelet, kube-scheduler and the real Secrets Store CSI driver) with KubeBao's own image
//! built from `KUBEBAO_BIN_DIR` (the Makefile builds the binaries into target/debug). It runs the
//! operator, applies `examples/` (KubeBaoInstallation, BaoPolicy, BaoSecret, SecretProviderClass
//! and its pod) and lets Kubernetes do the rest: the installer DaemonSet's pod writes the KMS
//! static pod, the kubelet runs it, the API server encrypts through it, the CSI provider's pod
//! serves the driver, and the application pod reads its secret file. Stays up until Ctrl-C, then
//! stops everything and restores the host. Needs root (the kubelet does).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, PostParams};
use kubebao_testbed::node_image::{
    CsiDriver, CsiDriverOptions, chart_csi_driver_object, import_image, pod_volume_dir,
    write_kubebao_image,
};
use kubebao_testbed::{Component, NODE_NAME, Node, OpenBaoServer, Testbed, free_port, wait_for};
use reqwest::Method;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(120);
/// The operator's namespace, where the installation's DaemonSets and the static pod run.
const NS: &str = "kubebao-system";
/// Where pods reach OpenBao's TLS listener (the node forwards it; its certificate names it).
const OPENBAO_PORT_FOR_PODS: u16 = 8200;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

fn step(text: &str) {
    println!("\n▶ {text}");
}

fn said(text: &str) {
    println!("  ✓ {text}");
}

/// The YAML documents of an example file, as JSON.
fn example(name: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(repo().join("examples").join(name)).expect("read example");
    text.split("\n---\n")
        .map(|doc| serde_saphyr::from_str::<Value>(doc).expect("example is YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn api_for(client: &kube::Client, obj: &Value) -> Api<DynamicObject> {
    let (group, version) = match obj["apiVersion"]
        .as_str()
        .expect("apiVersion")
        .split_once('/')
    {
        Some((g, v)) => (g.to_string(), v.to_string()),
        None => (
            String::new(),
            obj["apiVersion"].as_str().unwrap_or_default().to_string(),
        ),
    };
    let kind = obj["kind"].as_str().expect("kind");
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(&group, &version, kind));
    match obj["metadata"]["namespace"].as_str() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    }
}

async fn apply(client: &kube::Client, obj: Value) -> DynamicObject {
    let api = api_for(client, &obj);
    let obj: DynamicObject = serde_json::from_value(obj).expect("object");
    api.create(&PostParams::default(), &obj)
        .await
        .unwrap_or_else(|e| panic!("create {:?}: {e}", obj.metadata.name))
}

fn condition(obj: &DynamicObject, type_: &str) -> Option<(String, String)> {
    obj.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_string(),
                c["message"].as_str().unwrap_or_default().to_string(),
            )
        })
}

async fn wait_condition(
    client: &kube::Client,
    obj: &Value,
    type_: &str,
    operator: &mut Component,
) -> DynamicObject {
    let api = api_for(client, obj);
    let name = obj["metadata"]["name"].as_str().expect("name").to_string();
    wait_for(
        &format!("{} {name} to be {type_}", obj["kind"]),
        WAIT,
        || {
            operator.assert_running();
            let (api, name) = (api.clone(), name.clone());
            async move {
                let o = api.get(&name).await.map_err(|e| e.to_string())?;
                match condition(&o, type_) {
                    Some((s, _)) if s == "True" => Ok(o),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await
}

/// The directory with KubeBao's four binaries (`KUBEBAO_BIN_DIR`), checked up front.
fn bin_dir() -> PathBuf {
    let dir = std::env::var_os("KUBEBAO_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/debug"));
    for name in [
        "kubebao-operator",
        "kubebao-kms",
        "kubebao-csi",
        "kubebao-installer",
    ] {
        assert!(
            dir.join(name).is_file(),
            "{} is missing: run `make demo` (it builds the binaries first)",
            dir.join(name).display()
        );
    }
    dir
}

fn assert_root() {
    let uid = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Uid:")
                .map(|v| v.split_whitespace().next().map(str::to_string))
        })
        .flatten();
    assert!(
        uid.as_deref() == Some("0"),
        "make demo runs a real kubelet and containerd, which need root: run it as root (sudo make demo)"
    );
}

#[tokio::main]
async fn main() {
    kubebao_openbao::install_crypto_provider();
    assert_root();
    let bins = bin_dir();
    let bed = start_test_bed().await;
    let mut node = start_node(&bed, &bins).await;
    write_app_secrets(bed.openbao()).await;
    let (mut operator, token_file) = start_operator(&bed, &bins.join("kubebao-operator"));
    let host = tempfile::Builder::new()
        .prefix("kubebao-demo-host-")
        .tempdir_in("/tmp")
        .expect("host dir");
    let key_id = apply_installation(&bed, &mut node, &mut operator, host.path()).await;
    let client = encrypt_with_kms(&bed, host.path()).await;
    show_baosecret_sync(&client, &mut operator).await;
    show_etcd_proof(&bed, &key_id).await;
    show_csi_mount(&bed, &node).await;
    print_summary(&bed, &token_file);
    wait_and_clean_up(bed, node, operator).await;
}

/// etcd, kube-apiserver, kube-controller-manager and OpenBao, with Kubernetes auth.
async fn start_test_bed() -> Testbed {
    step(
        "Starting the test bed: etcd, kube-apiserver, kube-controller-manager and OpenBao on loopback",
    );
    let bed = Testbed::start(Default::default()).await;
    bed.enable_kubernetes_auth().await;
    std::fs::write(bed.dir().join("openbao-ca.pem"), bed.openbao().ca_pem()).expect("write CA");
    said(&format!(
        "Kubernetes {} and OpenBao {} are up; Kubernetes auth is enabled in OpenBao",
        bed.apiserver_url(),
        bed.openbao().tls_addr()
    ));
    bed
}

/// The node, KubeBao's image in its containerd, and the real CSI driver with the chart's
/// CSIDriver object (pod tokens for OpenBao, rotation on).
async fn start_node(bed: &Testbed, bins: &Path) -> (Node, CsiDriver) {
    step("Starting a node: containerd, kubelet, kube-scheduler and the Secrets Store CSI driver");
    let started = Instant::now();
    let node = Node::start(bed).await;
    // The KMS plugin goes on control-plane nodes: this node is one.
    bed.kubectl(&[
        "label",
        "node",
        NODE_NAME,
        "node-role.kubernetes.io/control-plane=",
    ]);
    let tarball = bed.dir().join("kubebao-image.tar");
    write_kubebao_image(bins, &tarball);
    import_image(&node, &tarball);
    let csi = CsiDriver::start(
        bed,
        &node,
        CsiDriverOptions {
            provider_dir: provider_dir(bed),
            rotation_poll_interval: Some(Duration::from_secs(10)),
            csi_driver_object: Some(chart_csi_driver_object(bed)),
        },
    )
    .await;
    said(&format!(
        "node {NODE_NAME} is Ready with KubeBao's image ({} MB) and the CSI driver, in {:.1?}",
        std::fs::metadata(&tarball)
            .map(|m| m.len() / 1_000_000)
            .unwrap_or(0),
        started.elapsed()
    ));
    (node, csi)
}

/// Where the CSI driver looks for KubeBao's provider socket (a host path the DaemonSet mounts).
fn provider_dir(bed: &Testbed) -> PathBuf {
    bed.dir().join("csi-providers")
}

/// The application's secrets the BaoSecret and the CSI mount read.
async fn write_app_secrets(bao: &OpenBaoServer) {
    step("Writing the application's secrets into OpenBao (KV v2 at secret/)");
    bao.enable_engine("secret", "kv", Some(2)).await;
    bao.root(
        Method::POST,
        "secret/data/myapp",
        Some(json!({"data": {"username": "app", "password": "demo-app-password"}})),
    )
    .await;
    bao.root(
        Method::POST,
        "secret/data/myapp/db",
        Some(json!({"data": {"password": "demo-db-password"}})),
    )
    .await;
    said("secret/myapp {username, password} and secret/myapp/db {password}");
}

/// Installs the CRDs and starts the operator; returns it and its OpenBao token file.
fn start_operator(bed: &Testbed, operator_bin: &Path) -> (Component, PathBuf) {
    step("Installing the CRDs and starting the operator");
    bed.install_crds();
    bed.try_kubectl(&["create", "namespace", NS], "")
        .expect("create the operator's namespace");
    let bao = bed.openbao();
    // For brevity the demo operator uses the root token; in a cluster it logs in as its own
    // ServiceAccount (docs/operations.md lists the policy it needs).
    let token_file = bed.dir().join("operator-token");
    std::fs::write(&token_file, bao.root_token().expose()).expect("token file");
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let kubeconfig = bed.kubeconfig().display().to_string();
    let operator = Component::start_with_env(
        "kubebao-operator",
        bed.dir(),
        operator_bin,
        &[
            format!("--openbao-addr={}", bao.addr()),
            // The demo's OpenBao listens on loopback only.
            "--openbao-allow-plain-http".into(),
            format!("--openbao-token-file={}", token_file.display()),
            format!("--namespace={NS}"),
            "--leader-elect=false".into(),
            format!("--metrics-addr=127.0.0.1:{}", free_port()),
        ],
        &[("KUBECONFIG", &kubeconfig)],
    );
    said(&format!(
        "kubebao-operator runs (log: {})",
        operator.log_path().display()
    ));
    (operator, token_file)
}

/// Applies the example KubeBaoInstallation, pointed at this test bed and the node's paths;
/// returns the Transit key_id once the KMS static pod and the CSI provider's pod are ready.
async fn apply_installation(
    bed: &Testbed,
    (node, _): &mut (Node, CsiDriver),
    operator: &mut Component,
    host: &Path,
) -> String {
    step("Applying examples/kubebaoinstallation.yaml (pointed at the local OpenBao and this node)");
    let client = bed.client().await;
    let bao = bed.openbao();
    let target = bao
        .tls_addr()
        .trim_start_matches("https://")
        .parse()
        .expect("address");
    let for_pods = node.expose_to_pods(OPENBAO_PORT_FOR_PODS, target);
    let mut kbi = example("kubebaoinstallation.yaml").remove(0);
    kbi["spec"]["namespace"] = json!(NS);
    kbi["spec"]["openbao"] = json!({
        "address": format!("https://{for_pods}"),
        "caBundle": String::from_utf8_lossy(bao.ca_pem()),
    });
    let kms = &mut kbi["spec"]["kms"];
    kms["image"] = json!(kubebao_testbed::node_image::KUBEBAO_IMAGE);
    kms["imagePullPolicy"] = json!("Never");
    kms["manifestDir"] = json!(node.static_pod_dir());
    kms["configDir"] = json!(host.join("etc-kubebao"));
    kms["socketPath"] = json!(host.join("run/kms.sock"));
    kms["healthPort"] = json!(free_port());
    let csi = &mut kbi["spec"]["csi"];
    csi["image"] = json!(kubebao_testbed::node_image::KUBEBAO_IMAGE);
    csi["imagePullPolicy"] = json!("Never");
    csi["providerDir"] = json!(provider_dir(bed));
    let started = Instant::now();
    apply(&client, kbi.clone()).await;
    let installed = wait_condition(&client, &kbi, "OpenBaoReady", operator).await;
    let key_id = installed.data["status"]["keyId"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    said(&format!(
        "OpenBao prepared: Transit key kubebao-kms (not exportable, not deletable), the plugin's policy and AppRole; key_id {key_id}"
    ));
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    ready_pod(&pods, "app.kubernetes.io/component=installer", operator).await;
    ready_pod(&pods, "app.kubernetes.io/component=kms", operator).await;
    said(&format!(
        "the installer pod wrote {} and the kubelet runs the KMS plugin as static pod kubebao-kms-{NODE_NAME} (ready in {:.1?})",
        node.static_pod_dir().join("kubebao-kms.yaml").display(),
        started.elapsed()
    ));
    ready_pod(&pods, "app.kubernetes.io/component=csi", operator).await;
    said("the CSI provider's DaemonSet pod serves kubebao.sock to the CSI driver");
    key_id
}

/// The first pod matching `selector` once it is Running and Ready.
async fn ready_pod(pods: &Api<Pod>, selector: &str, operator: &mut Component) -> Pod {
    wait_for(&format!("a ready pod {selector}"), WAIT, || {
        operator.assert_running();
        let pods = pods.clone();
        async move {
            let list = pods
                .list(&ListParams::default().labels(selector))
                .await
                .map_err(|e| e.to_string())?;
            let pod = list.items.into_iter().next().ok_or("no pod yet")?;
            let ready = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            if ready {
                Ok(pod)
            } else {
                Err(format!("{:?}", pod.status.and_then(|s| s.phase)))
            }
        }
    })
    .await
}

/// Restarts kube-apiserver with the EncryptionConfiguration the installer pod wrote; returns a
/// client to it.
async fn encrypt_with_kms(bed: &Testbed, host: &Path) -> kube::Client {
    step("Restarting kube-apiserver with the installed EncryptionConfiguration");
    bed.restart_apiserver(Some(&host.join("etc-kubebao/encryption-config.yaml")))
        .await;
    let client = bed.client().await;
    said(
        "the API server now encrypts Secrets with the kubebao KMS v2 provider, through the static pod's socket",
    );
    client
}

/// Applies the example BaoPolicy and BaoSecret and shows the Secret the operator synced.
async fn show_baosecret_sync(client: &kube::Client, operator: &mut Component) {
    step("Applying examples/baopolicy.yaml and examples/baosecret.yaml");
    for obj in example("baopolicy.yaml") {
        apply(client, obj.clone()).await;
        wait_condition(client, &obj, "Ready", operator).await;
    }
    said("policy my-app-policy and the Kubernetes-auth roles my-app and default are in OpenBao");
    for obj in example("baosecret.yaml") {
        apply(client, obj.clone()).await;
        wait_condition(client, &obj, "Ready", operator).await;
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    let synced = secrets.get("my-app-secret").await.expect("synced Secret");
    let data = synced.data.unwrap_or_default();
    let keys: Vec<&String> = data.keys().collect();
    let matches =
        data.get("password").map(|v| v.0.as_slice()) == Some(b"demo-app-password".as_slice());
    said(&format!(
        "BaoSecret my-app-secrets synced secret/myapp into Secret default/my-app-secret (keys {keys:?}; password equals OpenBao's: {matches}), read as ServiceAccount default/default"
    ));
}

/// Shows that etcd holds the synced Secret encrypted by the KMS plugin, not in plaintext.
async fn show_etcd_proof(bed: &Testbed, key_id: &str) {
    step("Reading the Secret's bytes straight from etcd");
    let raw = bed
        .etcd()
        .get("/registry/secrets/default/my-app-secret")
        .await
        .expect("in etcd");
    let prefix = String::from_utf8_lossy(&raw[..raw.len().min(23)]).to_string();
    let plaintext_in_etcd = raw.windows(17).any(|w| w == b"demo-app-password");
    let has_key_id =
        !key_id.is_empty() && raw.windows(key_id.len()).any(|w| w == key_id.as_bytes());
    said(&format!(
        "etcd value starts with {prefix:?}, {} bytes, plaintext present: {plaintext_in_etcd}, carries key_id {key_id}: {has_key_id}",
        raw.len()
    ));
}

/// The example pod (with the node's pause image instead of a registry image) mounts the example
/// SecretProviderClass through the real CSI driver and KubeBao's provider pod; shows its file.
async fn show_csi_mount(bed: &Testbed, (node, _): &(Node, CsiDriver)) {
    step("The pod of examples/secretproviderclass.yaml mounts its secret through the CSI driver");
    let client = bed.client().await;
    let docs = example("secretproviderclass.yaml");
    for doc in docs.iter().filter(|d| d["kind"] != "Pod") {
        bed.apply(&doc.to_string());
    }
    let mut pod = docs
        .into_iter()
        .find(|d| d["kind"] == "Pod")
        .expect("the example has a Pod");
    // The test bed's pause image: given a path, its process prints that file as it sees it from
    // inside the pod (then waits), so `kubectl logs my-app` shows what the application reads.
    let container = &mut pod["spec"]["containers"][0];
    container["image"] = json!(node.pause_image());
    container["imagePullPolicy"] = json!("Never");
    container["args"] = json!(["/mnt/secrets/db-password"]);
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let started = Instant::now();
    let pod = pods
        .create(
            &PostParams::default(),
            &serde_json::from_value(pod).expect("pod"),
        )
        .await
        .expect("create the example pod");
    let name = pod.metadata.name.clone().unwrap_or_default();
    let pod = wait_for("the example pod to run", WAIT, || {
        let (pods, name) = (pods.clone(), name.clone());
        async move {
            let pod = pods.get(&name).await.map_err(|e| e.to_string())?;
            match pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
                Some("Running") => Ok(pod),
                other => Err(format!("phase {other:?}")),
            }
        }
    })
    .await;
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    let file = pod_volume_dir(node, uid, "kubernetes.io~csi", "secrets")
        .join("mount")
        .join("db-password");
    let mode = std::fs::metadata(&file)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0);
    let seen = wait_for("the app's output (kubectl logs my-app)", WAIT, || {
        let (pods, name) = (pods.clone(), name.clone());
        async move {
            let logs = pods
                .logs(&name, &Default::default())
                .await
                .map_err(|e| e.to_string())?;
            if logs.is_empty() {
                Err("no output yet".to_string())
            } else {
                Ok(logs)
            }
        }
    })
    .await;
    said(&format!(
        "pod default/{name} runs {:.1?} after it was created; inside it the app read (kubectl logs {name}): {:?} (demo data; the file's mode is {mode:o})",
        started.elapsed(),
        seen.trim()
    ));
    said(
        "the provider logged in to OpenBao as the pod's own ServiceAccount default/my-app (role my-app)",
    );
}

/// What to try while the demo runs.
fn print_summary(bed: &Testbed, token_file: &Path) {
    let kubectl = bed.binaries().kubectl.display().to_string();
    println!(
        "\nKubeBao is running. Try:\
         \n  {kubectl} --kubeconfig {kc} get pods -A -o wide\
         \n  {kubectl} --kubeconfig {kc} get kubebaoinstallations,baopolicies,baosecrets -A\
         \n  {kubectl} --kubeconfig {kc} create secret generic hello -n default --from-literal=a=b\
         \n  (then etcd holds it encrypted: k8s:enc:kms:v2:kubebao:…)\
         \n  BAO_ADDR={addr} BAO_CACERT={ca} BAO_TOKEN=$(cat {tf}) {bao} read transit/keys/kubebao-kms\
         \n  logs: {dir}\
         \n\nPress Ctrl-C to stop, clean up and restore the host.",
        kc = bed.kubeconfig().display(),
        addr = bed.openbao().tls_addr(),
        ca = bed.dir().join("openbao-ca.pem").display(),
        tf = token_file.display(),
        bao = bed.binaries().bao.display(),
        dir = bed.dir().display(),
    );
}

/// Waits for Ctrl-C, then stops the operator, the node (restoring the host) and the test bed,
/// which removes its temporary directory.
async fn wait_and_clean_up(bed: Testbed, (node, csi): (Node, CsiDriver), operator: Component) {
    tokio::signal::ctrl_c().await.expect("wait for Ctrl-C");
    println!("\nStopping KubeBao, the node and the test bed…");
    drop(operator);
    drop(csi);
    let before = node.host_before().clone();
    let differences = node.stop().differences(&before);
    drop(bed);
    if differences.is_empty() {
        println!("Stopped; the host is restored and temporary files are removed.");
    } else {
        println!(
            "Stopped, but the host still differs:\n{}",
            differences.join("\n")
        );
    }
}
