#!/usr/bin/env bash
# `make image`: builds the four binaries and writes KubeBao's image tarball,
# <target dir>/image/kubebao-<version>.tar, tagged as the chart and the KubeBaoInstallation
# expect (ghcr.io/kubebao/kubebao:<version>). No Docker engine, no base image: see
# docs/image.md.
#
#   PROFILE      cargo profile, `release` (default) or `debug` (faster, bigger)
#   IMAGE_REPOSITORY  the repository part of the tag (default ghcr.io/kubebao/kubebao)
#   SOURCE_DATE_EPOCH  the image's file times and creation date (default 0)
set -euo pipefail
cd "$(dirname "$0")/.."

cargo=${CARGO:-cargo}
profile=${PROFILE:-release}
target_dir=${CARGO_TARGET_DIR:-target}
repository=${IMAGE_REPOSITORY:-ghcr.io/kubebao/kubebao}
packages=(-p kubebao-operator -p kubebao-kms -p kubebao-csi -p kubebao-installer)

case "$profile" in
  release) profile_args=(--release); bin_dir=$target_dir/release ;;
  debug | dev) profile_args=(); bin_dir=$target_dir/debug ;;
  *) profile_args=(--profile "$profile"); bin_dir=$target_dir/$profile ;;
esac

"$cargo" build --locked "${profile_args[@]}" "${packages[@]}" --bins

# The operator's version (its default image's tag) and the workspace's repository URL.
read -r version source < <("$cargo" metadata --no-deps --format-version 1 | python3 -c '
import json, sys
meta = json.load(sys.stdin)
pkg = next(p for p in meta["packages"] if p["name"] == "kubebao-operator")
source = pkg["repository"]
if not source:
    import tomllib  # Python 3.11+; the crates inherit nothing, so read [workspace.package]
    with open(meta["workspace_root"] + "/Cargo.toml", "rb") as f:
        source = tomllib.load(f)["workspace"]["package"].get("repository", "")
print(pkg["version"], source or "-")')

labels=(
  --label "org.opencontainers.image.title=kubebao"
  --label "org.opencontainers.image.description=KubeBao: KMS v2 plugin, Secrets Store CSI provider, node installer and operator for OpenBao"
  --label "org.opencontainers.image.licenses=Apache-2.0"
  --label "org.opencontainers.image.version=$version"
)
if [ "$source" != - ]; then
  labels+=(--label "org.opencontainers.image.source=$source")
fi
if revision=$(git rev-parse HEAD 2>/dev/null); then
  labels+=(--label "org.opencontainers.image.revision=$revision")
fi

python3 image/write_image.py --bin-dir "$bin_dir" --tag "$repository:$version" \
  --out "$target_dir/image/kubebao-$version.tar" "${labels[@]}"
