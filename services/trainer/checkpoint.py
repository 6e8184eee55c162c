"""One atomic file per training round: everything needed to resume exactly where the round ended.

The trainer writes it before it commits Kafka offsets. After a crash it resumes from the checkpoint's
own positions, not the group's committed offsets, so a round is either entirely in the checkpoint
(and never consumed again) or entirely absent (and consumed again from the same positions).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(directory: Path, state: dict[str, Any]) -> Path:
    """Writes state to directory/checkpoint.pt through a temporary file, fsync and rename."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / CHECKPOINT
    temporary = directory / f".{CHECKPOINT}.{os.getpid()}.tmp"
    with open(temporary, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, target)
    descriptor = os.open(directory, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    return target


def remove_interrupted_writes(directory: Path) -> None:
    """Deletes temporary files of writes a crash interrupted (the checkpoint before each is intact).
    Only the trainer, before it writes again, may call this: a reader would delete a write in progress."""
    for leftover in directory.glob(f".{CHECKPOINT}.*.tmp"):
        leftover.unlink()


def load_checkpoint(directory: Path) -> dict[str, Any] | None:
    path = directory / CHECKPOINT
    if not path.exists():
        return None
    # Our own file, holding protobuf events and optimiser state beside tensors: not weights-only.
    return torch.load(path, map_location="cpu", weights_only=False)
