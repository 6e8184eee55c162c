#!/usr/bin/env bash
# Type checks services/core with mypy (configured in pyproject.toml). mypy cannot follow the editable
# install's package-dir mapping (`modalign` = services/), so a symlink in a temporary folder gives it
# the import name.
set -euo pipefail
cd "$(dirname "$0")/.."
path="$(mktemp -d)"
trap 'rm -rf "$path"' EXIT
ln -s "$PWD/services" "$path/modalign"
MYPYPATH="$path" uv run --no-sync mypy "$@"
