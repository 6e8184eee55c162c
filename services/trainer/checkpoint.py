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

Format 3 is format 2 plus sharded tensors (DTensors: each rank's shards of the models under
--learner.sharding fsdp), written by every rank with torch.distributed.checkpoint into
sharded-<token>/ and named in checkpoint.json ({"sharded": "sharded-<token>"}; each such tensor in the
state is {"$sharded": <its key>}). That format records every tensor's global shape and each shard's
place in it, so any number of ranks, one included, loads it into its own layout. The sharded folder is
written before the manifest that names it, like the tensor file, and deleted once unreferenced.
"""

from __future__ import annotations

import collections
import json
import os
import random
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from modalign.trainer import distributed

FORMAT = 2
SHARDED_FORMAT = 3
READABLE_FORMATS = (FORMAT, SHARDED_FORMAT)
READABLE = f"formats {' and '.join(map(str, READABLE_FORMATS))}"
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


class _Tensors:
    """Where _encode puts the state's tensors: sharded ones as they are (each rank writes its own shards),
    plain ones as `plain` says: "copy" (to write them), "skip" (a rank that writes none), or "refer" (the
    tensors a sharded load fills in)."""

    def __init__(self, plain: str = "copy") -> None:
        self.plain_mode = plain
        self.plain: dict[str, torch.Tensor] = {}
        self.sharded: dict[str, torch.Tensor] = {}

    def add(self, path: str, tensor: torch.Tensor) -> dict[str, str]:
        if path in self.plain or path in self.sharded:
            raise ValueError(f"two tensors of the state map to the same key {path!r}")
        if isinstance(tensor, DTensor):
            self.sharded[path] = tensor.detach()
            return {"$sharded": path}
        if self.plain_mode == "copy":
            # A copy of its own: tied weights share storage, which safetensors refuses to write twice.
            self.plain[path] = tensor.detach().to("cpu", copy=True).contiguous()
        elif self.plain_mode == "refer":
            self.plain[path] = tensor.detach()
        return {"$tensor": path}


def _encode(value: Any, tensors: _Tensors, path: str) -> Any:
    if isinstance(value, torch.Tensor):
        return tensors.add(path, value)
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


def _decode(value: Any, tensors: dict[str, torch.Tensor], sharded: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(item, tensors, sharded) for item in value]
    if not isinstance(value, dict):
        return value
    if "$tensor" in value:
        return tensors[value["$tensor"]]
    if "$sharded" in value:
        return sharded[value["$sharded"]]
    if "$tuple" in value:
        return tuple(_decode(item, tensors, sharded) for item in value["$tuple"])
    if "$items" in value:
        return {_decode(key, tensors, sharded): _decode(item, tensors, sharded) for key, item in value["$items"]}
    return {key: _decode(item, tensors, sharded) for key, item in value.items()}


def _sharded_keys(tree: Any) -> set[str]:
    """The keys of the sharded tensors an encoded state refers to."""
    if isinstance(tree, list):
        return set().union(*(_sharded_keys(item) for item in tree))
    if not isinstance(tree, dict):
        return set()
    if "$sharded" in tree:
        return {tree["$sharded"]}
    return set().union(*(_sharded_keys(item) for item in tree.values()))


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


def save_checkpoint(directory: Path, state: dict[str, Any], rank: int = 0) -> Path | None:
    """Writes state (see the module docstring) atomically; returns the path of checkpoint.json on rank 0.

    A state holding sharded tensors is saved by every rank together, each with its own state (alike but
    for the shards); rank 0 alone writes the rest and commits. Other states are saved by rank 0 alone."""
    tensors = _Tensors("copy" if rank == 0 else "skip")
    tree = _encode(state, tensors, "")
    sharded_folder = None
    if tensors.sharded:
        sharded_folder = directory / distributed.all_gather(f"sharded-{secrets.token_hex(8)}")[0]
        # Each rank writes (and fsyncs) its own shards; rank 0 writes the index once all have.
        dcp.save(tensors.sharded, checkpoint_id=sharded_folder)
    if rank != 0:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    previous = _referenced_files(directory)
    tensor_file = directory / f"tensors-{secrets.token_hex(8)}.safetensors"
    save_file(tensors.plain, str(tensor_file))
    _fsync_file(tensor_file)
    manifest: dict[str, Any] = {"format": FORMAT, "tensors": tensor_file.name}
    if sharded_folder is not None:
        _fsync_directory(sharded_folder)
        manifest |= {"format": SHARDED_FORMAT, "sharded": sharded_folder.name}
    temporary = directory / f".{MANIFEST}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(manifest | {"state": tree}, handle, separators=(",", ":"))
        handle.flush()
        os.fsync(handle.fileno())
    target = directory / MANIFEST
    os.replace(temporary, target)
    _fsync_directory(directory)
    for path in previous:  # only now is the previous checkpoint unreferenced
        _delete(path)
    return target


def _delete(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _read_manifest(directory: Path) -> dict[str, Any] | None:
    path = directory / MANIFEST
    if not path.exists():
        if (directory / LEGACY_CHECKPOINT).exists():
            raise CheckpointFormatError(
                f"{directory / LEGACY_CHECKPOINT} is a format-1 checkpoint (a torch.save pickle); this trainer "
                f"reads {READABLE} only. Resume it with the release that wrote it, or move it away to start "
                "afresh from the consumer group's committed offsets."
            )
        return None
    manifest = json.loads(path.read_text(encoding="utf-8"))
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found not in READABLE_FORMATS:
        raise CheckpointFormatError(f"{path} has checkpoint format {found!r}; this trainer reads {READABLE}")
    return manifest


def _referenced_files(directory: Path) -> list[Path]:
    """The tensor file and sharded folder the current checkpoint names."""
    manifest = _read_manifest(directory)  # a checkpoint of another format is left alone: this raises
    if manifest is None:
        return []
    return [directory / manifest[key] for key in ("tensors", "sharded") if key in manifest]


def remove_interrupted_writes(directory: Path) -> None:
    """Deletes what writes a crash interrupted: temporary manifests, tensor files and sharded folders no
    manifest names (the checkpoint before each is intact). Only the trainer, before it writes again, may
    call this: a reader would delete a write in progress. A checkpoint of another format is refused, not
    touched."""
    keep = _referenced_files(directory)
    for leftover in [*directory.glob(f".{MANIFEST}.*.tmp"), *directory.glob("tensors-*.safetensors"),
                     *directory.glob("sharded-*")]:
        if leftover not in keep:
            _delete(leftover)


def load_checkpoint(directory: Path, into: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """The state the last save_checkpoint wrote, or None when there is none; refuses other formats.

    A sharded checkpoint (format 3) is read by every rank together, into the tensors of into(): a state
    of the same shape (the trainer's own, e.g. {"learner": learner.state_dict()}), whose tensors, sharded
    or whole, each receive their part; the state returned holds those very tensors. Without into, its
    sharded tensors read as None (what tools reading the ranks' states need)."""
    manifest = _read_manifest(directory)
    if manifest is None:
        return None
    tensors = load_file(str(directory / manifest["tensors"]), device="cpu")
    sharded: dict[str, torch.Tensor] = {}
    if "sharded" in manifest:
        if into is None:
            return _decode(manifest["state"], tensors, collections.defaultdict(lambda: None))
        like = _Tensors("refer")
        _encode(into(), like, "")
        targets = like.plain | like.sharded
        wanted = _sharded_keys(manifest["state"])
        missing = sorted(wanted - targets.keys())
        if missing:
            raise CheckpointFormatError(f"{directory / MANIFEST} holds tensors this trainer has no place for, "
                                        f"e.g. {missing[0]}")
        sharded = {key: targets[key] for key in wanted}
        dcp.load(sharded, checkpoint_id=directory / manifest["sharded"])
    return _decode(manifest["state"], tensors, sharded)
