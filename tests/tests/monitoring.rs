//! Monitoring as shipped in the chart: the PrometheusRule and the Grafana dashboard render to
//! valid YAML and JSON, and every metric their queries name is one the real operator exports
//! (scraped from the binary after it synced a BaoPolicy on the test bed).
//!
//! promtool is not available here (nothing is downloaded), so PromQL is read with a minimal
//! lexer ([`metric_names`]): enough to list the metric names a query uses, not to validate it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kubebao_testbed::conditions::wait_condition;
use kubebao_testbed::node_image::build_binaries;
use kubebao_testbed::{Binaries, Component, Testbed, free_port, wait_for};
use reqwest::Method;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(120);

/// The operator's own OpenBao policy (policies and roles only), as installed.
const OPERATOR_POLICY: &str = r#"
path "sys/policies/acl/*" { capabilities = ["create", "read", "update", "delete", "list"] }
path "auth/kubernetes/role/*" { capabilities = ["create", "read", "update", "delete", "list"] }
"#;

/// Metrics exported only once a BaoSecret wrote credentials that expire (a lease, a
/// certificate), which this test does not create.
const NEEDS_LEASED_CREDENTIALS: [&str; 1] = ["kubebao_operator_expiry_timestamp_seconds"];

/// The values that turn both on.
const ENABLED: [&str; 4] = [
    "--set",
    "metrics.prometheusRule.enabled=true",
    "--set",
    "metrics.grafanaDashboard.enabled=true",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

/// `helm template` of the chart into `namespace` with `values`; every document, parsed.
fn render(helm: &Path, namespace: &str, values: &[&str]) -> Vec<Value> {
    let out = Command::new(helm)
        .current_dir(repo())
        .args([
            "template",
            "kubebao",
            "charts/kubebao",
            "--namespace",
            namespace,
        ])
        .args(["--kube-version", "1.35.4"])
        .args(values)
        .output()
        .expect("run helm");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "helm template {values:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs: Vec<Value> = serde_saphyr::from_multiple(&stdout).expect("the rendering is YAML");
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// The PrometheusRule's alerting rules.
fn rules(docs: &[Value]) -> Vec<Value> {
    let rule = of_kind(docs, "PrometheusRule");
    assert_eq!(rule.len(), 1, "one PrometheusRule");
    rule[0]["spec"]["groups"]
        .as_array()
        .expect("spec.groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("group rules").clone())
        .collect()
}

/// The dashboard, parsed from its ConfigMap.
fn dashboard(docs: &[Value]) -> Value {
    let maps: Vec<_> = of_kind(docs, "ConfigMap")
        .into_iter()
        .filter(|c| c["data"]["kubebao.json"].is_string())
        .collect();
    assert_eq!(maps.len(), 1, "one dashboard ConfigMap");
    let text = maps[0]["data"]["kubebao.json"].as_str().expect("JSON text");
    serde_json::from_str(text).expect("the dashboard is JSON")
}

/// Every PromQL query of the dashboard's panels.
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().expect("a target's expr").to_string())
        .collect()
}

/// PromQL words that are not metric names when not followed by `(`.
const KEYWORDS: [&str; 22] = [
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
];

/// The metric names a PromQL query reads. Strings, label matchers `{…}` and ranges `[…]` are
/// dropped, as are the label lists of `by`/`without`/`on`/`ignoring`/`group_*`; what is left
/// is a metric name unless it is a number, a function (followed by `(`) or a keyword.
fn metric_names(query: &str) -> BTreeSet<String> {
    let mut plain = String::new();
    let (mut quote, mut depth) = (None, 0u32);
    for c in query.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'' | '`') => quote = Some(c),
            (None, '{' | '[') => depth += 1,
            (None, '}' | ']') => depth = depth.saturating_sub(1),
            (None, c) if depth == 0 => plain.push(c),
            _ => {}
        }
    }
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut tokens = Vec::new();
    let mut rest = plain.as_str();
    while let Some(c) = rest.chars().next() {
        let len = if word(c) {
            rest.find(|c| !word(c)).unwrap_or(rest.len())
        } else {
            c.len_utf8()
        };
        let token = &rest[..len];
        if !token.trim().is_empty() {
            tokens.push(token);
        }
        rest = &rest[len..];
    }
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < tokens.len() {
        let (token, next) = (tokens[i], tokens.get(i + 1).copied());
        let grouping = [
            "by",
            "without",
            "on",
            "ignoring",
            "group_left",
            "group_right",
        ];
        if grouping.contains(&token) && next == Some("(") {
            i += tokens[i..].iter().position(|t| *t == ")").unwrap_or(0);
        } else if token.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && next != Some("(")
            && !KEYWORDS.contains(&token)
        {
            names.insert(token.to_string());
        }
        i += 1;
    }
    names
}

/// The sample names the exposition declares: each `# TYPE` line's name, expanded the way
/// OpenMetrics writes its samples (counters `_total`, histograms `_bucket`/`_sum`/`_count`).
fn declared_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').expect("# TYPE <name> <type>");
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "gauge" => &[""],
            "histogram" => &["_bucket", "_sum", "_count"],
            other => panic!("metric {name} has a type this test does not know: {other}"),
        };
        names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
    }
    names
}

