//! The control plane and OpenBao, together: one per test binary (`Testbed::shared`) or a
//! private one for tests that restart or break things (`Testbed::start`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleRef, Subject};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use reqwest::Method;
use serde_json::json;
use tokio::sync::{Mutex, OnceCell};

use crate::etcd::{Etcd, RawEtcd};
use crate::kube_cluster::{ApiServerSpec, start_controller_manager, write_kubeconfig};
use crate::{Binaries, Component, OpenBaoServer, Pki, wait_for};

/// A free TCP port on 127.0.0.1 for a server the test bed starts. Taken below the kernel's
/// ephemeral range, where the OS would pick: there, any outgoing connection of a busy machine may
/// take the port between this check and the server's bind ("address already in use"). Each call
/// in this process gets a different port; other processes start elsewhere (by pid).
pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    // Above the ports a node uses (kubelet 10248/10250, scheduler 10259, …).
    let (low, high) = (11_000u32, ephemeral_start.max(11_001));
    let span = high - low;
    let start = std::process::id().wrapping_mul(7919);
    for _ in 0..span {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = u16::try_from(low + start.wrapping_add(n) % span).expect("port range");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free TCP port on 127.0.0.1 between {low} and {high}")
}

/// Builds a client from a kubeconfig file.
pub(crate) async fn client_from_kubeconfig(path: &Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(path).expect("read kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig to config");
    Client::try_from(config).expect("kube client")
}

