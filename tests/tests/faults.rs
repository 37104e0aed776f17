//! Faults under load: the real KMS plugin serves Encrypt+Decrypt continuously while OpenBao
//! breaks (a 3-node raft cluster losing its active node; one node sealed, then restarted);
//! kube-apiserver writes Secrets through it while it restarts; Secrets are written while etcd
//! is SIGKILLed and restarted; the real CSI provider mounts and the real operator syncs a
//! BaoSecret while the cluster's active node dies. Everything recovers by itself. Each test
//! prints `FIGURE fault:` lines (failed requests, recovery time, objects lost or wrong) and
//! asserts that nothing made before the fault is lost and nothing wrong is served.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, ObjectMeta, PostParams};
use kubebao_openbao::{OpenBao, SecretString};
use kubebao_proto::csi::csi_driver_provider_client::CsiDriverProviderClient;
use kubebao_proto::csi::{MountRequest, VersionRequest};
use kubebao_proto::kms::key_management_service_client::KeyManagementServiceClient;
use kubebao_proto::kms::{DecryptRequest, EncryptRequest, EncryptResponse};
use kubebao_testbed::node_image::kubebao_binaries;
use kubebao_testbed::{
    Binaries, Component, OpenBaoCluster, OpenBaoServer, Pki, Testbed, TestbedOptions, free_port,
    wait_for,
};
use reqwest::Method;
use serde_json::json;
use tonic::transport::Channel;

/// Longest outage the plugin may show after the active node dies. Failover is a raft election
/// (`performance_multiplier = 1`: ~1 s heartbeat timeout, randomised up to 2 s), the new active
/// node's post-unseal set-up (mounts, tokens: about a second), the forwarder noticing it
/// (100 ms) and the plugin's next request (2 s timeout each). That is under 10 s; 30 s leaves
/// room for this busy 2-core machine and is still well inside what an API server tolerates
/// (its KMS calls fail and retry; nothing is lost).
const RECOVERY_BOUND: Duration = Duration::from_secs(30);
/// How long the load runs before the fault, and keeps running after the first success.
const STEADY: Duration = Duration::from_secs(3);
/// Pause after a failed round trip before the next (the failed count is then comparable).
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Longest one Encrypt+Decrypt may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The KMS plugin's Transit key and a token with only the documented policy, in `dir`.
async fn transit_token(bao: &OpenBao, root: &SecretString, dir: &Path) -> PathBuf {
    let call = |method: Method, path: &'static str, body: serde_json::Value| async move {
        bao.request(method, path, Some(root), Some(&body))
            .await
            .unwrap_or_else(|e| panic!("OpenBao {path}: {e}"))
    };
    call(
        Method::POST,
        "sys/mounts/transit",
        json!({"type": "transit"}),
    )
    .await;
    call(
        Method::POST,
        "transit/keys/kubebao-kms",
        json!({"type": "aes256-gcm96"}),
    )
    .await;
    let policy = r#"path "transit/encrypt/kubebao-kms" { capabilities = ["update"] }
path "transit/decrypt/kubebao-kms" { capabilities = ["update"] }
path "transit/keys/kubebao-kms" { capabilities = ["read"] }
"#;
    call(
        Method::PUT,
        "sys/policies/acl/kubebao-kms",
        json!({"policy": policy}),
    )
    .await;
    let token = call(
        Method::POST,
        "auth/token/create",
        json!({"policies": ["kubebao-kms"], "ttl": "1h"}),
    )
    .await
    .expect("token response");
    let path = dir.join("kms-token");
    std::fs::write(
        &path,
        token["auth"]["client_token"].as_str().expect("token"),
    )
    .expect("write the token file");
    path
}

