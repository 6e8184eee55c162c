"""`modalign export-version VERSION`: a published policy version out of the model store, into a folder.

As stored: a full checkpoint's Hugging Face folder, or a LoRA version's adapter in PEFT's format
(PeftModel.from_pretrained loads it onto the base its manifest names). With --merged, any version as a
full checkpoint: an adapter merged into its base, which transformers loads on its own. Either way every
file is verified against the version's manifest (and an adapter's base against the adapter's) first.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from modalign.core.config import add_arguments, build_config
from modalign.core.modelstore import DEFAULT_MODEL_STORE, MANIFEST, ChecksumMismatch, S3Config, open_store
from modalign.policy.adapters import ADAPTER_FOLDER, is_adapter_version
from modalign.policy.model import load_policy, save_policy


@dataclass(frozen=True)
class ExportConfig:
    """Export a published policy version."""

    out: Path = Path("modalign-export")
    """The folder to write; it must not exist yet."""
    merged: bool = False
    """Write a full checkpoint: a LoRA version's adapter merged into its base (a full version is written as is)."""
    model_store: str = DEFAULT_MODEL_STORE
    """The model store the trainer publishes to (a folder or s3://bucket/prefix)."""
    s3: S3Config = field(default_factory=S3Config)
    """How to reach an s3:// model store."""


def export_version(version: str, config: ExportConfig) -> Path:
    """Writes version into config.out (see the module docstring); returns what it wrote."""
    if config.out.exists():
        raise FileExistsError(f"{config.out} exists: name a new folder")
    folder = open_store(config.model_store, config.s3).fetch("policy", version)
    if config.merged and is_adapter_version(folder):
        save_policy(*load_policy(folder), config.out)
    elif is_adapter_version(folder):
        shutil.copytree(folder / ADAPTER_FOLDER, config.out)
    else:
        shutil.copytree(folder, config.out, ignore=shutil.ignore_patterns(MANIFEST))
    return config.out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="modalign export-version", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("version", help="the policy version to export, e.g. v7")
    add_arguments(parser, ExportConfig)
    namespace = parser.parse_args(argv)
    try:
        out = export_version(namespace.version, build_config(parser, ExportConfig, namespace))
    except (LookupError, FileExistsError, ChecksumMismatch) as error:
        parser.error(str(error))
    print(out)
    return 0
