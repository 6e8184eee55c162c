"""deploy/kubernetes: the chart rendered for clusters without Helm, kept in step with the chart."""

from __future__ import annotations

import os
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.deploy.conftest import REPO, run, tool

PLAIN = REPO / "deploy" / "kubernetes"
SETUPS = sorted(p.name for p in PLAIN.iterdir() if (p / "kustomization.yaml").is_file())


def test_there_are_plain_manifests_for_gpu_and_cpu_clusters() -> None:
    assert SETUPS == ["cpu", "gpu"]


def test_committed_manifests_are_what_the_chart_renders_now(tmp_path: Path) -> None:
    result = run(["bash", str(PLAIN / "render.sh"), str(tmp_path)], env={**os.environ, "HELM": tool("helm")})
    assert result.returncode == 0, result.stderr
    for setup in SETUPS:
        fresh = (tmp_path / setup / "modalign.yaml").read_text()
        assert (PLAIN / setup / "modalign.yaml").read_text() == fresh, (
            f"deploy/kubernetes/{setup} is stale: run bash deploy/kubernetes/render.sh and commit the result")


@pytest.mark.parametrize("setup", SETUPS)
def test_kustomize_builds_each_setup_into_the_modalign_namespace(setup: str) -> None:
    result = run([tool("kubectl"), "kustomize", str(PLAIN / setup)])
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert {"Namespace", "Deployment", "Service", "PrometheusRule"} <= {doc["kind"] for doc in docs}
    (namespace,) = [doc for doc in docs if doc["kind"] == "Namespace"]
    kubernetes_validate.validate(namespace, kubernetes_validate.latest_version(), strict=True)
    # The chart's documents themselves are validated in test_chart.py; this is the same rendering.
    assert all(doc["metadata"]["namespace"] == namespace["metadata"]["name"] for doc in docs if doc is not namespace)
