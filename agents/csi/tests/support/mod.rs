//! What the CSI provider's end-to-end tests share: the test bed with OpenBao prepared as an
//! installation would, pods and the tokens the kubelet would hand the driver, and the real
//! `kubebao-csi` binary called over its socket exactly as the driver calls it.
// Each test binary uses a part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, PostParams};
use kubebao_proto::csi::csi_driver_provider_client::CsiDriverProviderClient;
use kubebao_proto::csi::{MountRequest, MountResponse, VersionRequest};
use kubebao_testbed::{Component, Testbed, free_port, wait_for};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::sync::{OnceCell, RwLock};
use tonic::transport::Channel;

/// Tests hold this for reading; the sealing test holds it for writing (OpenBao is shared).
pub static OPENBAO_GATE: RwLock<()> = RwLock::const_new(());
pub static SETUP: OnceCell<()> = OnceCell::const_new();

pub const SEED_OBJECTS: &str = r#"- objectName: "db-password"
  secretPath: "secret/data/myapp/db"
  secretKey: "password"
"#;

/// What the other tests mount (the seed's path belongs to the seed test, which rewrites it).
pub const SHARED_OBJECTS: &str = r#"- objectName: "db-password"
  secretPath: "secret/data/myapp/shared"
  secretKey: "password"
"#;

pub const POLICY: &str = r#"
path "secret/data/myapp/*" { capabilities = ["read"] }
path "kv/*" { capabilities = ["read"] }
path "pki/issue/web" { capabilities = ["create", "update"] }
path "database/creds/app" { capabilities = ["read"] }
path "sys/leases/renew" { capabilities = ["update"] }
"#;

/// OpenBao as an installation would prepare it: KV v1 and v2, PKI, Kubernetes auth, the
/// `my-app` role bound to ServiceAccount `app` in any namespace.
pub async fn bed() -> &'static Testbed {
    let bed = Testbed::shared().await;
    SETUP
        .get_or_init(|| async {
            bed.enable_kubernetes_auth().await;
            let bao = bed.openbao();
            bao.enable_engine("secret", "kv", Some(2)).await;
            bao.enable_engine("kv", "kv", Some(1)).await;
            bao.enable_engine("pki", "pki", None).await;
            bao.root(
                Method::POST,
                "pki/root/generate/internal",
                Some(json!({"common_name": "kubebao test CA", "ttl": "87600h"})),
            )
            .await;
            bao.root(
                Method::POST,
                "pki/roles/web",
                Some(
                    json!({"allowed_domains": "example.com", "allow_subdomains": true,
                            "generate_lease": true, "ttl": "1h", "max_ttl": "1h"}),
                ),
            )
            .await;
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
                    "bound_service_account_names": ["app"],
                    "bound_service_account_namespaces": ["*"],
                    "audience": "openbao",
                    "token_policies": ["my-app"],
                    "token_ttl": "1h",
                })),
            )
            .await;
        })
        .await;
    bed
}

/// A pod as the API server knows it (no kubelet runs it; it stays Pending).
pub struct TestPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
}

pub async fn pod(bed: &Testbed, namespace: &str, name: &str, service_account: &str) -> TestPod {
    bed.service_account(namespace, service_account).await;
    let api: Api<Pod> = Api::namespaced(bed.client().await, namespace);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"serviceAccountName": service_account,
                 "containers": [{"name": "app", "image": "registry.example/app:1"}]}
    }))
    .unwrap();
    let created = api.create(&PostParams::default(), &pod).await.unwrap();
    TestPod {
        namespace: namespace.into(),
        name: name.into(),
        uid: created.metadata.uid.unwrap(),
        service_account: service_account.into(),
    }
}

/// The token the kubelet would hand the driver (CSIDriver `tokenRequests: [{audience: openbao}]`).
pub async fn kubelet_token(bed: &Testbed, pod: &TestPod, audience: &str) -> String {
    let api: Api<ServiceAccount> = Api::namespaced(bed.client().await, &pod.namespace);
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.into()],
            expiration_seconds: Some(3600),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.name.clone()),
                uid: Some(pod.uid.clone()),
            }),
        },
        ..Default::default()
    };
    api.create_token_request(&pod.service_account, &PostParams::default(), &req)
        .await
        .unwrap()
        .status
        .unwrap()
        .token
}

