"""The repository explains itself: README's layout names every top-level entry and every folder of
services/, docs/architecture.md names every folder of services/, and no document links outside the
repository or to a file that is not in it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", "docs/architecture.md", "docs/rollout.md", "docs/demo.md", "docs/benchmarks.md", "docs/models.md",
             "docs/operations.md", "docs/security.md", "docs/data.md",
             "helm/modalign/README.md", "tests/deploy/schemas/README.md"]


def tracked() -> list[str]:
    result = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    return result.stdout.splitlines()


def layout_block(markdown: str) -> str:
    """The code block under README's '## Layout' heading."""
    section = markdown.split("\n## Layout\n", 1)[1]
    return section.split("```", 2)[1]


def service_folders() -> list[str]:
    return sorted(p.name for p in (REPO / "services").iterdir() if (p / "__init__.py").is_file())


def test_readme_layout_names_every_top_level_entry_and_every_services_folder() -> None:
    block = layout_block((REPO / "README.md").read_text())
    named = {line.split()[0].rstrip("/").split("/")[0] for line in block.splitlines() if line.strip() and not line.startswith("  ")}
    top_level = {path.split("/")[0] for path in tracked()}
    assert top_level - named == set(), "README's Layout misses these top-level entries"
    nested = {line.split()[0].rstrip("/") for line in block.splitlines() if line.startswith("  ")}
    assert set(service_folders()) - nested == set(), "README's Layout misses these folders of services/"


def test_architecture_names_every_services_folder() -> None:
    text = (REPO / "docs" / "architecture.md").read_text()
    assert [name for name in service_folders() if f"\n{name}/ " not in text] == []


@pytest.mark.parametrize("document", DOCUMENTS)
def test_links_stay_inside_the_repository_and_resolve(document: str) -> None:
    path = REPO / document
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a web address or an anchor
        resolved = (path.parent / target.split("#")[0]).resolve()
        assert resolved.is_relative_to(REPO), f"{document} links outside the repository: {target}"
        assert resolved.exists(), f"{document} links to {target}, which does not exist"


def test_nothing_tracked_reads_or_links_the_folder_beside_the_clone() -> None:
    # Spelt in parts so that this file does not match itself.
    beside = re.compile("(" + r"\.\./|/work/|parent / \"" + ")" + "shared")
    offenders = [path for path in tracked()
                 if (REPO / path).is_file() and (REPO / path).stat().st_size < 5_000_000
                 and beside.search((REPO / path).read_text(errors="replace"))]
    assert offenders == []
