//! Every example users copy, as written: the YAML blocks of the README and the files in
//! `examples/` are accepted by the real API server with strict field validation (an unknown or
//! misspelt field fails), and every Helm values example renders the chart.
//!
//! Objects are applied with a server-side dry run: the API server validates and admits them
//! exactly as it would store them, without putting BaoSecrets in `default` that operators of
//! other tests, sharing this test bed, would act on.

use std::path::{Path, PathBuf};
use std::process::Command;

use kubebao_testbed::{Binaries, Testbed, install_secrets_store_crds};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

/// One example: where it comes from (for the failure message) and its YAML text.
struct Example {
    origin: String,
    yaml: String,
}

/// The README's ```yaml blocks.
fn readme_examples() -> Vec<Example> {
    let text = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let mut examples = Vec::new();
    let mut block: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        match &mut block {
            None if line.trim_start().starts_with("```yaml") => {
                block = Some((i + 1, String::new()))
            }
            Some((start, yaml)) if line.trim_start().starts_with("```") => {
                examples.push(Example {
                    origin: format!("README.md line {start}"),
                    yaml: std::mem::take(yaml),
                });
                block = None;
            }
            Some((_, yaml)) => {
                yaml.push_str(line);
                yaml.push('\n');
            }
            None => {}
        }
    }
    assert!(block.is_none(), "README.md has an unclosed ```yaml block");
    assert!(
        examples.len() >= 5,
        "expected the README's YAML examples, found {}",
        examples.len()
    );
    examples
}

/// The files under `examples/` (recursively).
fn example_files() -> Vec<Example> {
    fn walk(dir: &Path, out: &mut Vec<Example>) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("dir entry").path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                out.push(Example {
                    origin: path
                        .strip_prefix(repo())
                        .expect("in the repository")
                        .display()
                        .to_string(),
                    yaml: std::fs::read_to_string(&path).expect("example file"),
                });
            }
        }
    }
    let mut out = Vec::new();
    walk(&repo().join("examples"), &mut out);
    assert!(out.len() >= 5, "expected the examples/ files");
    out
}

fn documents(example: &Example) -> Vec<Value> {
    example
        .yaml
        .split("\n---\n")
        .map(|doc| {
            serde_saphyr::from_str::<Value>(doc)
                .unwrap_or_else(|e| panic!("{}: not valid YAML: {e}", example.origin))
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn api_version(doc: &Value) -> &str {
    doc["apiVersion"].as_str().unwrap_or_default()
}

/// Renders the chart with `values` (YAML) by the real helm, with no other flag.
fn helm_template(values: &str, origin: &str) -> Result<String, String> {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), values).expect("write values");
    let out = Command::new(Binaries::locate().helm)
        .current_dir(repo())
        .args(["template", "kubebao", "charts/kubebao", "-f"])
        .arg(file.path())
        .output()
        .expect("run helm");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{origin}: helm template refused the values:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Helm values held by a GitOps object (Argo CD `valuesObject`, Flux `values`).
fn gitops_helm_values(doc: &Value) -> Option<&Value> {
    match doc["kind"].as_str() {
        Some("Application") => doc.pointer("/spec/source/helm/valuesObject"),
        Some("HelmRelease") => doc.pointer("/spec/values"),
        _ => None,
    }
}

/// Where a GitOps object points into this repository (only the chart ones do).
fn gitops_chart_path(doc: &Value) -> Option<&str> {
    match doc["kind"].as_str() {
        Some("Application") => doc.pointer("/spec/source/path")?.as_str(),
        Some("HelmRelease") => doc.pointer("/spec/chart/spec/chart")?.as_str(),
        _ => None,
    }
}

#[tokio::test]
async fn every_readme_and_examples_object_is_accepted_as_written() {
    let bed = Testbed::shared().await;
    bed.install_crds();
    install_secrets_store_crds(bed);
    let mut applied = 0;
    let mut failures = Vec::new();
    for example in readme_examples().into_iter().chain(example_files()) {
        let docs = documents(&example);
        let kinds: Vec<&str> = docs.iter().map(api_version).collect();
        // Helm values, EncryptionConfiguration files and GitOps objects have their own checks.
        if docs.is_empty()
            || kinds.iter().any(|v| {
                v.is_empty()
                    || v.starts_with("apiserver.config.k8s.io")
                    || v.contains("argoproj.io")
                    || v.contains("fluxcd.io")
            })
        {
            continue;
        }
        // A dry run stores nothing, so a pod could not find the ServiceAccount its own file
        // creates: those ServiceAccounts are created for real first (they grant nothing).
        for sa in docs.iter().filter(|d| d["kind"] == "ServiceAccount") {
            bed.apply(&serde_json::to_string(sa).expect("ServiceAccount as JSON"));
        }
        match bed.try_kubectl(
            &["apply", "--dry-run=server", "--validate=strict", "-f", "-"],
            &example.yaml,
        ) {
            Ok(_) => applied += docs.len(),
            Err(e) => failures.push(format!("{}: {e}", example.origin)),
        }
    }
    assert!(
        failures.is_empty(),
        "examples the API server refuses as written:\n{}",
        failures.join("\n")
    );
    assert!(applied >= 8, "only {applied} objects were applied");
}

#[test]
fn every_helm_values_example_renders_the_chart() {
    let mut rendered = 0;
    for example in readme_examples().into_iter().chain(example_files()) {
        for doc in documents(&example) {
            let values = if api_version(&doc).is_empty() {
                Some(doc.clone())
            } else {
                gitops_helm_values(&doc).cloned()
            };
            if let Some(values) = values {
                let yaml = serde_json::to_string(&values).expect("values as JSON (valid YAML)");
                helm_template(&yaml, &example.origin).unwrap_or_else(|e| panic!("{e}"));
                rendered += 1;
            }
            if let Some(path) = gitops_chart_path(&doc).filter(|p| p.contains("charts/")) {
                let chart = repo()
                    .join(path.trim_start_matches("./"))
                    .join("Chart.yaml");
                assert!(
                    chart.exists(),
                    "{}: points at {path}, which is not a chart in this repository",
                    example.origin
                );
            }
        }
    }
    assert!(
        rendered >= 3,
        "expected the README's and the GitOps examples' Helm values, found {rendered}"
    );
}

#[test]
fn readme_encryption_configuration_is_the_one_the_installer_writes() {
    let examples = readme_examples();
    let config = examples
        .iter()
        .flat_map(documents)
        .find(|d| d["kind"] == "EncryptionConfiguration")
        .expect("the README shows the EncryptionConfiguration");
    let kms = &config["resources"][0]["providers"][0]["kms"];
    assert_eq!(kms["apiVersion"], "v2", "KMS v2");
    assert_eq!(kms["name"], "kubebao", "the provider name in etcd's prefix");
    let values: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(repo().join("charts/kubebao/values.yaml")).expect("values.yaml"),
    )
    .expect("values.yaml");
    let socket = values["kms"]["socketPath"]
        .as_str()
        .expect("kms.socketPath");
    assert_eq!(
        kms["endpoint"],
        format!("unix://{socket}"),
        "the README's endpoint is the chart's default socket"
    );
    assert_eq!(
        config["resources"][0]["providers"][1],
        serde_json::json!({"identity": {}}),
        "identity stays last, so Secrets written before KMS remain readable"
    );
}

#[test]
fn plain_helm_template_needs_no_flags() {
    let out = helm_template("{}", "the chart's defaults").unwrap_or_else(|e| panic!("{e}"));
    assert!(out.contains("kind: Deployment"), "the operator is rendered");
}
