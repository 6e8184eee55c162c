"""The feedback service's write path, without a broker: what it keeps per feedback id is bounded, a failed
write retires its producer, and catching up shares one end-offset lookup among concurrent callers.

The Kafka clients are stand-ins here; tests/test_durability_cluster.py runs the same code against a real
three-node cluster."""

from __future__ import annotations

import threading
import time

import pytest
from kafka import TopicPartition
from kafka.errors import KafkaTimeoutError
from kafka.future import Future

from modalign.core.kafka import BrokerUnavailable, KafkaConfig
from modalign.feedback.ledger import EndOffsets
from modalign.feedback.server import ID_LOCK_STRIPES, FeedbackConfig, StripedLocks
from modalign.feedback.writes import PendingWrites
from modalign.v1 import events_pb2

from tests.feedback.cases import valid_feedback


def test_submits_of_one_id_share_a_lock_from_a_pool_that_does_not_grow() -> None:
    locks = StripedLocks(64)
    ids = [f"fb-{i}" for i in range(100_000)]
    used = {id(locks.lock_for(feedback_id)) for feedback_id in ids}
    assert len(used) == len(locks) == 64  # every id is served, by 64 locks whatever the number of ids
    assert all(locks.lock_for(feedback_id) is locks.lock_for(feedback_id) for feedback_id in ids[:1000])
    assert ID_LOCK_STRIPES == len(StripedLocks(ID_LOCK_STRIPES))


class StandInProducer:
    """Takes sends and hands back futures for the test to resolve, as KafkaProducer's acknowledgements."""

    def __init__(self) -> None:
        self.sent: list[Future] = []
        self.closed = threading.Event()

    def send(self, topic: str, key: bytes, value: bytes, headers: list) -> Future:
        future = Future()
        self.sent.append(future)
        return future

    def close(self, timeout: float | None = None) -> None:
        self.closed.set()


def event(feedback_id: str) -> events_pb2.FeedbackReceived:
    return events_pb2.FeedbackReceived(feedback=valid_feedback("rating", feedback_id), content_sha256=f"digest-{feedback_id}")


@pytest.fixture
def producers() -> list[StandInProducer]:
    return []


@pytest.fixture
def stored() -> dict[str, str]:
    return {}


@pytest.fixture
def writes(producers: list[StandInProducer], stored: dict[str, str]) -> PendingWrites:
    def make(config: KafkaConfig) -> StandInProducer:
        assert config.produce_timeout_s == 30.0  # the producer's own delivery timeout, not the client's wait
        producers.append(StandInProducer())
        return producers[-1]

    return PendingWrites(KafkaConfig(produce_timeout_s=5.0), delivery_timeout_s=30.0, capacity=3,
                         on_stored=stored.__setitem__, make=make)  # type: ignore[arg-type]


def test_writes_under_way_are_bounded_and_each_ends_by_being_stored_or_failing(
    writes: PendingWrites, producers: list[StandInProducer], stored: dict[str, str],
) -> None:
    first, second, third = (writes.begin(f"fb-{i}", event(f"fb-{i}")) for i in range(3))
    with pytest.raises(BrokerUnavailable, match="3 writes .* still unresolved"):
        writes.begin("fb-3", event("fb-3"))
    assert writes.pending("fb-0") is first and len(writes) == 3

    with pytest.raises(BrokerUnavailable, match="still being retried"):
        first.wait(0.01)  # the caller is answered UNAVAILABLE; the write goes on
    producers[0].sent[0].success(None)
    assert first.wait(0.01) and stored == {"fb-0": "digest-fb-0"}  # in the ledger before the write ends
    assert writes.pending("fb-0") is None and len(writes) == 2
    writes.begin("fb-3", event("fb-3"))  # room again
    assert len(producers) == 1


def test_a_failed_write_retires_its_producer_and_the_next_write_gets_a_new_one(
    writes: PendingWrites, producers: list[StandInProducer], stored: dict[str, str],
) -> None:
    failing, going_on, failing_later = (writes.begin(f"fb-{i}", event(f"fb-{i}")) for i in (0, 1, 5))
    producers[0].sent[0].failure(KafkaTimeoutError("Expiring 1 record(s)"))
    with pytest.raises(BrokerUnavailable, match="Expiring"):
        failing.wait(0.01)
    assert writes.pending("fb-0") is None

    writes.begin("fb-2", event("fb-2"))
    assert len(producers) == 2 and len(producers[1].sent) == 1
    assert producers[0].closed.wait(5)  # retired: closed as soon as its writes under way end
    # The retired producer's writes under way still end, and count.
    producers[0].sent[1].success(None)
    assert going_on.wait(0.01) and "fb-1" in stored
    # A failure of one of them does not retire the new producer.
    producers[0].sent[2].failure(KafkaTimeoutError("Expiring 1 record(s)"))
    with pytest.raises(BrokerUnavailable):
        failing_later.wait(0.01)
    writes.begin("fb-3", event("fb-3"))
    assert len(producers) == 2


def test_the_default_bound_on_writes_under_way_follows_from_the_threads_and_timeouts() -> None:
    config = FeedbackConfig()
    # 32 threads, each able to begin one write per 5 s wait, every write over within 30 s.
    assert config.max_pending_writes == 32 * (30 // 5 + 1)


class SlowConsumer:
    """end_offsets takes until the test lets it finish; counts its lookups, which must never overlap."""

    def __init__(self) -> None:
        self.lookups = 0
        self.running = False
        self.finish = threading.Event()
        self.started = threading.Event()

    def end_offsets(self, partitions: list[TopicPartition], timeout_ms: int) -> dict[TopicPartition, int]:
        assert not self.running, "two lookups at once on one consumer"
        self.running = True
        self.lookups += 1
        number = self.lookups
        self.started.set()
        self.finish.wait(10)
        self.running = False
        return {tp: number for tp in partitions}

    def close(self) -> None:
        pass


def test_callers_during_a_lookup_share_the_next_one_which_begins_after_their_call() -> None:
    consumer = SlowConsumer()
    partitions = [TopicPartition("t", 0)]
    offsets = EndOffsets(lambda: consumer, partitions)  # type: ignore[arg-type, return-value]
    results: dict[str, int] = {}

    def call(name: str) -> None:
        results[name] = offsets.get(timeout_s=10)[partitions[0]]

    first = threading.Thread(target=call, args=("first",))
    first.start()
    assert consumer.started.wait(5)
    waiting = [threading.Thread(target=call, args=(f"caller-{i}",)) for i in range(10)]
    for thread in waiting:
        thread.start()
    time.sleep(0.3)  # they are waiting now: the first lookup began before their calls
    consumer.finish.set()
    for thread in [first, *waiting]:
        thread.join(10)
    assert results.pop("first") == 1
    assert len(results) == 10 and min(results.values()) >= 2  # a lookup that began after each call
    assert consumer.lookups <= 3  # shared: not one per caller


def test_a_failed_lookup_is_a_timeout_for_every_caller_sharing_it() -> None:
    class Unreachable:
        def end_offsets(self, partitions, timeout_ms):
            raise KafkaTimeoutError("Failed to get offsets by timestamps")

        def close(self) -> None:
            pass

    offsets = EndOffsets(Unreachable, [TopicPartition("t", 0)])  # type: ignore[arg-type]
    with pytest.raises(TimeoutError, match="could not read the end offsets of t"):
        offsets.get(timeout_s=1)
