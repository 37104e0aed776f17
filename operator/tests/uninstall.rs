//! End-to-end: nothing is lost when Secrets are rewritten or KMS is removed. The real
//! `kubebao-operator` runs against the test bed; there is no kubelet, so the test plays the
//! control-plane node: it binds the installer DaemonSet's pods to a registered node, keeps the
//! node's heartbeat, mounts the bundle ConfigMap and credentials Secret into directories for the
//! real `kubebao-installer`, and marks a pod ready once the installer applied its bundle. The
//! real `kubebao-kms` runs with the installed manifest's command line, and kube-apiserver with
//! the installed EncryptionConfiguration (automatic reload). Every claim is checked in etcd.
//!
//! One test, in phases, because it restarts the shared API server:
//! 1. a rotation's rewrite, rate-limited over several batches while Secrets are created and
//!    deleted, leaves every Secret in etcd under the new key_id, and says complete only then;
//! 2. deleting the installation while kube-apiserver uses the plugin keeps the plugin and its
//!    files, and says why (Stalled, a Warning event);
//! 3. `kms.migrateOff` moves every Secret to plaintext (none left `k8s:enc:kms:v2:`), then the
//!    deletion completes, keeping an identity-only EncryptionConfiguration, and kube-apiserver
//!    reads every Secret without the plugin, also after a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, ObjectMeta, Patch,
    PatchParams, PostParams,
};
use kubebao_testbed::conditions::condition;
use kubebao_testbed::node_image::build_binaries;
use kubebao_testbed::{Component, RawEtcd, Testbed, free_port, wait_for};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);
const NS: &str = "kube-system";
const NODE: &str = "cp-1";
const KMS_PREFIX: &[u8] = b"k8s:enc:kms:v2:";

fn installations(client: kube::Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("kubebao.io", "v1alpha1", "KubeBaoInstallation");
    Api::all_with(client, &ApiResource::from_gvk(&gvk))
}

async fn http_get(url: &str) -> Result<String, String> {
    let resp = reqwest::get(url).await.map_err(|e| e.to_string())?;
    let ok = resp.status().is_success();
    let body = resp.text().await.map_err(|e| e.to_string())?;
    if ok { Ok(body) } else { Err(body) }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn put_secret(api: &Api<Secret>, name: &str, value: &str) -> Result<(), kube::Error> {
    let s = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        string_data: Some([("value".to_string(), value.to_string())].into()),
        ..Default::default()
    };
    api.create(&PostParams::default(), &s).await.map(|_| ())
}

/// Where etcd keeps Secrets.
const SECRETS: &str = "/registry/secrets/";

/// The Secrets in etcd not stored as `ok` says, with why; empty when all are.
async fn stored_otherwise(etcd: &RawEtcd, ok: impl Fn(&[u8]) -> bool) -> Vec<String> {
    etcd.range(SECRETS)
        .await
        .into_iter()
        .filter(|(_, v)| !ok(v))
        .map(|(k, v)| format!("{k}: {:?}", String::from_utf8_lossy(&v[..v.len().min(40)])))
        .collect()
}

/// The control-plane node, played by the test: heartbeats, the installer pods' scheduling,
/// mounts and readiness. Runs until `stop`.
struct FakeNode {
    client: kube::Client,
    bed: &'static Testbed,
    bundle: PathBuf,
    secrets: PathBuf,
    installer_bin: PathBuf,
    readyz: String,
}

