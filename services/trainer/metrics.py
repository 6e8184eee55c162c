"""A round's metrics: values recorded per minibatch (a history), reported as their means."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable

History = defaultdict[str, list[float]]


def new_history() -> History:
    return defaultdict(list)


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def summarise(history: dict[str, list[float]]) -> dict[str, float]:
    """The mean of each metric recorded over an update's minibatches."""
    return {name: mean(values) for name, values in history.items() if values}
