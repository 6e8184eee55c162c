"""The model store: one folder per published version, written atomically and verified before use.

Layout: <root>/<kind>/<version>/ holding the model's files and manifest.json, where kind is "policy" or
"reward". A version is written under a temporary name and renamed into place, so a reader never sees
half a version; a loader verifies the sha256 of every file against the manifest before using any.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

MANIFEST = "manifest.json"


@dataclass
class Manifest:
    version: str
    kind: str
    """"policy" or "reward"."""
    parent: str = ""
    """The version this one was trained from; empty for the first."""
    algorithm: str = ""
    files: dict[str, str] = field(default_factory=dict)
    """sha256 of every file in the folder (manifest.json aside), by path relative to the folder."""
    trained_through: list[dict] = field(default_factory=list)
    """Kafka positions [{"topic", "partition", "offset"}]: everything before each offset was trained on."""
    eval_metrics: dict[str, float] = field(default_factory=dict)
    created_at: float = 0.0


class ChecksumMismatch(RuntimeError):
    """A version's files differ from its manifest: it must not be loaded."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_tree(folder: Path) -> None:
    for path in [*folder.rglob("*"), folder]:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


class ModelStore:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def folder(self, kind: str, version: str) -> Path:
        return self.root / kind / version

    def versions(self, kind: str) -> list[str]:
        """Published versions of kind, oldest first."""
        base = self.root / kind
        if not base.exists():
            return []
        published = [p for p in base.iterdir() if (p / MANIFEST).exists() and not p.name.startswith(".")]
        return [p.name for p in sorted(published, key=lambda p: (p / MANIFEST).stat().st_mtime)]

    def publish(self, manifest: Manifest, write: Callable[[Path], None]) -> tuple[Path, str]:
        """Writes a version: write(folder) fills a temporary folder, the manifest is added with every
        file's sha256, then the folder is renamed into place. Returns the folder and the manifest's sha256.

        Raises FileExistsError if the version exists: versions are never rewritten.
        """
        target = self.folder(manifest.kind, manifest.version)
        if target.exists():
            raise FileExistsError(f"{manifest.kind} version {manifest.version} already exists at {target}")
        staging = target.parent / f".incoming-{manifest.version}-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        try:
            write(staging)
            manifest.files = {
                str(path.relative_to(staging)): file_sha256(path)
                for path in sorted(staging.rglob("*")) if path.is_file()
            }
            manifest.created_at = manifest.created_at or time.time()
            (staging / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2, sort_keys=True))
            _fsync_tree(staging)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target, file_sha256(target / MANIFEST)

    @staticmethod
    def verify(folder: Path | str, manifest_sha256: str | None = None) -> Manifest:
        """Checks every file against the manifest (and the manifest against manifest_sha256 when given)."""
        folder = Path(folder)
        manifest_path = folder / MANIFEST
        if manifest_sha256 is not None and file_sha256(manifest_path) != manifest_sha256:
            raise ChecksumMismatch(f"{manifest_path} does not match its published sha256")
        manifest = Manifest(**json.loads(manifest_path.read_text()))
        present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}
        if present != set(manifest.files):
            raise ChecksumMismatch(f"{folder}: files {sorted(present ^ set(manifest.files))} differ from the manifest")
        for relative, expected in manifest.files.items():
            if file_sha256(folder / relative) != expected:
                raise ChecksumMismatch(f"{folder / relative}: sha256 differs from the manifest")
        return manifest
