//! kube-apiserver and kube-controller-manager as child processes, with an admin kubeconfig.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use crate::{Binaries, Component, Pki, wait_for};

/// Everything needed to (re)start the API server with the same identity and storage.
pub(crate) struct ApiServerSpec {
    pub bin: PathBuf,
    pub dir: PathBuf,
    pub port: u16,
    pub etcd_url: String,
    pub pki: Pki,
}

impl ApiServerSpec {
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    fn args(&self, encryption_config: Option<&Path>) -> Vec<String> {
        let p = &self.pki;
        let mut args = vec![
            format!("--etcd-servers={}", self.etcd_url),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={}", self.port),
            format!("--cert-dir={}", self.dir.join("apiserver-certs").display()),
            format!("--tls-cert-file={}", p.serving_cert.display()),
            format!("--tls-private-key-file={}", p.serving_key.display()),
            format!("--client-ca-file={}", p.ca_cert.display()),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--allow-privileged=true".into(),
            "--authorization-mode=Node,RBAC".into(),
            // As OpenShift and hardened clusters run: setting blockOwnerDeletion on an owned
            // object needs `update` on the owner's finalizers, which the operator's RBAC grants.
            "--enable-admission-plugins=OwnerReferencesPermissionEnforcement".into(),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--service-account-key-file={}", p.sa_public_key.display()),
            format!(
                "--service-account-signing-key-file={}",
                p.sa_signing_key.display()
            ),
            "--api-audiences=https://kubernetes.default.svc,openbao".into(),
            // A node's kubelet (node.rs) serves on loopback under the name `localhost`: never
            // dial the machine's external address it also reports.
            "--kubelet-preferred-address-types=Hostname".into(),
            format!("--kubelet-client-certificate={}", p.admin_cert.display()),
            format!("--kubelet-client-key={}", p.admin_key.display()),
            "--enable-priority-and-fairness=false".into(),
            "--profiling=false".into(),
            "--v=1".into(),
        ];
        args.extend(crate::rbac::audit_args(&self.dir));
        if let Some(cfg) = encryption_config {
            args.push(format!("--encryption-provider-config={}", cfg.display()));
            args.push("--encryption-provider-config-automatic-reload=true".into());
        }
        args
    }

    /// Starts the API server and waits until `/readyz` says ok.
    pub async fn start(&self, encryption_config: Option<&Path>, kubeconfig: &Path) -> Component {
        crate::rbac::record_apiserver(&self.dir, "starting");
        let mut component = Component::start(
            "kube-apiserver",
            &self.dir,
            &self.bin,
            &self.args(encryption_config),
        );
        let client = crate::testbed::client_from_kubeconfig(kubeconfig).await;
        wait_for("kube-apiserver /readyz", Duration::from_secs(120), || {
            component.assert_running();
            let client = client.clone();
            async move {
                let req = http::Request::get("/readyz")
                    .body(Vec::new())
                    .map_err(|e| e.to_string())?;
                let body = client.request_text(req).await.map_err(|e| e.to_string())?;
                if body.trim() == "ok" {
                    Ok(())
                } else {
                    Err(body)
                }
            }
        })
        .await;
        crate::rbac::record_apiserver(&self.dir, "ready");
        component
    }
}

/// Writes an admin kubeconfig (certificates inline) for the API server at `url`.
pub(crate) fn write_kubeconfig(path: &Path, url: &str, pki: &Pki) {
    let read = |p: &PathBuf| B64.encode(std::fs::read(p).expect("read PKI file"));
    let user = format!(
        "client-certificate-data: {}\n    client-key-data: {}",
        read(&pki.admin_cert),
        read(&pki.admin_key)
    );
    write_kubeconfig_for(path, url, pki, &user);
}

/// Writes a kubeconfig that authenticates with a bearer `token` (a ServiceAccount's).
pub(crate) fn write_token_kubeconfig(path: &Path, url: &str, pki: &Pki, token: &str) {
    write_kubeconfig_for(path, url, pki, &format!("token: {token}"));
}

fn write_kubeconfig_for(path: &Path, url: &str, pki: &Pki, user: &str) {
    let ca = B64.encode(std::fs::read(&pki.ca_cert).expect("read PKI file"));
    let yaml = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: testbed
  cluster:
    server: {url}
    certificate-authority-data: {ca}
users:
- name: admin
  user:
    {user}
contexts:
- name: testbed
  context:
    cluster: testbed
    user: admin
current-context: testbed
"
    );
    std::fs::write(path, yaml).expect("write kubeconfig");
}

/// Starts kube-controller-manager (garbage collector, namespaces, service accounts,
/// DaemonSets, …) against the API server.
pub(crate) fn start_controller_manager(
    bins: &Binaries,
    dir: &Path,
    kubeconfig: &Path,
    pki: &Pki,
) -> Component {
    let args = vec![
        format!("--kubeconfig={}", kubeconfig.display()),
        "--leader-elect=false".into(),
        "--secure-port=0".into(),
        "--controllers=*".into(),
        format!("--root-ca-file={}", pki.ca_cert.display()),
        format!(
            "--service-account-private-key-file={}",
            pki.sa_signing_key.display()
        ),
        "--use-service-account-credentials=false".into(),
        "--concurrent-gc-syncs=5".into(),
        "--v=1".into(),
    ];
    Component::start(
        "kube-controller-manager",
        dir,
        &bins.kube_controller_manager,
        &args,
    )
}