impl FakeNode {
    async fn run(self, stop: Arc<AtomicBool>) {
        let mut beat = Instant::now() - Duration::from_secs(60);
        while !stop.load(Ordering::Relaxed) {
            if beat.elapsed() > Duration::from_secs(5) {
                self.heartbeat().await;
                beat = Instant::now();
            }
            if let Err(e) = self.pods().await {
                eprintln!("fake node: {e}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn heartbeat(&self) {
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let ready = json!({"status": {"conditions": [{
            "type": "Ready", "status": "True", "reason": "KubeletReady",
            "message": "played by the test", "lastHeartbeatTime": now, "lastTransitionTime": now,
        }]}});
        let nodes: Api<Node> = Api::all(self.client.clone());
        if let Err(e) = nodes
            .patch_status(NODE, &PatchParams::default(), &Patch::Strategic(ready))
            .await
        {
            eprintln!("fake node heartbeat: {e}");
        }
    }

    /// Binds the installer pods, deletes terminating ones at once (no kubelet to confirm),
    /// syncs the mounts and marks the current pod ready once the installer applied its bundle.
    async fn pods(&self) -> Result<(), String> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), NS);
        let lp = ListParams::default().labels("app.kubernetes.io/name=kubebao-installer");
        let list = pods.list(&lp).await.map_err(|e| e.to_string())?;
        for p in list.items {
            let name = p.metadata.name.clone().unwrap_or_default();
            if p.metadata.deletion_timestamp.is_some() {
                let _ = pods
                    .delete(&name, &DeleteParams::default().grace_period(0))
                    .await;
                continue;
            }
            if p.spec.as_ref().and_then(|s| s.node_name.clone()).is_none() {
                let binding = json!({
                    "apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": NODE},
                });
                pods.create_subresource::<_, Value>(
                    "binding",
                    &name,
                    &PostParams::default(),
                    &binding,
                )
                .await
                .map_err(|e| format!("bind {name}: {e}"))?;
            }
            let ready = p
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            if !ready && self.applied().await? {
                let now = k8s_openapi::jiff::Timestamp::now().to_string();
                let status = json!({"status": {"phase": "Running", "conditions": [
                    {"type": "Ready", "status": "True", "lastTransitionTime": now},
                ]}});
                pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
                    .await
                    .map_err(|e| format!("mark {name} ready: {e}"))?;
            }
        }
        Ok(())
    }

    /// Syncs the mounts; true when the installer has applied what they hold.
    async fn applied(&self) -> Result<bool, String> {
        self.bed
            .mount_config_map(NS, "kubebao-installer", &self.bundle)
            .await?;
        let _ = self
            .bed
            .mount_secret(NS, "kubebao-kms-approle", &self.secrets)
            .await;
        let plan: Value =
            serde_json::from_slice(&std::fs::read(self.bundle.join("plan.json")).unwrap())
                .map_err(|e| e.to_string())?;
        let Ok(line) = http_get(&self.readyz).await else {
            return Ok(false);
        };
        if plan["action"] == "uninstall" {
            return Ok(line.starts_with("uninstalled "));
        }
        let out = std::process::Command::new(&self.installer_bin)
            .arg("hash")
            .arg(format!("--bundle={}", self.bundle.display()))
            .arg(format!("--secrets={}", self.secrets.display()))
            .output()
            .map_err(|e| e.to_string())?;
        let hash = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok(out.status.success() && line.starts_with(&format!("installed hash={hash} ")))
    }
}