/// Starts a process that removes `dir` after this process has exited (or dropped the test
/// bed) and every process started with `dir` in its command line is gone: the shared test bed
/// lives in a static, which Rust never drops. `KUBEBAO_KEEP_TESTBED=1` keeps it for debugging.
fn janitor(dir: &Path) -> std::process::Child {
    const SCRIPT: &str = r#"
cat >/dev/null
while pgrep -f -- "$1" | grep -qvx "$$"; do sleep 0.2; done
[ -n "${KUBEBAO_KEEP_TESTBED:-}" ] || rm -rf -- "$1"
"#;
    std::process::Command::new("sh")
        .arg("-c")
        .arg(SCRIPT)
        .arg("janitor")
        .arg(dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start the test bed janitor")
}

/// What to start.
#[derive(Clone, Debug)]
pub struct TestbedOptions {
    /// Start kube-controller-manager (garbage collection, namespaces, service accounts, DaemonSets).
    pub controller_manager: bool,
    /// Start OpenBao.
    pub openbao: bool,
}

impl Default for TestbedOptions {
    fn default() -> Self {
        Self {
            controller_manager: true,
            openbao: true,
        }
    }
}

/// A running test bed. Every child process stops when this is dropped or the process exits.
pub struct Testbed {
    bins: Binaries,
    pki: Pki,
    kubeconfig: PathBuf,
    etcd: Etcd,
    apiserver_spec: ApiServerSpec,
    apiserver: Mutex<Option<Component>>,
    controller_manager: Option<Component>,
    openbao: Option<OpenBaoServer>,
    kubernetes_auth: OnceCell<()>,
    /// Removes the temporary directory once every process using it is gone (see `janitor`).
    /// (Its stdin is the lifeline: closed when this is dropped or the process exits.)
    _janitor: std::process::Child,
    /// Last field: dropped (removed) after every component above has stopped.
    dir: tempfile::TempDir,
}

static SHARED: OnceCell<Testbed> = OnceCell::const_new();

impl Testbed {
    /// The test binary's shared test bed, started on first use.
    pub async fn shared() -> &'static Testbed {
        SHARED
            .get_or_init(|| Testbed::start(TestbedOptions::default()))
            .await
    }

    /// Starts a private test bed.
    pub async fn start(options: TestbedOptions) -> Testbed {
        kubebao_openbao::install_crypto_provider();
        let bins = Binaries::locate();
        let dir = tempfile::Builder::new()
            .prefix("kubebao-testbed-")
            .tempdir()
            .expect("temp dir");
        let root = dir.path().to_path_buf();
        let pki = Pki::generate(&root.join("pki"));
        let etcd = Etcd::start(&bins, &root).await;
        let apiserver_spec = ApiServerSpec {
            bin: bins.kube_apiserver.clone(),
            dir: root.clone(),
            port: free_port(),
            etcd_url: etcd.client_url.clone(),
            pki: pki.clone(),
        };
        let kubeconfig = root.join("kubeconfig");
        write_kubeconfig(&kubeconfig, &apiserver_spec.url(), &pki);
        let openbao_start = async {
            if options.openbao {
                Some(OpenBaoServer::start(&bins, &pki, &root).await)
            } else {
                None
            }
        };
        let (apiserver, openbao) =
            tokio::join!(apiserver_spec.start(None, &kubeconfig), openbao_start);
        let controller_manager = options
            .controller_manager
            .then(|| start_controller_manager(&bins, &root, &kubeconfig, &pki));
        let mut bed = Testbed {
            bins,
            pki,
            kubeconfig,
            etcd,
            apiserver_spec,
            apiserver: Mutex::new(Some(apiserver)),
            controller_manager,
            openbao,
            kubernetes_auth: OnceCell::new(),
            _janitor: janitor(&root),
            dir,
        };
        if bed.controller_manager.is_some() {
            bed.wait_for_controller_manager().await;
        }
        bed
    }

    async fn wait_for_controller_manager(&mut self) {
        let sas: Api<ServiceAccount> = Api::namespaced(self.client().await, "default");
        let kcm = self
            .controller_manager
            .as_mut()
            .expect("controller manager");
        wait_for(
            "kube-controller-manager to create the default ServiceAccount",
            Duration::from_secs(120),
            || {
                kcm.assert_running();
                let sas = sas.clone();
                async move {
                    sas.get("default")
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }
            },
        )
        .await;
    }

    /// A new admin client (one per test: clients belong to the runtime that made them).
    pub async fn client(&self) -> Client {
        client_from_kubeconfig(&self.kubeconfig).await
    }

    /// Path of the admin kubeconfig.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The API server URL.
    pub fn apiserver_url(&self) -> String {
        self.apiserver_spec.url()
    }

    /// The temporary directory holding logs, data and certificates.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The test bed PKI.
    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    /// The binaries in use.
    pub fn binaries(&self) -> &Binaries {
        &self.bins
    }

    /// The OpenBao server (panics if the test bed was started without one).
    pub fn openbao(&self) -> &OpenBaoServer {
        self.openbao
            .as_ref()
            .expect("this test bed was started without OpenBao")
    }

    /// etcd directly: raw reads, and writes that bypass the API server.
    pub fn etcd(&self) -> RawEtcd {
        RawEtcd {
            url: self.etcd.client_url.clone(),
            http: reqwest::Client::new(),
        }
    }

    /// Restarts kube-apiserver, with or without an `EncryptionConfiguration`, on the same port,
    /// storage and certificates; returns when `/readyz` is ok.
    pub async fn restart_apiserver(&self, encryption_config: Option<&Path>) {
        let mut slot = self.apiserver.lock().await;
        if let Some(mut old) = slot.take() {
            old.stop();
        }
        *slot = Some(
            self.apiserver_spec
                .start(encryption_config, &self.kubeconfig)
                .await,
        );
    }

    /// Kills etcd (SIGKILL) and starts it again on the same data dir and ports; returns when
    /// its /health is ok. The API server keeps running and reconnects by itself.
    pub async fn restart_etcd(&self) {
        self.etcd.restart().await;
    }

    /// Creates a namespace with a unique name starting with `prefix`.
    pub async fn namespace(&self, prefix: &str) -> String {
        let api: Api<Namespace> = Api::all(self.client().await);
        let ns = Namespace {
            metadata: ObjectMeta {
                generate_name: Some(format!("{prefix}-")),
                ..Default::default()
            },
            ..Default::default()
        };
        api.create(&PostParams::default(), &ns)
            .await
            .expect("create namespace")
            .metadata
            .name
            .expect("namespace name")
    }

    /// Creates a ServiceAccount.
    pub async fn service_account(&self, namespace: &str, name: &str) {
        let api: Api<ServiceAccount> = Api::namespaced(self.client().await, namespace);
        let sa = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        match api.create(&PostParams::default(), &sa).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => panic!("create ServiceAccount {namespace}/{name}: {e}"),
        }
    }

    /// Issues a ServiceAccount token (TokenRequest) for `audience`.
    pub async fn service_account_token(
        &self,
        namespace: &str,
        name: &str,
        audience: &str,
        seconds: i64,
    ) -> String {
        let api: Api<ServiceAccount> = Api::namespaced(self.client().await, namespace);
        let req = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![audience.into()],
                expiration_seconds: Some(seconds),
                ..Default::default()
            },
            ..Default::default()
        };
        api.create_token_request(name, &PostParams::default(), &req)
            .await
            .unwrap_or_else(|e| panic!("TokenRequest for {namespace}/{name}: {e}"))
            .status
            .expect("token status")
            .token
    }

    /// Registers a Node object (there is no kubelet) so DaemonSet placement can be checked.
    pub async fn register_node(&self, name: &str, labels: &[(&str, &str)], control_plane: bool) {
        let api: Api<Node> = Api::all(self.client().await);
        let mut labels: std::collections::BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        labels.insert("kubernetes.io/hostname".into(), name.into());
        labels.insert("kubernetes.io/os".into(), "linux".into());
        let mut node: Node = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {}
        }))
        .expect("node");
        if control_plane {
            node.metadata.labels.get_or_insert_default().insert(
                "node-role.kubernetes.io/control-plane".into(),
                String::new(),
            );
            node.spec.get_or_insert_default().taints = Some(vec![
                serde_json::from_value(json!({
                    "key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"
                }))
                .expect("taint"),
            ]);
        }
        api.create(&PostParams::default(), &node)
            .await
            .unwrap_or_else(|e| panic!("register node {name}: {e}"));
    }

    /// Enables OpenBao's Kubernetes auth at `auth/kubernetes`, verifying tokens against this
    /// API server through TokenReview (a reviewer ServiceAccount bound to
    /// `system:auth-delegator`). Idempotent.
    pub async fn enable_kubernetes_auth(&self) {
        self.kubernetes_auth
            .get_or_init(|| async {
                let client = self.client().await;
                self.service_account("kube-system", "openbao-token-reviewer")
                    .await;
                let crb: ClusterRoleBinding = ClusterRoleBinding {
                    metadata: ObjectMeta {
                        name: Some("openbao-token-reviewer".into()),
                        ..Default::default()
                    },
                    role_ref: RoleRef {
                        api_group: "rbac.authorization.k8s.io".into(),
                        kind: "ClusterRole".into(),
                        name: "system:auth-delegator".into(),
                    },
                    subjects: Some(vec![Subject {
                        kind: "ServiceAccount".into(),
                        name: "openbao-token-reviewer".into(),
                        namespace: Some("kube-system".into()),
                        ..Default::default()
                    }]),
                };
                let api: Api<ClusterRoleBinding> = Api::all(client);
                match api.create(&PostParams::default(), &crb).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    Err(e) => panic!("create reviewer binding: {e}"),
                }
                let reviewer = self
                    .service_account_token(
                        "kube-system",
                        "openbao-token-reviewer",
                        "https://kubernetes.default.svc",
                        86400,
                    )
                    .await;
                let bao = self.openbao();
                bao.enable_auth("kubernetes", "kubernetes").await;
                bao.root(
                    Method::POST,
                    "auth/kubernetes/config",
                    Some(json!({
                        "kubernetes_host": self.apiserver_url(),
                        "kubernetes_ca_cert": self.pki.ca_pem(),
                        "token_reviewer_jwt": reviewer,
                        "disable_local_ca_jwt": true,
                    })),
                )
                .await;
            })
            .await;
    }

    /// Writes a ConfigMap's data into `dir`, one file per key, as the kubelet mounts a
    /// ConfigMap volume (there is no kubelet). Err while the ConfigMap does not exist yet.
    pub async fn mount_config_map(
        &self,
        namespace: &str,
        name: &str,
        dir: &Path,
    ) -> Result<(), String> {
        let cm = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(
            self.client().await,
            namespace,
        )
        .get(name)
        .await
        .map_err(|e| format!("ConfigMap {namespace}/{name}: {e}"))?;
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        for (key, value) in cm.data.unwrap_or_default() {
            std::fs::write(dir.join(key), value).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Writes a Secret's data into `dir`, one file per key, as the kubelet mounts a Secret
    /// volume. Err while the Secret does not exist yet.
    pub async fn mount_secret(
        &self,
        namespace: &str,
        name: &str,
        dir: &Path,
    ) -> Result<(), String> {
        let secret =
            Api::<k8s_openapi::api::core::v1::Secret>::namespaced(self.client().await, namespace)
                .get(name)
                .await
                .map_err(|e| format!("Secret {namespace}/{name}: {e}"))?;
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        for (key, value) in secret.data.unwrap_or_default() {
            std::fs::write(dir.join(key), value.0).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Runs the real kubectl against this test bed with `stdin` as its input; stdout, or stderr
    /// as the error.
    pub fn try_kubectl(&self, args: &[&str], stdin: &str) -> Result<String, String> {
        use std::io::Write as _;
        let mut child = std::process::Command::new(&self.bins.kubectl)
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run kubectl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write kubectl input");
        let out = child.wait_with_output().expect("kubectl");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Runs the real kubectl against this test bed; returns stdout, panics with stderr on failure.
    pub fn kubectl(&self, args: &[&str]) -> String {
        self.try_kubectl(args, "")
            .unwrap_or_else(|e| panic!("kubectl {args:?} failed: {e}"))
    }

    /// `kubectl apply` of a manifest given as text; panics with kubectl's error on failure.
    pub fn apply(&self, yaml: &str) {
        if let Err(e) = self.try_kubectl(&["apply", "-f", "-"], yaml) {
            panic!("kubectl apply failed: {e}\n{yaml}");
        }
    }

    /// Installs the project's CRDs from `crds/` as a user would (server-side apply) and waits
    /// until the API server serves them.
    pub fn install_crds(&self) {
        let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
        self.kubectl(&["apply", "--server-side", "-f", crds.to_str().expect("path")]);
        self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "crd",
            "--all",
            "--timeout=60s",
        ]);
    }
}
