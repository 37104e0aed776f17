//! `make demo`: brings up the test bed (etcd, kube-apiserver, kube-controller-manager and
//! OpenBao on loopback) and keeps it running until Ctrl-C, then cleans everything up.

use std::os::unix::fs::PermissionsExt;

use kubebao_testbed::Testbed;

#[tokio::main]
async fn main() {
    println!(
        "Starting the KubeBao test bed (etcd, kube-apiserver, kube-controller-manager, OpenBao)…"
    );
    let bed = Testbed::start(Default::default()).await;
    bed.enable_kubernetes_auth().await;
    let token_file = bed.dir().join("openbao-root-token");
    std::fs::write(&token_file, bed.openbao().root_token().expose()).expect("write token file");
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))
        .expect("chmod token file");
    let kubectl = bed.binaries().kubectl.display().to_string();
    let bao = bed.binaries().bao.display().to_string();
    println!(
        "\nThe test bed is up.\n\
         \n  Kubernetes API:  {api}\
         \n  kubeconfig:      {kc}\
         \n  OpenBao:         {addr} (Kubernetes auth enabled at auth/kubernetes)\
         \n  root token file: {tf} (mode 0600)\
         \n\nTry:\
         \n  {kubectl} --kubeconfig {kc} get namespaces\
         \n  BAO_ADDR={addr} BAO_TOKEN=$(cat {tf}) {bao} status\
         \n\nPress Ctrl-C to stop and clean up.",
        api = bed.apiserver_url(),
        kc = bed.kubeconfig().display(),
        addr = bed.openbao().addr(),
        tf = token_file.display(),
    );
    tokio::signal::ctrl_c().await.expect("wait for Ctrl-C");
    println!("\nStopping the test bed…");
    drop(bed);
    println!("Stopped; temporary files removed.");
}