/// Creates Secrets that sort before and after every other one in `ns` and deletes `victims`,
/// one of each every 300 ms, until `stop`. Returns how many it created and deleted.
async fn churn(
    api: Api<Secret>,
    prefix: &'static str,
    victims: Vec<String>,
    stop: Arc<AtomicBool>,
) -> (usize, usize) {
    let (mut created, mut deleted) = (0, 0);
    let mut victims = victims.into_iter();
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        for name in [format!("a-{prefix}-{i:03}"), format!("z-{prefix}-{i:03}")] {
            if put_secret(&api, &name, "churn").await.is_ok() {
                created += 1;
            }
        }
        if let Some(v) = victims.next()
            && api.delete(&v, &DeleteParams::default()).await.is_ok()
        {
            deleted += 1;
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    (created, deleted)
}

/// Polls the installation every 200 ms until `done` returns Some; `each` sees every status.
async fn watch_status<T>(
    api: &Api<DynamicObject>,
    what: &str,
    timeout: Duration,
    mut done: impl FnMut(&DynamicObject) -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Ok(o) = api.get("kubebao").await
            && let Some(t) = done(&o)
        {
            return t;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}: {}",
            api.get("kubebao")
                .await
                .map(|o| o.data["status"].to_string())
                .unwrap_or_else(|e| e.to_string())
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrites_skip_no_secret_and_kms_is_removed_only_after_migrating_off() {
    let bed = Testbed::shared().await;
    let client = bed.client().await;
    let bao = bed.openbao();
    let root = bao.root_token();
    let bins = build_binaries(&["kubebao-installer", "kubebao-kms"]);
    let (installer_bin, kms_bin) = (bins.join("kubebao-installer"), bins.join("kubebao-kms"));
    let etcd = bed.etcd();
    bed.install_crds();
    bed.register_node(NODE, &[], true).await;

    let token_file = bed.dir().join("uninstall-operator-token");
    std::fs::write(&token_file, root.expose()).unwrap();
    let kubeconfig = bed.operator_kubeconfig("kube-system").display().to_string();
    let mut operator = Component::start_with_env(
        "kubebao-operator-uninstall",
        bed.dir(),
        Path::new(env!("CARGO_BIN_EXE_kubebao-operator")),
        &[
            format!("--openbao-addr={}", bao.addr()),
            // The test bed's OpenBao listens on loopback over plain http.
            "--openbao-allow-plain-http".into(),
            format!("--openbao-token-file={}", token_file.display()),
            "--namespace=kube-system".into(),
            "--leader-elect=false".into(),
            format!("--metrics-addr=127.0.0.1:{}", free_port()),
        ],
        &[("KUBECONFIG", &kubeconfig)],
    );

    let host = tempfile::Builder::new()
        .prefix("kb-host-")
        .tempdir_in("/tmp")
        .unwrap();
    let h = host.path();
    let (manifests, config, socket) = (
        h.join("manifests"),
        h.join("etc-kubebao"),
        h.join("run/kms.sock"),
    );
    let kms_port = free_port();
    let ca = String::from_utf8(bao.ca_pem().to_vec()).unwrap();
    let cr = json!({
        "apiVersion": "kubebao.io/v1alpha1",
        "kind": "KubeBaoInstallation",
        "metadata": {"name": "kubebao"},
        "spec": {
            "openbao": {"address": bao.tls_addr(), "caBundle": ca},
            "kms": {
                "manifestDir": manifests, "configDir": config, "socketPath": socket,
                "healthPort": kms_port, "secretIdTtlSeconds": 3600,
                "tolerations": [{"operator": "Exists"}],
                // kube-apiserver polls its KMS plugin's Status every 60 s (the new key_id) and
                // re-reads its EncryptionConfiguration every 60 s.
                "rewriteAfterRotation": true, "rewriteDelaySeconds": 75,
                "apiServerReloadSeconds": 70,
                // Slow enough that a rewrite takes several batches (4 × 5 = 20 Secrets each).
                "rewritePerSecond": 4,
                // Long: the removal must be confirmed by the node, not end by timeout.
                "uninstallGraceSeconds": 900,
            },
            "csi": {"enabled": false},
        }
    });
    let api = installations(client.clone());
    api.create(&PostParams::default(), &serde_json::from_value(cr).unwrap())
        .await
        .expect("create KubeBaoInstallation");

    // ── The node: installer pods scheduled, mounted, ready when applied ──
    let mounts = tempfile::tempdir().unwrap();
    let (bundle_dir, secrets_dir) = (mounts.path().join("bundle"), mounts.path().join("secrets"));
    wait_for("the installer's bundle and credentials", WAIT, || async {
        bed.mount_config_map(NS, "kubebao-installer", &bundle_dir)
            .await?;
        bed.mount_secret(NS, "kubebao-kms-approle", &secrets_dir)
            .await
    })
    .await;
    let installer_port = free_port();
    let readyz = format!("http://127.0.0.1:{installer_port}/readyz");
    let mut installer = Component::start(
        "kubebao-installer-uninstall",
        bed.dir(),
        &installer_bin,
        &[
            "run".into(),
            format!("--bundle={}", bundle_dir.display()),
            format!("--secrets={}", secrets_dir.display()),
            "--host-root=/".into(),
            format!("--listen=127.0.0.1:{installer_port}"),
            "--interval=1".into(),
        ],
    );
    let stop_node = Arc::new(AtomicBool::new(false));
    let node = tokio::spawn(
        FakeNode {
            client: client.clone(),
            bed,
            bundle: bundle_dir.clone(),
            secrets: secrets_dir.clone(),
            installer_bin: installer_bin.clone(),
            readyz: readyz.clone(),
        }
        .run(stop_node.clone()),
    );
    let st = watch_status(&api, "the node to confirm the KMS install", WAIT, |o| {
        let st = &o.data["status"];
        (st["kmsConfigInstalled"] == true && st["kms"]["summary"] == "1/1").then(|| st.clone())
    })
    .await;
    let key_id_v1 = st["keyId"].as_str().expect("keyId").to_string();
    let manifest_path = manifests.join("kubebao-kms.yaml");
    let pod: Pod =
        serde_saphyr::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    let args = pod.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap_or_default();
    let mut plugin = Component::start("kubebao-kms-uninstall", bed.dir(), &kms_bin, &args);
    let health = format!("http://127.0.0.1:{kms_port}/readyz");
    wait_for("the installed plugin to be ready", WAIT, || {
        plugin.assert_running();
        let health = health.clone();
        async move { http_get(&health).await }
    })
    .await;
    let encryption_config = config.join("encryption-config.yaml");
    bed.restart_apiserver(Some(&encryption_config)).await;
    let client = bed.client().await;
    let api = installations(client.clone());

    // ── 1. Rotation: the rewrite spans batches while Secrets come and go ──
    let test_ns = bed.namespace("kbu").await;
    let secrets = Api::<Secret>::namespaced(client.clone(), &test_ns);
    let names: Vec<String> = (0..40).map(|i| format!("s-{i:03}")).collect();
    // `s-*` are deleted along the way; `kept` stays to the end.
    for n in names.iter().map(String::as_str).chain(["kept"]) {
        put_secret(&secrets, n, &format!("value-of-{n}"))
            .await
            .unwrap();
    }
    api.patch(
        "kubebao",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"kubebao.io/rotate": "r1"}}})),
    )
    .await
    .unwrap();
    let key_id_v2 = watch_status(&api, "the rotation", WAIT, |o| {
        let st = &o.data["status"];
        (st["keyVersion"] == 2).then(|| st["keyId"].as_str().unwrap().to_string())
    })
    .await;
    assert_ne!(key_id_v2, key_id_v1);
    let mut progress = Vec::new();
    let seen = |o: &DynamicObject, progress: &mut Vec<(Instant, u64)>| {
        let r = &o.data["status"]["rewrite"];
        if r["keyId"] != key_id_v2.as_str() {
            return None;
        }
        progress.push((Instant::now(), r["done"].as_u64().unwrap_or(0)));
        Some(r["complete"] == true)
    };
    watch_status(&api, "the first batch", Duration::from_secs(180), |o| {
        seen(o, &mut progress)
    })
    .await;
    // While it runs, delete Secrets in key order — the ones a rewrite does first, so every
    // later index shifts — and create Secrets before and after the cursor.
    let stop_churn = Arc::new(AtomicBool::new(false));
    let churning = tokio::spawn(churn(
        secrets.clone(),
        "rot",
        names[..30].to_vec(),
        stop_churn.clone(),
    ));
    watch_status(
        &api,
        "the rewrite to complete",
        Duration::from_secs(240),
        |o| seen(o, &mut progress).filter(|complete| *complete),
    )
    .await;
    let (first, last) = (progress[0], *progress.last().unwrap());
    // Complete: at this very moment every Secret in etcd is under the new key_id.
    let stale = stored_otherwise(&etcd, |v| {
        v.starts_with(b"k8s:enc:kms:v2:kubebao:") && contains(v, key_id_v2.as_bytes())
    })
    .await;
    stop_churn.store(true, Ordering::Relaxed);
    let (created, deleted) = churning.await.unwrap();
    assert!(stale.is_empty(), "not under {key_id_v2}: {stale:#?}");
    let o = api.get("kubebao").await.unwrap();
    let r = &o.data["status"]["rewrite"];
    assert_eq!(r["failed"], 0, "{r}");
    let batches = progress.windows(2).filter(|w| w[0].1 != w[1].1).count();
    assert!(batches >= 2, "the rewrite took several batches: {r}");
    assert!(
        created >= 10 && deleted >= 10,
        "churn during the rewrite: {created} created, {deleted} deleted"
    );
    // From when it was due (the key_id first seen + rewriteDelaySeconds) to complete: the
    // whole rewrite, listing included.
    let since: k8s_openapi::jiff::Timestamp = o.data["status"]["keyIdSince"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let whole = k8s_openapi::jiff::Timestamp::now()
        .duration_since(since)
        .as_secs_f64()
        - 75.0;
    let total = r["done"].as_u64().unwrap();
    let seconds = (last.0 - first.0).as_secs_f64();
    let mut seen: Vec<u64> = progress.iter().map(|p| p.1).collect();
    seen.dedup();
    eprintln!(
        "FIGURE rotation rewrite: {total} Secrets in {whole:.1} s from when it was due ({:.2}/s at rewritePerSecond 4); {} of them in {seconds:.1} s after the first batch was reported; done as seen: {seen:?}; {created} created and {deleted} deleted meanwhile",
        total as f64 / whole,
        last.1 - first.1,
    );
    let remaining = stored_otherwise(&etcd, |v| contains(v, key_id_v2.as_bytes())).await;
    assert!(remaining.is_empty(), "{remaining:#?}");

    // ── 2. Deleting while kube-apiserver uses the plugin: nothing is removed, and why ──
    api.delete("kubebao", &Default::default()).await.unwrap();
    let message = watch_status(&api, "Stalled KMSInUse", WAIT, |o| {
        match condition(o, "Stalled") {
            Some((s, r, m)) if s == "True" && r == "KMSInUse" => Some(m),
            _ => None,
        }
    })
    .await;
    assert!(message.contains("spec.kms.migrateOff: true"), "{message}");
    let note = warning_event(bed, "default", "kubebao", "KMSInUse").await;
    assert!(note.contains("migrateOff"), "{note}");
    // The reconcile that refused the deletion has run (its event is out): the files are kept.
    let host_files = [
        manifest_path.clone(),
        config.join("kms.yaml"),
        config.join("approle/secret-id"),
        encryption_config.clone(),
    ];
    for f in &host_files {
        assert!(f.exists(), "{} is still installed", f.display());
    }
    let cms = Api::<ConfigMap>::namespaced(client.clone(), NS);
    let plan = cms.get("kubebao-installer").await.unwrap().data.unwrap()["plan.json"].clone();
    assert!(plan.contains("\"action\": \"install\""), "{plan}");
    let line = http_get(&readyz).await.unwrap();
    assert!(line.starts_with("installed hash="), "{line}");
    plugin.assert_running();
    let o = api.get("kubebao").await.expect("held by its finalizer");
    assert!(o.metadata.deletion_timestamp.is_some());
    let listed = secrets.list(&Default::default()).await.unwrap();
    assert!(!listed.items.is_empty(), "Secrets still read");

    // ── 3. Migrating off KMS, then the deletion completes ──
    let migrate_start = Instant::now();
    api.patch(
        "kubebao",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"kms": {"migrateOff": true}}})),
    )
    .await
    .unwrap();
    let mut reasons: Vec<String> = Vec::new();
    let mut migration = Vec::new();
    let mut note = |o: &DynamicObject| {
        let (s, reason, _) = condition(o, "KMSMigratedOff")?;
        if reasons.last() != Some(&reason) {
            reasons.push(reason.clone());
        }
        let r = &o.data["status"]["migration"]["rewrite"];
        let rewriting = r["keyId"] == "identity";
        // Progress until the rewrite is complete (the status keeps it through the next stage).
        if rewriting && migration.last().is_none_or(|l: &(Instant, u64, bool)| !l.2) {
            let complete = r["complete"] == true;
            migration.push((Instant::now(), r["done"].as_u64().unwrap_or(0), complete));
        }
        Some((
            s == "True",
            rewriting,
            o.data["status"]["migration"].clone(),
        ))
    };
    watch_status(
        &api,
        "the migration's rewrite",
        Duration::from_secs(240),
        |o| note(o).filter(|n| n.1),
    )
    .await;
    let stop_churn = Arc::new(AtomicBool::new(false));
    let churning = tokio::spawn(churn(
        secrets.clone(),
        "mig",
        names[30..].to_vec(),
        stop_churn.clone(),
    ));
    let done = watch_status(&api, "KMSMigratedOff=True", Duration::from_secs(400), |o| {
        note(o).and_then(|(done, _, m)| done.then_some(m))
    })
    .await;
    // Reported done: at this very moment no Secret in etcd is KMS-encrypted.
    let encrypted = stored_otherwise(&etcd, |v| !v.starts_with(KMS_PREFIX)).await;
    stop_churn.store(true, Ordering::Relaxed);
    let (created, deleted) = churning.await.unwrap();
    assert!(encrypted.is_empty(), "still KMS-encrypted: {encrypted:#?}");
    for step in [
        "SwitchingNodes",
        "WaitingForAPIServer",
        "RewritingSecrets",
        "MigratedOff",
    ] {
        assert!(reasons.iter().any(|r| r == step), "{step} in {reasons:?}");
    }
    assert_eq!(done["rewrite"]["failed"], 0, "{done}");
    assert_eq!(done["stage"], "IdentityOnly", "{done}");
    let (m0, m1) = (migration[0], *migration.last().unwrap());
    assert!(m1.2, "the migration's rewrite completed");
    let seconds = (m1.0 - m0.0).as_secs_f64();
    eprintln!(
        "FIGURE migration off KMS: {} s in all (2 × apiServerReloadSeconds 70); {} Secrets rewritten as plaintext in {seconds:.1} s after the first batch ({:.2}/s); {created} created and {deleted} deleted meanwhile",
        migrate_start.elapsed().as_secs(),
        m1.1 - m0.1,
        (m1.1 - m0.1) as f64 / seconds.max(0.001)
    );

    wait_for("the KubeBaoInstallation to be gone", WAIT, || {
        operator.assert_running();
        installer.assert_running();
        let api = api.clone();
        async move {
            match api.get_opt("kubebao").await.map_err(|e| e.to_string())? {
                None => Ok(()),
                Some(o) => Err(o.data["status"].to_string()),
            }
        }
    })
    .await;
    let line = http_get(&readyz).await.unwrap();
    // CA, role-id, secret-id, kms.yaml and the manifest go; the EncryptionConfiguration stays.
    assert!(line.starts_with("uninstalled removed=5 kept=1"), "{line}");
    for f in &host_files[..3] {
        assert!(!f.exists(), "{} was removed", f.display());
    }
    let kept = std::fs::read_to_string(&encryption_config).unwrap();
    assert!(
        kept.contains("identity") && !kept.contains("kms"),
        "the API server's flag still points at an identity-only file: {kept}"
    );
    // The kubelet stops the static pod whose manifest is gone; the API server no longer needs it.
    plugin.stop();
    stop_node.store(true, Ordering::Relaxed);
    node.await.unwrap();
    let all = Api::<Secret>::all(client.clone())
        .list(&Default::default())
        .await
        .expect("every Secret reads without the plugin");
    let kept = all
        .items
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some("kept"))
        .expect("the kept Secret reads without the plugin");
    assert_eq!(kept.data.as_ref().unwrap()["value"].0, b"value-of-kept");
    bed.restart_apiserver(Some(&encryption_config)).await;
    let secrets = Api::<Secret>::namespaced(bed.client().await, &test_ns);
    let read = secrets.get("kept").await;
    if read.is_err() {
        let keys: Vec<String> = etcd
            .range(SECRETS)
            .await
            .into_iter()
            .map(|(k, v)| format!("{k} {:?}", String::from_utf8_lossy(&v[..v.len().min(20)])))
            .filter(|k| k.contains(&test_ns))
            .collect();
        panic!("kept in {test_ns} after a restart: {read:?}; etcd holds {keys:#?}");
    }
    let s = read.unwrap();
    assert_eq!(s.data.unwrap()["value"].0, b"value-of-kept");
    let s = secrets
        .get("a-mig-000")
        .await
        .expect("written while migrating");
    assert_eq!(s.data.unwrap()["value"].0, b"churn");
    let encrypted = stored_otherwise(&etcd, |v| !v.starts_with(KMS_PREFIX)).await;
    assert!(encrypted.is_empty(), "{encrypted:#?}");
    let key = bao
        .client()
        .transit_key(root, "transit", "kubebao-kms")
        .await
        .expect("the Transit key stays");
    assert_eq!(key.latest_version, 2);

    installer.stop();
    operator.stop();
}

/// Waits for a Warning event with `reason` about `name` in namespace `ns` (events about
/// cluster-scoped objects land in `default`); returns its note.
async fn warning_event(bed: &Testbed, ns: &str, name: &str, reason: &str) -> String {
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(bed.client().await, ns);
    wait_for(
        &format!("a Warning event {reason} about {name}"),
        WAIT,
        || async {
            let list = events
                .list(&Default::default())
                .await
                .map_err(|e| e.to_string())?;
            list.items
                .iter()
                .find(|e| {
                    e.reason.as_deref() == Some(reason)
                        && e.type_.as_deref() == Some("Warning")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                })
                .map(|e| e.note.clone().unwrap_or_default())
                .ok_or(format!("{} events, none matching", list.items.len()))
        },
    )
    .await
}
