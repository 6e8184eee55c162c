"""Dockerfile and skaffold.yaml, checked statically (no Docker engine runs here): hadolint, the skaffold
schema, and their agreement with the chart."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.deploy.conftest import CHART, REPO, load_json, render, run, schema_dir, tool

DOCKERFILE = REPO / "docker" / "Dockerfile"
SKAFFOLD = REPO / "skaffold.yaml"
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments dropped."""
    logical, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            keyword, _, arguments = pending.strip().partition(" ")
            logical.append((keyword.upper(), " ".join(arguments.split())))
            pending = ""
    return logical


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    start = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[start:]


def test_dockerfile_passes_hadolint() -> None:
    result = run([tool("hadolint"), "--failure-threshold", "info", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_runs_as_the_non_root_user_the_chart_expects() -> None:
    users = [arguments for keyword, arguments in final_stage(DOCKERFILE) if keyword == "USER"]
    assert users, "the runtime stage sets no USER: it would run as root"
    uid, _, gid = users[-1].partition(":")
    security = VALUES["podSecurityContext"]
    assert (int(uid), int(gid)) == (security["runAsUser"], security["runAsGroup"]) and int(uid) != 0
    assert ("ENTRYPOINT", '["modalign"]') in final_stage(DOCKERFILE)


def test_environment_is_installed_from_the_lock_with_uv() -> None:
    runs = [arguments for keyword, arguments in instructions(DOCKERFILE) if keyword == "RUN"]
    syncs = [command for command in runs if "uv sync" in command]
    assert syncs and all("--locked" in command for command in syncs), syncs
    assert not any(re.search(r"\bpip3? install\b", command) for command in runs), "packages must come from uv.lock"


def test_image_exposes_the_ports_the_chart_uses() -> None:
    exposed = {int(port) for keyword, arguments in final_stage(DOCKERFILE) if keyword == "EXPOSE" for port in arguments.split()}
    used = {VALUES["policy"]["grpcPort"], VALUES["policy"]["metricsPort"], VALUES["feedback"]["grpcPort"],
            VALUES["feedback"]["metricsPort"], VALUES["reward"]["httpPort"], VALUES["reward"]["grpcPort"],
            VALUES["trainer"]["metricsPort"]}
    assert exposed == used


def test_build_context_keeps_what_the_dockerfile_copies() -> None:
    ignore = DOCKERFILE.with_name("Dockerfile.dockerignore").read_text().splitlines()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = set()
    for keyword, arguments in instructions(DOCKERFILE):
        if keyword == "COPY" and "--from=" not in arguments:
            copied.update(shlex.split(arguments)[:-1])
    assert {path.rstrip("/").removeprefix("./") for path in copied} <= kept
    assert all((REPO / path).exists() for path in kept)


@pytest.fixture(scope="module")
def skaffold() -> dict:
    return yaml.safe_load(SKAFFOLD.read_text())


def skaffold_errors(config: dict) -> list[str]:
    version = config["apiVersion"].removeprefix("skaffold/")
    schema = load_json(schema_dir("skaffold") / f"{version}.json")
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(config)]


def test_skaffold_config_validates_against_its_schema(skaffold: dict) -> None:
    assert skaffold_errors(skaffold) == []
    misspelt = {**skaffold, "profiles": [{**skaffold["profiles"][0], "deploys": {}}]}
    assert skaffold_errors(misspelt), "the schema check must reject an unknown key"


def test_skaffold_has_cpu_and_gpu_profiles_that_build_with_the_dockerfile_and_deploy_the_chart(skaffold: dict) -> None:
    profiles = {profile["name"]: profile for profile in skaffold["profiles"]}
    assert set(profiles) == {"cpu", "gpu"}
    images = {VALUES["images"]["cpu"]["repository"]: "cpu", VALUES["images"]["cuda"]["repository"]: "cuda"}
    for name, profile in profiles.items():
        artifacts = profile["build"]["artifacts"]
        assert all((REPO / a["context"] / a["docker"]["dockerfile"]).resolve() == DOCKERFILE for a in artifacts)
        assert {a["image"] for a in artifacts} == ({*images} if name == "gpu" else {VALUES["images"]["cpu"]["repository"]})
        (release,) = profile["deploy"]["helm"]["releases"]
        assert (REPO / release["chartPath"]).resolve() == CHART
        for values_file in release.get("valuesFiles", []):
            assert (REPO / values_file).is_file(), values_file
        for key, template in release["setValueTemplates"].items():
            kind, field = key.split(".")[1:]
            image_key = re.sub(r"[^a-zA-Z0-9]", "_", next(i for i, k in images.items() if k == kind))
            assert template == f"{{{{.IMAGE_{'REPO' if field == 'repository' else 'TAG'}_{image_key}}}}}", key
            assert field in VALUES["images"][kind]


def test_skaffold_deployment_renders_with_built_image_names(skaffold: dict) -> None:
    for profile in skaffold["profiles"]:
        (release,) = profile["deploy"]["helm"]["releases"]
        flags = [flag for values_file in release.get("valuesFiles", []) for flag in ("--values", str(REPO / values_file))]
        built = {}
        for key in release["setValueTemplates"]:
            kind = key.split(".")[1]
            built[kind] = f"registry.local/{kind}:abc123"
            flags += ["--set-string", f"{key}={built[kind].split(':')[0] if key.endswith('repository') else 'abc123'}"]
        docs = render(None, *flags)
        images = {c["image"] for d in docs if d["kind"] in ("Deployment", "StatefulSet")
                  for c in d["spec"]["template"]["spec"]["containers"]}
        assert images == set(built.values()), (profile["name"], images)
