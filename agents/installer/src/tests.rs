use super::*;

struct Bed {
    _tmp: tempfile::TempDir,
    bundle: PathBuf,
    secrets: PathBuf,
    host: PathBuf,
}

fn bed() -> Bed {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = tmp.path().join("bundle");
    let secrets = tmp.path().join("secrets");
    let host = tmp.path().join("host");
    for d in [&bundle, &secrets, &host] {
        fs::create_dir_all(d).unwrap();
    }
    Bed {
        _tmp: tmp,
        bundle,
        secrets,
        host,
    }
}

fn plan(action: Action) -> Plan {
    Plan {
        action,
        state_path: "/etc/kubebao/installer-state.json".into(),
        files: vec![
            PlannedFile {
                name: "secret-id".into(),
                source: Source::Secret,
                path: "/etc/kubebao/approle/secret-id".into(),
                mode: 0o644,
            },
            PlannedFile {
                name: "kms.yaml".into(),
                source: Source::Config,
                path: "/etc/kubebao/kms.yaml".into(),
                mode: 0o644,
            },
            PlannedFile {
                name: "kubebao-kms.yaml".into(),
                source: Source::Config,
                path: "/etc/kubernetes/manifests/kubebao-kms.yaml".into(),
                mode: 0o600,
            },
        ],
        keep: vec![],
    }
}

