//! Where the test bed's binaries are: `KUBEBAO_*` variables, else the `testbed.env` that
//! `tests/testbed/install.sh` writes into the cache.

use std::path::PathBuf;

/// Paths of the real components.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// OpenBao server/CLI.
    pub bao: PathBuf,
    /// etcd.
    pub etcd: PathBuf,
    /// kube-apiserver.
    pub kube_apiserver: PathBuf,
    /// kube-controller-manager.
    pub kube_controller_manager: PathBuf,
    /// kubectl.
    pub kubectl: PathBuf,
    /// helm.
    pub helm: PathBuf,
    /// The GitOps health checker (Flux kstatus + Argo CD Lua), see tests/testbed/gitops-health.
    pub gitops_health: PathBuf,
}

fn cache_dir() -> PathBuf {
    std::env::var_os("KUBEBAO_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            PathBuf::from(home).join(".cache/kubebao")
        })
}

/// The value of a `KUBEBAO_*` setting: the environment variable, else `testbed.env`.
pub(crate) fn setting(key: &str) -> Option<String> {
    if let Ok(value) = std::env::var(key) {
        return Some(value);
    }
    std::fs::read_to_string(env_file())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_string())
}

/// The `testbed.env` that `make testbed` writes.
pub(crate) fn env_file() -> PathBuf {
    cache_dir().join("testbed.env")
}

/// The path a `KUBEBAO_*` setting names, or a panic saying how to install it.
pub(crate) fn installed(key: &str, what: &str) -> PathBuf {
    let path = setting(key).map(PathBuf::from).unwrap_or_else(|| {
        panic!(
            "test bed is not installed: {key} is not set and {} does not name it.\n\
             Run `make testbed` (it installs or builds {what} into the cache).",
            env_file().display()
        )
    });
    assert!(
        path.exists(),
        "test bed {what} is missing at {}. Run `make testbed` to build it.",
        path.display()
    );
    path
}

impl Binaries {
    /// Finds every binary, or panics with what is missing and how to install it.
    pub fn locate() -> Self {
        let env_file = env_file();
        let get = |key: &str| -> PathBuf {
            match setting(key) {
                Some(v) => PathBuf::from(v),
                None => panic!(
                    "test bed is not installed: {key} is not set and {} does not name it.\n\
                     Run `make testbed` (it builds etcd, kube-apiserver and installs OpenBao into the cache).",
                    env_file.display()
                ),
            }
        };
        let bins = Self {
            bao: get("KUBEBAO_BAO"),
            etcd: get("KUBEBAO_ETCD"),
            kube_apiserver: get("KUBEBAO_KUBE_APISERVER"),
            kube_controller_manager: get("KUBEBAO_KUBE_CONTROLLER_MANAGER"),
            kubectl: get("KUBEBAO_KUBECTL"),
            helm: get("KUBEBAO_HELM"),
            gitops_health: get("KUBEBAO_GITOPS_HEALTH"),
        };
        for (name, path) in [
            ("bao", &bins.bao),
            ("etcd", &bins.etcd),
            ("kube-apiserver", &bins.kube_apiserver),
            ("kube-controller-manager", &bins.kube_controller_manager),
            ("kubectl", &bins.kubectl),
            ("helm", &bins.helm),
            ("gitops-health", &bins.gitops_health),
        ] {
            assert!(
                path.is_file(),
                "test bed binary {name} is missing at {}. Run `make testbed` to build it.",
                path.display()
            );
        }
        bins
    }
}
