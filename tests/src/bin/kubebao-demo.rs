//! `make demo`: KubeBao end to end on a local test bed, told in plain words.
//!
//! Brings up etcd, kube-apiserver, kube-controller-manager and OpenBao, installs the CRDs, runs
//! the operator, applies `examples/` (KubeBaoInstallation, BaoPolicy, BaoSecret,
//! SecretProviderClass), runs the node side locally as the end-to-end tests do (the installer,
//! the KMS plugin from the installed static pod, the API server with the installed
//! EncryptionConfiguration, the CSI provider mounting as the pod), then stays up until Ctrl-C.
//! The binaries come from `KUBEBAO_BIN_DIR` (the Makefile builds them into target/debug).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use kubebao_proto::csi::csi_driver_provider_client::CsiDriverProviderClient;
use kubebao_proto::csi::{MountRequest, MountResponse};
use kubebao_testbed::{Component, OpenBaoServer, Testbed, free_port, wait_for};
use reqwest::Method;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(90);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("KUBEBAO_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/debug"));
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `make demo` (it builds the binaries first)",
        path.display()
    );
    path
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

async fn http_ok(url: String) -> Result<String, String> {
    let resp = reqwest::get(&url).await.map_err(|e| e.to_string())?;
    let ok = resp.status().is_success();
    let body = resp.text().await.map_err(|e| e.to_string())?;
    if ok { Ok(body) } else { Err(body) }
}

/// KubeBao's binaries, from `KUBEBAO_BIN_DIR`.
struct KubeBaoBinaries {
    operator: PathBuf,
    installer: PathBuf,
    kms: PathBuf,
    csi: PathBuf,
}

impl KubeBaoBinaries {
    /// Finds every binary up front, so a missing one fails before the test bed starts.
    fn locate() -> Self {
        Self {
            operator: bin("kubebao-operator"),
            installer: bin("kubebao-installer"),
            kms: bin("kubebao-kms"),
            csi: bin("kubebao-csi"),
        }
    }
}

/// Where the KubeBaoInstallation puts the node's files (under a temporary host root).
struct NodeFiles {
    manifests: PathBuf,
    config: PathBuf,
    socket: PathBuf,
    kms_port: u16,
}

#[tokio::main]
async fn main() {
    kubebao_openbao::install_crypto_provider();
    let bins = KubeBaoBinaries::locate();
    let bed = start_test_bed().await;
    write_app_secrets(bed.openbao()).await;
    let (mut operator, token_file) = start_operator(&bed, &bins.operator);
    let (node, key_id) = apply_installation(&bed, &mut operator).await;
    let installer = run_installer(&bed, &bins.installer, &node).await;
    let plugin = start_kms_plugin(&bed, &bins.kms, &node).await;
    let client = encrypt_with_kms(&bed, &node).await;
    show_baosecret_sync(&client, &mut operator).await;
    show_etcd_proof(&bed, &key_id).await;
    let csi = show_csi_mount(&bed, &client, &bins.csi).await;
    print_summary(&bed, &token_file);
    // Stopped in this order: the CSI provider first, the operator last, then the test bed.
    wait_and_clean_up(bed, [csi, plugin, installer, operator]).await;
}

