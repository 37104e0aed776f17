//! The Helm chart and the one-file install manifest, checked with the real helm and accepted by
//! the real API server (server-side dry-run).

use std::path::{Path, PathBuf};
use std::process::Command;

use kubebao_testbed::node_image::upstream_csi_driver_chart;
use kubebao_testbed::{Binaries, Testbed, TestbedOptions};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn values_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("charts/kubebao/ci"))
        .expect("charts/kubebao/ci")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 3,
        "expected several values files in charts/kubebao/ci"
    );
    files
}

fn render(helm: &Path, values: &Path, namespace: &str) -> String {
    run(Command::new(helm)
        .current_dir(repo())
        .args([
            "template",
            "kubebao",
            "charts/kubebao",
            "--namespace",
            namespace,
            "--kube-version",
            "1.35.4",
            "-f",
        ])
        .arg(values))
}

#[test]
fn chart_passes_helm_lint_with_every_values_file() {
    let helm = Binaries::locate().helm;
    for values in values_files() {
        run(Command::new(&helm)
            .current_dir(repo())
            .args(["lint", "--strict", "charts/kubebao", "-f"])
            .arg(&values));
    }
}

#[test]
fn values_schema_rejects_a_bad_value() {
    let helm = Binaries::locate().helm;
    let out = Command::new(&helm)
        .current_dir(repo())
        .args([
            "template",
            "kubebao",
            "charts/kubebao",
            "--kube-version",
            "1.35.4",
            "--set",
            "global.openbao.authMethod=password",
        ])
        .output()
        .expect("run helm");
    assert!(
        !out.status.success(),
        "an unknown authMethod must be refused"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("authMethod"),
        "the error names the field"
    );
}

#[test]
fn seed_values_render_the_operator_and_the_csi_driver_object() {
    let helm = Binaries::locate().helm;
    let rendered = render(
        &helm,
        &repo().join("charts/kubebao/ci/seed-values.yaml"),
        "kubebao",
    );
    for kind in [
        "kind: Deployment",
        "kind: ClusterRole",
        "kind: ServiceAccount",
        "kind: CSIDriver",
        "name: baosecrets.kubebao.io",
        "name: baopolicies.kubebao.io",
    ] {
        assert!(
            rendered.contains(kind),
            "{kind} missing from the seed rendering"
        );
    }
    assert!(rendered.contains("https://openbao.example.com:8200"));
    assert!(
        rendered.contains("runAsNonRoot: true")
            && rendered.contains("readOnlyRootFilesystem: true")
    );
}

#[tokio::test]
async fn rendered_chart_is_accepted_by_the_api_server() {
    let bed = Testbed::shared().await;
    bed.install_crds();
    for values in values_files() {
        let ns = bed.namespace("chart").await;
        let file = bed.dir().join(format!("rendered-{ns}.yaml"));
        std::fs::write(&file, render(&bed.binaries().helm, &values, &ns)).expect("write rendering");
        bed.kubectl(&[
            "apply",
            "--dry-run=server",
            "-n",
            &ns,
            "-f",
            file.to_str().expect("path"),
        ]);
    }
}

#[test]
fn install_manifest_is_up_to_date() {
    let helm = Binaries::locate().helm;
    let fresh = run(Command::new(repo().join("deploy/render.sh")).arg(&helm));
    let committed =
        std::fs::read_to_string(repo().join("deploy/kubebao.yaml")).expect("deploy/kubebao.yaml");
    assert!(
        fresh == committed,
        "deploy/kubebao.yaml is stale: run `make manifest` and commit it"
    );
}

#[test]
fn chart_crds_are_the_generated_crds() {
    let generated =
        std::fs::read_to_string(repo().join("crds/kubebao.io.yaml")).expect("crds/kubebao.io.yaml");
    let in_chart =
        std::fs::read_to_string(repo().join("charts/kubebao/files/crds/kubebao.io.yaml"))
            .expect("chart copy of the CRDs");
    assert!(
        generated == in_chart,
        "charts/kubebao/files/crds is stale: run `make crds` and commit it"
    );
}

/// Maps whose keys are the user's own (labels, annotations, node selectors, resource names).
const FREE_FORM: [&str; 5] = [
    "nodeSelector",
    "annotations",
    "labels",
    "requests",
    "limits",
];

/// Every map of values.yaml where the schema knows the keys, as a path of keys.
fn keyed_maps(value: &serde_json::Value, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    let Some(map) = value.as_object() else { return };
    if path.last().is_some_and(|k| FREE_FORM.contains(&k.as_str())) {
        return;
    }
    out.push(path.clone());
    for (key, child) in map {
        path.push(key.clone());
        keyed_maps(child, path, out);
        path.pop();
    }
}

