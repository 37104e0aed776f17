//! KubeBao's image, as `make image` writes it (`image/write_image.py`), from debug binaries: the
//! tarball is both a docker-archive and an OCI layout whose blobs match their digests, it is
//! tagged as the chart expects, runs as non-root, holds the four binaries, every library they
//! need and nothing else, and two builds are byte-identical. The binaries run from the unpacked
//! layer with chroot (no shell, no host library), and the tarball is imported into containerd
//! (`ctr images import`, installed by `make testbed`) and run in a container.

use std::collections::{BTreeSet, VecDeque};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kubebao_testbed::node_image::{kubebao_binaries, write_kubebao_image};
use serde_json::Value;

const BINARIES: [&str; 4] = [
    "kubebao-operator",
    "kubebao-kms",
    "kubebao-csi",
    "kubebao-installer",
];
const NON_ROOT: &str = "65532:65532";

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
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn sh(script: &str) -> String {
    run(Command::new("sh").args(["-c", script]))
}

fn sha256(path: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(path));
    format!(
        "sha256:{}",
        out.split_whitespace().next().expect("sha256sum")
    )
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

fn is_root() -> bool {
    sh("id -u").trim() == "0"
}

/// The tag the chart and the KubeBaoInstallation use: values.yaml `image.repository` and the
/// chart's appVersion, which must be the workspace version (the operator's default image).
fn expected_tag() -> String {
    let yaml = |file: &str| -> Value {
        let text = std::fs::read_to_string(repo().join(file)).expect(file);
        serde_saphyr::from_str(&text).expect("chart YAML")
    };
    let values = yaml("charts/kubebao/values.yaml");
    let chart = yaml("charts/kubebao/Chart.yaml");
    let tag = format!(
        "{}:{}",
        values["image"]["repository"]
            .as_str()
            .expect("image.repository"),
        chart["appVersion"].as_str().expect("appVersion")
    );
    assert_eq!(
        tag,
        concat!("ghcr.io/kubebao/kubebao:", env!("CARGO_PKG_VERSION")),
        "the chart's image and the operator's default image (DEFAULT_IMAGE) differ"
    );
    tag
}

/// The blob a descriptor names, after checking its size and digest; returns its path.
fn blob(layout: &Path, desc: &Value) -> PathBuf {
    let digest = desc["digest"].as_str().expect("descriptor digest");
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    let path = layout.join("blobs/sha256").join(hex);
    let size = std::fs::metadata(&path)
        .unwrap_or_else(|e| panic!("blob {digest} missing: {e}"))
        .len();
    assert_eq!(Some(size), desc["size"].as_u64(), "size of blob {digest}");
    assert_eq!(sha256(&path), digest, "content of blob {digest}");
    path
}

