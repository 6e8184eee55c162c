"""How much one user's feedback may weigh. Pure logic, no I/O.

Authentication ties feedback to its author and rate limits bound how fast one author can give it, but
an author within the rate limit can still give far more than anyone else: a thousand five-star ratings
would decide a canary analysis alone, and a training round would learn mostly that user's taste. So the
canary analysis (over a rollout's ratings and preferences) and the trainer (over each round's feedback,
before it becomes pairs) keep, of each user's items, only the first ones up to that user's cap, and
count what they leave out.

A user's cap is the largest of three bounds, so that a setup with few users is not starved and a
flood is still cut down to the size of an ordinary user's share:

- `max_share`: the user's kept items may make up this share of everything kept;
- `median_multiple`: this many times what the median other user kept;
- `min_items`: this many, whatever the others did.

With a single user there is nobody to protect, and nothing is capped. Every user's cap depends on what
the others keep, so the caps are solved together: starting from the raw counts, each user's kept count
is recomputed from the others' until nothing changes (the counts only fall, so this ends).
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from modalign.core.config import ConfigError

Item = TypeVar("Item")


@dataclass(frozen=True)
class UserCap:
    """How much of a window's feedback (a rollout's evidence, a training round's pairs) one user may give."""

    max_share: float = 0.1
    """A user may keep up to this share of all the items kept in a window; 1 turns the cap off."""
    median_multiple: float = 4.0
    """A user may also keep up to this many times what the median other user keeps, if that is more."""
    min_items: int = 8
    """A user may always keep at least this many items."""

    def validate(self) -> None:
        if not 0 < self.max_share <= 1:
            raise ConfigError("max_share", f"must be in (0, 1], not {self.max_share}")
        if self.median_multiple < 0:
            raise ConfigError("median_multiple", f"must not be negative, not {self.median_multiple}")
        if self.min_items < 0:
            raise ConfigError("min_items", f"must not be negative, not {self.min_items}")

    def limit(self, others_total: int, others_median: float | None) -> float:
        """The most one user may keep, given the total and the median of what the other users keep
        (None: there are no other users)."""
        if others_median is None or self.max_share >= 1:
            return math.inf
        by_share = self.max_share / (1 - self.max_share) * others_total
        return max(self.min_items, by_share, self.median_multiple * others_median)


def kept_counts(counts: dict[str, int], cap: UserCap) -> dict[str, int]:
    """How many items each user keeps, out of counts given."""
    kept, changed = dict(counts), True
    while changed:  # a pass that changes anything lowers a count and raises none, so this ends
        ordered, total = sorted(kept.values()), sum(kept.values())
        new = {user: int(min(given, cap.limit(total - kept[user], _median_without(ordered, kept[user]))))
               for user, given in counts.items()}
        changed, kept = new != kept, new
    return kept


def _median_without(ordered: list[int], value: int) -> float | None:
    """The median of ordered (sorted) with one occurrence of value taken out; None if nothing is left."""
    rest = len(ordered) - 1
    if rest == 0:
        return None
    removed = bisect.bisect_left(ordered, value)

    def at(index: int) -> int:
        return ordered[index if index < removed else index + 1]

    return at(rest // 2) if rest % 2 else (at(rest // 2 - 1) + at(rest // 2)) / 2


def capped(items: Sequence[Item], user_of: Callable[[Item], str], cap: UserCap) -> tuple[list[Item], Counter[str]]:
    """items in their order, each user's beyond their cap left out; and how many each user had left out."""
    return keep_first(items, user_of, kept_counts(Counter(user_of(item) for item in items), cap))


def keep_first(items: Sequence[Item], user_of: Callable[[Item], str],
               allowed: dict[str, int]) -> tuple[list[Item], Counter[str]]:
    """items in their order, but no more of each user's than allowed; and how many each had left out."""
    kept, seen, dropped = [], Counter[str](), Counter[str]()
    for item in items:
        user = user_of(item)
        seen[user] += 1
        if seen[user] <= allowed.get(user, 0):
            kept.append(item)
        else:
            dropped[user] += 1
    return kept, dropped
