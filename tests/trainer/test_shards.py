"""Minibatches every rank draws alike (Shards.shared_minibatches), padding-aware where items have lengths."""

from __future__ import annotations

import random

from modalign.trainer.distributed import LENGTH_GROUP, Shards


def padded_tokens(batches: list[list[int]]) -> int:
    """Tokens a batch of items (each its own length) takes once padded to its longest."""
    return sum(len(batch) * max(batch) for batch in batches)


def test_padding_aware_minibatches_hold_items_of_about_one_length_in_a_random_order() -> None:
    rng = random.Random(1)
    lengths = [rng.randint(4, 64) for _ in range(256)]
    plain = Shards(seed=0).shared_minibatches(lengths, 8)
    aware = Shards(seed=0).shared_minibatches(lengths, 8, length=lambda item: item)

    assert sorted(item for batch in aware for item in batch) == sorted(lengths)  # each item once
    assert [len(batch) for batch in aware] == [len(batch) for batch in plain]  # as many steps
    assert padded_tokens(aware) < 0.8 * padded_tokens(plain)
    # Sorted within groups of LENGTH_GROUP minibatches, not across the round: short and long minibatches mix.
    widths = [max(batch) for batch in aware]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)
    assert len(aware) > LENGTH_GROUP


def test_every_rank_takes_its_share_of_the_same_padding_aware_minibatches() -> None:
    items = list(range(96))
    width = {item: (item * 37) % 50 for item in items}
    ranks = [Shards(seed=3, rank=rank, world_size=2).shared_minibatches(items, 4, length=width.__getitem__)
             for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 96 // 8
    for mine, theirs in zip(*ranks):
        assert len(mine) == len(theirs) == 4 and not set(mine) & set(theirs)
    assert sorted(item for rank in ranks for batch in rank for item in batch) == items
