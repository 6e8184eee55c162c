"""Freshness from the topics (modalign.demo.freshness): a pure function on hand-built events."""

from __future__ import annotations

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from modalign.demo.freshness import FeedbackRecord, freshness
from modalign.v1 import events_pb2

FEEDBACK_TOPIC = "demo-test.feedback"


def at(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def feedback(partition: int, offset: int, received: float) -> FeedbackRecord:
    return partition, offset, events_pb2.FeedbackReceived(received_at=at(received))


def version(name: str, **through: int) -> events_pb2.PolicyVersionPublished:
    """A published version trained through the feedback partitions p0=..., p1=...; the generations topic's
    positions are set far ahead, as a check that they are not taken for the feedback topic's."""
    positions = [events_pb2.PartitionOffset(topic=FEEDBACK_TOPIC, partition=int(p[1:]), offset=o) for p, o in through.items()]
    positions += [events_pb2.PartitionOffset(topic="demo-test.generations", partition=p, offset=999) for p in (0, 1)]
    return events_pb2.PolicyVersionPublished(version=name, trained_through=positions)


def generation(policy_version: str, created: float) -> events_pb2.GenerationLogged:
    return events_pb2.GenerationLogged(response_id=f"{policy_version}@{created}", policy_version=policy_version,
                                       created_at=at(created))


RECORDS = [feedback(0, 0, 10.4), feedback(0, 1, 20), feedback(0, 2, 30), feedback(1, 0, 15), feedback(1, 1, 40)]
# v1 covers p0's first two records and none of p1's; v2 covers every record but p1's last, and never served;
# v3 covers what v2 does and served at 200.
PUBLISHED = [version("v1", p0=2, p1=0), version("v2", p0=3, p1=1), version("v3", p0=3, p1=1)]
GENERATIONS = [generation("v0", 5), generation("v1", 150), generation("v1", 100), generation("v3", 200),
               generation("v3", 260)]


def test_each_feedback_waits_for_the_first_serving_version_that_covers_it() -> None:
    measured = freshness(RECORDS, PUBLISHED, GENERATIONS, FEEDBACK_TOPIC)
    # p0@0 and p0@1: v1, first served at 100; p0@2 and p1@0: v2 never served, so v3 at 200; p1@1: nothing.
    waits = sorted([100 - 10.4, 100 - 20, 200 - 30, 200 - 15])
    assert (measured.measured, measured.left_out) == (4, 1)
    assert measured.median == pytest.approx((waits[1] + waits[2]) / 2)
    assert measured.p90 == pytest.approx(waits[2] + 0.7 * (waits[3] - waits[2]))  # rank 0.9 x 3 = 2.7


def test_a_later_version_that_served_first_ends_the_wait() -> None:
    # v3 went out before v1 did (v1 waited behind another canary): feedback v1 covers was served at v3's time.
    measured = freshness(RECORDS[:1], PUBLISHED, [generation("v1", 300), generation("v3", 200)], FEEDBACK_TOPIC)
    assert (measured.median, measured.measured, measured.left_out) == (189.6, 1, 0)


def test_without_a_served_version_every_feedback_is_left_out() -> None:
    measured = freshness(RECORDS, PUBLISHED, [generation("v0", 5)], FEEDBACK_TOPIC)
    assert (measured.median, measured.p90, measured.measured, measured.left_out) == (None, None, 0, 5)
    assert freshness([], PUBLISHED, GENERATIONS, FEEDBACK_TOPIC).left_out == 0


def test_feedback_the_trainer_passed_over_is_counted_apart_never_measured() -> None:
    # v3 names p0's offsets 1 and 2 as passed over (older than --max-feedback-age-s when read): no version
    # learned them, so they have no freshness, however soon a version covered their offsets.
    passed = events_pb2.PolicyVersionPublished()
    passed.CopyFrom(PUBLISHED[2])
    passed.passed_over.add(topic=FEEDBACK_TOPIC, partition=0, start=1, end=3)
    passed.passed_over.add(topic="demo-test.generations", partition=1, start=0, end=1)  # another topic's: ignored
    measured = freshness(RECORDS, [*PUBLISHED[:2], passed], GENERATIONS, FEEDBACK_TOPIC)
    assert (measured.measured, measured.left_out, measured.passed_over) == (2, 1, 2)
    assert measured.median == pytest.approx(((100 - 10.4) + (200 - 15)) / 2)
