//! What the node tests add on a [`Node`]: KubeBao's own image, written from the debug binaries
//! and imported into the node's containerd; KubeBao's binaries for host processes; the Secrets
//! Store CSI driver with secret rotation and KubeBao's CSIDriver object from the chart; and
//! ways to look at a pod from the host (its volumes' files, its container's environment).
//!
//! ```no_run
//! # async fn demo() {
//! # let bed = kubebao_testbed::Testbed::shared().await;
//! # let node = kubebao_testbed::Node::start(bed).await;
//! let dir = tempfile::tempdir().unwrap();
//! let tag = kubebao_testbed::node_image::kubebao_image_on(&node, dir.path()); // pods run `image: tag`
//! # }
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

pub use crate::node::{CsiDriver, CsiDriverOptions};
use crate::{Node, Testbed};

/// KubeBao's binaries: what the image holds, in `/usr/local/bin`.
pub const KUBEBAO_BINARIES: [&str; 4] = [
    "kubebao-operator",
    "kubebao-kms",
    "kubebao-csi",
    "kubebao-installer",
];

/// KubeBao's image as the chart and the operator name it (the workspace version).
pub const KUBEBAO_IMAGE: &str = concat!("ghcr.io/kubebao/kubebao:", env!("CARGO_PKG_VERSION"));

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
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds KubeBao's `binaries` (debug, into the running test's own target dir: the one
/// `cargo test` built it in) and returns that profile dir, where they now are.
pub fn build_binaries(binaries: &[&str]) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    let target_dir = profile_dir.parent().expect("target dir");
    let mut cargo = Command::new(option_env!("CARGO").unwrap_or("cargo"));
    cargo
        .current_dir(repo())
        .args(["build", "-q", "--bins", "--target-dir"])
        .arg(target_dir);
    for bin in binaries {
        cargo.args(["-p", bin]);
    }
    run(&mut cargo);
    profile_dir.to_path_buf()
}

/// Builds KubeBao's four binaries and copies them into `dir`, so a concurrent rebuild cannot
/// change them under the test; returns `dir`.
pub fn kubebao_binaries(dir: &Path) -> PathBuf {
    let profile_dir = build_binaries(&KUBEBAO_BINARIES);
    std::fs::create_dir_all(dir).expect("create the binaries' dir");
    for bin in KUBEBAO_BINARIES {
        std::fs::copy(profile_dir.join(bin), dir.join(bin))
            .unwrap_or_else(|e| panic!("copy {bin} out of {}: {e}", profile_dir.display()));
    }
    dir.to_path_buf()
}

/// Writes KubeBao's image, tagged [`KUBEBAO_IMAGE`] and labelled with its version, from the
/// binaries in `bin_dir` into the tarball `out`, as `make image` does (`image/write_image.py`).
/// Returns what the writer printed (its digests).
pub fn write_kubebao_image(bin_dir: &Path, out: &Path) -> String {
    run(Command::new("python3")
        .arg(repo().join("image/write_image.py"))
        .arg("--bin-dir")
        .arg(bin_dir)
        .args(["--tag", KUBEBAO_IMAGE, "--label"])
        .arg(concat!(
            "org.opencontainers.image.version=",
            env!("CARGO_PKG_VERSION")
        ))
        .arg("--out")
        .arg(out)
        .env("SOURCE_DATE_EPOCH", "1700000000"))
}

/// The node's containerd socket (its private one, in the node's directory).
pub fn containerd_socket(node: &Node) -> PathBuf {
    node.dir().join("containerd/containerd.sock")
}

/// `ctr` against the node's containerd, in the kubelet's namespace `k8s.io`.
fn ctr(node: &Node, args: &[&str]) -> String {
    run(Command::new("ctr")
        .arg(format!("--address={}", containerd_socket(node).display()))
        .arg("--namespace=k8s.io")
        .args(args))
}

/// Imports an image tarball into the node's containerd, where pods with
/// `imagePullPolicy: Never` find it.
pub fn import_image(node: &Node, tarball: &Path) {
    ctr(
        node,
        &["images", "import", tarball.to_str().expect("UTF-8 path")],
    );
}

/// KubeBao's image on the node: binaries built, image written (into `dir`) and imported.
/// Returns the tag pods use ([`KUBEBAO_IMAGE`]).
pub fn kubebao_image_on(node: &Node, dir: &Path) -> String {
    let started = Instant::now();
    let bins = kubebao_binaries(&dir.join("bin"));
    let tarball = dir.join("kubebao-image.tar");
    write_kubebao_image(&bins, &tarball);
    import_image(node, &tarball);
    eprintln!(
        "node: KubeBao's image {KUBEBAO_IMAGE} built and imported in {:.1?}",
        started.elapsed()
    );
    KUBEBAO_IMAGE.to_string()
}

/// The host pid of a running container, from its id as a pod's status gives it
/// (`containerd://<id>`) or bare.
pub fn container_pid(node: &Node, container_id: &str) -> Result<u32, String> {
    let id = container_id
        .strip_prefix("containerd://")
        .unwrap_or(container_id);
    let tasks = ctr(node, &["tasks", "ls"]);
    let line = tasks
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .ok_or_else(|| format!("containerd runs no task {id}:\n{tasks}"))?;
    line.split_whitespace()
        .nth(1)
        .and_then(|pid| pid.parse().ok())
        .ok_or_else(|| format!("no pid in ctr's line {line:?}"))
}

/// A process's environment, read from `/proc` (the host sees every container's processes).
pub fn process_env(pid: u32) -> Result<BTreeMap<String, String>, String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ"))
        .map_err(|e| format!("read /proc/{pid}/environ: {e}"))?;
    Ok(raw
        .split(|b| *b == 0)
        .filter_map(|entry| {
            let entry = String::from_utf8_lossy(entry);
            let (k, v) = entry.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect())
}

/// Where the kubelet puts a pod's volume on the host: `<root>/pods/<uid>/volumes/<plugin>/<volume>`,
/// `plugin` as the kubelet writes it (`kubernetes.io~secret`; CSI volumes,
/// `kubernetes.io~csi`, have their files in a `mount` directory below).
pub fn pod_volume_dir(node: &Node, pod_uid: &str, plugin: &str, volume: &str) -> PathBuf {
    node.root_dir()
        .join("pods")
        .join(pod_uid)
        .join("volumes")
        .join(plugin)
        .join(volume)
}

/// The Secrets Store CSI driver's own Helm chart (from its Go module, copied by `make testbed`).
pub fn upstream_csi_driver_chart() -> PathBuf {
    crate::paths::installed("KUBEBAO_CSI_DRIVER_CHART", "the CSI driver's Helm chart")
}

/// The CSIDriver object `secrets-store.csi.k8s.io` as KubeBao's chart writes it (pod tokens
/// for the `openbao` audience, republish for rotation), rendered by the real helm.
pub fn chart_csi_driver_object(bed: &Testbed) -> String {
    run(Command::new(&bed.binaries().helm)
        .args(["template", "kubebao"])
        .arg(repo().join("charts/kubebao"))
        .args(["--kube-version", "1.35.0"])
        .args(["--show-only", "templates/csidriver.yaml"]))
}
