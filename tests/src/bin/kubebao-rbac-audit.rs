//! Least privilege, measured: after the e2e suite (`make test`), compares what KubeBao's
//! identities called (the test beds' API server audit logs in `$KUBEBAO_AUDIT_DIR`) with what
//! their RBAC grants: the chart's operator RBAC, and the CSI provider's and node installer's RBAC
//! a KubeBaoInstallation creates. Fails on a granted permission nothing used, and on a denied call.
//!
//! Usage: `kubebao-rbac-audit <audit dir>`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use kubebao_testbed::Binaries;
use kubebao_testbed::rbac::{
    AUDIT_DIR_ENV, Identity, Permission, granted, read_usage, render_chart,
};

/// Rights the API server checks without a request of their own, so never in the audit log:
/// - OwnerReferencesPermissionEnforcement (on in the test bed, as in OpenShift) lets the operator
///   set `blockOwnerDeletion` on the objects it owns only with `update` on the owner's finalizers;
/// - RBAC's escalation check lets the operator create the CSI provider's ClusterRole (TokenReview)
///   only if it holds that right itself.
const HELD_WITHOUT_A_REQUEST: &[(&str, &str, &str)] = &[
    ("kubebao.io", "baosecrets/finalizers", "update"),
    ("kubebao.io", "kubebaoinstallations/finalizers", "update"),
    ("authentication.k8s.io", "tokenreviews", "create"),
];

/// Refusals the product asks for and handles: the operator requests a tenant's token and turns
/// a 403 into `NamespaceNotEnabled` when `rbac.tokenNamespaces` leaves that namespace out.
const EXPECTED_DENIALS: &[(Identity, &str, &str, &str)] =
    &[(Identity::Operator, "", "serviceaccounts/token", "create")];

fn snapshot(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../operator/src/installation/render/snapshots")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn show(p: &Permission) -> String {
    let group = if p.0.is_empty() { "core" } else { &p.0 };
    format!("{:<6} {}/{}", p.2, group, p.1)
}

fn main() -> ExitCode {
    let dir = std::env::args()
        .nth(1)
        .or_else(|| std::env::var(AUDIT_DIR_ENV).ok())
        .map(PathBuf::from)
        .expect("usage: kubebao-rbac-audit <audit dir> (the e2e suite's audit logs)");
    let usage = match read_usage(&dir) {
        Ok(u) if u.events > 0 => u,
        Ok(_) => {
            eprintln!(
                "no request of a KubeBao identity in the audit logs in {}: run the e2e suite \
                 with {AUDIT_DIR_ENV} set first (make test does)",
                dir.display()
            );
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let chart = render_chart(&Binaries::locate().helm, "kubebao", "kubebao", &[]);
    let grants = [
        (Identity::Operator, granted(&chart, "kubebao")),
        (Identity::Csi, granted(&snapshot("csi.yaml"), "kubebao-csi")),
        (
            Identity::Installer,
            granted(&snapshot("installer-daemonset.yaml"), "kubebao-installer"),
        ),
    ];
    let mut failed = false;
    println!(
        "RBAC, measured: {} requests of KubeBao identities in {}",
        usage.events,
        dir.display()
    );
    for (who, grant) in &grants {
        let mut used = usage.used.get(who).cloned().unwrap_or_default();
        if *who == Identity::Operator {
            used.extend(
                HELD_WITHOUT_A_REQUEST
                    .iter()
                    .map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string())),
            );
        }
        let unused: BTreeSet<_> = grant.difference(&used).collect();
        println!("\n{who:?}: {} granted, {} used", grant.len(), used.len());
        for p in grant {
            let mark = if unused.contains(p) { "UNUSED" } else { "used" };
            println!("  {mark:<6} {}", show(p));
        }
        for p in used.difference(grant) {
            println!("  extra  {} (granted by a built-in role)", show(p));
        }
        failed |= !unused.is_empty();
    }
    for (who, p, ns) in &usage.denied {
        let expected = EXPECTED_DENIALS.iter().any(|(w, g, r, v)| {
            w == who && (*g, *r, *v) == (p.0.as_str(), p.1.as_str(), p.2.as_str())
        });
        let mark = if expected {
            "refused as designed"
        } else {
            "DENIED"
        };
        println!("{mark}: {who:?} {} in namespace {ns:?}", show(p));
        failed |= !expected;
    }
    println!(
        "\n{} crossings tried as an attacker (agent_boundary and friends) were refused; {} calls \
         were refused after an uninstall began removing the caller's RBAC, {} while the API \
         server (re)started and had not loaded RBAC yet",
        usage.crossings_refused,
        usage.refused_while_uninstalling,
        usage.refused_while_apiserver_starts
    );
    if failed {
        eprintln!(
            "\nRBAC is not least privilege: remove the UNUSED permissions from the chart \
             (charts/kubebao/templates/rbac.yaml, then `make manifest`) or the operator's \
             rendered RBAC, or grant what was DENIED"
        );
        return ExitCode::FAILURE;
    }
    println!("\nevery granted permission is used; no call was denied");
    ExitCode::SUCCESS
}