/// Checks the OCI layout and the docker manifest.json; returns (config, gzip layer path).
fn check_archive(layout: &Path, tag: &str) -> (Value, PathBuf) {
    let version = &read_json(&layout.join("oci-layout"))["imageLayoutVersion"];
    assert_eq!(version, "1.0.0");
    let index = read_json(&layout.join("index.json"));
    let entries = index["manifests"].as_array().expect("index manifests");
    assert_eq!(entries.len(), 1, "one image in index.json");
    let entry = &entries[0];
    assert_eq!(
        entry["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    for name in [
        "io.containerd.image.name",
        "org.opencontainers.image.ref.name",
    ] {
        assert_eq!(entry["annotations"][name], tag, "{name} in index.json");
    }
    let manifest = read_json(&blob(layout, entry));
    let config_path = blob(layout, &manifest["config"]);
    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1, "one layer");
    assert_eq!(
        layers[0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let layer = blob(layout, &layers[0]);

    let docker = read_json(&layout.join("manifest.json"));
    let rel = |p: &Path| {
        p.strip_prefix(layout)
            .unwrap()
            .to_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        docker,
        serde_json::json!([{"Config": rel(&config_path), "RepoTags": [tag], "Layers": [rel(&layer)]}]),
        "manifest.json names the same config and layer as the OCI manifest"
    );
    (read_json(&config_path), layer)
}

fn check_config(config: &Value, layer: &Path) {
    let c = &config["config"];
    assert_eq!(c["User"], NON_ROOT, "the image runs as the non-root user");
    assert_eq!(config["os"], "linux");
    assert!(config["architecture"].is_string());
    // The chart's Deployment runs this path; its `docker run` default is the operator.
    let deployment =
        std::fs::read_to_string(repo().join("charts/kubebao/templates/deployment.yaml"))
            .expect("deployment template");
    assert!(deployment.contains("command: [/usr/local/bin/kubebao-operator]"));
    assert_eq!(
        c["Entrypoint"],
        serde_json::json!(["/usr/local/bin/kubebao-operator"])
    );
    assert!(c["Env"].as_array().expect("Env").iter().any(|e| {
        e.as_str()
            .is_some_and(|e| e.starts_with("PATH=/usr/local/bin:"))
    }));
    assert_eq!(
        c["Labels"]["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );
    let diff_id = sh(&format!("gzip -dc '{}' | sha256sum", layer.display()));
    let diff_id = format!("sha256:{}", diff_id.split_whitespace().next().unwrap());
    assert_eq!(config["rootfs"]["diff_ids"], serde_json::json!([diff_id]));
}

/// Resolves `path` inside `root` as the container would (absolute symlinks from `root`);
/// returns the real path relative to `root`, or None when something on the way is missing.
fn resolve_in(root: &Path, path: &str) -> Option<PathBuf> {
    let split = |p: &str| -> Vec<String> {
        p.split('/')
            .filter(|s| !s.is_empty() && *s != ".")
            .map(String::from)
            .collect()
    };
    let mut todo: VecDeque<String> = split(path).into();
    let mut cur = PathBuf::new();
    let mut links = 0;
    while let Some(part) = todo.pop_front() {
        if part == ".." {
            cur.pop();
            continue;
        }
        let next = cur.join(&part);
        let meta = std::fs::symlink_metadata(root.join(&next)).ok()?;
        if !meta.file_type().is_symlink() {
            cur = next;
            continue;
        }
        links += 1;
        assert!(links < 40, "symlink loop at {path}");
        let target = std::fs::read_link(root.join(&next)).ok()?;
        let target = target.to_str().expect("utf-8 link");
        if target.starts_with('/') {
            cur = PathBuf::new();
        }
        for piece in split(target).into_iter().rev() {
            todo.push_front(piece);
        }
    }
    Some(cur)
}

/// The libraries `ldd` resolves for a binary (host paths).
fn needed_libraries(binary: &Path) -> Vec<String> {
    let out = run(Command::new("ldd").arg(binary));
    assert!(!out.contains("not found"), "{}: {out}", binary.display());
    out.lines()
        .filter_map(|l| {
            let path = l.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| path.to_string())
        })
        .collect()
}

fn regular_files(root: &Path, dir: &Path, out: &mut BTreeSet<PathBuf>) {
    for entry in std::fs::read_dir(root.join(dir)).expect("read rootfs") {
        let entry = entry.expect("dir entry");
        let rel = dir.join(entry.file_name());
        let kind = entry.file_type().expect("file type");
        if kind.is_dir() {
            regular_files(root, &rel, out);
        } else if kind.is_file() {
            out.insert(rel);
        }
    }
}

/// The layer holds the binaries, what they need, and nothing else; everything is root-owned.
fn check_layer(layer: &Path, rootfs: &Path, bin_dir: &Path) {
    let listing = run(Command::new("tar")
        .args(["--numeric-owner", "-tvzf"])
        .arg(layer));
    for line in listing.lines() {
        assert_eq!(
            line.split_whitespace().nth(1),
            Some("0/0"),
            "owner of {line}"
        );
    }
    run(Command::new("tar")
        .args(["--numeric-owner", "-xpzf"])
        .arg(layer)
        .arg("-C")
        .arg(rootfs));
    let mut expected: BTreeSet<PathBuf> = ["etc/passwd", "etc/group", "etc/nsswitch.conf"]
        .into_iter()
        .map(PathBuf::from)
        .collect();
    let ca = "/etc/ssl/certs/ca-certificates.crt";
    if Path::new(ca).is_file() {
        expected.insert(resolve_in(rootfs, ca).expect("the CA bundle is in the image"));
    }
    for bin in BINARIES {
        let path = PathBuf::from("usr/local/bin").join(bin);
        let meta = std::fs::metadata(rootfs.join(&path)).expect(bin);
        assert!(
            meta.is_file() && meta.permissions().mode() & 0o111 != 0,
            "{bin} is executable"
        );
        assert_eq!(
            sha256(&rootfs.join(&path)),
            sha256(&bin_dir.join(bin)),
            "{bin} is the build"
        );
        expected.insert(path);
        for lib in needed_libraries(&bin_dir.join(bin)) {
            let real = resolve_in(rootfs, &lib)
                .unwrap_or_else(|| panic!("{bin} needs {lib}, missing from the image"));
            assert!(
                rootfs.join(&real).is_file(),
                "{lib} resolves to a file in the image"
            );
            expected.insert(real);
        }
    }
    let mut found = BTreeSet::new();
    regular_files(rootfs, Path::new(""), &mut found);
    assert_eq!(
        found, expected,
        "the image's files are the binaries and what they need"
    );

    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).expect("passwd");
    assert!(passwd.lines().any(|l| l.contains(&format!(":{NON_ROOT}:"))));
    let group = std::fs::read_to_string(rootfs.join("etc/group")).expect("group");
    assert!(group.lines().any(|l| l.starts_with("nonroot:x:65532:")));
    let tmp = std::fs::metadata(rootfs.join("tmp")).expect("/tmp");
    assert_eq!(tmp.permissions().mode() & 0o7777, 0o1777, "/tmp is 1777");
    for shell in ["/bin/sh", "/usr/bin/sh", "/bin/bash"] {
        assert!(resolve_in(rootfs, shell).is_none(), "no shell: {shell}");
    }
}

/// Runs each binary from the unpacked layer with chroot: the image's libraries are complete.
fn run_in_chroot(rootfs: &Path) {
    for bin in BINARIES {
        let out = run(Command::new("chroot")
            .arg(rootfs)
            .arg(format!("/usr/local/bin/{bin}"))
            .arg("--version"));
        assert!(out.contains(bin), "{bin} --version: {out}");
    }
    let out = run(Command::new("chroot")
        .arg(format!("--userspec={NON_ROOT}"))
        .arg(rootfs)
        .args(["/usr/local/bin/kubebao-operator", "--help"]));
    assert!(
        out.contains("Usage"),
        "the operator runs as {NON_ROOT}: {out}"
    );
}

/// A private containerd (own root, state and socket), stopped on drop.
struct Containerd {
    child: Child,
    socket: PathBuf,
}

impl Containerd {
    fn start(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("containerd dir");
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        let d = dir.display();
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{}\"\n",
                socket.display()
            ),
        )
        .expect("containerd config");
        let log = std::fs::File::create(dir.join("containerd.log")).expect("containerd log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let ctd = Self { child, socket };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ctd.ctr(&["version"]).status().is_ok_and(|s| s.success()) {
            assert!(
                Instant::now() < deadline,
                "containerd did not start, see {d}/containerd.log"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        ctd
    }

    fn ctr(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "kubebao-image-test"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// `ctr images import` accepts the tarball, and the image runs in a container.
fn import_with_ctr(dir: &Path, tarball: &Path, tag: &str) {
    let ctd = Containerd::start(dir);
    run(&mut ctd.ctr(&["images", "import", tarball.to_str().expect("path")]));
    let images = run(&mut ctd.ctr(&["images", "ls", "-q"]));
    assert!(
        images.lines().any(|l| l == tag),
        "ctr lists {tag}: {images}"
    );
    let out = run(&mut ctd.ctr(&[
        "run",
        "--rm",
        tag,
        "kubebao-image-test",
        "/usr/local/bin/kubebao-kms",
        "--version",
    ]));
    assert!(
        out.contains("kubebao-kms"),
        "kubebao-kms runs in the container: {out}"
    );
}

#[test]
fn image_tarball_is_complete_valid_and_reproducible() {
    let tag = expected_tag();
    let dir = tempfile::tempdir().expect("temp dir");
    let bins = dir.path().join("bin");
    let (layout, rootfs) = (dir.path().join("layout"), dir.path().join("rootfs"));
    for d in [&bins, &layout, &rootfs] {
        std::fs::create_dir(d).expect("mkdir");
    }
    kubebao_binaries(&bins);

    let (a, b) = (dir.path().join("a.tar"), dir.path().join("b.tar"));
    let (out_a, out_b) = (
        write_kubebao_image(&bins, &a),
        write_kubebao_image(&bins, &b),
    );
    assert!(
        out_a.contains("digest   sha256:"),
        "the build prints the digest: {out_a}"
    );
    assert_eq!(
        out_a.replace("a.tar", ""),
        out_b.replace("b.tar", ""),
        "same digests"
    );
    assert_eq!(sha256(&a), sha256(&b), "two builds give the same tarball");

    run(Command::new("tar")
        .arg("-xf")
        .arg(&a)
        .arg("-C")
        .arg(&layout));
    let (config, layer) = check_archive(&layout, &tag);
    check_config(&config, &layer);
    check_layer(&layer, &rootfs, &bins);

    // The test bed runs as root and installs containerd (`make testbed`): both checks always run.
    assert!(
        is_root(),
        "running the binaries from the layer needs root (chroot); run the tests as root"
    );
    run_in_chroot(&rootfs);
    assert!(
        on_path("ctr") && on_path("containerd"),
        "containerd is not installed: run `make testbed` (it installs Debian's containerd)"
    );
    import_with_ctr(&dir.path().join("containerd"), &a, &tag);
}
