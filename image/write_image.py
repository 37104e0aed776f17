#!/usr/bin/env python3
"""Writes KubeBao's container image from binaries already built, with no Docker engine and no
base image: one layer with the four binaries, the shared libraries `ldd` says they need, the
users, /tmp and the CA bundle. The output is one tar that is both a docker-archive
(manifest.json, for `docker load`) and an OCI image layout (oci-layout, index.json, blobs/, for
`podman load`, `ctr images import` and `skopeo copy oci-archive:`), like `docker save` writes.

The output is deterministic: same binaries, same host libraries, same arguments and the same
SOURCE_DATE_EPOCH give the same bytes and so the same digest.

    python3 image/write_image.py --bin-dir target/release \\
        --tag ghcr.io/kubebao/kubebao:0.1.0 --out target/image/kubebao-0.1.0.tar

Standard library only (Python 3.9+).
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

# The binaries, all in /usr/local/bin: the chart and the rendered manifests call them by path.
BINARIES = ["kubebao-operator", "kubebao-kms", "kubebao-csi", "kubebao-installer"]
BIN_DIR = "usr/local/bin"
# The chart's Deployment runs the operator (it sets command and args itself, as do the
# rendered static pod and DaemonSets); `docker run IMAGE --help` shows the operator's help.
ENTRYPOINT = ["/usr/local/bin/kubebao-operator"]
USER = "65532:65532"
ENV = ["PATH=/usr/local/bin:/usr/bin:/bin"]
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"

PASSWD = (
    "root:x:0:0:root:/root:/usr/sbin/nologin\n"
    "nonroot:x:65532:65532:nonroot:/nonexistent:/usr/sbin/nologin\n"
)
GROUP = "root:x:0:\nnonroot:x:65532:\n"
# glibc's built-in default asks DNS before /etc/hosts (and stops on NXDOMAIN): without this
# file `localhost` and the pod's own name would not resolve from /etc/hosts.
NSSWITCH = "passwd: files\ngroup: files\nhosts: files dns\n"

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
# ELF e_machine -> OCI architecture.
ARCHITECTURES = {0x3E: "amd64", 0xB7: "arm64"}


def fail(message):
    sys.exit(f"write_image: {message}")


class Layer:
    """The file system of the layer: path (no leading slash) -> entry."""

    def __init__(self):
        self.entries = {}

    def _put(self, path, kind, **entry):
        old = self.entries.get(path)
        if old is not None and old["kind"] != kind:
            fail(f"/{path} is both a {old['kind']} and a {kind} in the layer")
        self.entries[path] = dict(kind=kind, **entry)
        parent = os.path.dirname(path)
        if parent:
            self.directory(parent)

    def directory(self, path, mode=0o755):
        old = self.entries.get(path)
        if old is None or old["kind"] != "dir" or mode != 0o755:
            self._put(path, "dir", mode=mode)

    def text(self, path, content):
        self._put(path, "file", mode=0o644, data=content.encode())

    def host_file(self, path, source):
        """A host file at `path`; executable files stay executable (0755), others 0644."""
        mode = 0o755 if os.stat(source).st_mode & 0o111 else 0o644
        self._put(path, "file", mode=mode, source=source)

    def host_path(self, path):
        """The host file at absolute `path`, with every symlink on the way to it, so that
        the same path resolves the same way inside the image."""
        cur = ""
        parts = [p for p in path.split("/") if p not in ("", ".")]
        for i, part in enumerate(parts):
            cur = os.path.dirname(cur) if part == ".." else os.path.join(cur, part)
            host = "/" + cur
            if os.path.islink(host):
                target = os.readlink(host)
                self._put(cur, "symlink", mode=0o777, target=target)
                base = "/" if target.startswith("/") else "/" + os.path.dirname(cur)
                rest = "/".join(parts[i + 1 :])
                return self.host_path(os.path.join(base, target, rest))
            if not os.path.exists(host):
                fail(f"{host} does not exist")
        if not os.path.isfile("/" + cur):
            fail(f"{path} is not a regular file")
        self.host_file(cur, "/" + cur)

    def write(self, out, mtime):
        """Writes the layer as an uncompressed tar, sorted, root-owned, with fixed times."""
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(self.entries):
                entry = self.entries[path]
                info = tarinfo(path, entry["mode"], mtime)
                if entry["kind"] == "dir":
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif entry["kind"] == "symlink":
                    info.type = tarfile.SYMTYPE
                    info.linkname = entry["target"]
                    tar.addfile(info)
                elif "data" in entry:
                    info.size = len(entry["data"])
                    tar.addfile(info, io.BytesIO(entry["data"]))
                else:
                    info.size = os.stat(entry["source"]).st_size
                    with open(entry["source"], "rb") as f:
                        tar.addfile(info, f)


def tarinfo(name, mode, mtime):
    info = tarfile.TarInfo(name)
    info.mode = mode
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def libraries(binary):
    """The shared libraries `ldd` resolves for `binary` (absolute host paths)."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True)
    if out.returncode != 0:
        if "not a dynamic executable" in out.stderr + out.stdout:
            return []
        fail(f"ldd {binary} failed: {out.stderr.strip()}")
    libs = []
    for line in out.stdout.splitlines():
        if "not found" in line:
            fail(f"{binary} needs a library this machine does not have: {line.strip()}")
        match = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if match:
            libs.append(match.group(1))
    return libs


