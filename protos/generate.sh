#!/usr/bin/env bash
# Regenerates the Python code for protos/modalign/v1 into services/v1 (the import package modalign.v1).
# CI runs it and fails when the committed code differs: edit the .proto files, then run this.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$python" -m grpc_tools.protoc -I "$root/protos" \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  "$root"/protos/modalign/v1/*.proto
mkdir -p "$root/services/v1"
rm -f "$root"/services/v1/*_pb2*.py "$root"/services/v1/*_pb2*.pyi
cp "$out"/modalign/v1/* "$root/services/v1/"
printf '"""Generated from protos/modalign/v1 by protos/generate.sh; do not edit."""\n' > "$root/services/v1/__init__.py"
