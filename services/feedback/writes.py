"""The feedback service's writes to its topic: one write at a time per feedback_id, kept going after its
caller stopped waiting, on a producer that is replaced when a write fails.

A client waits at most produce_timeout_s for its feedback to be stored, and Kafka may take longer: when a
broker dies, its partitions' leaders move, and a follower that stops answering holds back every
acks=all write of its partitions until the controller fences it (broker.session.timeout.ms, 9 s by
default). A write abandoned then may still be stored (the leader had appended it), and a retry that
wrote again would store it twice. So a write is not abandoned when its caller is answered UNAVAILABLE:
the producer keeps retrying it under its idempotent sequence number (so it is stored at most once) for
up to delivery_timeout_s, and a retry of the same feedback_id on this replica meanwhile waits for that
write instead of beginning another (PendingWrites.pending). Once it is acknowledged, the id is in the
ledger and the retry is answered as a duplicate; once it failed, the retry writes anew.

A failed write also retires its producer (modalign.core.kafka.DurableProducer): kafka-python's idempotent
producer does not always recover by itself from a write that expired after it was sent.

How many writes may be pending is bounded (capacity): each holds its caller's gRPC thread for up to
produce_timeout_s and ends within delivery_timeout_s, so the feedback service sizes it from those and
its thread count, and refuses a write past it as UNAVAILABLE, which no healthy replica ever does.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from kafka import KafkaProducer
from kafka.errors import KafkaError

from modalign.core.kafka import (
    PRODUCE_ERRORS,
    PRODUCE_SECONDS,
    BrokerUnavailable,
    DurableProducer,
    KafkaConfig,
    make_producer,
    type_headers,
)
from modalign.v1 import events_pb2

log = logging.getLogger(__name__)


class Write:
    """One write of a feedback event, begun and waited for."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None

    def wait(self, timeout_s: float) -> bool:
        """True when the broker acknowledged the write (acks=all) within timeout_s. Raises BrokerUnavailable
        when the write failed, or is still under way: then it may yet be stored."""
        if not self.done.wait(timeout_s):
            raise BrokerUnavailable(f"Kafka did not acknowledge the write in {timeout_s:.1f}s; it is still being retried")
        if self.error is not None:
            raise BrokerUnavailable(f"Kafka did not acknowledge the write: {self.error}") from self.error
        return True


class PendingWrites:
    """The writes to the feedback topic this replica has begun, by feedback_id until each ends (at most
    capacity at once), through one producer, replaced after a write fails."""

    def __init__(self, kafka: KafkaConfig, delivery_timeout_s: float, capacity: int,
                 on_stored: Callable[[str, str], None],
                 make: Callable[[KafkaConfig], KafkaProducer] = make_producer) -> None:
        # The producer gives up on a write after delivery_timeout_s, not after its callers' wait.
        self._topic = kafka.topic("feedback")
        self.capacity = capacity
        self._on_stored = on_stored
        self._lock = threading.Lock()
        self._pending: dict[str, Write] = {}
        self._producer = DurableProducer(dataclasses.replace(kafka, produce_timeout_s=delivery_timeout_s), make)

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    def pending(self, feedback_id: str) -> Write | None:
        """The write of feedback_id under way here, if any."""
        with self._lock:
            return self._pending.get(feedback_id)

    def begin(self, feedback_id: str, event: events_pb2.FeedbackReceived) -> Write:
        """Begins writing event under key feedback_id (the caller holds feedback_id's lock and has checked
        that no write of it is pending). On acknowledgement on_stored(feedback_id, digest) is called, from
        the producer's thread. Raises BrokerUnavailable when the write could not begin."""
        with self._lock:
            if len(self._pending) >= self.capacity:
                raise BrokerUnavailable(f"{len(self._pending)} writes to {self._topic} are still unresolved")
            write = Write()
            self._pending[feedback_id] = write
        started = time.perf_counter()
        try:
            producer = self._producer.current()
        except BrokerUnavailable as error:
            self._end(feedback_id, write, None, error, started)
            raise
        try:
            future = producer.send(self._topic, key=feedback_id.encode(), value=event.SerializeToString(),
                                   headers=type_headers(event))
        except KafkaError as error:
            self._end(feedback_id, write, producer, error, started)
            raise BrokerUnavailable(f"Kafka did not take the write to {self._topic}: {error}") from error
        future.add_callback(lambda _: self._end(feedback_id, write, producer, None, started, event.content_sha256))
        future.add_errback(lambda error: self._end(feedback_id, write, producer, error, started))
        return write

    def _end(self, feedback_id: str, write: Write, producer: KafkaProducer | None, error: BaseException | None,
             started: float, digest: str = "") -> None:
        if error is None:
            PRODUCE_SECONDS.labels(self._topic).observe(time.perf_counter() - started)
            self._on_stored(feedback_id, digest)
        else:
            PRODUCE_ERRORS.labels(self._topic, type(error).__name__).inc()
        with self._lock:
            if self._pending.get(feedback_id) is write:
                del self._pending[feedback_id]
        if error is not None and producer is not None:
            self._producer.failed(producer)
        write.error = error
        write.done.set()

    def close(self, timeout_s: float = 5.0) -> None:
        self._producer.close(timeout_s)