def architecture(binary):
    with open(binary, "rb") as f:
        header = f.read(20)
    if header[:4] != b"\x7fELF":
        fail(f"{binary} is not an ELF executable")
    machine = int.from_bytes(header[18:20], "little")
    if machine not in ARCHITECTURES:
        fail(f"{binary}: unsupported ELF machine {machine:#x}")
    return ARCHITECTURES[machine]


def build_layer(bin_dir):
    layer = Layer()
    for name in BINARIES:
        binary = os.path.join(bin_dir, name)
        if not os.path.isfile(binary):
            fail(f"{binary} is missing: build it first (cargo build -p {name})")
        layer.host_file(f"{BIN_DIR}/{name}", binary)
        for lib in libraries(binary):
            layer.host_path(lib)
    if os.path.isfile(CA_BUNDLE):
        layer.host_path(CA_BUNDLE)
    else:
        print(f"write_image: warning: {CA_BUNDLE} not found; the image has no CA bundle "
              "(install Debian's ca-certificates)", file=sys.stderr)
    layer.text("etc/passwd", PASSWD)
    layer.text("etc/group", GROUP)
    layer.text("etc/nsswitch.conf", NSSWITCH)
    layer.directory("tmp", 0o1777)
    return layer


class Hashing:
    """A write-only file that hashes and counts what goes through it."""

    def __init__(self, inner):
        self.inner, self.sha, self.size = inner, hashlib.sha256(), 0

    def write(self, data):
        self.sha.update(data)
        self.size += len(data)
        return self.inner.write(data)

    def flush(self):
        self.inner.flush()

    def tell(self):
        return self.size

    def digest(self):
        return "sha256:" + self.sha.hexdigest()


def write_layer_blob(layer, path, mtime):
    """Writes the gzip layer to `path`; returns (diff_id, digest, size)."""
    with open(path, "wb") as f:
        compressed = Hashing(f)
        with gzip.GzipFile(filename="", fileobj=compressed, mode="wb",
                           compresslevel=6, mtime=0) as gz:
            plain = Hashing(gz)
            layer.write(plain, mtime)
    return plain.digest(), compressed.digest(), compressed.size


def canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def descriptor(media_type, data):
    return {"mediaType": media_type, "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
            "size": len(data)}


def image_config(arch, diff_id, labels, created):
    return canonical({
        "architecture": arch,
        "os": "linux",
        "created": created,
        "config": {"User": USER, "Env": ENV, "Entrypoint": ENTRYPOINT, "WorkingDir": "/",
                   "Labels": labels},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": "make image (image/write_image.py)"}],
    })


