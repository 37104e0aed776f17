//! Least privilege, measured. Every test bed's API server keeps an audit log of what
//! ServiceAccounts call; the operator runs in the e2e suite as the chart's own ServiceAccount with
//! the chart's own RBAC ([`Testbed::operator_kubeconfig`]). After the suite, `kubebao-rbac-audit`
//! reads every bed's log and fails when KubeBao's RBAC grants a permission no KubeBao identity
//! used, or when a call was denied. `make test` sets [`AUDIT_DIR_ENV`] so the logs outlive the beds.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use k8s_openapi::jiff::Timestamp;
use serde::Deserialize;

use crate::Testbed;

/// Directory where every test bed writes its API server's audit log (`<bed>.log`) and the
/// operator identities it created (`<bed>.identities`). Unset: the bed's own directory.
pub const AUDIT_DIR_ENV: &str = "KUBEBAO_AUDIT_DIR";

/// Only ServiceAccounts' requests, without bodies: small, and all that RBAC decides on.
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    userGroups: [\"system:serviceaccounts\"]
  - level: None
";

/// Where a test bed whose files live in `bed_dir` keeps a file named `<bed>.<ext>`.
fn audit_file(bed_dir: &Path, ext: &str) -> PathBuf {
    let bed = bed_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "testbed".into());
    match std::env::var_os(AUDIT_DIR_ENV) {
        Some(dir) => {
            std::fs::create_dir_all(&dir).expect("create the audit log directory");
            PathBuf::from(dir).join(format!("{bed}.{ext}"))
        }
        None => bed_dir.join(format!("audit.{ext}")),
    }
}

/// The API server flags that turn the audit log on (written once per bed, kept across restarts).
pub(crate) fn audit_args(bed_dir: &Path) -> Vec<String> {
    let policy = bed_dir.join("audit-policy.yaml");
    std::fs::write(&policy, AUDIT_POLICY).expect("write the audit policy");
    vec![
        format!("--audit-policy-file={}", policy.display()),
        format!("--audit-log-path={}", audit_file(bed_dir, "log").display()),
        "--audit-log-format=json".into(),
    ]
}

/// The chart, as users install it.
fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/kubebao")
}

impl Testbed {
    /// A kubeconfig for the operator acting as the chart's ServiceAccount, with exactly the
    /// chart's RBAC (rendered by helm for a release `kubebao-<namespace>` in `namespace`; the
    /// namespace is created if needed). The operator's `--namespace` must be `namespace`: the
    /// chart grants its Lease there only. The identity is recorded for `kubebao-rbac-audit`.
    pub fn operator_kubeconfig(&self, namespace: &str) -> PathBuf {
        let release: String = format!("kubebao-{namespace}").chars().take(53).collect();
        let release = release.trim_end_matches('-').to_string();
        let path = self.dir().join(format!("kubeconfig-{release}"));
        if path.exists() {
            return path;
        }
        let _ = self.try_kubectl(&["create", "namespace", namespace], "");
        self.apply(&render_chart(
            &self.binaries().helm,
            &release,
            namespace,
            &[],
        ));
        // The API server's RBAC cache learns new bindings a moment later: an operator started
        // before that would see 403s that no user sees.
        let user = format!("system:serviceaccount:{namespace}:{release}");
        self.wait_until_allowed(&user, "watch", "baopolicies.kubebao.io", None);
        self.wait_until_allowed(
            &user,
            "create",
            "leases.coordination.k8s.io",
            Some(namespace),
        );
        // The API server's own audience, for a day: longer than any test.
        let token = self.kubectl(&[
            "create",
            "token",
            &release,
            "--namespace",
            namespace,
            "--duration=24h",
        ]);
        let url = self.apiserver_url();
        // Written aside and renamed: a concurrent caller never reads half a file.
        let partial = path.with_extension("partial");
        crate::kube_cluster::write_token_kubeconfig(&partial, &url, self.pki(), token.trim());
        std::fs::rename(&partial, &path).expect("write the operator's kubeconfig");
        record_operator(self.dir(), &user);
        path
    }

