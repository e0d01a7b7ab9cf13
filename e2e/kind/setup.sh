#!/usr/bin/env bash
# Create a kind cluster, build both images from the Dockerfile, load them into kind and install the
# operator with the Helm chart. Used by .github/workflows/e2e-kind.yaml; runnable by hand where
# Docker, kind, kubectl and helm exist. Afterwards: E2E_TARGET=kind pytest e2e
set -euo pipefail
cluster="${KIND_CLUSTER:-kvcache-e2e}"
root="$(cd "$(dirname "$0")/../.." && pwd)"

kind create cluster --name "$cluster" --wait 120s
docker build --target operator -t kvcache-operator:e2e "$root"
docker build --target engine -t kvcache-engine:e2e "$root"
kind load docker-image --name "$cluster" kvcache-operator:e2e kvcache-engine:e2e
helm install kvcache-operator "$root/helm/kvcache-operator" \
  --namespace kvcache-system --create-namespace \
  --set image.repository=kvcache-operator --set image.tag=e2e --set image.pullPolicy=Never \
  --wait --timeout 180s
kubectl -n kvcache-system get pods
