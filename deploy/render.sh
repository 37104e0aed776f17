#!/usr/bin/env bash
# Prints the one-file install manifest (deploy/kubebao.yaml): the Helm chart rendered with its
# defaults into namespace kubebao, with the Namespace itself first.
# Usage: deploy/render.sh [path/to/helm] > deploy/kubebao.yaml   (or: make manifest)
set -euo pipefail
helm="${1:-helm}"
cd "$(dirname "$0")/.."
cat <<'YAML'
# KubeBao install manifest, rendered from charts/kubebao with default values.
# kubectl apply --server-side -f deploy/kubebao.yaml
# Regenerate with `make manifest`; a test fails when this file is stale.
apiVersion: v1
kind: Namespace
metadata:
  name: kubebao
  labels:
    app.kubernetes.io/name: kubebao
YAML
"$helm" template kubebao charts/kubebao --namespace kubebao --kube-version 1.35.4
