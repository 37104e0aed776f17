//! End-to-end: one KubeBaoInstallation, applied to the test bed, run by the real
//! `kubebao-operator` binary. There is no kubelet, so the node side runs as local processes:
//! the real `kubebao-installer` writes the rendered files into a temporary host root, the real
//! `kubebao-kms` starts with the command line from the installed static-pod manifest, and
//! kube-apiserver restarts with the installed EncryptionConfiguration.
//!
//! One test, in phases, because it restarts the shared API server.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::ResourceExt as _;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ObjectMeta, Patch, PatchParams, PostParams,
};
use kubebao_openbao::{Credentials, SecretString};
use kubebao_testbed::conditions::condition;
use kubebao_testbed::node_image::build_binaries;
use kubebao_testbed::{Component, Testbed, free_port, wait_for};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);
const NS: &str = "kube-system";

fn installations(client: kube::Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("kubebao.io", "v1alpha1", "KubeBaoInstallation");
    Api::all_with(client, &ApiResource::from_gvk(&gvk))
}

/// Writes the installer's ConfigMap and Secret into directories, as the kubelet mounts them.
async fn sync_mounts(bed: &Testbed, bundle: &Path, secrets: &Path) -> Result<(), String> {
    bed.mount_config_map(NS, "kubebao-installer", bundle)
        .await?;
    bed.mount_secret(NS, "kubebao-kms-approle", secrets).await
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

async fn put_secret(api: &Api<Secret>, name: &str, value: &str) {
    let s = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        string_data: Some([("value".to_string(), value.to_string())].into()),
        ..Default::default()
    };
    api.create(&PostParams::default(), &s)
        .await
        .expect("create Secret");
}