/// `attributes` as the driver builds them: the SecretProviderClass parameters overlaid with
/// the pod's volume context and, when the CSIDriver asks for them, the ServiceAccount tokens.
pub fn driver_attributes(
    parameters: &[(&str, &str)],
    pod: &TestPod,
    token: Option<&str>,
) -> String {
    let mut attrs: BTreeMap<String, String> = parameters
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    attrs.insert("secretProviderClass".into(), "kubebao-secrets".into());
    attrs.insert("csi.storage.k8s.io/ephemeral".into(), "false".into());
    attrs.insert("csi.storage.k8s.io/pod.name".into(), pod.name.clone());
    attrs.insert(
        "csi.storage.k8s.io/pod.namespace".into(),
        pod.namespace.clone(),
    );
    attrs.insert("csi.storage.k8s.io/pod.uid".into(), pod.uid.clone());
    attrs.insert(
        "csi.storage.k8s.io/serviceAccount.name".into(),
        pod.service_account.clone(),
    );
    if let Some(token) = token {
        attrs.insert(
            "csi.storage.k8s.io/serviceAccount.tokens".into(),
            json!({"openbao": {"token": token, "expirationTimestamp": "2099-01-01T00:00:00Z"}})
                .to_string(),
        );
    }
    serde_json::to_string(&attrs).unwrap()
}

/// A running agent.
pub struct Agent {
    pub process: Component,
    pub socket: PathBuf,
    pub metrics_url: String,
    pub _dir: tempfile::TempDir,
}

impl Agent {
    /// `/healthz` or `/readyz`: status code and body.
    pub async fn probe(&self, path: &str) -> (u16, String) {
        let url = self.metrics_url.replace("/metrics", path);
        let r = reqwest::get(&url).await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// The agent process's `/proc/<pid>/status` field (`VmHWM`, `VmRSS`), in KiB.
    pub fn memory_kib(&self, field: &str) -> u64 {
        let pid = self.process.pid().expect("the agent runs");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
    }
}

pub async fn agent(bed: &Testbed) -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("version.key");
    std::fs::write(&key, [42u8; 32]).unwrap();
    start_agent(bed, dir, &key).await
}

pub async fn start_agent(bed: &Testbed, dir: tempfile::TempDir, key: &Path) -> Agent {
    let port = free_port();
    let providers = dir.path().join("providers");
    let args = vec![
        format!("--provider-dir={}", providers.display()),
        format!("--openbao-addr={}", bed.openbao().addr()),
        // The test bed's OpenBao listens on plain http on loopback.
        "--openbao-allow-plain-http".to_string(),
        format!("--kubeconfig={}", bed.kubeconfig().display()),
        "--audience=openbao".to_string(),
        format!("--object-version-key-file={}", key.display()),
        format!("--listen=127.0.0.1:{port}"),
    ];
    let mut process = Component::start(
        "kubebao-csi",
        dir.path(),
        Path::new(env!("CARGO_BIN_EXE_kubebao-csi")),
        &args,
    );
    let socket = providers.join("kubebao.sock");
    let s = socket.clone();
    wait_for("kubebao-csi to serve", Duration::from_secs(30), || {
        process.assert_running();
        let s = s.clone();
        async move {
            let mut c = connect(&s).await.map_err(|e| e.to_string())?;
            c.version(VersionRequest {
                version: "v1alpha1".into(),
            })
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
        }
    })
    .await;
    Agent {
        process,
        socket,
        metrics_url: format!("http://127.0.0.1:{port}/metrics"),
        _dir: dir,
    }
}

pub async fn connect(
    socket: &Path,
) -> Result<CsiDriverProviderClient<Channel>, tonic::transport::Error> {
    let channel = tonic::transport::Endpoint::try_from(format!("unix://{}", socket.display()))?
        .connect()
        .await?;
    Ok(CsiDriverProviderClient::new(channel))
}

impl Agent {
    pub async fn mount(&self, attributes: &str) -> Result<MountResponse, tonic::Status> {
        let mut client = connect(&self.socket).await.unwrap();
        client
            .mount(MountRequest {
                attributes: attributes.to_string(),
                secrets: "{}".into(),
                target_path: "/var/lib/kubelet/pods/x/volumes/kubernetes.io~csi/secrets/mount"
                    .into(),
                permission: "420".into(),
                current_object_version: vec![],
            })
            .await
            .map(|r| r.into_inner())
    }

    /// A counter's value (0 when never incremented), e.g. `kubebao_csi_logins_total{result="ok"}`.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = reqwest::get(&self.metrics_url)
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    }
}

pub fn file<'a>(resp: &'a MountResponse, path: &str) -> &'a kubebao_proto::csi::File {
    resp.files
        .iter()
        .find(|f| f.path == path)
        .unwrap_or_else(|| {
            panic!(
                "no file {path:?} in {:?}",
                resp.files.iter().map(|f| &f.path).collect::<Vec<_>>()
            )
        })
}

pub fn version(resp: &MountResponse, id: &str) -> String {
    resp.object_version
        .iter()
        .find(|v| v.id == id)
        .unwrap_or_else(|| panic!("no version for {id}"))
        .version
        .clone()
}

pub async fn kv2_put(bed: &Testbed, path: &str, data: Value) {
    bed.openbao()
        .root(
            Method::POST,
            &format!("secret/data/{path}"),
            Some(json!({ "data": data })),
        )
        .await;
}
