#!/usr/bin/env bash
# Renders helm/modalign into plain manifests for clusters without Helm, one folder per setup:
#   gpu/  the chart's defaults: policy, reward and trainer on GPU nodes, an existing Kafka at kafka:9092
#   cpu/  helm/modalign/examples/cpu.yaml: CPU only, built-in models, the trainer on CPU, Kafka from Strimzi
# The services' bearer tokens come from Secret modalign-tokens, which plain manifests cannot hold: create
# it first (docs/security.md), e.g.
#   kubectl -n modalign create secret generic modalign-tokens --from-file=tokens.json
# Apply with `kubectl apply -k deploy/kubernetes/gpu` (namespace modalign). tests/deploy checks the
# committed files are what this script renders; rerun it after changing the chart:
#   bash deploy/kubernetes/render.sh [OUTPUT_DIR]
# helm comes from PATH or HELM (.ci/install-deploy-tools.sh prints its directory).
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-deploy/kubernetes}"
helm="${HELM:-helm}"

render() {
  local setup="$1"; shift
  mkdir -p "$out/$setup"
  {
    echo "# Rendered from helm/modalign by deploy/kubernetes/render.sh; do not edit by hand."
    "$helm" template modalign helm/modalign --namespace modalign "$@"
  } >"$out/$setup/modalign.yaml"
}

render gpu --set auth.tokensSecret=modalign-tokens
render cpu --values helm/modalign/examples/cpu.yaml --set auth.tokensSecret=modalign-tokens