/// etcd, kube-apiserver, kube-controller-manager and OpenBao, with Kubernetes auth and two nodes.
async fn start_test_bed() -> Testbed {
    step(
        "Starting the test bed: etcd, kube-apiserver, kube-controller-manager and OpenBao on loopback",
    );
    let bed = Testbed::start(Default::default()).await;
    bed.enable_kubernetes_auth().await;
    bed.register_node("control-plane-1", &[], true).await;
    bed.register_node("worker-1", &[], false).await;
    said(&format!(
        "Kubernetes {} and OpenBao {} are up; Kubernetes auth is enabled in OpenBao",
        bed.apiserver_url(),
        bed.openbao().addr()
    ));
    bed
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
            format!("--openbao-token-file={}", token_file.display()),
            "--namespace=kube-system".into(),
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

/// Applies the example KubeBaoInstallation, pointed at this test bed; returns where it puts the
/// node's files and the Transit key_id the operator prepared.
async fn apply_installation(bed: &Testbed, operator: &mut Component) -> (NodeFiles, String) {
    step(
        "Applying examples/kubebaoinstallation.yaml (pointed at the local OpenBao and a temporary host root)",
    );
    let (client, bao) = (bed.client().await, bed.openbao());
    let host = bed.dir().join("host");
    let node = NodeFiles {
        manifests: host.join("etc/kubernetes/manifests"),
        config: host.join("etc/kubebao"),
        socket: host.join("run/kubebao/kms.sock"),
        kms_port: free_port(),
    };
    let mut kbi = example("kubebaoinstallation.yaml").remove(0);
    kbi["spec"]["openbao"] =
        json!({"address": bao.tls_addr(), "caBundle": String::from_utf8_lossy(bao.ca_pem())});
    kbi["spec"]["kms"]["manifestDir"] = json!(node.manifests);
    kbi["spec"]["kms"]["configDir"] = json!(node.config);
    kbi["spec"]["kms"]["socketPath"] = json!(node.socket);
    kbi["spec"]["kms"]["healthPort"] = json!(node.kms_port);
    kbi["spec"]["csi"]["providerDir"] = json!(host.join("providers"));
    apply(&client, kbi.clone()).await;
    let installed = wait_condition(&client, &kbi, "OpenBaoReady", operator).await;
    let key_id = installed.data["status"]["keyId"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    said(&format!(
        "OpenBao prepared: Transit key kubebao-kms (not exportable, not deletable), the plugin's policy and AppRole; key_id {key_id}"
    ));
    (node, key_id)
}

/// Runs the node installer on the bundle and credentials the operator rendered, as its
/// DaemonSet would mount them; returns it once ready.
async fn run_installer(bed: &Testbed, installer_bin: &Path, node: &NodeFiles) -> Component {
    step(
        "Node side: the installer writes the static pod, the EncryptionConfiguration and the credentials",
    );
    let (bundle_dir, secrets_dir) = (
        bed.dir().join("installer-bundle"),
        bed.dir().join("installer-secrets"),
    );
    std::fs::create_dir_all(&bundle_dir).expect("bundle dir");
    std::fs::create_dir_all(&secrets_dir).expect("secrets dir");
    wait_for(
        "the installer bundle and the plugin's AppRole Secret",
        WAIT,
        || async {
            bed.mount_config_map("kube-system", "kubebao-installer", &bundle_dir)
                .await?;
            bed.mount_secret("kube-system", "kubebao-kms-approle", &secrets_dir)
                .await
        },
    )
    .await;
    let installer_port = free_port();
    let mut installer = Component::start(
        "kubebao-installer",
        bed.dir(),
        installer_bin,
        &[
            "run".into(),
            format!("--bundle={}", bundle_dir.display()),
            format!("--secrets={}", secrets_dir.display()),
            "--host-root=/".into(),
            format!("--listen=127.0.0.1:{installer_port}"),
        ],
    );
    let ready = wait_for("the installer", WAIT, || {
        installer.assert_running();
        http_ok(format!("http://127.0.0.1:{installer_port}/readyz"))
    })
    .await;
    said(&format!(
        "installed ({}): {}",
        ready.trim(),
        node.manifests.join("kubebao-kms.yaml").display()
    ));
    installer
}

/// Starts the KMS plugin with the arguments of the installed static pod; returns it once ready.
async fn start_kms_plugin(bed: &Testbed, kms_bin: &Path, node: &NodeFiles) -> Component {
    step("Starting the KMS plugin exactly as the installed static pod says");
    let pod: Pod = serde_saphyr::from_str(
        &std::fs::read_to_string(node.manifests.join("kubebao-kms.yaml")).expect("manifest"),
    )
    .expect("pod");
    let args = pod.spec.expect("pod spec").containers[0]
        .args
        .clone()
        .unwrap_or_default();
    let mut plugin = Component::start("kubebao-kms", bed.dir(), kms_bin, &args);
    wait_for("the KMS plugin to be ready", WAIT, || {
        plugin.assert_running();
        http_ok(format!("http://127.0.0.1:{}/readyz", node.kms_port))
    })
    .await;
    said(&format!(
        "kubebao-kms serves {} (mode 0600), logged in with the installed AppRole",
        node.socket.display()
    ));
    plugin
}

/// Restarts kube-apiserver with the installed EncryptionConfiguration; returns a client to it.
async fn encrypt_with_kms(bed: &Testbed, node: &NodeFiles) -> kube::Client {
    step("Restarting kube-apiserver with the installed EncryptionConfiguration");
    bed.restart_apiserver(Some(&node.config.join("encryption-config.yaml")))
        .await;
    let client = bed.client().await;
    said("the API server now encrypts Secrets with the kubebao KMS v2 provider");
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

/// Mounts the example SecretProviderClass for the example pod through the CSI provider, as the
/// Secrets Store CSI driver would, and shows the pod's files; returns the running provider.
async fn show_csi_mount(bed: &Testbed, client: &kube::Client, csi_bin: &Path) -> Component {
    step("A pod mounts examples/secretproviderclass.yaml through the CSI provider");
    let (mut csi, socket) = start_csi_provider(bed, csi_bin).await;
    let docs = example("secretproviderclass.yaml");
    let spc = docs
        .iter()
        .find(|d| d["kind"] == "SecretProviderClass")
        .expect("SecretProviderClass");
    let pod_obj = docs
        .iter()
        .find(|d| d["kind"] == "Pod")
        .expect("Pod")
        .clone();
    bed.service_account("default", "my-app").await;
    let pod: Pod = serde_json::from_value(pod_obj).expect("pod");
    let pod = Api::<Pod>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let (pod_name, pod_uid) = (
        pod.metadata.name.clone().unwrap_or_default(),
        pod.metadata.uid.clone().unwrap_or_default(),
    );
    let token = pod_token(client, &pod_name, &pod_uid).await;
    let attributes = mount_attributes(spc, &pod_name, pod_uid, token);
    let resp = csi_mount(&socket, &attributes, &mut csi).await;
    show_pod_files(&bed.dir().join("pod-volume"), &resp);
    said(&format!(
        "logged in to OpenBao as default/my-app through role my-app, for pod {pod_name}"
    ));
    csi
}

/// Starts the CSI provider with the object-version key its DaemonSet mounts; returns it and
/// its socket.
async fn start_csi_provider(bed: &Testbed, csi_bin: &Path) -> (Component, PathBuf) {
    let csi_dir = bed.dir().join("csi");
    std::fs::create_dir_all(&csi_dir).expect("csi dir");
    // The object-version key, as the CSI DaemonSet mounts it from the rendered Secret.
    bed.mount_secret(
        "kube-system",
        "kubebao-csi-object-version-key",
        &csi_dir.join("version-key"),
    )
    .await
    .expect("object version key Secret");
    let version_key = csi_dir.join("version-key/key");
    let csi = Component::start(
        "kubebao-csi",
        bed.dir(),
        csi_bin,
        &[
            format!("--provider-dir={}", csi_dir.display()),
            format!("--openbao-addr={}", bed.openbao().addr()),
            format!("--kubeconfig={}", bed.kubeconfig().display()),
            "--audience=openbao".into(),
            format!("--object-version-key-file={}", version_key.display()),
            format!("--listen=127.0.0.1:{}", free_port()),
        ],
    );
    (csi, csi_dir.join("kubebao.sock"))
}

/// What the kubelet hands the driver for `tokenRequests: [{audience: openbao}]`: a token of
/// ServiceAccount default/my-app bound to the pod.
async fn pod_token(client: &kube::Client, pod_name: &str, pod_uid: &str) -> String {
    Api::<ServiceAccount>::namespaced(client.clone(), "default")
        .create_token_request(
            "my-app",
            &PostParams::default(),
            &TokenRequest {
                spec: TokenRequestSpec {
                    audiences: vec!["openbao".into()],
                    expiration_seconds: Some(3600),
                    bound_object_ref: Some(BoundObjectReference {
                        api_version: Some("v1".into()),
                        kind: Some("Pod".into()),
                        name: Some(pod_name.into()),
                        uid: Some(pod_uid.into()),
                    }),
                },
                ..Default::default()
            },
        )
        .await
        .expect("pod token")
        .status
        .expect("token status")
        .token
}

/// The mount request's attributes, as the driver builds them: the SecretProviderClass's
/// parameters plus the pod's identity and token.
fn mount_attributes(
    spc: &Value,
    pod_name: &str,
    pod_uid: String,
    token: String,
) -> BTreeMap<String, String> {
    let mut attributes: BTreeMap<String, String> = spc["spec"]["parameters"]
        .as_object()
        .expect("parameters")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
        .collect();
    for (k, v) in [
        ("secretProviderClass", "kubebao-secrets".to_string()),
        ("csi.storage.k8s.io/pod.name", pod_name.to_string()),
        ("csi.storage.k8s.io/pod.namespace", "default".into()),
        ("csi.storage.k8s.io/pod.uid", pod_uid),
        ("csi.storage.k8s.io/serviceAccount.name", "my-app".into()),
        (
            "csi.storage.k8s.io/serviceAccount.tokens",
            json!({"openbao": {"token": token, "expirationTimestamp": "2099-01-01T00:00:00Z"}})
                .to_string(),
        ),
    ] {
        attributes.insert(k.to_string(), v);
    }
    attributes
}

/// Calls the CSI provider's Mount over its socket until it answers.
async fn csi_mount(
    socket: &Path,
    attributes: &BTreeMap<String, String>,
    csi: &mut Component,
) -> MountResponse {
    wait_for("the CSI provider to mount", WAIT, || {
        csi.assert_running();
        let (socket, attributes) = (
            socket.to_path_buf(),
            serde_json::to_string(attributes).expect("attributes"),
        );
        async move {
            let channel =
                tonic::transport::Endpoint::try_from(format!("unix://{}", socket.display()))
                    .map_err(|e| e.to_string())?
                    .connect()
                    .await
                    .map_err(|e| e.to_string())?;
            CsiDriverProviderClient::new(channel)
                .mount(MountRequest {
                    attributes,
                    permission: "420".into(),
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner())
                .map_err(|e| e.to_string())
        }
    })
    .await
}

/// Writes the mounted files into `mount_dir`, as the driver does for the pod, and shows each.
fn show_pod_files(mount_dir: &Path, resp: &MountResponse) {
    for f in &resp.files {
        let path = mount_dir.join(&f.path);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mount dir");
        std::fs::write(&path, &f.contents).expect("write file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(f.mode as u32))
            .expect("mode");
        said(&format!(
            "the pod sees {} (mode {:o}), content: {:?} (demo data), version {}",
            path.display(),
            f.mode,
            String::from_utf8_lossy(&f.contents),
            resp.object_version
                .iter()
                .find(|v| v.id == f.path)
                .map(|v| v.version.as_str())
                .unwrap_or("-")
        ));
    }
}

/// What to try while the demo runs.
fn print_summary(bed: &Testbed, token_file: &Path) {
    let kubectl = bed.binaries().kubectl.display().to_string();
    println!(
        "\nKubeBao is running. Try:\
         \n  {kubectl} --kubeconfig {kc} get kubebaoinstallations,baopolicies,baosecrets -A\
         \n  {kubectl} --kubeconfig {kc} create secret generic hello -n default --from-literal=a=b\
         \n  (then etcd holds it encrypted: k8s:enc:kms:v2:kubebao:…)\
         \n  BAO_ADDR={addr} BAO_TOKEN=$(cat {tf}) {bao} read transit/keys/kubebao-kms\
         \n  logs: {dir}\
         \n\nPress Ctrl-C to stop and clean up.",
        kc = bed.kubeconfig().display(),
        addr = bed.openbao().addr(),
        tf = token_file.display(),
        bao = bed.binaries().bao.display(),
        dir = bed.dir().display(),
    );
}

/// Waits for Ctrl-C, then stops `kubebao` in order and the test bed, which removes its
/// temporary directory.
async fn wait_and_clean_up(bed: Testbed, kubebao: [Component; 4]) {
    tokio::signal::ctrl_c().await.expect("wait for Ctrl-C");
    println!("\nStopping KubeBao and the test bed…");
    drop(kubebao);
    drop(bed);
    println!("Stopped; temporary files removed.");
}