/// The real `kubebao-kms` pointed at `addr`; returns it once /readyz is ok, and its socket.
async fn start_plugin(
    bin_dir: &Path,
    dir: &Path,
    addr: &str,
    token: &Path,
) -> (Component, PathBuf) {
    let socket = dir.join("kms.sock");
    let http = format!("127.0.0.1:{}", free_port());
    let args = vec![
        format!("--socket={}", socket.display()),
        format!("--http-addr={http}"),
        format!("--openbao-addr={addr}"),
        "--openbao-allow-plain-http".into(),
        format!("--token-file={}", token.display()),
        "--probe-interval=1s".into(),
        "--log-level=info,kubebao_kms=debug".into(),
    ];
    let mut plugin = Component::start("kubebao-kms", dir, &bin_dir.join("kubebao-kms"), &args);
    let url = format!("http://{http}/readyz");
    wait_for(
        "the KMS plugin to be ready",
        Duration::from_secs(60),
        || {
            plugin.assert_running();
            let url = url.clone();
            async move {
                let resp = reqwest::get(&url).await.map_err(|e| e.to_string())?;
                if resp.status().is_success() {
                    Ok(())
                } else {
                    Err(resp.text().await.unwrap_or_default())
                }
            }
        },
    )
    .await;
    (plugin, socket)
}

async fn grpc_client(socket: &Path) -> KeyManagementServiceClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("unix:{}", socket.display()))
        .expect("socket endpoint")
        .connect()
        .await
        .expect("connect to the plugin socket");
    KeyManagementServiceClient::new(channel)
}

/// One request (or round trip) as the load made it.
struct Outcome {
    started: Instant,
    finished: Instant,
    error: Option<String>,
}

/// What the load saw: every request, and what each successful one made (an object to check
/// afterwards), with when it started.
struct Record<T> {
    outcomes: Vec<Outcome>,
    made: Vec<(Instant, T)>,
}

impl<T> Default for Record<T> {
    fn default() -> Self {
        Self {
            outcomes: Vec::new(),
            made: Vec::new(),
        }
    }
}

/// A KMS Encrypt then Decrypt of `plaintext`; the ciphertext with its plaintext.
async fn round_trip(
    mut client: KeyManagementServiceClient<Channel>,
    plaintext: Vec<u8>,
) -> Result<(Vec<u8>, EncryptResponse), String> {
    let sealed = client
        .encrypt(EncryptRequest {
            plaintext: plaintext.clone(),
            uid: "fault-load".into(),
        })
        .await
        .map_err(|e| format!("Encrypt: {e}"))?
        .into_inner();
    let opened = decrypt(&mut client, &sealed).await?;
    if opened != plaintext {
        return Err("Decrypt returned other bytes than were encrypted".into());
    }
    Ok((plaintext, sealed))
}

async fn decrypt(
    client: &mut KeyManagementServiceClient<Channel>,
    sealed: &EncryptResponse,
) -> Result<Vec<u8>, String> {
    Ok(client
        .decrypt(DecryptRequest {
            ciphertext: sealed.ciphertext.clone(),
            uid: "fault-load".into(),
            key_id: sealed.key_id.clone(),
            annotations: sealed.annotations.clone(),
        })
        .await
        .map_err(|e| format!("Decrypt: {e}"))?
        .into_inner()
        .plaintext)
}

/// Requests made one after the other (`op(i)` for i = 0, 1, …) until stopped.
struct Load<T> {
    record: Arc<Mutex<Record<T>>>,
    task: tokio::task::JoinHandle<()>,
}