#[test]
fn values_schema_refuses_a_misspelt_key_at_every_level() {
    let helm = Binaries::locate().helm;
    let values: serde_json::Value = serde_saphyr::from_str(
        &std::fs::read_to_string(repo().join("charts/kubebao/values.yaml")).expect("values.yaml"),
    )
    .expect("values.yaml");
    let mut maps = Vec::new();
    keyed_maps(&values, &mut Vec::new(), &mut maps);
    // Empty by default, typed by the schema all the same.
    maps.push(vec!["operator".into(), "affinity".into()]);
    assert!(
        maps.len() >= 15,
        "expected every level of values.yaml, found {maps:?}"
    );
    for path in maps {
        // A typo users make: the first key of the map with a letter doubled, or a made-up key.
        let typo = values
            .pointer(&format!("/{}", path.join("/")))
            .and_then(|m| m.as_object())
            .and_then(|m| m.keys().next().cloned())
            .map(|k| format!("{k}{}", k.chars().last().unwrap_or('x')))
            .unwrap_or_else(|| "nodeAfinity".into());
        let mut key = path.clone();
        key.push(typo.clone());
        let out = Command::new(&helm)
            .current_dir(repo())
            .args(["template", "kubebao", "charts/kubebao", "--set"])
            .arg(format!("{}=true", key.join(".")))
            .output()
            .expect("run helm");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "the misspelt key {} was accepted",
            key.join(".")
        );
        assert!(
            stderr.contains(&typo),
            "the error for {} names the key: {stderr}",
            key.join(".")
        );
    }
}

/// `helm` against the test bed's API server; Err with its stderr when it fails.
fn helm_on(bed: &Testbed, args: &[&str]) -> Result<String, String> {
    let out = Command::new(&bed.binaries().helm)
        .current_dir(repo())
        .env("KUBECONFIG", bed.kubeconfig())
        .args(args)
        .output()
        .expect("run helm");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test]
async fn kubebao_chart_installs_next_to_the_upstream_driver_chart() {
    // A bed of its own: real installs and uninstalls of cluster-wide objects (the CSIDriver,
    // ClusterRoles) would race the other tests' dry runs of the same objects.
    let bed = &Testbed::start(TestbedOptions {
        controller_manager: false,
        openbao: false,
    })
    .await;
    let upstream = upstream_csi_driver_chart();
    let upstream = upstream.to_str().expect("path");
    // The driver's own chart owns the CSIDriver; KubeBao's audience goes into its tokenRequests,
    // next to another provider's.
    helm_on(
        bed,
        &[
            "install",
            "csi-secrets-store",
            upstream,
            "--namespace",
            "kube-system",
            // Its CRD-upgrade hook is a Job, which needs a node to run; its crds/ suffice.
            "--set",
            "linux.crds.enabled=false",
            // Rotation (requiresRepublish), as KubeBao's docs say to set it.
            "--set",
            "enableSecretRotation=true",
            "--set",
            "tokenRequests[0].audience=openbao",
            "--set",
            "tokenRequests[1].audience=api://other-provider",
        ],
    )
    .unwrap_or_else(|e| panic!("the upstream chart: {e}"));
    // KubeBao's chart next to it, leaving the CSIDriver to the driver's chart. (The CRDs come
    // from `crds/` here: other tests of this file apply them with kubectl.)
    helm_on(
        bed,
        &[
            "install",
            "kubebao",
            "charts/kubebao",
            "--namespace",
            "kubebao-coexist",
            "--create-namespace",
            "--set",
            "csi.driver.install=false,crds.enabled=false",
        ],
    )
    .unwrap_or_else(|e| panic!("KubeBao's chart next to the driver's: {e}"));
    // As JSON: k8s-openapi's CSIDriver type predates `serviceAccountTokenInSecrets`.
    let driver: serde_json::Value = serde_json::from_str(&bed.kubectl(&[
        "get",
        "csidriver",
        "secrets-store.csi.k8s.io",
        "-o",
        "json",
    ]))
    .expect("the CSIDriver as JSON");
    assert_eq!(
        driver["metadata"]["annotations"]["meta.helm.sh/release-name"], "csi-secrets-store",
        "one owner: the driver's chart"
    );
    let spec = &driver["spec"];
    assert_eq!(
        spec["tokenRequests"],
        serde_json::json!([{"audience": "openbao"}, {"audience": "api://other-provider"}]),
        "every provider's audience"
    );
    assert_eq!(spec["requiresRepublish"], true);
    assert_eq!(
        spec["serviceAccountTokenInSecrets"], true,
        "Kubernetes 1.35: tokens in NodePublishVolume's secrets"
    );
    // KubeBao's own CSIDriver next to the driver's chart is refused by helm (one owner per
    // object): the reason values.yaml says to set csi.driver.install=false then.
    let refused = helm_on(
        bed,
        &[
            "install",
            "kubebao-second",
            "charts/kubebao",
            "--namespace",
            "kubebao-coexist-2",
            "--create-namespace",
            "--set",
            "operator.enabled=false,crds.enabled=false,rbac.create=false,serviceAccount.create=false,metrics.service.enabled=false",
        ],
    )
    .expect_err("a second owner of the CSIDriver");
    assert!(
        refused.contains("CSIDriver") && refused.contains("secrets-store.csi.k8s.io"),
        "{refused}"
    );
    for (release, ns) in [
        ("kubebao", "kubebao-coexist"),
        ("csi-secrets-store", "kube-system"),
    ] {
        helm_on(bed, &["uninstall", release, "--namespace", ns])
            .unwrap_or_else(|e| panic!("uninstall {release}: {e}"));
    }
}
