//! GitOps health of what the real operator writes: Flux's kstatus and Argo CD's Lua health
//! check (run by their own code, tests/testbed/gitops-health) read a synced object as
//! Current/Healthy and a failing one as Failed/Degraded, never as a silent success.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use kubebao_testbed::{Component, Testbed, free_port, wait_for};
use reqwest::Method;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

/// (kstatus, Argo CD health) of one object as the API server returns it.
fn health(bed: &Testbed, kind: &str, name: &str, namespace: Option<&str>) -> (String, String) {
    let mut args = vec!["get", kind, name, "-o", "json"];
    if let Some(ns) = namespace {
        args.extend(["-n", ns]);
    }
    health_of(bed, &bed.try_kubectl(&args, "").expect("get object"))
}

/// (kstatus, Argo CD health) of an object given as JSON.
fn health_of(bed: &Testbed, object: &str) -> (String, String) {
    let mut child = Command::new(&bed.binaries().gitops_health)
        .arg(repo().join("deploy/argocd/health.lua"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run gitops-health");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(object.as_bytes())
        .expect("write object");
    let out = child.wait_with_output().expect("gitops-health output");
    let results: Vec<Value> = serde_json::from_slice(&out.stdout).expect("gitops-health JSON");
    (
        results[0]["kstatus"].as_str().unwrap().into(),
        results[0]["argocd"].as_str().unwrap().into(),
    )
}

async fn wait_health(
    bed: &Testbed,
    operator: &mut Component,
    kind: &str,
    name: &str,
    namespace: Option<&str>,
    want: (&str, &str),
) {
    wait_for(&format!("{kind} {name} to read {want:?}"), WAIT, || {
        operator.assert_running();
        let got = health(bed, kind, name, namespace);
        async move {
            if got.0 == want.0 && got.1 == want.1 {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            }
        }
    })
    .await;
}

#[tokio::test]
async fn flux_and_argocd_see_synced_objects_healthy_and_failing_ones_degraded() {
    let bed = Testbed::shared().await;
    bed.enable_kubernetes_auth().await;
    let bao = bed.openbao();
    bao.enable_engine("secret", "kv", Some(2)).await;
    bao.root(
        Method::POST,
        "secret/data/team/app",
        Some(json!({"data": {"k": "v"}})),
    )
    .await;
    // A policy someone wrote by hand: a BaoPolicy claiming its name must not take it over.
    bao.root(
        Method::POST,
        "sys/policies/acl/hand-written",
        Some(json!({"policy": "path \"x/*\" { capabilities = [\"read\"] }"})),
    )
    .await;
    bed.install_crds();

    let token_file = bed.dir().join("gitops-operator-token");
    std::fs::write(&token_file, bao.root_token().expose()).expect("token file");
    let kubeconfig = bed.operator_kubeconfig("default").display().to_string();
    let port = free_port();
    let mut operator = Component::start_with_env(
        "kubebao-operator-gitops",
        bed.dir(),
        Path::new(env!("CARGO_BIN_EXE_kubebao-operator")),
        &[
            format!("--openbao-addr={}", bao.addr()),
            // The test bed's OpenBao listens on loopback over plain http.
            "--openbao-allow-plain-http".into(),
            format!("--openbao-token-file={}", token_file.display()),
            "--namespace=default".into(),
            "--leader-elect=false".into(),
            format!("--metrics-addr=127.0.0.1:{port}"),
        ],
        &[("KUBECONFIG", &kubeconfig)],
    );

    let ns = bed.namespace("gitops").await;
    let manifests = format!(
        r#"
apiVersion: kubebao.io/v1alpha1
kind: BaoPolicy
metadata: {{name: gitops-good}}
spec:
  rules:
    - path: "secret/data/team/*"
      capabilities: [read]
  roles:
    - name: gitops-reader
      boundServiceAccountNames: [default]
      boundServiceAccountNamespaces: ["{ns}"]
      audience: openbao
---
apiVersion: kubebao.io/v1alpha1
kind: BaoPolicy
metadata: {{name: gitops-conflict}}
spec:
  name: hand-written
  rules:
    - path: "secret/data/other/*"
      capabilities: [read]
---
apiVersion: kubebao.io/v1alpha1
kind: BaoSecret
metadata: {{name: good, namespace: "{ns}"}}
spec:
  secretPath: secret/data/team/app
  role: gitops-reader
  target: {{name: good}}
---
apiVersion: kubebao.io/v1alpha1
kind: BaoSecret
metadata: {{name: denied, namespace: "{ns}"}}
spec:
  secretPath: secret/data/elsewhere/app
  role: gitops-reader
  target: {{name: denied}}
"#
    );
    bed.apply(&manifests);

    wait_health(
        bed,
        &mut operator,
        "baopolicy",
        "gitops-good",
        None,
        ("Current", "Healthy"),
    )
    .await;
    wait_health(
        bed,
        &mut operator,
        "baopolicy",
        "gitops-conflict",
        None,
        ("Failed", "Degraded"),
    )
    .await;
    wait_health(
        bed,
        &mut operator,
        "baosecret",
        "good",
        Some(&ns),
        ("Current", "Healthy"),
    )
    .await;
    wait_health(
        bed,
        &mut operator,
        "baosecret",
        "denied",
        Some(&ns),
        ("Failed", "Degraded"),
    )
    .await;

    // A spec change reads InProgress until the operator has observed it, then Current again.
    // The patch's answer is the object before the operator can have seen the change.
    let patched = bed
        .try_kubectl(
            &[
                "patch",
                "baosecret",
                "good",
                "-n",
                &ns,
                "--type=merge",
                "-p",
                r#"{"spec":{"refreshInterval":"30m"}}"#,
                "-o",
                "json",
            ],
            "",
        )
        .expect("patch the BaoSecret");
    let unobserved: Value = serde_json::from_str(&patched).expect("patched object");
    assert_ne!(
        unobserved["metadata"]["generation"], unobserved["status"]["observedGeneration"],
        "the patch bumped the generation"
    );
    assert_eq!(
        health_of(bed, &patched),
        ("InProgress".to_string(), "Progressing".to_string()),
        "a change the operator has not observed yet"
    );
    wait_health(
        bed,
        &mut operator,
        "baosecret",
        "good",
        Some(&ns),
        ("Current", "Healthy"),
    )
    .await;
    let observed = bed
        .try_kubectl(
            &[
                "get",
                "baosecret",
                "good",
                "-n",
                &ns,
                "-o",
                "jsonpath={.metadata.generation}/{.status.observedGeneration}",
            ],
            "",
        )
        .expect("generation");
    let (generation, seen) = observed.split_once('/').expect("generation/observed");
    assert_eq!(
        generation, seen,
        "Current means the latest generation was observed"
    );
}
