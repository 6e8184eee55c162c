"""torch.distributed for the trainer: ranks started by torchrun share the feedback partitions.

Every rank joins the feedback it consumed into pairs; the pairs are gathered so that all ranks hold
the same global list; each rank learns from its shard, and DistributedDataParallel averages the
gradients, so the models stay identical on every rank. One process without torchrun is world size 1,
and these helpers then do nothing.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
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


LENGTH_GROUP = 8
"""Minibatches whose items shared_minibatches sorts by length together: more saves more padding, fewer keeps
more of the shuffle's randomness in which items share a minibatch (transformers' LengthGroupedSampler takes 50)."""


class Shards:
    """How the ranks split the work of a round, and the random draws that go with it.

    Draws every rank makes alike (the order of the shared pairs) come from shared_rng; draws of this
    rank's own (the prompts and seeds of its samples, minibatch order) from rank_rng, which is
    re-derived from shared_rng at the start of each round, so shared_rng alone is checkpointed.
    """

    def __init__(self, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.rank, self.world_size = rank, world_size
        self.shared_rng = random.Random(seed)
        self.rank_rng = random.Random(f"{seed}-{rank}")

    def new_round(self) -> None:
        self.rank_rng.seed(f"{self.shared_rng.getrandbits(64)}-{self.rank}")

    def shard(self, items: list[T]) -> list[T]:
        """This rank's share of a list every rank holds alike."""
        return items[self.rank::self.world_size]

    def shared_minibatches(self, items: list[T], size: int, length: Callable[[T], int] | None = None) -> list[list[T]]:
        """Minibatches of `size` per rank from a list every rank holds alike, shuffled alike on every rank;
        each rank gets its shard of each, so all ranks take the same number of steps.

        With length (an item's padded width, in tokens), padding-aware: the shuffled items are taken
        LENGTH_GROUP minibatches at a time, each group sorted by length before it is cut, and the minibatches
        then shuffled, so that each holds items of about one length (a batch is as wide as its widest row)
        while which items share it, and the order of the minibatches, stay random."""
        order = list(range(len(items)))
        self.shared_rng.shuffle(order)
        step = size * self.world_size
        if length is None:
            batches = [order[start:start + step] for start in range(0, len(order), step)]
        else:
            group = step * LENGTH_GROUP
            by_length = [i for start in range(0, len(order), group)
                         for i in sorted(order[start:start + group], key=lambda i: length(items[i]))]
            batches = [by_length[start:start + step] for start in range(0, len(by_length), step)]
            self.shared_rng.shuffle(batches)
        return [self.shard([items[i] for i in batch]) for batch in batches]