fn write_bundle(b: &Bed, action: Action) {
    fs::write(
        b.bundle.join(PLAN_FILE),
        serde_json::to_vec(&plan(action)).unwrap(),
    )
    .unwrap();
    fs::write(
        b.bundle.join("kms.yaml"),
        "socket: /var/run/kubebao/kms.sock\n",
    )
    .unwrap();
    fs::write(b.bundle.join("kubebao-kms.yaml"), "kind: Pod\n").unwrap();
    fs::write(b.secrets.join("secret-id"), "s3cret").unwrap();
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn install_writes_every_planned_file_below_the_host_root() {
    let b = bed();
    write_bundle(&b, Action::Install);
    let out = apply(&b.bundle, &b.secrets, &b.host).unwrap();
    assert!(matches!(out, Outcome::Installed { written: 3, .. }));
    assert_eq!(
        fs::read_to_string(b.host.join("etc/kubernetes/manifests/kubebao-kms.yaml")).unwrap(),
        "kind: Pod\n"
    );
    assert_eq!(
        fs::read_to_string(b.host.join("etc/kubebao/approle/secret-id")).unwrap(),
        "s3cret"
    );
}

#[test]
fn secrets_are_written_0600_whatever_the_plan_says() {
    let b = bed();
    write_bundle(&b, Action::Install);
    apply(&b.bundle, &b.secrets, &b.host).unwrap();
    assert_eq!(mode(&b.host.join("etc/kubebao/approle/secret-id")), 0o600);
    assert_eq!(mode(&b.host.join("etc/kubebao/kms.yaml")), 0o644);
    assert_eq!(
        mode(&b.host.join("etc/kubebao/installer-state.json")),
        0o600
    );
}

#[test]
fn reinstalling_unchanged_files_writes_nothing_and_keeps_the_hash() {
    let b = bed();
    write_bundle(&b, Action::Install);
    let Outcome::Installed { hash: h1, .. } = apply(&b.bundle, &b.secrets, &b.host).unwrap() else {
        panic!("install")
    };
    let out = apply(&b.bundle, &b.secrets, &b.host).unwrap();
    assert_eq!(
        out,
        Outcome::Installed {
            hash: h1.clone(),
            written: 0
        }
    );
    assert_eq!(planned_hash(&b.bundle, &b.secrets).unwrap(), h1);
}

#[test]
fn a_changed_file_changes_the_hash_and_is_rewritten() {
    let b = bed();
    write_bundle(&b, Action::Install);
    let before = planned_hash(&b.bundle, &b.secrets).unwrap();
    apply(&b.bundle, &b.secrets, &b.host).unwrap();
    fs::write(b.secrets.join("secret-id"), "renewed").unwrap();
    let out = apply(&b.bundle, &b.secrets, &b.host).unwrap();
    let Outcome::Installed { hash, written } = out else {
        panic!("install")
    };
    assert_ne!(hash, before);
    assert_eq!(written, 1);
    assert_eq!(
        fs::read_to_string(b.host.join("etc/kubebao/approle/secret-id")).unwrap(),
        "renewed"
    );
}

#[test]
fn the_state_file_records_the_installed_paths_and_hash() {
    let b = bed();
    write_bundle(&b, Action::Install);
    let Outcome::Installed { hash, .. } = apply(&b.bundle, &b.secrets, &b.host).unwrap() else {
        panic!("install")
    };
    let state = read_state(&b.host.join("etc/kubebao/installer-state.json")).unwrap();
    assert_eq!(state.hash, hash);
    let files = installed_files(&state);
    assert_eq!(files.len(), 3);
    assert_eq!(
        files["/etc/kubebao/approle/secret-id"],
        hex::encode(Sha256::digest(b"s3cret"))
    );
}

#[test]
fn uninstall_removes_exactly_the_installed_files() {
    let b = bed();
    write_bundle(&b, Action::Install);
    apply(&b.bundle, &b.secrets, &b.host).unwrap();
    let foreign = b.host.join("etc/kubernetes/manifests/kube-apiserver.yaml");
    fs::write(&foreign, "kind: Pod\n").unwrap();
    write_bundle(&b, Action::Uninstall);
    let out = apply(&b.bundle, &b.secrets, &b.host).unwrap();
    assert_eq!(
        out,
        Outcome::Uninstalled {
            removed: 3,
            kept: 0
        }
    );
    assert!(
        !b.host
            .join("etc/kubernetes/manifests/kubebao-kms.yaml")
            .exists()
    );
    assert!(!b.host.join("etc/kubebao/kms.yaml").exists());
    assert!(!b.host.join("etc/kubebao/installer-state.json").exists());
    assert!(foreign.exists(), "files the installer did not write stay");
    // A second uninstall is a no-op.
    assert_eq!(
        apply(&b.bundle, &b.secrets, &b.host).unwrap(),
        Outcome::Uninstalled {
            removed: 0,
            kept: 0
        }
    );
}

#[test]
fn files_dropped_from_the_plan_are_removed_on_the_next_install() {
    let b = bed();
    write_bundle(&b, Action::Install);
    apply(&b.bundle, &b.secrets, &b.host).unwrap();
    let mut p = plan(Action::Install);
    p.files.retain(|f| f.name != "kms.yaml");
    fs::write(b.bundle.join(PLAN_FILE), serde_json::to_vec(&p).unwrap()).unwrap();
    apply(&b.bundle, &b.secrets, &b.host).unwrap();
    assert!(!b.host.join("etc/kubebao/kms.yaml").exists());
    assert!(
        b.host
            .join("etc/kubernetes/manifests/kubebao-kms.yaml")
            .exists()
    );
}

#[test]
fn destinations_outside_the_host_root_are_refused() {
    let root = Path::new("/host");
    assert!(matches!(
        host_path(root, "/etc/../../x"),
        Err(Error::BadPath(_))
    ));
    assert!(matches!(host_path(root, "etc/x"), Err(Error::BadPath(_))));
    assert!(matches!(host_path(root, "/"), Err(Error::BadPath(_))));
    assert_eq!(
        host_path(root, "/etc/kubebao/kms.yaml").unwrap(),
        Path::new("/host/etc/kubebao/kms.yaml")
    );
}

#[test]
fn a_missing_source_names_the_file_and_installs_nothing() {
    let b = bed();
    write_bundle(&b, Action::Install);
    fs::remove_file(b.secrets.join("secret-id")).unwrap();
    let err = apply(&b.bundle, &b.secrets, &b.host).unwrap_err();
    assert!(err.to_string().contains("secret-id"), "{err}");
    assert!(
        !b.host
            .join("etc/kubernetes/manifests/kubebao-kms.yaml")
            .exists()
    );
}

#[test]
fn no_temp_files_are_left_behind() {
    let b = bed();
    write_bundle(&b, Action::Install);
    apply(&b.bundle, &b.secrets, &b.host).unwrap();
    let leftovers: Vec<_> = fs::read_dir(b.host.join("etc/kubebao"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("kubebao-tmp"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn an_uninstall_can_keep_a_file_in_place_and_removes_the_rest() {
    let b = bed();
    write_bundle(&b, Action::Install);
    apply(&b.bundle, &b.secrets, &b.host).unwrap();
    let mut p = plan(Action::Uninstall);
    p.keep = vec![PlannedFile {
        name: "kms.yaml".into(),
        source: Source::Config,
        path: "/etc/kubebao/kms.yaml".into(),
        mode: 0o600,
    }];
    fs::write(b.bundle.join(PLAN_FILE), serde_json::to_vec(&p).unwrap()).unwrap();
    fs::write(b.bundle.join("kms.yaml"), "identity only\n").unwrap();
    let out = apply(&b.bundle, &b.secrets, &b.host).unwrap();
    assert_eq!(
        out,
        Outcome::Uninstalled {
            removed: 2,
            kept: 1
        }
    );
    assert!(
        !b.host
            .join("etc/kubernetes/manifests/kubebao-kms.yaml")
            .exists()
    );
    assert!(!b.host.join("etc/kubebao/approle/secret-id").exists());
    let kept = b.host.join("etc/kubebao/kms.yaml");
    assert_eq!(fs::read_to_string(&kept).unwrap(), "identity only\n");
    assert_eq!(mode(&kept), 0o600);
    // The state now records only the kept file; the next uninstall changes nothing.
    let state = read_state(&b.host.join("etc/kubebao/installer-state.json")).unwrap();
    assert_eq!(state.files.len(), 1);
    assert_eq!(
        apply(&b.bundle, &b.secrets, &b.host).unwrap(),
        Outcome::Uninstalled {
            removed: 0,
            kept: 1
        }
    );
    assert_eq!(
        planned_hash(&b.bundle, &b.secrets).unwrap(),
        state.hash,
        "the kept set's hash, so `run` notices a changed kept file"
    );
}