def write_archive(out, tag, arch, config, layer_blob, layer_desc):
    """The docker-archive + OCI layout tar; returns the manifest descriptor."""
    config_desc = descriptor(MEDIA_CONFIG, config)
    manifest = canonical({"schemaVersion": 2, "mediaType": MEDIA_MANIFEST,
                          "config": config_desc, "layers": [layer_desc]})
    manifest_desc = descriptor(MEDIA_MANIFEST, manifest)
    index_entry = dict(manifest_desc, platform={"architecture": arch, "os": "linux"},
                       annotations={"io.containerd.image.name": tag,
                                    "org.opencontainers.image.ref.name": tag})
    index = canonical({"schemaVersion": 2, "mediaType": MEDIA_INDEX,
                       "manifests": [index_entry]})
    blob = lambda d: "blobs/sha256/" + d["digest"].split(":", 1)[1]  # noqa: E731
    docker = canonical([{"Config": blob(config_desc), "RepoTags": [tag],
                         "Layers": [blob(layer_desc)]}])
    files = {
        "oci-layout": canonical({"imageLayoutVersion": "1.0.0"}),
        "index.json": index,
        "manifest.json": docker,
        blob(config_desc): config,
        blob(manifest_desc): manifest,
        blob(layer_desc): layer_blob,
    }
    with tarfile.open(out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("blobs", "blobs/sha256"):
            info = tarinfo(d, 0o755, 0)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name in sorted(files):
            content = files[name]
            info = tarinfo(name, 0o644, 0)
            if isinstance(content, bytes):
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
            else:
                info.size = os.stat(content).st_size
                with open(content, "rb") as f:
                    tar.addfile(info, f)
    return manifest_desc, config_desc


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bin-dir", required=True, help="directory with the four built binaries")
    p.add_argument("--tag", help="image reference, e.g. ghcr.io/kubebao/kubebao:0.1.0 (with --out)")
    p.add_argument("--out", help="the image tarball to write")
    p.add_argument("--rootfs", help="also (or only) unpack the layer into this directory "
                   "(the Dockerfile copies it into a FROM scratch image)")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                   help="image label (repeatable)")
    args = p.parse_args()
    if not args.out and not args.rootfs:
        p.error("give --out, --rootfs or both")
    if args.out and not args.tag:
        p.error("--out needs --tag")
    return args


def unpack(layer_path, rootfs):
    os.makedirs(rootfs, exist_ok=True)
    with tarfile.open(layer_path, "r:gz") as tar:
        # Our own tar: keep modes (/tmp is 1777) and owners as written.
        trusted = {"filter": "fully_trusted"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(rootfs, numeric_owner=True, **trusted)


def main():
    args = parse_args()
    if any("=" not in label for label in args.label):
        fail("--label takes KEY=VALUE")
    labels = dict(label.split("=", 1) for label in args.label)
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
    arch = architecture(os.path.join(args.bin_dir, BINARIES[0]))
    layer = build_layer(args.bin_dir)
    out_dir = os.path.dirname(os.path.abspath(args.out or args.rootfs))
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".image-") as tmp:
        layer_path = os.path.join(tmp, "layer.tar.gz")
        diff_id, layer_digest, layer_size = write_layer_blob(layer, layer_path, epoch)
        if args.rootfs:
            unpack(layer_path, args.rootfs)
        if not args.out:
            return
        layer_desc = {"mediaType": MEDIA_LAYER, "digest": layer_digest, "size": layer_size}
        config = image_config(arch, diff_id, labels, created)
        partial = os.path.join(tmp, "image.tar")
        manifest, config_desc = write_archive(partial, args.tag, arch, config, layer_path,
                                              layer_desc)
        shutil.move(partial, args.out)
    size = os.stat(args.out).st_size
    print(f"{args.out}: {args.tag}, {size / 1e6:.1f} MB")
    print(f"  digest   {manifest['digest']}  (manifest; kept by skopeo copy oci-archive:)")
    print(f"  image id {config_desc['digest']}  (config; `docker images` shows it)")


if __name__ == "__main__":
    main()
