"""Freshness: how long after a user's feedback a policy version trained on it serves canary traffic.

Read from the topics alone, so it needs no clock of its own:
- a feedback record's time is its received_at (the feedback service's clock when it accepted it);
- a published version was trained through trained_through, the trainer's consumer positions (the next
  offset to read, per partition): a feedback record at (partition, offset) went into every version whose
  position for that partition is past its offset;
- a version serves from the created_at of the first generation the policy service logged with it.

A record's freshness is the time from its received_at to the first generation of the earliest-serving
version that covers it. Records that no serving version covers (feedback after the last version, or covered
only by versions that never served) are left out and counted; so are records the trainer passed over
without training on them (a version's passed_over ranges: --max-feedback-age-s), which no version learned.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from modalign.v1 import events_pb2

FeedbackRecord = tuple[int, int, events_pb2.FeedbackReceived]
"""A feedback record as read from its topic: (partition, offset, message)."""


@dataclass(frozen=True)
class Freshness:
    """Seconds from feedback to a version trained on it serving, to a tenth; None for both figures when none was
    measured."""

    median: float | None
    p90: float | None
    measured: int
    """Feedback records some serving version covers."""
    left_out: int
    """Feedback records no serving version covers."""
    passed_over: int = 0
    """Feedback records the trainer read past without training on them."""


def first_served(generations: Iterable[events_pb2.GenerationLogged]) -> dict[str, float]:
    """Per policy version, the Unix time of its earliest generation."""
    first: dict[str, float] = {}
    for generation in generations:
        at = generation.created_at.ToNanoseconds() / 1e9
        if at < first.get(generation.policy_version, float("inf")):
            first[generation.policy_version] = at
    return first


def covered_through(version: events_pb2.PolicyVersionPublished, feedback_topic: str) -> dict[int, int]:
    """Per feedback partition, the next offset the version's trainer was to read: every record before it went
    into the version, but those it passed over. trained_through holds the generations topic's positions too,
    hence the topic filter. A distributed trainer publishes rank 0's positions, which name only rank 0's feedback partitions: the
    others' records would count as left out (the demo's trainer is one process)."""
    return {p.partition: p.offset for p in version.trained_through if p.topic == feedback_topic}


def freshness(feedback: Sequence[FeedbackRecord], published: Sequence[events_pb2.PolicyVersionPublished],
              generations: Iterable[events_pb2.GenerationLogged], feedback_topic: str) -> Freshness:
    """The freshness of every feedback record (module docstring); feedback_topic is the feedback topic's full
    name (with its prefix), as trained_through names it."""
    skipped = {(r.partition, offset) for v in published for r in v.passed_over if r.topic == feedback_topic
               for offset in range(r.start, r.end)}
    feedback = [record for record in feedback if record[:2] not in skipped]
    served = first_served(generations)
    # Only versions that served can end a record's wait. The earliest serving among those that cover a
    # record is taken rather than the first published: a version the controller skipped never served, and the
    # positions only grow, so a later version covers the record too.
    serving = [(served[v.version], covered_through(v, feedback_topic)) for v in published if v.version in served]
    seconds = []
    for partition, offset, record in feedback:
        covering = [at for at, through in serving if through.get(partition, 0) > offset]
        if covering:
            seconds.append(min(covering) - record.received_at.ToNanoseconds() / 1e9)
    if not seconds:
        return Freshness(None, None, 0, len(feedback), len(skipped))
    # To a tenth of a second: the clocks of two services (feedback's, policy's) are compared.
    return Freshness(round(float(np.median(seconds)), 1), round(float(np.percentile(seconds, 90)), 1), len(seconds),
                     len(feedback) - len(seconds), len(skipped))