/// The names of the samples in the exposition.
fn sample_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn the_promql_reader_finds_metric_names_only() {
    let query = r#"sum by (kind, le) (rate(a_bucket{x!="{y}",le=~"1|2"}[$__rate_interval]))
        / on (kind) group_left (z) (b:recorded offset 5m) > bool 0.5 unless c or vector(0)"#;
    let names: Vec<_> = metric_names(query).into_iter().collect();
    assert_eq!(names, ["a_bucket", "b:recorded", "c"]);
}

#[test]
fn the_rule_and_the_dashboard_render_only_when_enabled_and_say_what_to_do() {
    let helm = Binaries::locate().helm;
    let defaults = render(&helm, "kubebao", &[]);
    assert!(of_kind(&defaults, "PrometheusRule").is_empty());
    assert!(
        of_kind(&defaults, "ConfigMap").is_empty(),
        "no dashboard by default"
    );
    let docs = render(&helm, "kubebao", &ENABLED);
    let rules = rules(&docs);
    assert_eq!(rules.len(), 5, "{rules:#?}");
    for rule in &rules {
        let alert = rule["alert"].as_str().expect("alert name");
        assert!(!metric_names(rule["expr"].as_str().expect("expr")).is_empty());
        assert!(rule["for"].is_string(), "{alert}: for");
        assert!(rule["labels"]["severity"].is_string(), "{alert}: severity");
        assert!(
            rule["annotations"]["summary"].is_string(),
            "{alert}: summary"
        );
        let description = rule["annotations"]["description"].as_str().unwrap_or("");
        assert!(
            description.contains("docs/troubleshooting.md"),
            "{alert}: the description says where to look: {description}"
        );
        // Helm must have left Prometheus's own templates for Prometheus.
        assert!(!description.contains("{{`"), "{alert}: {description}");
    }
    let dashboard = dashboard(&docs);
    assert_eq!(dashboard["uid"], "kubebao");
    let panels = dashboard["panels"].as_array().expect("panels");
    let ids: BTreeSet<_> = panels
        .iter()
        .map(|p| p["id"].as_u64().expect("id"))
        .collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    for p in panels {
        assert!(p["title"].is_string() && p["gridPos"]["w"].is_u64(), "{p}");
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
    }
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= panels.len(), "every panel queries");
    // The sidecar label and the namespace are configurable.
    let docs = render(
        &helm,
        "kubebao",
        &[
            ENABLED.as_slice(),
            &["--set", "metrics.grafanaDashboard.namespace=grafana"],
            &[
                "--set",
                "metrics.grafanaDashboard.labels.grafana_dashboard=kubebao",
            ],
        ]
        .concat(),
    );
    let map = of_kind(&docs, "ConfigMap")[0];
    assert_eq!(map["metadata"]["namespace"], "grafana");
    assert_eq!(map["metadata"]["labels"]["grafana_dashboard"], "kubebao");
    let out = Command::new(&helm)
        .current_dir(repo())
        .args(["lint", "--strict", "charts/kubebao"])
        .args(ENABLED)
        .output()
        .expect("run helm lint");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn gvk(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk("kubebao.io", "v1alpha1", kind))
}