impl<T: Send + 'static> Load<T> {
    fn start<F, Fut>(mut op: F) -> Self
    where
        F: FnMut(u64) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, String>> + Send,
    {
        let record = Arc::new(Mutex::new(Record::default()));
        let shared = record.clone();
        let task = tokio::spawn(async move {
            for i in 0u64.. {
                let started = Instant::now();
                let result = tokio::time::timeout(REQUEST_TIMEOUT, op(i))
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer in {REQUEST_TIMEOUT:?}")));
                let finished = Instant::now();
                let failed = result.is_err();
                {
                    let mut record = shared.lock().expect("record lock");
                    let error = match result {
                        Ok(made) => {
                            record.made.push((started, made));
                            None
                        }
                        Err(e) => Some(e),
                    };
                    record.outcomes.push(Outcome {
                        started,
                        finished,
                        error,
                    });
                }
                if failed {
                    // A client retries after a pause, not in a tight loop.
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        });
        Load { record, task }
    }

    /// Runs the load for `STEADY`, applies `fault` (it returns once the fault is over: at
    /// once for a crash, after the repair otherwise), waits for the first request started
    /// after the fault began to succeed once it was over, runs `STEADY` more, stops, and checks
    /// with `intact` that every object made (before the fault and after) is still there.
    /// Prints the FIGURE lines and asserts nothing was lost and recovery stayed in bound.
    async fn through(
        self,
        name: &str,
        fault: impl Future<Output = ()>,
        mut intact: impl AsyncFnMut(&T) -> bool,
    ) {
        tokio::time::sleep(STEADY).await;
        let before = self.record.lock().expect("record lock").made.len();
        assert!(before > 0, "the load made nothing before the fault");
        let fault_at = Instant::now();
        fault.await;
        let repaired_at = Instant::now();
        let record = self.record.clone();
        let first_success = wait_for(
            &format!("requests to succeed again after {name}"),
            RECOVERY_BOUND * 2,
            || {
                let found = record
                    .lock()
                    .expect("record lock")
                    .outcomes
                    .iter()
                    .find(|o| {
                        o.started >= fault_at && o.finished >= repaired_at && o.error.is_none()
                    })
                    .map(|o| o.finished);
                async move { found.ok_or_else(|| "no success yet".to_string()) }
            },
        )
        .await;
        let recovery = first_success - repaired_at;
        let outage = first_success - fault_at;
        tokio::time::sleep(STEADY).await;
        self.task.abort();
        let record = std::mem::take(&mut *self.record.lock().expect("record lock"));
        let after_fault: Vec<&Outcome> = record
            .outcomes
            .iter()
            .filter(|o| o.finished >= fault_at)
            .collect();
        let failed: Vec<&Outcome> = after_fault
            .iter()
            .copied()
            .filter(|o| o.error.is_some())
            .collect();
        let mut lost = 0;
        for (_, made) in &record.made {
            if !intact(made).await {
                lost += 1;
            }
        }
        let made_before = record.made.iter().filter(|(t, _)| *t < fault_at).count();
        println!(
            "FIGURE fault: {name}: {} requests after the fault, {} failed (first error: {})",
            after_fault.len(),
            failed.len(),
            failed
                .first()
                .and_then(|o| o.error.as_deref())
                .unwrap_or("none")
        );
        println!(
            "FIGURE fault: {name}: recovery {recovery:.2?} (first success after the fault was over), outage {outage:.2?} (from the fault's start)"
        );
        println!(
            "FIGURE fault: {name}: objects lost {lost} of {} ({made_before} made before the fault)",
            record.made.len()
        );
        let longest = failed
            .iter()
            .map(|o| o.finished - o.started)
            .max()
            .unwrap_or_default();
        println!("FIGURE fault: {name}: longest failed request {longest:.2?}");
        assert_eq!(lost, 0, "{lost} objects lost through {name}");
        assert!(
            recovery <= RECOVERY_BOUND,
            "requests took {recovery:?} to succeed again after {name} (bound {RECOVERY_BOUND:?})"
        );
    }
}

/// KMS round trips over the plugin's socket, each with its own plaintext.
async fn kms_load(socket: &Path) -> Load<(Vec<u8>, EncryptResponse)> {
    let client = grpc_client(socket).await;
    Load::start(move |i| round_trip(client.clone(), format!("secret number {i}").into_bytes()))
}

/// Whether `sealed` still decrypts to `plaintext` through the plugin.
async fn still_decrypts(
    client: &mut KeyManagementServiceClient<Channel>,
    (plaintext, sealed): &(Vec<u8>, EncryptResponse),
) -> bool {
    decrypt(client, sealed).await.as_deref() == Ok(plaintext.as_slice())
}

fn work_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("kubebao-faults-")
        .tempdir()
        .expect("temp dir")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_plugin_recovers_when_the_active_openbao_node_dies() {
    let dir = work_dir();
    let bin_dir = kubebao_binaries(&dir.path().join("bin"));
    let cluster = OpenBaoCluster::start(&Binaries::locate(), dir.path(), 3).await;
    let token = transit_token(&cluster.client(), cluster.root_token(), dir.path()).await;
    let (_plugin, socket) = start_plugin(&bin_dir, dir.path(), cluster.addr(), &token).await;
    let active = cluster.active_node().await;
    let mut check = grpc_client(&socket).await;
    kms_load(&socket)
        .await
        .through(
            "active OpenBao node SIGKILLed",
            async { cluster.kill(active).await },
            async |made| still_decrypts(&mut check, made).await,
        )
        .await;
    let now_active = cluster.active_node().await;
    assert_ne!(now_active, active, "a standby took over");

    // The killed node comes back (unsealed again) as a standby; the plugin still serves.
    cluster.restart(active).await;
    let health = cluster.node_client(active).health().await.expect("health");
    assert!(
        health.standby && !health.sealed,
        "the restarted node is a standby: {health:?}"
    );
    let made = round_trip(grpc_client(&socket).await, b"after the restart".to_vec())
        .await
        .expect("the plugin serves after the killed node is back");
    assert!(still_decrypts(&mut check, &made).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_plugin_recovers_when_openbao_is_sealed_and_when_it_restarts() {
    let dir = work_dir();
    let bin_dir = kubebao_binaries(&dir.path().join("bin"));
    let pki = Pki::generate(&dir.path().join("pki"));
    let bao = OpenBaoServer::start(&Binaries::locate(), &pki, dir.path()).await;
    let token = transit_token(&bao.client(), bao.root_token(), dir.path()).await;
    let (_plugin, socket) = start_plugin(&bin_dir, dir.path(), bao.addr(), &token).await;

    let mut check = grpc_client(&socket).await;
    kms_load(&socket)
        .await
        .through(
            "OpenBao sealed for 2 s, then unsealed",
            async {
                bao.seal().await;
                tokio::time::sleep(Duration::from_secs(2)).await;
                bao.unseal().await;
            },
            async |made| still_decrypts(&mut check, made).await,
        )
        .await;
    kms_load(&socket)
        .await
        .through(
            "OpenBao restarted",
            async { bao.restart().await },
            async |made| still_decrypts(&mut check, made).await,
        )
        .await;
}

/// kube-apiserver's EncryptionConfiguration: Secrets through the plugin on `socket`.
fn encryption_config(dir: &Path, socket: &Path) -> PathBuf {
    let path = dir.join("encryption-config.yaml");
    std::fs::write(
        &path,
        format!(
            r#"apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources: [secrets]
    providers:
      - kms:
          apiVersion: v2
          name: kubebao
          endpoint: unix://{}
          timeout: 3s
      - identity: {{}}
"#,
            socket.display()
        ),
    )
    .expect("write the encryption config");
    path
}

fn secret(name: &str, value: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "value".to_string(),
            ByteString(value.as_bytes().to_vec()),
        )])),
        ..Default::default()
    }
}