    /// Waits until RBAC lets `user` do `verb` on `resource` (`kubectl auth can-i`).
    fn wait_until_allowed(&self, user: &str, verb: &str, resource: &str, namespace: Option<&str>) {
        let as_user = format!("--as={user}");
        let mut args = vec!["auth", "can-i", verb, resource, as_user.as_str()];
        if let Some(ns) = namespace {
            args.extend(["--namespace", ns]);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while self.try_kubectl(&args, "").map(|o| o.trim() == "yes") != Ok(true) {
            assert!(
                std::time::Instant::now() < deadline,
                "RBAC did not let {user} {verb} {resource} within 30 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Records that `username` is a KubeBao operator running under the chart's RBAC (for a test
    /// that installs the chart itself, e.g. with helm).
    pub fn record_operator_identity(&self, username: &str) {
        record_operator(self.dir(), username);
    }

    /// Records that an uninstall (e.g. `helm uninstall`) of operator `username` begins now: its
    /// RBAC may go before its pods, whose last calls are then refused.
    pub fn record_uninstall(&self, username: &str) {
        record(
            self.dir(),
            &format!("uninstalled {username} {}", Timestamp::now()),
        );
    }

    /// Marks this bed as one where tests try crossings as an attacker would: its refused calls
    /// are the crossings the test asserts, counted by `kubebao-rbac-audit`, not failures.
    pub fn record_attacks(&self) {
        record(self.dir(), "attacks");
    }
}

fn record_operator(bed_dir: &Path, username: &str) {
    record(bed_dir, &format!("operator {username}"));
}

/// Records that the bed's API server is starting (`starting`) or ready (`ready`): until it is
/// ready its authorizer may not have loaded RBAC yet, and refuses what RBAC grants.
pub(crate) fn record_apiserver(bed_dir: &Path, what: &str) {
    record(bed_dir, &format!("apiserver_{what} {}", Timestamp::now()));
}

fn record(bed_dir: &Path, line: &str) {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(audit_file(bed_dir, "identities"))
        .expect("open the identities file");
    writeln!(file, "{line}").expect("record in the identities file");
}

/// The chart's ServiceAccount and operator RBAC for a release in `namespace`.
pub fn render_chart(helm: &Path, release: &str, namespace: &str, values: &[&str]) -> String {
    let chart = chart_dir();
    let mut cmd = std::process::Command::new(helm);
    cmd.args(["template", release])
        .arg(&chart)
        .args(["--namespace", namespace])
        .args(["--show-only", "templates/serviceaccount.yaml"])
        .args(["--show-only", "templates/rbac.yaml"]);
    for v in values {
        cmd.args(["--set", v]);
    }
    let out = cmd.output().expect("run helm");
    assert!(
        out.status.success(),
        "helm template of the chart's RBAC failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("helm output is UTF-8")
}

/// One permission as RBAC grants it: API group, resource (`pods`, `serviceaccounts/token`), verb.
pub type Permission = (String, String, String);

/// Who a request came from, in KubeBao's terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Identity {
    /// The operator (the chart's ServiceAccount).
    Operator,
    /// The CSI provider's ServiceAccount (`kubebao-csi`, created by a KubeBaoInstallation).
    Csi,
    /// The KMS node installer's ServiceAccount (`kubebao-installer`).
    Installer,
}

/// The permissions every `Role`/`ClusterRole` bound to ServiceAccount `sa` grants in `yaml`
/// (several documents, as `helm template` prints them).
pub fn granted(yaml: &str, sa: &str) -> BTreeSet<Permission> {
    #[derive(Deserialize)]
    struct Doc {
        kind: Option<String>,
        metadata: Option<Meta>,
        #[serde(default)]
        rules: Vec<Rule>,
        #[serde(rename = "roleRef")]
        role_ref: Option<Meta>,
        #[serde(default)]
        subjects: Vec<Meta>,
    }
    #[derive(Deserialize)]
    struct Meta {
        name: String,
    }
    #[derive(Deserialize)]
    struct Rule {
        #[serde(default, rename = "apiGroups")]
        api_groups: Vec<String>,
        #[serde(default)]
        resources: Vec<String>,
        #[serde(default)]
        verbs: Vec<String>,
    }
    let docs: Vec<Doc> = serde_saphyr::from_multiple(yaml).expect("RBAC YAML parses");
    let bound: BTreeSet<&str> = docs
        .iter()
        .filter(|d| d.subjects.iter().any(|s| s.name == sa))
        .filter_map(|d| d.role_ref.as_ref().map(|r| r.name.as_str()))
        .collect();
    let mut out = BTreeSet::new();
    for doc in &docs {
        let is_role = matches!(doc.kind.as_deref(), Some("Role" | "ClusterRole"));
        let name = doc.metadata.as_ref().map(|m| m.name.as_str());
        if !is_role || !name.is_some_and(|n| bound.contains(n)) {
            continue;
        }
        for rule in &doc.rules {
            for g in &rule.api_groups {
                for r in &rule.resources {
                    for v in &rule.verbs {
                        out.insert((g.clone(), r.clone(), v.clone()));
                    }
                }
            }
        }
    }
    out
}

/// What the audit logs show for KubeBao's identities.
#[derive(Debug, Default)]
pub struct Usage {
    /// Permissions used (requests answered with anything but 403), by identity.
    pub used: BTreeMap<Identity, BTreeSet<Permission>>,
    /// Requests refused with 403: identity, permission, namespace.
    pub denied: BTreeSet<(Identity, Permission, String)>,
    /// Requests refused with 403 on beds where tests try crossings as attackers.
    pub crossings_refused: usize,
    /// Requests refused with 403 after an uninstall began removing the caller's RBAC.
    pub refused_while_uninstalling: usize,
    /// Requests refused with 403 while the API server was (re)starting (RBAC not loaded yet).
    pub refused_while_apiserver_starts: usize,
    /// Audit events read (of KubeBao's identities).
    pub events: usize,
}

/// What tests recorded about one bed (its `<bed>.identities` file, one mark per line).
#[derive(Debug, Default)]
pub struct Marks {
    /// `operator <username>`: the operator's identities on this bed.
    pub operators: BTreeSet<String>,
    /// `attacks`: tests try crossings here.
    pub attacks: bool,
    /// `uninstalled <username> <time>`: an uninstall began removing that identity's RBAC.
    pub uninstalled: BTreeMap<String, Timestamp>,
    /// `apiserver_starting <time>` … `apiserver_ready <time>`: the API server (re)starting.
    pub apiserver_starting: Vec<(Timestamp, Option<Timestamp>)>,
}

impl Marks {
    /// Parses a `<bed>.identities` file.
    pub fn parse(text: &str) -> Marks {
        let mut marks = Marks::default();
        for line in text.lines() {
            let words: Vec<&str> = line.split(' ').collect();
            match words[..] {
                ["operator", user] => {
                    marks.operators.insert(user.to_string());
                }
                ["attacks"] => marks.attacks = true,
                ["apiserver_starting", at] => {
                    if let Ok(at) = at.parse() {
                        marks.apiserver_starting.push((at, None));
                    }
                }
                ["apiserver_ready", at] => {
                    if let (Some(last), Ok(at)) = (marks.apiserver_starting.last_mut(), at.parse())
                    {
                        last.1 = Some(at);
                    }
                }
                ["uninstalled", user, at] => {
                    if let Ok(at) = at.parse() {
                        marks.uninstalled.insert(user.to_string(), at);
                    }
                }
                _ => {}
            }
        }
        marks
    }
}

/// Reads every `<bed>.log` in `dir`, with the `<bed>.identities` next to it.
pub fn read_usage(dir: &Path) -> Result<Usage, String> {
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
    let mut usage = Usage::default();
    for entry in
        std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?
    {
        let log = entry.map_err(|e| e.to_string())?.path();
        if log.extension().and_then(|e| e.to_str()) != Some("log") {
            continue;
        }
        let marks = Marks::parse(&read(&log.with_extension("identities")).unwrap_or_default());
        for line in read(&log)?.lines() {
            usage.add(line, &marks);
        }
    }
    Ok(usage)
}

impl Usage {
    /// Adds one audit event (a JSON line); events of other identities are skipped. On a bed
    /// where tests attack, a refusal counts as a refused crossing; after an uninstall began
    /// removing an identity's RBAC, its refusals are the uninstall's, not RBAC gaps.
    pub fn add(&mut self, line: &str, marks: &Marks) {
        #[derive(Deserialize)]
        struct Event {
            user: User,
            verb: String,
            #[serde(rename = "objectRef")]
            object: Option<Object>,
            #[serde(rename = "responseStatus")]
            status: Option<Status>,
            #[serde(rename = "requestReceivedTimestamp")]
            received: Option<String>,
        }
        #[derive(Deserialize)]
        struct User {
            username: String,
        }
        #[derive(Deserialize)]
        struct Object {
            resource: Option<String>,
            subresource: Option<String>,
            #[serde(rename = "apiGroup", default)]
            api_group: String,
            #[serde(default)]
            namespace: String,
        }
        #[derive(Deserialize)]
        struct Status {
            code: Option<u16>,
        }
        let Ok(event) = serde_json::from_str::<Event>(line) else {
            return;
        };
        let who = if marks.operators.contains(&event.user.username) {
            Identity::Operator
        } else {
            match event.user.username.rsplit(':').next() {
                Some("kubebao-csi") => Identity::Csi,
                Some("kubebao-installer") => Identity::Installer,
                _ => return,
            }
        };
        // Non-resource requests (discovery, /version) are not RBAC resource rules.
        let Some(object) = event.object else { return };
        let Some(resource) = object.resource else {
            return;
        };
        let resource = match object.subresource {
            Some(sub) => format!("{resource}/{sub}"),
            None => resource,
        };
        let permission = (object.api_group, resource, event.verb);
        self.events += 1;
        let received = event.received.and_then(|t| t.parse::<Timestamp>().ok());
        let uninstalling = marks
            .uninstalled
            .get(&event.user.username)
            .is_some_and(|began| received.is_some_and(|t| t >= *began));
        let starting = marks
            .apiserver_starting
            .iter()
            .any(|(from, to)| received.is_some_and(|t| t >= *from && to.is_none_or(|to| t <= to)));
        let code = event.status.and_then(|s| s.code);
        if code == Some(403) {
            if marks.attacks {
                self.crossings_refused += 1;
            } else if uninstalling {
                self.refused_while_uninstalling += 1;
            } else if starting {
                self.refused_while_apiserver_starts += 1;
            } else {
                self.denied.insert((who, permission, object.namespace));
            }
        } else {
            let used = self.used.entry(who).or_default();
            // A server-side apply that creates the object (201) is a `patch` request the API
            // server also authorizes as `create`.
            if permission.2 == "patch" && code == Some(201) {
                used.insert((permission.0.clone(), permission.1.clone(), "create".into()));
            }
            used.insert(permission);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHART: &str = "kind: ClusterRole
metadata: {name: op}
rules:
  - apiGroups: ['']
    resources: [secrets]
    verbs: [get, list]
---
kind: ClusterRole
metadata: {name: other}
rules:
  - apiGroups: ['']
    resources: [pods]
    verbs: [get]
---
kind: ClusterRoleBinding
metadata: {name: op}
roleRef: {name: op}
subjects: [{kind: ServiceAccount, name: kubebao, namespace: ns}]
";

    #[test]
    fn granted_takes_only_the_roles_bound_to_the_service_account() {
        let g = granted(CHART, "kubebao");
        let s = |v: &str| (String::new(), "secrets".to_string(), v.to_string());
        assert_eq!(g, BTreeSet::from([s("get"), s("list")]));
        assert!(granted(CHART, "someone-else").is_empty());
    }

    #[test]
    fn usage_sorts_audit_events_by_identity_and_answer() {
        let ops = Marks::parse("operator system:serviceaccount:ns:kubebao\n");
        let attacks = Marks::parse("attacks\n");
        let mut u = Usage::default();
        let event = |user: &str, verb: &str, res: &str, sub: &str, code: u16| {
            format!(
                r#"{{"user":{{"username":"{user}"}},"verb":"{verb}","objectRef":{{"resource":"{res}","subresource":{sub},"namespace":"a"}},"responseStatus":{{"code":{code}}}}}"#
            )
        };
        u.add(
            &event(
                "system:serviceaccount:ns:kubebao",
                "get",
                "secrets",
                "null",
                200,
            ),
            &ops,
        );
        u.add(
            &event(
                "system:serviceaccount:ns:kubebao",
                "create",
                "serviceaccounts",
                "\"token\"",
                403,
            ),
            &ops,
        );
        u.add(
            &event(
                "system:serviceaccount:kube-system:kubebao-csi",
                "create",
                "tokenreviews",
                "null",
                201,
            ),
            &ops,
        );
        u.add(
            &event(
                "system:serviceaccount:x:someone",
                "get",
                "pods",
                "null",
                200,
            ),
            &ops,
        );
        u.add(
            r#"{"user":{"username":"system:serviceaccount:ns:kubebao"},"verb":"get"}"#,
            &ops,
        );
        u.add(
            &event(
                "system:serviceaccount:kube-system:kubebao-csi",
                "list",
                "secrets",
                "null",
                403,
            ),
            &attacks,
        );
        assert_eq!(u.events, 4);
        assert_eq!(
            u.crossings_refused, 1,
            "a refusal on an attack bed is a refused crossing"
        );
        let p = |r: &str, v: &str| (String::new(), r.to_string(), v.to_string());
        assert_eq!(
            u.used[&Identity::Operator],
            BTreeSet::from([p("secrets", "get")])
        );
        assert_eq!(
            u.used[&Identity::Csi],
            BTreeSet::from([p("tokenreviews", "create")])
        );
        assert_eq!(
            u.denied,
            BTreeSet::from([(
                Identity::Operator,
                p("serviceaccounts/token", "create"),
                "a".into()
            )])
        );
    }

    #[test]
    fn refusals_after_an_uninstall_began_are_the_uninstalls() {
        let marks = Marks::parse(
            "operator system:serviceaccount:ns:kubebao\n\
             uninstalled system:serviceaccount:ns:kubebao 2026-01-01T10:00:00Z\n",
        );
        let lease = |at: &str| {
            format!(
                r#"{{"user":{{"username":"system:serviceaccount:ns:kubebao"}},"verb":"get","objectRef":{{"resource":"leases","apiGroup":"coordination.k8s.io","namespace":"ns"}},"responseStatus":{{"code":403}},"requestReceivedTimestamp":"{at}"}}"#
            )
        };
        let mut u = Usage::default();
        u.add(&lease("2026-01-01T10:00:01.5Z"), &marks);
        assert_eq!((u.refused_while_uninstalling, u.denied.len()), (1, 0));
        u.add(&lease("2026-01-01T09:59:59Z"), &marks);
        assert_eq!(
            u.denied.len(),
            1,
            "before the uninstall, a refusal is a gap"
        );
    }

    #[test]
    fn an_apply_that_creates_uses_create_too() {
        let marks = Marks::parse("operator system:serviceaccount:ns:kubebao\n");
        let apply = |code: u16| {
            format!(
                r#"{{"user":{{"username":"system:serviceaccount:ns:kubebao"}},"verb":"patch","objectRef":{{"resource":"configmaps","namespace":"ns"}},"responseStatus":{{"code":{code}}}}}"#
            )
        };
        let mut u = Usage::default();
        u.add(&apply(200), &marks);
        let p = |v: &str| (String::new(), "configmaps".to_string(), v.to_string());
        assert_eq!(u.used[&Identity::Operator], BTreeSet::from([p("patch")]));
        u.add(&apply(201), &marks);
        assert_eq!(
            u.used[&Identity::Operator],
            BTreeSet::from([p("patch"), p("create")])
        );
    }

    #[test]
    fn refusals_while_the_api_server_starts_are_its_own() {
        let marks = Marks::parse(
            "operator system:serviceaccount:ns:kubebao\n\
             apiserver_starting 2026-01-01T10:00:00Z\n\
             apiserver_ready 2026-01-01T10:00:05Z\n",
        );
        let watch = |at: &str| {
            format!(
                r#"{{"user":{{"username":"system:serviceaccount:ns:kubebao"}},"verb":"watch","objectRef":{{"resource":"secrets"}},"responseStatus":{{"code":403}},"requestReceivedTimestamp":"{at}"}}"#
            )
        };
        let mut u = Usage::default();
        u.add(&watch("2026-01-01T10:00:04Z"), &marks);
        assert_eq!((u.refused_while_apiserver_starts, u.denied.len()), (1, 0));
        u.add(&watch("2026-01-01T10:00:06Z"), &marks);
        assert_eq!(u.denied.len(), 1, "once ready, a refusal is a gap");
    }
}