#[tokio::test]
async fn one_installation_prepares_openbao_installs_the_plugin_and_encrypts_etcd() {
    let bed = Testbed::shared().await;
    let client = bed.client().await;
    let bao = bed.openbao();
    let root = bao.root_token();
    let bins = build_binaries(&["kubebao-installer", "kubebao-kms"]);
    let (installer_bin, kms_bin) = (bins.join("kubebao-installer"), bins.join("kubebao-kms"));

    // The CRDs, as `crds/` ships them.
    bed.install_crds();

    // Nodes: one control plane, one worker (DaemonSet placement is computed on them).
    bed.register_node("cp-1", &[], true).await;
    bed.register_node("worker-1", &[], false).await;

    // The operator, with a token as its own OpenBao identity (the CR names no auth).
    let token_file = bed.dir().join("installation-operator-token");
    std::fs::write(&token_file, root.expose()).unwrap();
    let metrics_port = free_port();
    let kubeconfig = bed.operator_kubeconfig("kube-system").display().to_string();
    let mut operator = Component::start_with_env(
        "kubebao-operator-installation",
        bed.dir(),
        Path::new(env!("CARGO_BIN_EXE_kubebao-operator")),
        &[
            format!("--openbao-addr={}", bao.addr()),
            // The test bed's OpenBao listens on loopback over plain http.
            "--openbao-allow-plain-http".into(),
            format!("--openbao-token-file={}", token_file.display()),
            "--namespace=kube-system".into(),
            "--leader-elect=false".into(),
            format!("--metrics-addr=127.0.0.1:{metrics_port}"),
        ],
        &[("KUBECONFIG", &kubeconfig)],
    );

    // A temporary "host": manifest dir, config dir, socket dir.
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
                "healthPort": kms_port, "rewriteAfterRotation": true, "rewriteDelaySeconds": 75,
                "uninstallGraceSeconds": 30,
                // Registered nodes have no kubelet, so they get the unreachable taint after
                // ~50 s; tolerate it so cp-1 stays a target and deletion waits for its
                // installer (the grace period) instead of finding no node to wait for.
                "tolerations": [{"operator": "Exists"}],
                "secretIdTtlSeconds": 3600,
            },
            "csi": {"providerDir": h.join("providers")},
        }
    });
    let api = installations(client.clone());
    let obj: DynamicObject = serde_json::from_value(cr).unwrap();
    api.create(&PostParams::default(), &obj)
        .await
        .expect("create KubeBaoInstallation");

    // ── OpenBao is prepared ──
    let status = wait_for("OpenBaoReady", WAIT, || {
        operator.assert_running();
        let api = api.clone();
        async move {
            let o = api.get("kubebao").await.map_err(|e| e.to_string())?;
            match condition(&o, "OpenBaoReady") {
                Some((s, _, _)) if s == "True" => Ok(o.data["status"].clone()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    let key = bao
        .client()
        .transit_key(root, "transit", "kubebao-kms")
        .await
        .expect("Transit key exists");
    assert!(
        !key.exportable && !key.deletion_allowed,
        "key is neither exportable nor deletable"
    );
    assert_eq!(key.auto_rotate_period, 720 * 3600);
    assert_eq!(status["keyVersion"], 1);
    let key_id_v1 = status["keyId"].as_str().expect("keyId").to_string();
    let policy = bao
        .client()
        .policy_read(root, "kubebao-kms")
        .await
        .unwrap()
        .expect("policy");
    assert!(policy.contains("path \"transit/encrypt/kubebao-kms\""));
    assert_eq!(
        policy.matches("path ").count(),
        3,
        "only encrypt, decrypt and read on the key"
    );

    // The AppRole credentials Secret logs in, with the plugin's policy only.
    let secrets = Api::<Secret>::namespaced(client.clone(), NS);
    let creds = wait_for("the AppRole credentials Secret", WAIT, || {
        let secrets = secrets.clone();
        async move {
            secrets
                .get("kubebao-kms-approle")
                .await
                .map_err(|e| e.to_string())
        }
    })
    .await;
    let data = creds.data.clone().unwrap();
    let login = bao
        .client()
        .login(&Credentials::AppRole {
            mount: "approle".into(),
            role_id: SecretString::new(String::from_utf8(data["role-id"].0.clone()).unwrap()),
            secret_id: SecretString::new(String::from_utf8(data["secret-id"].0.clone()).unwrap()),
        })
        .await
        .expect("AppRole login with the installed credentials");
    assert!(
        login.policies.contains(&"kubebao-kms".to_string())
            && login
                .policies
                .iter()
                .all(|p| p == "kubebao-kms" || p == "default"),
        "the plugin's policy (and OpenBao's default) only: {:?}",
        login.policies
    );
    let denied = bao
        .client()
        .policy_read(&login.client_token, "kubebao-kms")
        .await;
    assert!(denied.is_err(), "the plugin's token cannot read policies");
    assert!(
        creds
            .annotations()
            .contains_key("kubebao.io/secret-id-expires")
    );

    // ── Objects exist with the rendered content ──
    let cms = Api::<ConfigMap>::namespaced(client.clone(), NS);
    let bundle_cm = cms
        .get("kubebao-installer")
        .await
        .expect("installer bundle ConfigMap");
    let files = bundle_cm.data.clone().unwrap();
    for f in [
        "plan.json",
        "kms.yaml",
        "encryption-config.yaml",
        "kubebao-kms.yaml",
        "openbao-ca.crt",
    ] {
        assert!(files.contains_key(f), "bundle has {f}");
    }
    assert!(
        files["encryption-config.yaml"].contains(&format!("endpoint: unix://{}", socket.display()))
    );
    assert!(files["kms.yaml"].contains("transit-key: \"kubebao-kms\""));
    assert_eq!(
        bundle_cm.labels()["app.kubernetes.io/managed-by"],
        "kubebao-operator"
    );
    assert_eq!(bundle_cm.owner_references()[0].kind, "KubeBaoInstallation");
    Api::<ServiceAccount>::namespaced(client.clone(), NS)
        .get("kubebao-csi")
        .await
        .expect("CSI ServiceAccount");
    let role = Api::<ClusterRole>::all(client.clone())
        .get("kubebao-csi")
        .await
        .expect("CSI ClusterRole");
    let rules = role.rules.unwrap();
    assert_eq!(rules.len(), 1, "TokenReview only: {rules:?}");
    assert_eq!(rules[0].resources.as_ref().unwrap(), &["tokenreviews"]);
    Api::<ClusterRoleBinding>::all(client.clone())
        .get("kubebao-csi")
        .await
        .expect("CSI ClusterRoleBinding");
    let key_secret = secrets
        .get("kubebao-csi-object-version-key")
        .await
        .expect("version key Secret");
    assert_eq!(key_secret.data.unwrap()["key"].0.len(), 32);
    let dss = Api::<DaemonSet>::namespaced(client.clone(), NS);
    let counts = |name: &'static str| {
        let dss = dss.clone();
        async move {
            let ds = dss.get(name).await.map_err(|e| e.to_string())?;
            let st = ds.status.ok_or("no status yet")?;
            Ok::<_, String>(st.desired_number_scheduled)
        }
    };
    wait_for(
        "the installer on the one control-plane node",
        WAIT,
        || async {
            match counts("kubebao-installer").await? {
                1 => Ok(()),
                n => Err(format!("desired {n}")),
            }
        },
    )
    .await;
    wait_for("the CSI provider on both nodes", WAIT, || async {
        match counts("kubebao-csi").await? {
            2 => Ok(()),
            n => Err(format!("desired {n}")),
        }
    })
    .await;
    // Status: nodes desired per component; without a kubelet nothing becomes ready, so the
    // installation is Reconciling (kstatus: in progress), not Stalled.
    wait_for("status to count the nodes", WAIT, || {
        let api = api.clone();
        async move {
            let o = api.get("kubebao").await.map_err(|e| e.to_string())?;
            let st = &o.data["status"];
            let reconciling = condition(&o, "Reconciling").map(|c| c.0);
            let stalled = condition(&o, "Stalled").map(|c| c.0);
            if st["kms"]["desired"] == 1
                && st["csi"]["desired"] == 2
                && st["kms"]["summary"] == "0/1"
                && reconciling.as_deref() == Some("True")
                && stalled.as_deref() == Some("False")
            {
                Ok(())
            } else {
                Err(format!(
                    "{st} reconciling={reconciling:?} stalled={stalled:?}"
                ))
            }
        }
    })
    .await;
    let installer_ds = dss.get("kubebao-installer").await.unwrap();
    let hash_v1 = installer_ds
        .spec
        .unwrap()
        .template
        .metadata
        .unwrap()
        .annotations
        .unwrap()["kubebao.io/config-hash"]
        .clone();

    // ── A second installation is refused ──
    let second: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "kubebao.io/v1alpha1", "kind": "KubeBaoInstallation",
        "metadata": {"name": "second"}, "spec": {"openbao": {"address": bao.addr()}}
    }))
    .unwrap();
    api.create(&PostParams::default(), &second).await.unwrap();
    wait_for("the second installation to report a conflict", WAIT, || {
        let api = api.clone();
        async move {
            let o = api.get("second").await.map_err(|e| e.to_string())?;
            match condition(&o, "Stalled") {
                Some((s, r, _)) if s == "True" && r == "Conflict" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    api.delete("second", &Default::default()).await.unwrap();

    // ── The node side: installer → files on the host ──
    let mounts = tempfile::tempdir().unwrap();
    let (bundle_dir, secrets_dir) = (mounts.path().join("bundle"), mounts.path().join("secrets"));
    std::fs::create_dir_all(&bundle_dir).unwrap();
    std::fs::create_dir_all(&secrets_dir).unwrap();
    sync_mounts(bed, &bundle_dir, &secrets_dir).await.unwrap();
    let installer_port = free_port();
    let mut installer = Component::start(
        "kubebao-installer",
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
    let readyz = format!("http://127.0.0.1:{installer_port}/readyz");
    let ready = wait_for("the installer to install", WAIT, || {
        installer.assert_running();
        let readyz = readyz.clone();
        async move { http_get(&readyz).await }
    })
    .await;
    assert!(ready.starts_with("installed hash="), "{ready}");
    let manifest_path = manifests.join("kubebao-kms.yaml");
    let mode = |p: &Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions())
            & 0o777
    };
    assert_eq!(mode(&config.join("approle/secret-id")), 0o600);
    assert_eq!(mode(&manifest_path), 0o600);
    assert_eq!(
        std::fs::read_to_string(&manifest_path).unwrap(),
        files["kubebao-kms.yaml"]
    );

    // ── The plugin, started exactly as the installed static pod says ──
    let pod: Pod =
        serde_saphyr::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    let pod_spec = pod.spec.unwrap();
    let c = &pod_spec.containers[0];
    assert_eq!(
        pod_spec.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(c.command.as_ref().unwrap(), &["/usr/local/bin/kubebao-kms"]);
    let args = c.args.clone().unwrap_or_default();
    let mut plugin = Component::start("kubebao-kms-installed", bed.dir(), &kms_bin, &args);
    let health = format!("http://127.0.0.1:{kms_port}/readyz");
    wait_for("the installed plugin to be ready", WAIT, || {
        plugin.assert_running();
        let health = health.clone();
        async move { http_get(&health).await }
    })
    .await;

    // ── kube-apiserver with the installed EncryptionConfiguration ──
    let test_ns = bed.namespace("kbi").await;
    let ns_secrets = Api::<Secret>::namespaced(bed.client().await, &test_ns);
    put_secret(&ns_secrets, "before", "plain-before-value").await;
    bed.restart_apiserver(Some(&config.join("encryption-config.yaml")))
        .await;
    let client = bed.client().await;
    let ns_secrets = Api::<Secret>::namespaced(client.clone(), &test_ns);
    put_secret(&ns_secrets, "after", "plain-after-value").await;
    let raw = bed
        .etcd()
        .get(&format!("/registry/secrets/{test_ns}/after"))
        .await
        .expect("in etcd");
    assert!(
        raw.starts_with(b"k8s:enc:kms:v2:kubebao:"),
        "stored encrypted by the kubebao provider"
    );
    assert!(
        !contains(&raw, b"plain-after-value"),
        "no plaintext in etcd"
    );
    assert!(
        contains(&raw, key_id_v1.as_bytes()),
        "etcd holds the key_id the operator reports ({key_id_v1})"
    );

    // ── A spec change renders new content and a new config hash ──
    let api = installations(client.clone());
    api.patch(
        "kubebao",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"kms": {"image": "registry.example/kubebao:test"}}})),
    )
    .await
    .unwrap();
    let dss = Api::<DaemonSet>::namespaced(client.clone(), NS);
    let hash_v2 = wait_for("a new config hash on the installer DaemonSet", WAIT, || {
        let dss = dss.clone();
        let hash_v1 = hash_v1.clone();
        async move {
            let ds = dss
                .get("kubebao-installer")
                .await
                .map_err(|e| e.to_string())?;
            let h = ds
                .spec
                .unwrap()
                .template
                .metadata
                .unwrap()
                .annotations
                .unwrap()["kubebao.io/config-hash"]
                .clone();
            if h != hash_v1 {
                Ok(h)
            } else {
                Err("unchanged".into())
            }
        }
    })
    .await;
    let cms = Api::<ConfigMap>::namespaced(client.clone(), NS);
    let manifest =
        cms.get("kubebao-installer").await.unwrap().data.unwrap()["kubebao-kms.yaml"].clone();
    assert!(manifest.contains("image: registry.example/kubebao:test"));
    wait_for("status to report the new hash", WAIT, || {
        let api = api.clone();
        let hash_v2 = hash_v2.clone();
        async move {
            let st = api.get("kubebao").await.map_err(|e| e.to_string())?.data["status"].clone();
            if st["kms"]["configHash"] == hash_v2.as_str() {
                Ok(())
            } else {
                Err(st["kms"].to_string())
            }
        }
    })
    .await;
    let o = api.get("kubebao").await.unwrap();
    assert_eq!(
        o.data["status"]["observedGeneration"],
        o.metadata.generation.unwrap()
    );

    // ── Rotation on request → new key_id → every Secret rewritten under it ──
    api.patch(
        "kubebao",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"kubebao.io/rotate": "r1"}}})),
    )
    .await
    .unwrap();
    let key_id_v2 = wait_for("the rotation to show in status", WAIT, || {
        let api = api.clone();
        async move {
            let st = api.get("kubebao").await.map_err(|e| e.to_string())?.data["status"].clone();
            if st["keyVersion"] == 2 {
                Ok(st["keyId"].as_str().unwrap().to_string())
            } else {
                Err(st["keyVersion"].to_string())
            }
        }
    })
    .await;
    assert_ne!(key_id_v2, key_id_v1);
    wait_for("the rewrite to complete", Duration::from_secs(180), || {
        let api = api.clone();
        let key_id_v2 = key_id_v2.clone();
        async move {
            let st = api.get("kubebao").await.map_err(|e| e.to_string())?.data["status"].clone();
            let r = &st["rewrite"];
            if r["complete"] == true && r["keyId"] == key_id_v2.as_str() {
                Ok(())
            } else {
                Err(r.to_string())
            }
        }
    })
    .await;
    let rewrite = api.get("kubebao").await.unwrap().data["status"]["rewrite"].clone();
    assert_eq!(rewrite["failed"], 0);
    assert!(rewrite["done"].as_u64().unwrap() >= 2);
    for name in ["before", "after"] {
        let raw = bed
            .etcd()
            .get(&format!("/registry/secrets/{test_ns}/{name}"))
            .await
            .unwrap();
        assert!(
            raw.starts_with(b"k8s:enc:kms:v2:kubebao:"),
            "{name} is encrypted"
        );
        assert!(
            contains(&raw, key_id_v2.as_bytes()),
            "{name} is stored under the new key_id"
        );
    }

    // ── Deletion: installers remove their files, objects go, the Transit key stays ──
    api.delete("kubebao", &Default::default()).await.unwrap();
    let host_files = [
        manifest_path.clone(),
        config.join("kms.yaml"),
        config.join("approle/secret-id"),
        config.join("encryption-config.yaml"),
    ];
    wait_for("the installer to uninstall", WAIT, || {
        installer.assert_running();
        let (b, s) = (bundle_dir.clone(), secrets_dir.clone());
        let readyz = readyz.clone();
        async move {
            let _ = sync_mounts(bed, &b, &s).await;
            let r = http_get(&readyz).await?;
            if r.starts_with("uninstalled") {
                Ok(())
            } else {
                Err(r)
            }
        }
    })
    .await;
    for f in &host_files {
        assert!(!f.exists(), "{} was removed", f.display());
    }
    wait_for("the KubeBaoInstallation to be gone", WAIT, || {
        let api = api.clone();
        async move {
            match api.get_opt("kubebao").await.map_err(|e| e.to_string())? {
                None => Ok(()),
                Some(_) => Err("still there".to_string()),
            }
        }
    })
    .await;
    assert!(dss.get_opt("kubebao-installer").await.unwrap().is_none());
    assert!(dss.get_opt("kubebao-csi").await.unwrap().is_none());
    assert!(cms.get_opt("kubebao-installer").await.unwrap().is_none());
    let secrets = Api::<Secret>::namespaced(client.clone(), NS);
    assert!(
        secrets
            .get_opt("kubebao-kms-approle")
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        Api::<ClusterRole>::all(client.clone())
            .get_opt("kubebao-csi")
            .await
            .unwrap()
            .is_none()
    );
    let key = bao
        .client()
        .transit_key(root, "transit", "kubebao-kms")
        .await
        .expect("the Transit key stays");
    assert_eq!(key.latest_version, 2);
    assert!(!key.deletion_allowed);
    // The plugin's own access went with the installation.
    assert_eq!(
        bao.client().policy_read(root, "kubebao-kms").await.unwrap(),
        None,
        "the plugin's policy was removed"
    );
    assert!(
        bao.client()
            .read("auth/approle/role/kubebao-kms", root)
            .await
            .unwrap_err()
            .is_not_found(),
        "the plugin's AppRole role was removed"
    );
    plugin.stop();

    // Secrets stored under the key still read back once something may use the key again: a
    // plugin with a token allowed on it, behind an API server restarted with no DEK cached, so
    // the read is a Transit decrypt under the kept key (the API server that was running could
    // serve them from its DEK cache without asking anyone).
    let ca_file = h.join("openbao-ca.pem");
    std::fs::write(&ca_file, bao.ca_pem()).unwrap();
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    let reader_port = free_port();
    let mut reader = Component::start(
        "kubebao-kms-reader",
        bed.dir(),
        &kms_bin,
        &[
            format!("--socket={}", socket.display()),
            format!("--http-addr=127.0.0.1:{reader_port}"),
            format!("--openbao-addr={}", bao.tls_addr()),
            format!("--openbao-ca-file={}", ca_file.display()),
            "--transit-mount=transit".into(),
            "--transit-key=kubebao-kms".into(),
            "--auth-method=token".into(),
            format!("--token-file={}", token_file.display()),
        ],
    );
    let reader_health = format!("http://127.0.0.1:{reader_port}/readyz");
    wait_for("a plugin with access to the kept key", WAIT, || {
        reader.assert_running();
        let health = reader_health.clone();
        async move { http_get(&health).await }
    })
    .await;
    let encryption_config = h.join("encryption-config.yaml");
    std::fs::write(&encryption_config, &files["encryption-config.yaml"]).unwrap();
    let mark = bao.audit().len();
    bed.restart_apiserver(Some(&encryption_config)).await;
    let ns_secrets = Api::<Secret>::namespaced(bed.client().await, &test_ns);
    let read = ns_secrets.get("before").await.unwrap();
    assert_eq!(read.data.unwrap()["value"].0, b"plain-before-value");
    let decrypts = bao
        .audit()
        .since(mark)
        .filter(|r| r.path == "transit/decrypt/kubebao-kms" && r.error.is_none());
    assert!(
        !decrypts.is_empty(),
        "the restarted API server read them through a Transit decrypt"
    );

    reader.stop();
    installer.stop();
    operator.stop();
}