/// The real operator on the test bed (no leader election), with the chart's RBAC and a token of
/// [`OPERATOR_POLICY`]; returns it and its /metrics URL once it is ready.
async fn start_operator(bed: &Testbed) -> (Component, String) {
    let bao = bed.openbao();
    bao.root(
        Method::POST,
        "sys/policies/acl/kubebao-operator",
        Some(json!({"policy": OPERATOR_POLICY})),
    )
    .await;
    let token = bao
        .root(
            Method::POST,
            "auth/token/create",
            Some(json!({"policies": ["kubebao-operator"], "ttl": "1h"})),
        )
        .await
        .expect("token response");
    let token_file = bed.dir().join("operator-token");
    let token = token["auth"]["client_token"].as_str().expect("token");
    std::fs::write(&token_file, token).expect("write the operator's token");
    // A copy, so a concurrent rebuild cannot change the binary under the test.
    let binary = bed.dir().join("kubebao-operator");
    std::fs::copy(
        build_binaries(&["kubebao-operator"]).join("kubebao-operator"),
        &binary,
    )
    .expect("copy the operator binary");
    let port = free_port();
    let kubeconfig = bed.operator_kubeconfig("kubebao-system");
    let mut operator = Component::start_with_env(
        "kubebao-operator",
        bed.dir(),
        &binary,
        &[
            format!("--openbao-addr={}", bao.addr()),
            "--openbao-allow-plain-http".into(),
            format!("--openbao-token-file={}", token_file.display()),
            "--namespace=kubebao-system".into(),
            "--pod-name=operator-0".into(),
            format!("--metrics-addr=127.0.0.1:{port}"),
            "--leader-elect=false".into(),
        ],
        &[("KUBECONFIG", &kubeconfig.display().to_string())],
    );
    let ready = format!("http://127.0.0.1:{port}/readyz");
    wait_for("the operator to be ready", WAIT, || {
        operator.assert_running();
        let ready = ready.clone();
        async move {
            match reqwest::get(&ready).await {
                Ok(r) if r.status().is_success() => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    (operator, format!("http://127.0.0.1:{port}/metrics"))
}

/// Waits until the exposition at `url` satisfies `check` (Err says what is missing).
async fn scrape_until(url: &str, what: &str, check: impl Fn(&str) -> Result<(), String>) -> String {
    wait_for(what, WAIT, || async {
        let text = reqwest::get(url)
            .await
            .map_err(|e| e.to_string())?
            .text()
            .await
            .map_err(|e| e.to_string())?;
        check(&text).map_err(|e| format!("{e}; /metrics:\n{text}"))?;
        Ok(text)
    })
    .await
}

#[tokio::test]
async fn every_metric_the_alerts_and_the_dashboard_query_is_exported() {
    let bed = Testbed::shared().await;
    bed.install_crds();
    let (_operator, url) = start_operator(bed).await;
    let name = "monitoring-probe";
    bed.apply(&format!(
        "apiVersion: kubebao.io/v1alpha1\nkind: BaoPolicy\nmetadata:\n  name: {name}\nspec:\n  rules:\n    - path: \"secret/data/monitoring/*\"\n      capabilities: [read]\n"
    ));
    let policies: Api<DynamicObject> = Api::all_with(bed.client().await, &gvk("BaoPolicy"));
    wait_condition(&policies, name, "Ready", "True", "Synced").await;
    let series = format!(
        "kubebao_operator_last_success_timestamp_seconds{{kind=\"BaoPolicy\",namespace=\"\",name=\"{name}\"}} "
    );
    let synced = |text: &str| match text.contains(&series) {
        true => Ok(()),
        false => Err(format!("no {series}")),
    };
    let exposition = scrape_until(&url, "the BaoPolicy's last success", synced).await;
    for sample in [
        "kubebao_operator_sync_duration_seconds_bucket{le=\"60.0\",kind=\"BaoPolicy\"} ",
        "kubebao_operator_reconciles_total{kind=\"BaoPolicy\",result=\"ok\"} ",
        "kubebao_operator_openbao_requests_total{op=\"policy_write\",result=\"ok\"} ",
        "kubebao_operator_leader 1",
    ] {
        assert!(
            exposition.contains(sample),
            "{sample} missing:\n{exposition}"
        );
    }
    let declared = declared_names(&exposition);
    let sampled = sample_names(&exposition);
    assert!(
        sampled.is_subset(&declared),
        "samples not declared by a # TYPE line: {:?}",
        sampled.difference(&declared).collect::<Vec<_>>()
    );

    let docs = render(&bed.binaries().helm, "kubebao-system", &ENABLED);
    let mut used = BTreeSet::new();
    for rule in rules(&docs) {
        used.extend(metric_names(rule["expr"].as_str().expect("expr")));
    }
    for query in dashboard_queries(&dashboard(&docs)) {
        used.extend(metric_names(&query));
    }
    assert!(used.len() >= 8, "the queries name the metrics: {used:?}");
    // An empty family is not exported at all (no `# TYPE` line either): the names only a
    // BaoSecret with leased or certificate credentials fills are checked against their
    // registration in the operator's source instead.
    let source = std::fs::read_to_string(repo().join("operator/src/metrics.rs"))
        .expect("operator/src/metrics.rs");
    for name in NEEDS_LEASED_CREDENTIALS {
        let registered = name.strip_prefix("kubebao_operator_").expect("prefixed");
        assert!(
            source.contains(&format!("\"{registered}\",")),
            "{name} is not registered in operator/src/metrics.rs"
        );
        used.remove(name);
    }
    let unknown: Vec<_> = used.difference(&declared).collect();
    assert!(
        unknown.is_empty(),
        "the chart's alerts or dashboard query metrics the operator does not export: {unknown:?}\nexported: {declared:?}"
    );

    // The dashboard's ConfigMap is one the API server accepts (size, name, labels).
    let ns = bed.namespace("monitoring").await;
    let mut map = of_kind(&docs, "ConfigMap")[0].clone();
    map["metadata"]["namespace"] = json!(ns);
    let map = serde_json::to_string(&map).expect("ConfigMap as JSON");
    if let Err(e) = bed.try_kubectl(&["apply", "--dry-run=server", "-f", "-"], &map) {
        panic!("the API server refuses the dashboard's ConfigMap: {e}");
    }

    // A deleted object's series go with it: no alert for what no longer exists.
    bed.kubectl(&["delete", "baopolicy", name, "--wait=true"]);
    let gone = |text: &str| match text.contains(&format!("name=\"{name}\"")) {
        true => Err(format!("{name}'s series are still exported")),
        false => Ok(()),
    };
    scrape_until(&url, "the deleted BaoPolicy's series to go", gone).await;
}
