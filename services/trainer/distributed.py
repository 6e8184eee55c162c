"""torch.distributed for the trainer: ranks started by torchrun share the feedback partitions.

Every rank joins the feedback it consumed into pairs; the pairs are gathered so that all ranks hold
the same global list; each rank learns from its shard, and DistributedDataParallel averages the
gradients, so the models stay identical on every rank. One process without torchrun is world size 1,
and these helpers then do nothing.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

import torch.distributed as dist

T = TypeVar("T")


def init_from_environment(device: str) -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment, initialising the process group when world_size > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return int(os.environ.get("RANK", "0")), world_size


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather(value: T) -> list[T]:
    """Every rank's value, in rank order (just [value] without a process group)."""
    if not active():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
