"""One atomic checkpoint per training round: everything needed to resume exactly where the round ended.

The trainer writes it before it commits Kafka offsets. After a crash it resumes from the checkpoint's
own positions, not the group's committed offsets, so a round is either entirely in the checkpoint
(and never consumed again) or entirely absent (and consumed again from the same positions).

Format 2, in the work directory, nothing pickled, so renaming or moving a class cannot break resuming:
  tensors-<token>.safetensors  every tensor of the state (weights, optimiser moments, the torch RNG)
  checkpoint.json              {"format": 2, "tensors": "<that file>", "state": ...}: the rest of the
                               state as JSON, each tensor replaced by {"$tensor": <its key in the file>}
A tensor file is written and fsynced first under a fresh name; renaming checkpoint.json into place
is the commit, and only then is the previous tensor file deleted. Format 1 (checkpoint.pt, a
torch.save pickle) and any other format are refused, naming the format found and the one expected.
"""

from __future__ import annotations

import json
import os
import random
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT = 2
MANIFEST = "checkpoint.json"
LEGACY_CHECKPOINT = "checkpoint.pt"
"""Format 1: torch.save of pickled dataclasses and protobuf objects."""


class CheckpointFormatError(RuntimeError):
    """The work directory holds a checkpoint this trainer cannot read."""


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy and torch RNG states, as values save_checkpoint can store."""
    name, key, position, has_gauss, cached_gaussian = np.random.get_state()
    return {"python": random.getstate(), "numpy": [name, key.tolist(), position, has_gauss, cached_gaussian],
            "torch": torch.get_rng_state()}


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, key, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])


# --- the state tree as JSON plus tensors ---------------------------------------------------------------
# A state is nested dicts, lists, tuples, tensors and JSON scalars. Tuples and dicts whose keys are not
# all strings (an optimiser's state is keyed by parameter index) are tagged, so they come back as they were.


def _encode(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(value, torch.Tensor):
        if path in tensors:
            raise ValueError(f"two tensors of the state map to the same key {path!r}")
        # A copy of its own: tied weights share storage, which safetensors refuses to write twice.
        tensors[path] = value.detach().to("cpu", copy=True).contiguous()
        return {"$tensor": path}
    if isinstance(value, dict):
        if all(isinstance(key, str) and not key.startswith("$") for key in value):
            return {key: _encode(item, tensors, f"{path}/{key}") for key, item in value.items()}
        return {"$items": [[_encode(key, tensors, f"{path}/{i}.key"), _encode(item, tensors, f"{path}/{i}")]
                           for i, (key, item) in enumerate(value.items())]}
    if isinstance(value, tuple):
        return {"$tuple": [_encode(item, tensors, f"{path}/{i}") for i, item in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(item, tensors, f"{path}/{i}") for i, item in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a checkpoint stores tensors and JSON values, not {type(value).__name__} (at {path or '/'})")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(item, tensors) for item in value]
    if not isinstance(value, dict):
        return value
    if "$tensor" in value:
        return tensors[value["$tensor"]]
    if "$tuple" in value:
        return tuple(_decode(item, tensors) for item in value["$tuple"])
    if "$items" in value:
        return {_decode(key, tensors): _decode(item, tensors) for key, item in value["$items"]}
    return {key: _decode(item, tensors) for key, item in value.items()}


# --- files ---------------------------------------------------------------------------------------------


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)  # make renames and deletions in it durable
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def save_checkpoint(directory: Path, state: dict[str, Any]) -> Path:
    """Writes state (see the module docstring) atomically; returns the path of checkpoint.json."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors, "")
    previous = _referenced_tensor_file(directory)
    tensor_file = directory / f"tensors-{secrets.token_hex(8)}.safetensors"
    save_file(tensors, str(tensor_file))
    _fsync_file(tensor_file)
    temporary = directory / f".{MANIFEST}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump({"format": FORMAT, "tensors": tensor_file.name, "state": tree}, handle, separators=(",", ":"))
        handle.flush()
        os.fsync(handle.fileno())
    target = directory / MANIFEST
    os.replace(temporary, target)
    _fsync_directory(directory)
    if previous is not None and previous != tensor_file:  # only now is the previous checkpoint unreferenced
        previous.unlink(missing_ok=True)
    return target


def _read_manifest(directory: Path) -> dict[str, Any] | None:
    path = directory / MANIFEST
    if not path.exists():
        if (directory / LEGACY_CHECKPOINT).exists():
            raise CheckpointFormatError(
                f"{directory / LEGACY_CHECKPOINT} is a format-1 checkpoint (a torch.save pickle); this trainer "
                f"reads format {FORMAT} only. Resume it with the release that wrote it, or move it away to start "
                "afresh from the consumer group's committed offsets."
            )
        return None
    manifest = json.loads(path.read_text(encoding="utf-8"))
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != FORMAT:
        raise CheckpointFormatError(f"{path} has checkpoint format {found!r}; this trainer reads format {FORMAT}")
    return manifest


def _referenced_tensor_file(directory: Path) -> Path | None:
    manifest = _read_manifest(directory)  # a checkpoint of another format is left alone: this raises
    return directory / manifest["tensors"] if manifest is not None else None


def remove_interrupted_writes(directory: Path) -> None:
    """Deletes what writes a crash interrupted: temporary manifests and tensor files no manifest names (the
    checkpoint before each is intact). Only the trainer, before it writes again, may call this: a reader
    would delete a write in progress. A checkpoint of another format is refused, not touched."""
    keep = _referenced_tensor_file(directory)
    for leftover in [*directory.glob(f".{MANIFEST}.*.tmp"), *directory.glob("tensors-*.safetensors")]:
        if leftover != keep:
            leftover.unlink()


def load_checkpoint(directory: Path) -> dict[str, Any] | None:
    """The state the last save_checkpoint wrote, or None when there is none; refuses other formats."""
    manifest = _read_manifest(directory)
    if manifest is None:
        return None
    tensors = load_file(str(directory / manifest["tensors"]), device="cpu")
    return _decode(manifest["state"], tensors)