/// Secrets created one after the other (`s-0`, `s-1`, …) through the API server; each
/// successful create made (name, value).
fn secret_load(api: &Api<Secret>) -> Load<(String, String)> {
    let writer = api.clone();
    Load::start(move |i| {
        let api = writer.clone();
        async move {
            let (name, value) = (format!("s-{i}"), format!("value number {i}"));
            api.create(&PostParams::default(), &secret(&name, &value))
                .await
                .map_err(|e| format!("create Secret {name}: {e}"))?;
            Ok((name, value))
        }
    })
}

/// Whether Secret `name` reads back with `value`.
async fn reads_back(api: &Api<Secret>, (name, value): &(String, String)) -> bool {
    api.get(name).await.is_ok_and(|s| {
        s.data.and_then(|d| d.get("value").cloned()) == Some(ByteString(value.clone().into_bytes()))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_survive_an_etcd_restart_under_load() {
    let bed = Testbed::start(TestbedOptions {
        controller_manager: false,
        openbao: false,
    })
    .await;
    let ns = bed.namespace("faults").await;
    let api: Api<Secret> = Api::namespaced(bed.client().await, &ns);
    secret_load(&api)
        .through(
            "etcd SIGKILLed and restarted",
            bed.restart_etcd(),
            async |made| reads_back(&api, made).await,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_encrypted_through_the_plugin_survive_an_apiserver_restart_under_load() {
    let bed = Testbed::start(TestbedOptions {
        controller_manager: false,
        openbao: true,
    })
    .await;
    let bin_dir = kubebao_binaries(&bed.dir().join("bin"));
    let bao = bed.openbao();
    let token = transit_token(&bao.client(), bao.root_token(), bed.dir()).await;
    let (_plugin, socket) = start_plugin(&bin_dir, bed.dir(), bao.addr(), &token).await;
    let config = encryption_config(bed.dir(), &socket);
    bed.restart_apiserver(Some(&config)).await;
    let ns = bed.namespace("faults").await;
    let api: Api<Secret> = Api::namespaced(bed.client().await, &ns);

    secret_load(&api)
        .through(
            "kube-apiserver restarted",
            bed.restart_apiserver(Some(&config)),
            async |made| reads_back(&api, made).await,
        )
        .await;
    let raw = bed
        .etcd()
        .get(&format!("/registry/secrets/{ns}/s-0"))
        .await
        .expect("Secret s-0 in etcd");
    assert!(
        raw.starts_with(b"k8s:enc:kms:v2:kubebao:"),
        "Secrets are stored as KMS v2 envelopes"
    );
}

/// What the CSI provider and the operator read from the cluster: a KV v2 secret.
const APP_SECRET_PATH: &str = "secret/data/app/db";

/// Writes `password` to the KV v2 secret at `path`, retrying while a just-enabled mount
/// upgrades or the cluster fails over.
async fn put_secret(cluster: &OpenBaoCluster, path: &str, password: &str) {
    let (bao, root) = (cluster.client(), cluster.root_token().clone());
    wait_for("the KV v2 write", Duration::from_secs(30), || {
        let (bao, root) = (bao.clone(), root.clone());
        let body = json!({"data": {"password": password}});
        async move {
            bao.request(Method::POST, path, Some(&root), Some(&body))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    })
    .await;
}

/// The cluster prepared as an installation would: KV v2 at `secret/` with the app's secret,
/// and Kubernetes auth verifying tokens with the bed's API server (as
/// `Testbed::enable_kubernetes_auth` does for the bed's own OpenBao), role `my-app` bound to
/// ServiceAccount `app`.
async fn prepare_cluster(bed: &Testbed, cluster: &OpenBaoCluster, password: &str) {
    bed.service_account("kube-system", "openbao-token-reviewer")
        .await;
    bed.kubectl(&[
        "create",
        "clusterrolebinding",
        "openbao-token-reviewer",
        "--clusterrole=system:auth-delegator",
        "--serviceaccount=kube-system:openbao-token-reviewer",
    ]);
    let reviewer = bed
        .service_account_token(
            "kube-system",
            "openbao-token-reviewer",
            "https://kubernetes.default.svc",
            86400,
        )
        .await;
    let setup: [(Method, &str, serde_json::Value); 5] = [
        (
            Method::POST,
            "sys/mounts/secret",
            json!({"type": "kv", "options": {"version": "2"}}),
        ),
        (
            Method::POST,
            "sys/auth/kubernetes",
            json!({"type": "kubernetes"}),
        ),
        (
            Method::POST,
            "auth/kubernetes/config",
            json!({
                "kubernetes_host": bed.apiserver_url(),
                "kubernetes_ca_cert": bed.pki().ca_pem(),
                "token_reviewer_jwt": reviewer,
                "disable_local_ca_jwt": true,
            }),
        ),
        (
            Method::PUT,
            "sys/policies/acl/my-app",
            json!({"policy": r#"path "secret/data/app/*" { capabilities = ["read"] }"#}),
        ),
        (
            Method::POST,
            "auth/kubernetes/role/my-app",
            json!({
                "bound_service_account_names": ["app"],
                "bound_service_account_namespaces": ["*"],
                "audience": "openbao",
                "token_policies": ["my-app"],
                "token_ttl": "1h",
            }),
        ),
    ];
    for (method, path, body) in setup {
        cluster.root(method, path, Some(body)).await;
    }
    put_secret(cluster, APP_SECRET_PATH, password).await;
}

/// The real `kubebao-csi` against `addr`; returns it once its socket answers, and the socket.
async fn start_csi(
    bin_dir: &Path,
    dir: &Path,
    addr: &str,
    kubeconfig: &Path,
) -> (Component, PathBuf) {
    let providers = dir.join("providers");
    let key = dir.join("version.key");
    std::fs::write(&key, [42u8; 32]).expect("write the object-version key");
    let args = vec![
        format!("--provider-dir={}", providers.display()),
        format!("--openbao-addr={addr}"),
        "--openbao-allow-plain-http".into(),
        format!("--kubeconfig={}", kubeconfig.display()),
        "--audience=openbao".into(),
        format!("--object-version-key-file={}", key.display()),
        format!("--listen=127.0.0.1:{}", free_port()),
    ];
    let mut csi = Component::start("kubebao-csi", dir, &bin_dir.join("kubebao-csi"), &args);
    let socket = providers.join("kubebao.sock");
    let s = socket.clone();
    wait_for("kubebao-csi to serve", Duration::from_secs(60), || {
        csi.assert_running();
        let s = s.clone();
        async move {
            csi_client(&s)
                .await?
                .version(VersionRequest {
                    version: "v1alpha1".into(),
                })
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    })
    .await;
    (csi, socket)
}

async fn csi_client(socket: &Path) -> Result<CsiDriverProviderClient<Channel>, String> {
    let channel = tonic::transport::Endpoint::from_shared(format!("unix:{}", socket.display()))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(CsiDriverProviderClient::new(channel))
}

/// A pod (Pending: no kubelet) of ServiceAccount `app`, and the Mount attributes the driver
/// would send for it (no token: the provider requests one bound to the pod).
async fn app_pod_attributes(bed: &Testbed, ns: &str) -> String {
    bed.service_account(ns, "app").await;
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"serviceAccountName": "app",
                 "containers": [{"name": "app", "image": "registry.example/app:1"}]}
    }))
    .expect("pod");
    let uid = Api::<Pod>::namespaced(bed.client().await, ns)
        .create(&PostParams::default(), &pod)
        .await
        .expect("create the pod")
        .metadata
        .uid
        .expect("pod uid");
    json!({
        "secretProviderClass": "app-secrets",
        "csi.storage.k8s.io/ephemeral": "false",
        "csi.storage.k8s.io/pod.name": "web",
        "csi.storage.k8s.io/pod.namespace": ns,
        "csi.storage.k8s.io/pod.uid": uid,
        "csi.storage.k8s.io/serviceAccount.name": "app",
        "roleName": "my-app",
        "objects": "- objectName: \"db-password\"\n  secretPath: \"secret/data/app/db\"\n  secretKey: \"password\"\n",
    })
    .to_string()
}

/// One Mount as the driver makes it; the content served for `db-password`.
async fn mount(socket: &Path, attributes: &str) -> Result<Vec<u8>, String> {
    let resp = csi_client(socket)
        .await?
        .mount(MountRequest {
            attributes: attributes.to_string(),
            secrets: "{}".into(),
            target_path: "/var/lib/kubelet/pods/x/volumes/kubernetes.io~csi/secrets/mount".into(),
            permission: "420".into(),
            current_object_version: vec![],
        })
        .await
        .map_err(|e| format!("Mount: {e}"))?
        .into_inner();
    resp.files
        .into_iter()
        .find(|f| f.path == "db-password")
        .map(|f| f.contents)
        .ok_or_else(|| "Mount returned no db-password file".to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csi_provider_recovers_when_the_active_openbao_node_dies() {
    let bed = Testbed::start(TestbedOptions {
        controller_manager: false,
        openbao: false,
    })
    .await;
    let bin_dir = kubebao_binaries(&bed.dir().join("bin"));
    let cluster = OpenBaoCluster::start(bed.binaries(), bed.dir(), 3).await;
    prepare_cluster(&bed, &cluster, "pw-1").await;
    let (_csi, socket) = start_csi(&bin_dir, bed.dir(), cluster.addr(), bed.kubeconfig()).await;
    let ns = bed.namespace("faults").await;
    let attributes = app_pod_attributes(&bed, &ns).await;
    let active = cluster.active_node().await;
    let load_socket = socket.clone();
    // "Lost" here is a Mount that served other content than the secret holds.
    Load::start(move |_| {
        let (socket, attributes) = (load_socket.clone(), attributes.clone());
        async move { mount(&socket, &attributes).await }
    })
    .through(
        "CSI provider, active OpenBao node SIGKILLed",
        async { cluster.kill(active).await },
        async |served| served.as_slice() == b"pw-1",
    )
    .await;
    assert_ne!(cluster.active_node().await, active, "a standby took over");
}

/// The operator's own OpenBao policy (policies and roles only, no KV), as installed.
const OPERATOR_POLICY: &str = r#"
path "sys/policies/acl/*" { capabilities = ["create", "read", "update", "delete", "list"] }
path "auth/kubernetes/role/*" { capabilities = ["create", "read", "update", "delete", "list"] }
"#;

/// The real `kubebao-operator` against `addr` with a token of `OPERATOR_POLICY`; returns it
/// once /readyz is ok.
async fn start_operator(bed: &Testbed, cluster: &OpenBaoCluster, bin_dir: &Path) -> Component {
    cluster
        .root(
            Method::POST,
            "sys/policies/acl/kubebao-operator",
            Some(json!({"policy": OPERATOR_POLICY})),
        )
        .await;
    let token = cluster
        .root(
            Method::POST,
            "auth/token/create",
            Some(json!({"policies": ["kubebao-operator"], "ttl": "1h"})),
        )
        .await
        .expect("token response");
    let token_file = bed.dir().join("operator-token");
    std::fs::write(
        &token_file,
        token["auth"]["client_token"].as_str().expect("token"),
    )
    .expect("write the operator's token");
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
        &bin_dir.join("kubebao-operator"),
        &[
            format!("--openbao-addr={}", cluster.addr()),
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
    wait_for("the operator to be ready", Duration::from_secs(120), || {
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

/// A namespace whose `default` ServiceAccount may read `secret/data/<ns>/*` through the
/// OpenBao role named after the namespace (the BaoSecret defaults).
async fn tenant(bed: &Testbed, cluster: &OpenBaoCluster) -> String {
    let ns = bed.namespace("faults").await;
    // No kube-controller-manager runs to create it.
    bed.service_account(&ns, "default").await;
    let policy = format!("path \"secret/data/{ns}/*\" {{ capabilities = [\"read\"] }}\n");
    cluster
        .root(
            Method::POST,
            &format!("sys/policies/acl/tenant-{ns}"),
            Some(json!({"policy": policy})),
        )
        .await;
    cluster
        .root(
            Method::POST,
            &format!("auth/kubernetes/role/{ns}"),
            Some(json!({"bound_service_account_names": ["default"],
                        "bound_service_account_namespaces": [ns],
                        "token_policies": [format!("tenant-{ns}")], "token_ttl": "1h"})),
        )
        .await;
    ns
}

/// The `password` the operator's Secret holds now (None while it does not exist).
async fn synced_password(api: &Api<Secret>) -> Option<String> {
    let secret = api.get_opt("app-secret").await.ok()??;
    let value = secret.data?.get("password")?.0.clone();
    Some(String::from_utf8_lossy(&value).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_syncs_a_change_made_after_the_active_openbao_node_dies() {
    let bed = Testbed::start(TestbedOptions {
        controller_manager: false,
        openbao: false,
    })
    .await;
    let bin_dir = kubebao_binaries(&bed.dir().join("bin"));
    let cluster = OpenBaoCluster::start(bed.binaries(), bed.dir(), 3).await;
    prepare_cluster(&bed, &cluster, "unused").await;
    let _operator = start_operator(&bed, &cluster, &bin_dir).await;
    let ns = tenant(&bed, &cluster).await;
    let path = format!("secret/data/{ns}/app");
    put_secret(&cluster, &path, "before-the-fault").await;
    bed.apply(
        &json!({
            "apiVersion": "kubebao.io/v1alpha1",
            "kind": "BaoSecret",
            "metadata": {"name": "app", "namespace": ns},
            "spec": {"secretPath": path, "target": {"name": "app-secret"}, "refreshInterval": "2s"},
        })
        .to_string(),
    );
    let api: Api<Secret> = Api::namespaced(bed.client().await, &ns);
    let synced = |want: &'static str| {
        let api = api.clone();
        move || {
            let api = api.clone();
            async move {
                match synced_password(&api).await {
                    Some(p) if p == want => Ok(()),
                    other => Err(format!(
                        "the Secret holds {:?}",
                        other.map(|_| "another value")
                    )),
                }
            }
        }
    };
    wait_for(
        "the first sync",
        Duration::from_secs(60),
        synced("before-the-fault"),
    )
    .await;

    // Watch the Secret throughout: it must never disappear or hold anything else.
    let watcher = api.clone();
    let wrong = Arc::new(Mutex::new((0u32, 0u32)));
    let seen = wrong.clone();
    let watch = tokio::spawn(async move {
        loop {
            let ok = matches!(
                synced_password(&watcher).await.as_deref(),
                Some("before-the-fault" | "after-the-fault")
            );
            {
                let mut seen = seen.lock().expect("watch lock");
                seen.0 += 1;
                seen.1 += u32::from(!ok);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let active = cluster.active_node().await;
    let fault_at = Instant::now();
    cluster.kill(active).await;
    put_secret(&cluster, &path, "after-the-fault").await;
    let written_at = Instant::now();
    wait_for(
        "the change to be synced",
        RECOVERY_BOUND * 2,
        synced("after-the-fault"),
    )
    .await;
    let synced_at = Instant::now();
    watch.abort();
    let (polls, bad) = *wrong.lock().expect("watch lock");
    let recovery = synced_at - written_at;
    println!(
        "FIGURE fault: operator, active OpenBao node SIGKILLed: change written {:.2?} after the kill, synced {recovery:.2?} after it was written ({:.2?} after the kill)",
        written_at - fault_at,
        synced_at - fault_at
    );
    println!(
        "FIGURE fault: operator, active OpenBao node SIGKILLed: Secret missing or wrong in {bad} of {polls} reads"
    );
    assert_eq!(bad, 0, "the Secret went missing or held a wrong value");
    assert!(
        recovery <= RECOVERY_BOUND,
        "the change took {recovery:?} to reach the Secret (bound {RECOVERY_BOUND:?})"
    );
    assert_ne!(cluster.active_node().await, active, "a standby took over");
}
