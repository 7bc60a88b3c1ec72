#!/usr/bin/env bash
# `make k8s-check` (part of `make test`): renders every overlay of build/k8s with
# `kubectl kustomize` (the configuration files of configs/ sit outside the kustomization, hence
# the load restrictor flag) and validates each object strictly against the Kubernetes schemas,
# offline: kubernetes-validate bundles them. The test `cli kubernetes` checks what they say
# against the services themselves.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
command -v kubectl >/dev/null || { echo "[k8s] kubectl is needed (with its built-in kustomize)" >&2; exit 1; }

VENV="$ROOT/.local/k8s-venv"
KV="$VENV/bin/kubernetes-validate"
KV_VERSION=1.37.0
# The Kubernetes version the manifests are validated for.
K8S_VERSION="${K8S_VERSION:-1.32.0}"
installed="$("$VENV/bin/pip" show kubernetes-validate 2>/dev/null || true)"
if [ ! -x "$KV" ] || ! grep -q "^Version: $KV_VERSION$" <<<"$installed"; then
  echo "[k8s] installing kubernetes-validate $KV_VERSION from PyPI into .local/k8s-venv"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "kubernetes-validate==$KV_VERSION"
fi

OUT="$ROOT/.local/k8s"
mkdir -p "$OUT"
for overlay in build/k8s/overlays/*/; do
  name="$(basename "$overlay")"
  kubectl kustomize --load-restrictor LoadRestrictionsNone "$overlay" > "$OUT/$name.yaml"
  objects="$(grep -c '^kind:' "$OUT/$name.yaml")"
  "$KV" --strict --kubernetes-version "$K8S_VERSION" --quiet "$OUT/$name.yaml"
  echo "[k8s] $name: $objects objects rendered and valid for Kubernetes $K8S_VERSION (strict)"
done
