# KubeBao entry points. `make test` and `make demo` set up everything they need themselves.
SHELL := /bin/bash
.DEFAULT_GOAL := help
CARGO ?= cargo
export KUBEBAO_CACHE ?= $(HOME)/.cache/kubebao
# One crypto provider, no OpenSSL anywhere: fail the build if something pulls openssl-sys in.
export OPENSSL_NO_VENDOR := 1

.PHONY: help
help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

.PHONY: testbed
testbed: ## Install/build OpenBao, etcd, Kubernetes (with kubelet, kube-scheduler), helm, the GitOps health checker and the node (containerd, pause image, Secrets Store CSI driver) into the cache
	@bash tests/testbed/install.sh

.PHONY: build
build: ## Build every crate (debug)
	$(CARGO) build --workspace --all-targets

.PHONY: fmt
fmt: ## Format the code
	$(CARGO) fmt --all

.PHONY: fmt-check
fmt-check:
	$(CARGO) fmt --all -- --check

.PHONY: lint
lint: ## Clippy with warnings as errors
	$(CARGO) clippy --workspace --all-targets -- -D warnings

.PHONY: test
# Every test bed's API server audit log lands here; kubebao-rbac-audit then checks that KubeBao's
# RBAC grants exactly what the suite used (docs/security.md, "Least privilege, measured").
AUDIT_DIR := $(CURDIR)/target/rbac-audit

test: testbed fmt-check lint ## Everything: set up the test bed, then unit and end-to-end tests, then RBAC measured
	rm -rf "$(AUDIT_DIR)" && mkdir -p "$(AUDIT_DIR)"
	KUBEBAO_AUDIT_DIR="$(AUDIT_DIR)" $(CARGO) test --workspace --no-fail-fast
	$(CARGO) run -q -p kubebao-testbed --bin kubebao-rbac-audit -- "$(AUDIT_DIR)"

.PHONY: demo
demo: testbed ## Run KubeBao end to end on a local test bed until Ctrl-C
	$(CARGO) build -p kubebao-operator -p kubebao-kms -p kubebao-csi -p kubebao-installer -p kubebao-testbed --bins
	KUBEBAO_BIN_DIR=$${CARGO_TARGET_DIR:-target}/debug $${CARGO_TARGET_DIR:-target}/debug/kubebao-demo

.PHONY: image
image: ## Build the image tarball target/image/kubebao-<version>.tar (PROFILE=debug: faster)
	@PROFILE=$(PROFILE) CARGO=$(CARGO) bash image/build.sh

.PHONY: crds
crds: ## Regenerate crds/ and the chart's copy from the Rust types
	$(CARGO) run -q -p kubebao-operator -- crd > crds/kubebao.io.yaml
	cp crds/kubebao.io.yaml charts/kubebao/files/crds/kubebao.io.yaml

.PHONY: manifest
manifest: testbed ## Regenerate deploy/kubebao.yaml from the chart
	source "$(KUBEBAO_CACHE)/testbed.env" && deploy/render.sh "$$KUBEBAO_HELM" > deploy/kubebao.yaml

.PHONY: clean-cache
clean-cache: ## Remove the test bed cache (forces a rebuild of etcd and Kubernetes)
	rm -rf "$(KUBEBAO_CACHE)"
