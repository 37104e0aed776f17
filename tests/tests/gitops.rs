//! GitOps health: Flux's kstatus and Argo CD's Lua health check (run by their own code, see
//! tests/testbed/gitops-health) read KubeBao's status conditions the same, documented way.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kubebao_testbed::Binaries;
use serde_json::{Value, json};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

/// (kstatus, Argo CD) health of each object, by the real implementations.
fn health(objects: &[Value]) -> Vec<(String, String)> {
    let mut child = Command::new(Binaries::locate().gitops_health)
        .arg(repo().join("deploy/argocd/health.lua"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run gitops-health");
    let list = json!({"apiVersion": "v1", "kind": "List", "items": objects});
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(list.to_string().as_bytes())
        .expect("write objects");
    let out = child.wait_with_output().expect("gitops-health output");
    assert!(out.status.success(), "gitops-health failed");
    let results: Vec<Value> = serde_json::from_slice(&out.stdout).expect("gitops-health JSON");
    results
        .iter()
        .map(|r| {
            (
                r["kstatus"].as_str().unwrap().to_string(),
                r["argocd"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn object(kind: &str, generation: i64, observed: i64, conditions: &[(&str, &str, &str)]) -> Value {
    let conditions: Vec<Value> = conditions
        .iter()
        .map(|(t, s, reason)| {
            json!({"type": t, "status": s, "reason": reason, "message": format!("{t} is {s}: {reason}"),
                   "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": observed})
        })
        .collect();
    json!({
        "apiVersion": "kubebao.io/v1alpha1", "kind": kind,
        "metadata": {"name": "x", "generation": generation},
        "status": {"observedGeneration": observed, "conditions": conditions}
    })
}

#[test]
fn flux_and_argocd_read_kubebao_conditions_the_same_way() {
    let cases: Vec<(Value, &str, &str)> = ["BaoSecret", "BaoPolicy", "KubeBaoInstallation"]
        .into_iter()
        .flat_map(|kind| {
            vec![
                (
                    object(
                        kind,
                        1,
                        1,
                        &[
                            ("Ready", "True", "Synced"),
                            ("Reconciling", "False", "Synced"),
                            ("Stalled", "False", "Synced"),
                        ],
                    ),
                    "Current",
                    "Healthy",
                ),
                (
                    object(kind, 2, 1, &[("Ready", "True", "Synced")]),
                    "InProgress",
                    "Progressing",
                ),
                (
                    object(
                        kind,
                        1,
                        1,
                        &[
                            ("Ready", "False", "OpenBaoUnavailable"),
                            ("Reconciling", "True", "OpenBaoUnavailable"),
                        ],
                    ),
                    "InProgress",
                    "Progressing",
                ),
                (
                    object(
                        kind,
                        1,
                        1,
                        &[
                            ("Ready", "False", "PermissionDenied"),
                            ("Stalled", "True", "PermissionDenied"),
                        ],
                    ),
                    "Failed",
                    "Degraded",
                ),
            ]
        })
        .collect();
    let objects: Vec<Value> = cases.iter().map(|(o, _, _)| o.clone()).collect();
    let got = health(&objects);
    for ((obj, kstatus, argocd), (got_k, got_a)) in cases.iter().zip(got) {
        let what = format!("{} {}", obj["kind"], obj["status"]);
        assert_eq!(got_k, *kstatus, "kstatus for {what}");
        assert_eq!(got_a, *argocd, "Argo CD for {what}");
    }
}

/// kstatus cannot tell anything from an object with no status and calls it Current; this is why
/// the operator writes `Reconciling=True` with `observedGeneration` on first sight. Argo CD's
/// check says Progressing.
#[test]
fn a_new_object_without_status_is_progressing_for_argocd_and_opaque_to_kstatus() {
    let obj = json!({"apiVersion": "kubebao.io/v1alpha1", "kind": "BaoSecret", "metadata": {"name": "new", "generation": 1}});
    assert_eq!(
        health(&[obj]),
        vec![("Current".to_string(), "Progressing".to_string())]
    );
}

#[test]
fn argocd_cm_patch_embeds_the_health_script_for_every_kind() {
    let script =
        std::fs::read_to_string(repo().join("deploy/argocd/health.lua")).expect("health.lua");
    let patch =
        std::fs::read_to_string(repo().join("deploy/argocd/argocd-cm-patch.yaml")).expect("patch");
    let indented: String = script
        .lines()
        .map(|l| {
            if l.is_empty() {
                "\n".to_string()
            } else {
                format!("    {l}\n")
            }
        })
        .collect();
    for kind in ["BaoSecret", "BaoPolicy", "KubeBaoInstallation"] {
        let key = format!("  resource.customizations.health.kubebao.io_{kind}: |\n");
        let start = patch
            .find(&key)
            .unwrap_or_else(|| panic!("no health check for {kind}"))
            + key.len();
        assert!(
            patch[start..].starts_with(&indented),
            "the {kind} check differs from deploy/argocd/health.lua"
        );
    }
}
